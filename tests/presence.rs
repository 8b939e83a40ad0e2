//! Presence announcements on real sockets: once a change's coalescing window has passed, its
//! member event waits up to one more window for other traffic to the member, so it costs no
//! write of its own when a message follows, and it still arrives alone when none does. Each
//! member event gets its own wait: an earlier one's deadline, met by a write, does not cut it.

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::poll_event;
use common::Client;
use flux::config::Config;
use serde_json::Value;

const CHANNEL: &str = "presence-deferral";
/// Long enough that the checks below sit well inside a window even on a busy machine.
const WINDOW: Duration = Duration::from_secs(2);

/// Subscribes `client` to the presence channel as `user_id`.
fn join(client: &mut Client, user_id: &str) -> Value {
    common::join_presence(client, CHANNEL, user_id)
}

/// The user a member event is about.
fn member_of(event: &Value) -> String {
    let data: Value = serde_json::from_str(event["data"].as_str().expect("data is a string")).expect("data is JSON");
    data["user_id"].as_str().expect("user_id").to_owned()
}

/// Publishes a message to the channel and checks it takes `user`'s waiting member_added along,
/// ahead of itself.
fn publish_carries_member_added(addr: SocketAddr, member: &mut Client, user: &str) {
    let (status, body) = common::publish(addr, &[CHANNEL], "hello", "{}", None);
    assert_eq!(status, 200, "{body}");
    let first = member.next_event();
    assert_eq!(first["event"], "pusher_internal:member_added", "{first}");
    assert_eq!(member_of(&first), user);
    assert_eq!(member.next_event()["event"], "hello");
}

/// Sleeps until `at` after `start`, and checks the test thread was not descheduled past `by`.
fn sleep_until(start: Instant, at: Duration, by: Duration) {
    thread::sleep(at.saturating_sub(start.elapsed()));
    assert!(start.elapsed() < by, "the test thread was descheduled past {by:?}");
}

#[test]
fn a_member_event_rides_with_the_next_message_or_goes_alone_by_its_deadline() {
    let config = Config { presence_coalesce_ms: WINDOW.as_millis() as u64, workers: Some(1), ..common::config() };
    let node = common::start(&config);
    let addr = node.local_addr();

    let mut ann = Client::connect(addr);
    join(&mut ann, "ann");
    // Ann's own join is announced (to nobody) one window later; Bob joins after that batch, so
    // his member_added is announced one window after his join (at 1 x WINDOW below), and Carol's,
    // who joins a quarter window later, in the next batch a window after that (at 2 x WINDOW).
    // The quarter window keeps her out of Bob's batch even when the worker wakes for it late:
    // joining right after him, she shared it once in CI, on a busy machine.
    thread::sleep(WINDOW + Duration::from_millis(200));
    let mut bob = Client::connect(addr);
    join(&mut bob, "bob");
    let start = Instant::now();
    thread::sleep(WINDOW / 4);
    let mut carol = Client::connect(addr);
    join(&mut carol, "carol");

    // Bob's member_added, announced at 1 x WINDOW, may then wait until 2 x WINDOW: at 1.5 x
    // nothing has been written to Ann.
    sleep_until(start, WINDOW * 3 / 2, WINDOW * 2);
    assert_eq!(poll_event(&mut ann, Duration::from_millis(100)), None, "member_added waits for other traffic");

    // A message to the channel takes the waiting member_added with it, ahead of itself.
    publish_carries_member_added(addr, &mut ann, "bob");

    // Carol's member_added, announced at 2 x WINDOW just as Bob's deadline (already met by the
    // message) passes, gets a deadline of its own: at 2.5 x WINDOW it still waits.
    sleep_until(start, WINDOW * 5 / 2, WINDOW * 3);
    assert_eq!(poll_event(&mut ann, Duration::from_millis(100)), None, "a deadline met by a write does not hurry the next event");
    publish_carries_member_added(addr, &mut ann, "carol");

    // With no other traffic, member_removed goes out alone once its deadline passes.
    drop(bob);
    let removed = ann.next_event();
    assert_eq!(removed["event"], "pusher_internal:member_removed", "{removed}");
    assert_eq!(member_of(&removed), "bob");
    drop(carol);
}

