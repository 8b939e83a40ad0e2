//! A mass disconnect of connections that each hold many distinct channels: the vacated
//! channels' occupancy must reach the other worker without overflowing its inbox, and nobody
//! else may notice: a healthy subscriber loses no broadcast, new clients still connect, and the
//! node's channel list settles to what is really occupied.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{masked_text, Client};
use serde_json::json;

/// Connections that leave together, and the distinct channels each holds (the most one
/// connection may subscribe to). With two workers each vacates about 80,000 channels at once:
/// more than a worker's inbox holds, had each channel been a message of its own.
const LEAVING: usize = 160;
const CHANNELS_EACH: usize = 1000;

/// Events published to the healthy subscriber while the others leave.
const EVENTS: usize = 300;

/// `count` clients, each subscribed to `CHANNELS_EACH` channels `{prefix}-{client}-{k}` of its
/// own, asked for in one write as pusher-js does; returns once every subscription is confirmed.
fn clients_on_channels(addr: SocketAddr, count: usize, prefix: &str) -> Vec<Client> {
    let mut clients: Vec<Client> = (0..count)
        .map(|c| {
            let mut client = Client::connect(addr);
            let mut burst = Vec::new();
            for k in 0..CHANNELS_EACH {
                let subscribe = json!({"event": "pusher:subscribe", "data": {"channel": format!("{prefix}-{c}-{k}")}});
                burst.extend(masked_text(subscribe.to_string().as_bytes()));
            }
            client.ws.get_mut().write_all(&burst).expect("send the subscriptions");
            client
        })
        .collect();
    for client in &mut clients {
        for _ in 0..CHANNELS_EACH {
            assert_eq!(client.next_event()["event"], "pusher_internal:subscription_succeeded");
        }
    }
    clients
}

#[test]
fn vacating_many_channels_at_once_costs_no_broadcast_no_connection_and_no_inbox_overflow() {
    let node = common::start(&common::config());
    let addr = node.local_addr();
    let mut healthy = Client::connect(addr);
    healthy.subscribe("healthy");

    let leaving = clients_on_channels(addr, LEAVING, "vacate");
    let occupied = || common::rest(addr, "GET", "/apps/app-id/channels", "", &[]).1["channels"].as_object().map_or(0, |c| c.len());
    assert!(
        common::wait_until(Duration::from_secs(30), || occupied() == LEAVING * CHANNELS_EACH + 1),
        "every subscription is known node-wide before the storm ({} channels)",
        occupied()
    );

    // New clients keep connecting throughout.
    let probing = Arc::new(AtomicBool::new(true));
    let prober = std::thread::spawn({
        let probing = probing.clone();
        move || {
            let mut connected = 0;
            while probing.load(Ordering::Relaxed) {
                let mut probe = Client::connect(addr); // Panics, failing the test, if refused.
                probe.subscribe("probe");
                connected += 1;
            }
            connected
        }
    });
    // Events go out while everyone else leaves at once.
    let publisher = std::thread::spawn(move || {
        for seq in 0..EVENTS {
            let (status, body) = common::publish(addr, &["healthy"], "tick", &seq.to_string(), None);
            assert_eq!(status, 200, "publish {seq}: {body}");
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    drop(leaving);

    publisher.join().expect("every publish was accepted");
    for seq in 0..EVENTS {
        let event = healthy.next_event();
        assert_eq!((event["event"].as_str(), event["data"].as_str()), (Some("tick"), Some(seq.to_string().as_str())), "event {seq}");
    }
    assert!(
        common::wait_until(Duration::from_secs(60), || occupied() <= 2),
        "the vacated channels leave the channel list ({} left)",
        occupied()
    );
    probing.store(false, Ordering::Relaxed);
    let probes = prober.join().expect("every new client connected");
    assert!(probes > 0);
    let counters = node.observer().counters();
    assert_eq!(counters.inbox_overflows, 0, "no message between workers was lost");
}

/// Closed connections' subscriptions are removed a slice per turn, so their keys stay in the
/// channel registry for a while. A new connection that is given one of those keys (the worker's
/// slab hands out the last freed key first) must start with none of those subscriptions.
#[test]
fn a_new_connection_on_a_closed_ones_key_gets_none_of_its_channels() {
    let node = common::start(&flux::config::Config { workers: Some(1), ..common::config() });
    let addr = node.local_addr();
    let mut leaving = clients_on_channels(addr, 50, "old");
    leaving.iter_mut().for_each(|client| client.ws.get_mut().shutdown(std::net::Shutdown::Both).expect("close"));
    drop(leaving);

    // Connects while tens of thousands of subscriptions are still being removed.
    let mut newcomer = Client::connect(addr);
    let last_channels: Vec<String> = (0..50).map(|c| format!("old-{c}-{}", CHANNELS_EACH - 1)).collect();
    let channels: Vec<&str> = last_channels.iter().map(String::as_str).collect();
    let (status, body) = common::publish(addr, &channels, "stray", "{}", None);
    assert_eq!(status, 200, "{body}");
    newcomer.subscribe("mine");
    common::publish(addr, &["mine"], "first", "{}", None);
    assert_eq!(newcomer.next_event()["event"], "first", "nothing meant for the closed connections arrived");
}
