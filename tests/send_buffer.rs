//! The kernel's send buffer capped (`FLUX_SEND_BUFFER_BYTES`), on real loopback sockets: a
//! reader that reads nothing can hide only kilobytes in the kernel before the server sees its
//! backlog, not megabytes; a reader that reads, but slower
//! than its channel, is evicted within seconds instead of falling minutes behind unseen, while a
//! fast one on the same channel loses nothing. The TLS port's case is in tls.rs.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{masked_text, raw_websocket, read_close_code_after, Client};
use flux::config::Config;
use flux::gateway::Gateway;
use serde_json::json;

const CHANNEL: &str = "flood";
/// The kernel send buffer these nodes give each connection (Linux holds twice it).
const SEND_BUFFER: u32 = 16 * 1024;
/// The most the kernel may take for a reader that reads nothing, with that buffer: the server's
/// 32 KiB, the client's receive queue (about 128 KiB by default on Linux) and room to spare.
/// With the kernel's autotuning a loopback socket alone takes megabytes.
const HIDDEN_BOUND: u64 = 1 << 20;

fn node(evict_after_ms: u64) -> Gateway {
    common::start(&Config { send_buffer_bytes: SEND_BUFFER, evict_after_ms, ..common::config() })
}

/// A raw WebSocket subscribed to the channel, that reads nothing unless told to.
fn raw_subscriber(addr: SocketAddr) -> TcpStream {
    let mut stream = raw_websocket(addr);
    let subscribe = json!({"event": "pusher:subscribe", "data": {"channel": CHANNEL}}).to_string();
    stream.write_all(&masked_text(subscribe.as_bytes())).unwrap();
    thread::sleep(Duration::from_millis(200));
    stream
}

fn publish(addr: SocketAddr, event: &str, data: &str) {
    let (status, body) = common::publish(addr, &[CHANNEL], event, data, None);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_stalled_reader_hides_kilobytes_in_the_kernel_not_megabytes() {
    // Not evicted while it is looked at (its eviction is backpressure.rs's subject).
    let node = node(60_000);
    let addr = node.local_addr();
    let stalled = raw_subscriber(addr);

    // 1.2 MB, more than its ring holds (256 frames) and the kernel would take with the cap.
    let peer = stalled.local_addr().unwrap();
    let (hidden, seen) = common::bytes_the_kernel_took(&node, peer, 300, 4096, |data| publish(addr, "flood", data));
    assert!(hidden < HIDDEN_BOUND, "the kernel took {hidden} bytes for a reader that reads nothing: {seen:?}");
    assert!(seen.backpressured_ms.is_some(), "the rest waits in its ring, backpressured: {seen:?}");
}

#[test]
fn a_reader_slower_than_its_channel_is_evicted_within_seconds_and_a_fast_one_is_not() {
    // 16 KiB/s of reading against 160 KB/s of events: it falls 9 s further behind every second.
    const READ_CHUNK: usize = 4096;
    const READ_EVERY: Duration = Duration::from_millis(250);
    let node = node(1000);
    let addr = node.local_addr();

    let mut fast = Client::connect(addr);
    fast.subscribe(CHANNEL);
    let fast = thread::spawn(move || common::flood_until_done(|| fast.next_event()));
    let slow = raw_subscriber(addr);
    let slow_peer = slow.local_addr().unwrap().to_string();
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let reading = reading.clone();
        thread::spawn(move || {
            let (mut slow, mut read) = (slow, Vec::new());
            let mut chunk = [0u8; READ_CHUNK];
            while reading.load(Ordering::Relaxed) {
                thread::sleep(READ_EVERY);
                let n = slow.read(&mut chunk).expect("the slow reader reads");
                read.extend_from_slice(&chunk[..n]);
            }
            (slow, read)
        })
    };

    let filler = "x".repeat(8000);
    let started = Instant::now();
    let mut published = 0u64;
    while node.observer().counters().evictions == 0 && started.elapsed() < Duration::from_secs(20) {
        publish(addr, "flood", &format!("{published:08}{filler}"));
        published += 1;
        thread::sleep(Duration::from_millis(50));
    }
    let waited = started.elapsed();
    reading.store(false, Ordering::Relaxed);
    // What the kernel hides for it (the server's 32 KiB and its own receive queue: seconds of
    // its reading) fills within about a second, then 1 s of backpressure. With the kernel's
    // autotuning that takes half a minute to fill.
    assert!(waited < Duration::from_secs(10), "the slow reader was not evicted within {waited:?}");
    let logged = node.observer().evictions();
    assert_eq!(logged.len(), 1, "only the slow reader is evicted: {logged:?}");
    assert_eq!(logged[0].peer, slow_peer);

    publish(addr, "done", "{}");
    let seen = fast.join().expect("fast subscriber thread");
    assert_eq!(seen.len() as u64, published, "the fast subscriber missed events");
    assert!(seen.iter().enumerate().all(|(i, &seq)| i as u64 == seq), "events out of order");
    let (mut slow, read) = reader.join().expect("slow reader thread");
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_close_code_after(&mut slow, read), 4100, "what was in flight, then the 4100 close");
}