/// A member that stops reading has its ring filled by the events of another channel; the next
/// presence changes find no room. Losing them would leave that member a wrong roster for good, so
/// it is sent the whole roster again (a second `subscription_succeeded`, which pusher-js takes as
/// its new member list) behind what its ring holds, and it is not evicted for it. A member that
/// reads sees every change as usual.
#[test]
fn a_member_whose_ring_has_no_room_for_presence_changes_gets_the_whole_roster_again() {
    const ROOM: &str = "presence-slow-member";
    const FLOODED: &str = "flooded";
    const JOINERS: usize = 20;
    let config = Config {
        ring_slots: 16,
        // Far beyond the test: the slow member is never evicted while it does not read.
        evict_after_ms: 600_000,
        presence_coalesce_ms: 50,
        workers: Some(2),
        ..common::config()
    };
    let node = common::start(&config);
    let addr = node.local_addr();

    let mut watcher = Client::connect(addr);
    common::join_presence(&mut watcher, ROOM, "watcher");
    let mut slow = Client::connect(addr);
    common::join_presence(&mut slow, ROOM, "slow");
    slow.subscribe(FLOODED);
    let slow_peer = slow.ws.get_ref().local_addr().expect("local address").to_string();
    let watching = thread::spawn(move || {
        let mut added = Vec::new();
        while added.len() < JOINERS {
            let event = watcher.next_event();
            if event["event"] == "pusher_internal:member_added" && member_of(&event) != "slow" {
                added.push(member_of(&event));
            }
        }
        // The watcher stays a member till the end: returned, not dropped.
        (added, watcher)
    });

    // The slow member stops reading: flood its other channel until its kernel buffers and its
    // ring are full.
    let filler = "x".repeat(9000);
    let flooded = common::wait_until(Duration::from_secs(60), || {
        for _ in 0..20 {
            let (status, body) = common::publish(addr, &[FLOODED], "flood", &filler, None);
            assert_eq!(status, 200, "{body}");
        }
        let connections = node.observer().connections(Duration::from_secs(1));
        connections.iter().any(|c| c.peer == slow_peer && c.ring_len == c.ring_slots)
    });
    assert!(flooded, "the slow member's ring filled up");

    let mut joiners: Vec<Client> = (0..JOINERS).map(|_| Client::connect(addr)).collect();
    for (i, joiner) in joiners.iter_mut().enumerate() {
        common::join_presence(joiner, ROOM, &format!("joiner-{i}"));
    }
    let mut expected: Vec<String> = (0..JOINERS).map(|i| format!("joiner-{i}")).collect();
    expected.sort();
    let (mut added, _watcher) = watching.join().expect("watcher thread");
    added.sort();
    assert_eq!(added, expected, "the reading member saw every change");
    assert!(common::wait_until(Duration::from_secs(20), || node.observer().counters().presence_resyncs > 0), "a resync was sent");

    // The slow member reads again and keeps its member list as pusher-js does (a
    // subscription_succeeded replaces it, member events change it): it comes to list everyone.
    expected.extend(["slow".to_owned(), "watcher".to_owned()]);
    expected.sort();
    let mut members: Vec<String> = Vec::new();
    let mut resyncs = 0;
    while members != expected {
        let event = slow.next_event();
        if event["channel"] != ROOM {
            continue;
        }
        match event["event"].as_str() {
            Some("pusher_internal:subscription_succeeded") => {
                resyncs += 1;
                let data: Value = serde_json::from_str(event["data"].as_str().expect("data is a string")).expect("JSON");
                let ids = data["presence"]["ids"].as_array().expect("ids").iter();
                members = ids.map(|id| id.as_str().expect("id").to_owned()).collect();
                assert_eq!(data["presence"]["count"], members.len());
            }
            Some("pusher_internal:member_added") => members.push(member_of(&event)),
            Some("pusher_internal:member_removed") => members.retain(|m| *m != member_of(&event)),
            _ => {}
        }
        members.sort();
        members.dedup();
    }
    assert!(resyncs > 0, "the roster was sent again");
    assert_eq!(node.observer().counters().evictions, 0, "nobody was evicted");
}
