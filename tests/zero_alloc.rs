//! The fan-out allocates nothing per recipient: with a counting global allocator, one
//! broadcast to 1,000 subscribers costs the gateway the same allocations as one to 100 (the
//! REST request, the event's one frame, and nothing per ring). Measured end to end through a
//! real gateway, its workers and loopback sockets.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{masked_text, raw_websocket};
use flux::config::Config;
use flux::gateway::Gateway;
use flux::pusher::signature::sign_query;

/// Counts every allocation and reallocation in the process, on every thread.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A signed `POST /apps/app-id/events` as raw bytes, built before any measurement.
fn publish_request(channel: &str, n: u32) -> Vec<u8> {
    let body = format!(r#"{{"name":"tick","channels":["{channel}"],"data":"event {n:06}"}}"#);
    let query = sign_query(&common::app(), "POST", "/apps/app-id/events", body.as_bytes(), &[], common::unix_now());
    format!(
        "POST /apps/app-id/events?{query} HTTP/1.1\r\nHost: flux\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Allocations the whole process makes for one broadcast to `recipients` subscribers: the
/// least over several broadcasts, so an unrelated timer's allocation cannot count.
fn allocations_per_broadcast(recipients: usize) -> u64 {
    let node = Gateway::start(&Config { workers: Some(1), ..common::config() }, false).expect("gateway starts");
    let addr: SocketAddr = node.local_addr();
    let subscribe = masked_text(br#"{"event":"pusher:subscribe","data":{"channel":"fanout"}}"#);
    let mut subscribers: Vec<TcpStream> = (0..recipients)
        .map(|_| {
            let mut socket = raw_websocket(addr);
            socket.write_all(&subscribe).unwrap();
            socket
        })
        .collect();
    assert!(common::wait_until(Duration::from_secs(10), || node.observer().counters().websockets == recipients as u64));
    std::thread::sleep(Duration::from_millis(200)); // Let every subscription be confirmed.
    for socket in &subscribers {
        socket.set_nonblocking(true).unwrap();
    }
    let mut publisher = TcpStream::connect(addr).unwrap();
    let mut buf = vec![0u8; 1 << 16];

    let mut least = u64::MAX;
    for n in 0..30 {
        let request = publish_request("fanout", n);
        common::drain(&mut subscribers, &mut buf);
        let delivered_before = node.observer().counters().deliveries;

        let before = ALLOCATIONS.load(Ordering::Relaxed);
        publisher.write_all(&request).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.observer().counters().deliveries < delivered_before + recipients as u64 {
            assert!(Instant::now() < deadline, "the broadcast did not reach every ring");
            std::thread::sleep(Duration::from_millis(1));
        }
        let during = ALLOCATIONS.load(Ordering::Relaxed) - before;

        let read = publisher.read(&mut buf).unwrap();
        assert!(buf[..read].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..read]));
        // The first broadcasts warm the rings, the pool and the buffers up.
        if n >= 10 {
            least = least.min(during);
        }
    }
    node.stop();
    node.join();
    least
}

#[test]
fn a_broadcast_allocates_nothing_per_recipient() {
    let small = allocations_per_broadcast(100);
    let large = allocations_per_broadcast(1_000);
    println!("allocations per broadcast: {small} for 100 recipients, {large} for 1,000");
    // 900 more recipients: any per-recipient allocation would add hundreds.
    assert!(large <= small + 5, "{small} allocations for 100 recipients but {large} for 1,000");
    assert!(small < 200, "one broadcast should cost a handful of allocations, not {small}");
}
