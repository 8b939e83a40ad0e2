//! Presence announcements on real sockets: once a change's coalescing window has passed, its
//! member event waits up to one more window for other traffic to the member, so it costs no
//! write of its own when a message follows, and it still arrives alone when none does.

mod common;

use std::io::ErrorKind;
use std::thread;
use std::time::{Duration, Instant};

use common::Client;
use flux::config::Config;
use flux::pusher::signature::channel_auth;
use serde_json::{json, Value};
use tungstenite::Message;

const CHANNEL: &str = "presence-deferral";
/// Long enough that the checks below sit well inside a window even on a busy machine.
const WINDOW: Duration = Duration::from_secs(2);

/// Subscribes `client` to the presence channel as `user_id`, signed as an auth endpoint would.
fn join(client: &mut Client, user_id: &str) -> Value {
    let channel_data = json!({"user_id": user_id, "user_info": {"name": user_id}}).to_string();
    let auth = channel_auth(&common::app(), &client.socket_id, CHANNEL, Some(&channel_data));
    client.send(json!({"event": "pusher:subscribe", "data": {"channel": CHANNEL, "auth": auth, "channel_data": channel_data}}));
    let reply = client.next_event();
    assert_eq!(reply["event"], "pusher_internal:subscription_succeeded", "{reply}");
    reply
}

/// The next text message if one arrives within `within`.
fn poll_event(client: &mut Client, within: Duration) -> Option<Value> {
    client.ws.get_mut().set_read_timeout(Some(within)).expect("read timeout");
    let read = client.ws.read();
    client.ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    match read {
        Ok(Message::Text(text)) => Some(serde_json::from_str(&text).expect("server sends JSON")),
        Ok(other) => panic!("unexpected message {other:?}"),
        Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("read failed: {e}"),
    }
}

#[test]
fn a_member_event_rides_with_the_next_message_or_goes_alone_by_its_deadline() {
    let config = Config { presence_coalesce_ms: WINDOW.as_millis() as u64, workers: Some(1), ..common::config() };
    let node = common::start(&config);
    let addr = node.local_addr();

    let mut ann = Client::connect(addr);
    join(&mut ann, "ann");
    // Ann's own join is announced (to nobody) one window later; Bob joins after that batch, so
    // his member_added is announced a window after his join.
    thread::sleep(WINDOW + Duration::from_millis(200));
    let mut bob = Client::connect(addr);
    join(&mut bob, "bob");
    let bob_joined = Instant::now();

    // Announced at bob_joined + WINDOW, it may then wait until + 2 x WINDOW: at + 1.5 x WINDOW
    // nothing has been written to Ann.
    thread::sleep(WINDOW * 3 / 2 - bob_joined.elapsed().min(WINDOW));
    assert!(bob_joined.elapsed() < WINDOW * 2, "the test thread was descheduled past the deadline");
    assert_eq!(poll_event(&mut ann, Duration::from_millis(100)), None, "member_added waits for other traffic");

    // A message to the channel takes the waiting member_added with it, ahead of itself.
    let (status, body) = common::publish(addr, &[CHANNEL], "hello", "{}", None);
    assert_eq!(status, 200, "{body}");
    let first = ann.next_event();
    assert_eq!(first["event"], "pusher_internal:member_added", "{first}");
    assert_eq!(serde_json::from_str::<Value>(first["data"].as_str().unwrap()).unwrap()["user_id"], "bob");
    assert_eq!(ann.next_event()["event"], "hello");

    // With no other traffic, member_removed goes out alone once its deadline passes.
    drop(bob);
    let removed = ann.next_event();
    assert_eq!(removed["event"], "pusher_internal:member_removed", "{removed}");
    assert_eq!(serde_json::from_str::<Value>(removed["data"].as_str().unwrap()).unwrap()["user_id"], "bob");
}
