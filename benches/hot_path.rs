//! The fan-out hot path, piece by piece: ring push and pop, broadcast enqueue per recipient,
//! frame encoding, frame-pool checkout and return, and what counting a heap allocation adds to
//! it. Run: `cargo bench --bench hot_path`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::IoSlice;
use std::time::Instant;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::json;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use flux::fanout::pool::FramePool;
use flux::fanout::ring::{Offer, Outbound};
use flux::heap::CountingAllocator;
use flux::ws::{data_frame, text_frame};

/// A typical chat event's frame.
fn event_frame(pool: &FramePool) -> Bytes {
    text_frame(pool, r#"{"event":"message","channel":"guild-chat","data":"{\"user\":\"ada\",\"text\":\"hello, world\"}"}"#)
}

/// One frame into a ring and out again, as a socket write of it completes.
fn ring_push_pop(c: &mut Criterion) {
    let pool = FramePool::default();
    let frame = event_frame(&pool);
    let mut ring = Outbound::new(256);
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(1));
    group.bench_function("push and pop one frame", |b| {
        b.iter(|| {
            assert_eq!(ring.offer(black_box(&frame)), Offer::Queued);
            let mut slices = [IoSlice::new(&[]); 4];
            let filled = ring.write_slices(&mut slices);
            let len: usize = slices[..filled].iter().map(|s| s.len()).sum();
            black_box(ring.advance(len));
        })
    });
    group.finish();
}

/// One framed broadcast handed to every recipient's ring: a reference-count increment and a
/// ring slot each. Reported per recipient.
fn broadcast_enqueue(c: &mut Criterion) {
    let pool = FramePool::default();
    let frame = event_frame(&pool);
    let mut group = c.benchmark_group("broadcast enqueue");
    for recipients in [1_000usize, 10_000] {
        let mut rings: Vec<Outbound> = (0..recipients).map(|_| Outbound::new(256)).collect();
        group.throughput(Throughput::Elements(recipients as u64));
        group.bench_function(format!("{recipients} recipients"), |b| {
            b.iter_custom(|iterations| {
                let mut spent = std::time::Duration::ZERO;
                for _ in 0..iterations {
                    let began = Instant::now();
                    for ring in &mut rings {
                        black_box(ring.offer(&frame));
                    }
                    spent += began.elapsed();
                    // Drain outside the timed part, as the socket writes would.
                    for ring in &mut rings {
                        let len = frame.len();
                        ring.advance(len);
                    }
                }
                spent
            })
        });
    }
    group.finish();
}

/// Serializing a Pusher event with serde_json straight into a pooled buffer and framing it.
fn frame_encoding(c: &mut Criterion) {
    let pool = FramePool::default();
    let mut group = c.benchmark_group("frame encoding");
    for size in [100usize, 4096] {
        let data = "x".repeat(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("event with {size}-byte data"), |b| {
            b.iter(|| {
                let message = json!({"event": "message", "channel": "guild-chat", "data": &data});
                let frame = data_frame(&pool, OpCode::Data(Data::Text), |buf| Ok(serde_json::to_writer(buf, &message)?)).unwrap();
                black_box(frame)
            })
        });
    }
    group.finish();
}

/// Taking a buffer from the pool and giving it back when its last handle drops.
fn pool_checkout_return(c: &mut Criterion) {
    let pool = FramePool::default();
    drop(pool.checkout()); // One idle buffer to reuse.
    c.bench_function("pool checkout and return", |b| {
        b.iter_batched(|| (), |()| drop(black_box(pool.checkout().freeze())), BatchSize::SmallInput)
    });
}

/// A 64-byte allocation and its free, from the system allocator and through the gateway's
/// counting wrapper (called directly: this bench's global allocator stays the system's).
fn counted_allocation(c: &mut Criterion) {
    fn alloc_free(allocator: &impl GlobalAlloc) {
        let layout = Layout::from_size_align(64, 8).expect("a valid layout");
        // SAFETY: a non-zero-sized layout, freed with the same allocator and layout.
        unsafe {
            let ptr = allocator.alloc(layout);
            assert!(!ptr.is_null());
            allocator.dealloc(black_box(ptr), layout);
        }
    }
    let mut group = c.benchmark_group("heap");
    group.throughput(Throughput::Elements(1));
    group.bench_function("system allocation and free", |b| b.iter(|| alloc_free(&System)));
    group.bench_function("counted allocation and free", |b| b.iter(|| alloc_free(&CountingAllocator)));
    group.finish();
}

criterion_group!(benches, ring_push_pop, broadcast_enqueue, frame_encoding, pool_checkout_return, counted_allocation);
criterion_main!(benches);
