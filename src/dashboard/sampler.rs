//! The sampler: a thread that reads the node's counters once a second and keeps the last five
//! minutes of per-second rates, so the dashboard's numbers and charts are computed once on the
//! server, the same for every browser, and a page opened late still gets full charts.
//!
//! It reads only atomic counters through the [`Observer`]; it never talks to a worker.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::Serialize;

use crate::fanout::pool::PoolStats;
use crate::gateway::Observer;
use crate::heap::HeapCounts;
use crate::metrics::Counters;

/// Time between two samples.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Samples kept: five minutes at one a second.
pub const HISTORY_LEN: usize = 300;

/// The node's counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// When they were read.
    pub at: Instant,
    /// The counters, all workers added up.
    pub counters: Counters,
    /// The frame pool's counters.
    pub pool: PoolStats,
    /// The process's heap allocations, if they are counted.
    pub heap: Option<HeapCounts>,
}

impl Reading {
    /// Reads the node now.
    pub fn take(observer: &Observer) -> Reading {
        Reading { at: Instant::now(), counters: observer.counters(), pool: observer.pool_stats(), heap: observer.heap() }
    }
}

/// One interval between two readings: rates per second, gauges at its end, ratios over it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// End of the interval, in seconds since the Unix epoch (a chart's x value).
    pub t: f64,
    /// WebSocket messages received per second.
    pub messages_in: f64,
    /// Frames written to clients per second.
    pub messages_out: f64,
    /// Bytes read per second.
    pub bytes_in: f64,
    /// Bytes written per second.
    pub bytes_out: f64,
    /// Broadcasts fanned out per second.
    pub broadcasts: f64,
    /// Frames queued into rings by broadcasts per second.
    pub deliveries: f64,
    /// Connections entering backpressure per second.
    pub backpressure_events: f64,
    /// Frames dropped on full rings per second.
    pub drops: f64,
    /// Slow consumers evicted per second.
    pub evictions: f64,
    /// TCP connections open at the end of the interval.
    pub connections: u64,
    /// WebSocket sessions open at the end of the interval.
    pub websockets: u64,
    /// Share of flushes in the interval that wrote everything at once, in percent.
    pub write_success_rate: f64,
    /// Share of frame-buffer checkouts in the interval served by the pool, in percent.
    pub pool_hit_rate: f64,
    /// Heap allocations per second by the whole process (absent when they are not counted).
    pub heap_allocations: Option<f64>,
    /// Bytes of heap those allocations asked for, per second.
    pub heap_bytes: Option<f64>,
}

impl Sample {
    /// The interval from `earlier` to `later`, which ended at `t` (Unix seconds).
    pub fn between(earlier: &Reading, later: &Reading, t: f64) -> Sample {
        let seconds = later.at.saturating_duration_since(earlier.at).as_secs_f64().max(f64::EPSILON);
        let (a, b) = (&earlier.counters, &later.counters);
        let rate = |count: fn(&Counters) -> u64| count(b).saturating_sub(count(a)) as f64 / seconds;
        let writes = Counters {
            writes_immediate: b.writes_immediate.saturating_sub(a.writes_immediate),
            writes_would_block: b.writes_would_block.saturating_sub(a.writes_would_block),
            ..Counters::default()
        };
        let checkouts = PoolStats {
            hits: later.pool.hits.saturating_sub(earlier.pool.hits),
            misses: later.pool.misses.saturating_sub(earlier.pool.misses),
            idle: later.pool.idle,
        };
        let heap = earlier.heap.zip(later.heap);
        let heap_rate = |count: fn(&HeapCounts) -> u64| heap.map(|(a, b)| count(&b).saturating_sub(count(&a)) as f64 / seconds);
        Sample {
            t,
            messages_in: rate(|c| c.messages_in),
            messages_out: rate(|c| c.messages_out),
            bytes_in: rate(|c| c.bytes_in),
            bytes_out: rate(|c| c.bytes_out),
            broadcasts: rate(|c| c.broadcasts),
            deliveries: rate(|c| c.deliveries),
            backpressure_events: rate(|c| c.backpressure_events),
            drops: rate(|c| c.drops),
            evictions: rate(|c| c.evictions),
            connections: b.connections,
            websockets: b.websockets,
            write_success_rate: writes.write_success_rate(),
            pool_hit_rate: checkouts.hit_rate(),
            heap_allocations: heap_rate(|h| h.allocations),
            heap_bytes: heap_rate(|h| h.bytes),
        }
    }
}

