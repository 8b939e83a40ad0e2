//! Issue 16's allocation budget, held: a steady stream of REST publishes to a channel with
//! subscribers on both workers costs the whole gateway fewer than 16 heap allocations and under
//! 1,000 bytes of heap per published event (1 MB/s at fanout-1k's 1,000 events a second),
//! counted with the gateway's own counting allocator through a real gateway, its two workers and
//! loopback sockets. Counts, not times: the test is as strict on a slow machine as on a fast one.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{masked_text, raw_websocket};
use flux::config::Config;
use flux::gateway::Gateway;
use flux::heap::{self, CountingAllocator};
use flux::pusher::signature::sign_query;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// The budget per published event (issue 16).
const MAX_ALLOCATIONS_PER_EVENT: f64 = 16.0;
const MAX_BYTES_PER_EVENT: f64 = 1_000.0;

const SUBSCRIBERS: usize = 200;
const WARM_UP: usize = 100;
const MEASURED: usize = 300;

/// A signed `POST /apps/app-id/events` as a server SDK sends it (the headers of flux-load's
/// HTTP client), 100 bytes of data, built before any measurement.
fn publish_request(addr: SocketAddr, n: usize) -> Vec<u8> {
    let data = format!("{n:06} {}", "x".repeat(93));
    let body = format!(r#"{{"name":"load","channels":["budget"],"data":"{data}"}}"#);
    let query = sign_query(&common::app(), "POST", "/apps/app-id/events", body.as_bytes(), &[], common::unix_now());
    format!(
        "POST /apps/app-id/events?{query} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ureq/3.0\r\nAccept: */*\r\n\
         Content-Type: application/json\r\nAccept-Encoding: gzip\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends one publish and reads its whole answer into `buf`, allocating nothing.
fn publish(publisher: &mut TcpStream, request: &[u8], buf: &mut [u8]) {
    publisher.write_all(request).expect("the publish is sent");
    let mut read = 0;
    while !buf[..read].ends_with(b"\r\n\r\n{}") {
        let n = publisher.read(&mut buf[read..]).expect("the answer is read");
        assert!(n > 0, "the gateway closed the publisher's connection");
        read += n;
    }
    assert!(buf.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..read]));
}

/// Ring slots: a ring's initial size. A ring grows towards its bound the first times its
/// connection's queue gets deeper (a busy machine delays a worker), once per connection and
/// bounded; held at its initial size here, what is counted is what every publish costs.
const RING_SLOTS: u32 = 8;

#[test]
fn steady_rest_publishing_stays_within_the_allocation_budget() {
    let config = Config { workers: Some(2), ring_slots: RING_SLOTS, ..common::config() };
    let node = Gateway::start(&config, false).expect("gateway starts");
    let addr = node.local_addr();
    let subscribe = masked_text(br#"{"event":"pusher:subscribe","data":{"channel":"budget"}}"#);
    let mut subscribers: Vec<TcpStream> = (0..SUBSCRIBERS)
        .map(|_| {
            let mut socket = raw_websocket(addr);
            socket.write_all(&subscribe).expect("subscribe");
            socket
        })
        .collect();
    assert!(common::wait_until(Duration::from_secs(10), || node.observer().counters().websockets == SUBSCRIBERS as u64));
    std::thread::sleep(Duration::from_millis(300)); // Every subscription confirmed, on both workers.
    for socket in &subscribers {
        socket.set_nonblocking(true).expect("nonblocking");
    }
    let requests: Vec<Vec<u8>> = (0..WARM_UP + MEASURED).map(|n| publish_request(addr, n)).collect();
    let mut publisher = TcpStream::connect(addr).expect("the publisher connects");
    let (mut answer, mut scratch) = (vec![0u8; 4096], vec![0u8; 1 << 16]);

    // The first publishes warm the rings, the pool, the buffers and the scratch space up.
    for request in &requests[..WARM_UP] {
        publish(&mut publisher, request, &mut answer);
        common::drain(&mut subscribers, &mut scratch);
    }
    // Offered to every ring: queued, or dropped on a full one.
    let offered = || {
        let counters = node.observer().counters();
        counters.deliveries + counters.drops
    };
    let offered_before = offered();
    let before = heap::totals();
    for request in &requests[WARM_UP..] {
        publish(&mut publisher, request, &mut answer);
        common::drain(&mut subscribers, &mut scratch);
    }
    // Every ring on both workers was offered its frame (the other worker's are asynchronous).
    let deadline = Instant::now() + Duration::from_secs(10);
    while offered() < offered_before + (MEASURED * SUBSCRIBERS) as u64 {
        assert!(Instant::now() < deadline, "the events did not reach every ring");
        std::thread::sleep(Duration::from_millis(1));
    }
    let after = heap::totals();
    node.stop();
    node.join();

    let allocations = (after.allocations - before.allocations) as f64 / MEASURED as f64;
    let bytes = (after.bytes - before.bytes) as f64 / MEASURED as f64;
    println!("per published event ({SUBSCRIBERS} subscribers on 2 workers): {allocations:.2} allocations, {bytes:.0} bytes");
    assert!(allocations < MAX_ALLOCATIONS_PER_EVENT, "{allocations:.2} allocations per event, budget {MAX_ALLOCATIONS_PER_EVENT}");
    assert!(bytes < MAX_BYTES_PER_EVENT, "{bytes:.0} bytes per event, budget {MAX_BYTES_PER_EVENT}");
}
