//! The per-node health and limits on the main port, over loopback: `GET /up` and `GET /ready`,
//! `FLUX_MAX_CONNECTIONS` (4004 past it, readiness 503 at it, and room again once clients
//! leave), and `FLUX_MAX_CHANNELS_PER_CONNECTION` against a client that asks for 100,000
//! channels. The drain of a shutdown, which needs a signal, is in `lifecycle.rs`.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use common::{close_code, next_event, open, Client};
use flux::config::Config;
use serde_json::{json, Value};

fn up(addr: SocketAddr) -> (u16, Value) {
    common::get(&format!("http://{addr}/up"))
}

fn ready(addr: SocketAddr) -> (u16, Value) {
    common::get(&format!("http://{addr}/ready"))
}

#[test]
fn up_and_ready_answer_200_while_the_node_serves() {
    let node = common::start(&common::config());
    assert_eq!(up(node.local_addr()), (200, json!({"health": "OK"})));
    assert_eq!(ready(node.local_addr()), (200, json!({"ready": true})));
    // No cap is set: many clients change nothing.
    let _clients: Vec<Client> = (0..20).map(|_| Client::connect(node.local_addr())).collect();
    assert_eq!(ready(node.local_addr()).0, 200);
}

/// A client past the limit is refused the Pusher way: the error, then the close, both 4004.
fn assert_refused_over_quota(addr: SocketAddr) {
    let mut ws = open(addr, "/app/app-key?protocol=7");
    let error = next_event(&mut ws);
    assert_eq!(error["event"], "pusher:error", "{error}");
    assert_eq!(error["data"]["code"], 4004, "{error}");
    assert!(error["data"]["message"].as_str().is_some_and(|m| m.starts_with("Over connection quota")), "{error}");
    assert_eq!(close_code(&mut ws), Some(4004));
}

#[test]
fn past_the_connection_limit_clients_get_4004_and_ready_is_503_until_clients_leave() {
    const MAX: u64 = 3;
    let node = common::start(&Config { max_connections: Some(MAX), ..common::config() });
    let addr = node.local_addr();
    // Round after round, so a count that kept refused or departed clients would show.
    for round in 0..3 {
        let clients: Vec<Client> = (0..MAX).map(|_| Client::connect(addr)).collect();
        let (status, body) = ready(addr);
        assert_eq!(status, 503, "round {round}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("connection limit")), "{body}");
        assert_eq!(up(addr), (200, json!({"health": "OK"})), "a full node is still up");
        for _ in 0..10 {
            assert_refused_over_quota(addr);
        }
        assert_eq!(node.observer().counters().websockets, MAX, "refused clients are not counted");
        drop(clients);
        assert!(common::wait_until(Duration::from_secs(5), || ready(addr).0 == 200), "round {round}: ready once clients left");
        assert_eq!(node.observer().counters().websockets, 0);
    }
    // Room again: a new client is admitted and served.
    let mut newcomer = Client::connect(addr);
    newcomer.subscribe("room");
}

/// One connection asks for 100,000 channels in one burst: it holds its limit, each other
/// request is refused with a subscription error, and the node holds no more channels than
/// the limit for it.
#[test]
fn a_connection_asking_for_100000_channels_holds_its_limit_and_is_refused_the_rest() {
    const LIMIT: usize = 50;
    const ASKED: usize = 100_000;
    let node = common::start(&Config { max_channels_per_connection: LIMIT as u32, ..common::config() });
    let mut client = Client::connect(node.local_addr());
    // Written from a thread of its own: the node reads a connection's requests only while
    // their answers have room, so the answers must be read meanwhile.
    let mut writer = client.ws.get_ref().try_clone().expect("clone the socket");
    let asking = std::thread::spawn(move || {
        for chunk in (0..ASKED).collect::<Vec<_>>().chunks(1000) {
            let mut burst = Vec::new();
            for i in chunk {
                let request = json!({"event": "pusher:subscribe", "data": {"channel": format!("many-{i}")}});
                burst.extend(common::masked_text(request.to_string().as_bytes()));
            }
            writer.write_all(&burst).expect("write the requests");
        }
    });
    for i in 0..ASKED {
        let reply = client.next_event();
        assert_eq!(reply["channel"], format!("many-{i}"), "answers come in request order");
        if i < LIMIT {
            assert_eq!(reply["event"], "pusher_internal:subscription_succeeded", "{reply}");
        } else {
            assert_eq!(reply["event"], "pusher:subscription_error", "{reply}");
            assert_eq!((reply["data"]["type"].as_str(), reply["data"]["status"].as_u64()), (Some("LimitReached"), Some(400)), "{reply}");
        }
    }
    asking.join().expect("the writer finished");
    let (status, channels) = common::rest(node.local_addr(), "GET", "/apps/app-id/channels", "", &[]);
    assert_eq!(status, 200);
    assert_eq!(channels["channels"].as_object().map(|c| c.len()), Some(LIMIT), "only the limit is held");
    // The connection is still served.
    client.send(json!({"event": "pusher:ping", "data": {}}));
    assert_eq!(client.next_event()["event"], "pusher:pong");
}