/// The last [`HISTORY_LEN`] samples, shared by the sampler and the HTTP threads.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    fn push(&self, sample: Sample) {
        // Samples are plain values: one written before a panic elsewhere is still good.
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() == HISTORY_LEN {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The newest sample, once a first interval has passed.
    pub fn latest(&self) -> Option<Sample> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner).back().copied()
    }

    /// Every sample kept, oldest first.
    pub fn all(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect()
    }
}

/// Starts the sampler thread. It stops when `stop`'s sender is dropped (or sends).
pub fn spawn(observer: Observer, history: Arc<History>, stop: Receiver<()>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("flux-dashboard-sampler".into()).spawn(move || {
        let mut previous = Reading::take(&observer);
        let mut next = previous.at + SAMPLE_INTERVAL;
        loop {
            // The stop channel doubles as the clock, so stopping never waits out an interval.
            match stop.recv_deadline(next) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            let reading = Reading::take(&observer);
            history.push(Sample::between(&previous, &reading, crate::clock::since_unix_epoch().as_secs_f64()));
            previous = reading;
            // Ticks stay on a one-second grid; after a stall (a suspended machine) start afresh
            // rather than sampling in a burst to catch up.
            next += SAMPLE_INTERVAL;
            if next <= reading.at {
                next = reading.at + SAMPLE_INTERVAL;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_and_ratios_cover_only_the_interval() {
        let at = Instant::now();
        let earlier = Reading {
            at,
            counters: Counters { messages_out: 100, writes_immediate: 1000, writes_would_block: 0, ..Counters::default() },
            pool: PoolStats { hits: 0, misses: 10, idle: 0 },
            heap: Some(HeapCounts { allocations: 1_000, bytes: 50_000 }),
        };
        let later = Reading {
            at: at + Duration::from_secs(2),
            counters: Counters { messages_out: 300, writes_immediate: 1009, writes_would_block: 1, websockets: 7, ..Counters::default() },
            pool: PoolStats { hits: 30, misses: 10, idle: 4 },
            heap: Some(HeapCounts { allocations: 1_600, bytes: 90_000 }),
        };
        let sample = Sample::between(&earlier, &later, 1.0);
        assert_eq!(sample.messages_out, 100.0);
        assert_eq!(sample.write_success_rate, 90.0);
        assert_eq!(sample.pool_hit_rate, 100.0);
        assert_eq!(sample.websockets, 7);
        assert_eq!((sample.heap_allocations, sample.heap_bytes), (Some(300.0), Some(20_000.0)));
        let uncounted = Reading { heap: None, ..later };
        assert_eq!(Sample::between(&earlier, &uncounted, 1.0).heap_allocations, None, "not counted is not zero");
    }

    #[test]
    fn history_keeps_five_minutes() {
        let history = History::default();
        let at = Instant::now();
        let reading = Reading { at, counters: Counters::default(), pool: PoolStats::default(), heap: None };
        for t in 0..HISTORY_LEN + 10 {
            history.push(Sample::between(&reading, &reading, t as f64));
        }
        let all = history.all();
        assert_eq!(all.len(), HISTORY_LEN);
        assert_eq!(all[0].t, 10.0);
        assert_eq!(history.latest().map(|s| s.t), Some((HISTORY_LEN + 9) as f64));
    }
}
