//! Per-worker metrics, written by their worker without locks and read from any thread.
//!
//! Each counter has one writer (its worker, or for refused connections the acceptor), so a relaxed atomic add is all the hot path pays;
//! per-recipient work is counted once per broadcast, never once per recipient. Readers take a
//! [`Counters`] snapshot and add the workers' snapshots together. Latency histograms (fan-out
//! time, and in a cluster the time from a publish on another node to its delivery here) are
//! recorded by the worker in a private [`LatencyRecorder`] and merged into the shared one about
//! once a second, so their lock is never taken on the hot path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Declares a struct of live atomic counters (`$cells`) and its point-in-time copy (`$copy`),
/// with `snapshot()` to read one into the other and `+` to add copies. Used here for the
/// workers' counters and by [`crate::webhooks`] for its own.
macro_rules! counters {
    (
        $(#[$cells_doc:meta])* $cells:ident,
        $(#[$copy_doc:meta])* $copy:ident { $($(#[$doc:meta])* $name:ident),* $(,)? }
    ) => {
        $(#[$cells_doc])*
        #[derive(Debug, Default)]
        pub struct $cells {
            $($(#[$doc])* pub $name: std::sync::atomic::AtomicU64,)*
        }

        $(#[$copy_doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        pub struct $copy {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl $cells {
            /// Reads every counter.
            pub fn snapshot(&self) -> $copy {
                $copy { $($name: self.$name.load(std::sync::atomic::Ordering::Relaxed),)* }
            }
        }

        impl std::ops::Add for $copy {
            type Output = $copy;
            fn add(self, other: $copy) -> $copy {
                $copy { $($name: self.$name + other.$name,)* }
            }
        }
    };
}
pub(crate) use counters;

counters! {
    /// A worker's live counters.
    CounterCells,
    /// A point-in-time copy of counters (one worker's, or a sum).
    Counters {
        /// TCP connections open now (a gauge).
        connections,
        /// WebSocket sessions open now (a gauge).
        websockets,
        /// TCP connections accepted since start.
        connections_total,
        /// WebSocket messages received.
        messages_in,
        /// Frames fully written to clients (WebSocket frames and HTTP responses).
        messages_out,
        /// Bytes read from clients.
        bytes_in,
        /// Bytes written to clients.
        bytes_out,
        /// HTTP requests handled (REST calls and upgrades).
        http_requests,
        /// Broadcasts fanned out by this worker (one per channel per event).
        broadcasts,
        /// Frames queued into rings by broadcasts.
        deliveries,
        /// Times a connection entered backpressure.
        backpressure_events,
        /// Frames dropped because a ring was full.
        drops,
        /// Slow consumers evicted.
        evictions,
        /// Presence members sent their channel's whole roster again because their ring had no
        /// room for a change.
        presence_resyncs,
        /// Flushes that wrote everything queued at once.
        writes_immediate,
        /// Flushes that stopped at WouldBlock.
        writes_would_block,
        /// Times a connection's read budget for one loop turn ran out (a flooding client).
        read_budget_exhausted,
        /// Messages for another worker that found its inbox full and waited in this worker's
        /// backlog for it instead.
        inbox_full,
        /// Messages for another worker lost because its inbox and this worker's backlog for it
        /// were both full.
        inbox_overflows,
        /// Subscriptions to cache channels answered with the channel's last event.
        cache_hits,
        /// Subscriptions to cache channels that found no event kept (`pusher:cache_miss`).
        cache_misses,
        /// Cache channels' last events dropped before their TTL to stay within the node's
        /// budget (counted by worker 0: every worker keeps the same events).
        cache_evictions,
        /// Subscription-count events framed: one per channel per announcement (each then
        /// delivered to every subscriber of the channel on the node).
        subscription_count_events,
        /// TLS handshakes completed.
        tls_handshakes,
        /// TLS connections closed for input that is not TLS (plaintext, garbage) or breaks it.
        tls_refused,
        /// TLS handshakes that did not finish within the request timeout.
        tls_timed_out,
        /// Connections accepted that are not yet an open WebSocket (request being read, TLS
        /// handshake under way, keep-alive HTTP), a gauge.
        handshakes_pending,
        /// Connections refused at accept because the node held FLUX_MAX_PENDING_HANDSHAKES
        /// (counted by the acceptor, in counters of its own).
        handshakes_refused_node,
        /// Connections refused at accept because their source address held
        /// FLUX_MAX_PENDING_HANDSHAKES_PER_IP (counted by the acceptor).
        handshakes_refused_per_ip,
    }
}

impl Counters {
    /// Share of flushes that completed without WouldBlock, in percent (100 when idle).
    pub fn write_success_rate(&self) -> f64 {
        success_rate(self.writes_immediate, self.writes_would_block)
    }
}

/// `good` as a share of `good + bad`, in percent; 100 when both are 0 (nothing went wrong).
pub fn success_rate(good: u64, bad: u64) -> f64 {
    let total = good.saturating_add(bad);
    if total == 0 {
        100.0
    } else {
        100.0 * good as f64 / total as f64
    }
}

/// Fan-out times are recorded in microseconds, from 1 µs to 60 s.
const FANOUT_MAX_MICROS: u64 = 60_000_000;

/// One worker's metrics.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    /// The counters.
    pub counters: CounterCells,
    /// Time from a publish to its frame in the last ring of this worker.
    pub fanout: SharedHistogram,
    /// Time from a publish on another node of the cluster to its frame in the last ring of this
    /// worker (Redis included; the nodes' clocks are assumed in sync).
    pub remote_delivery: SharedHistogram,
}

/// A latency histogram in microseconds that one worker merges into and any thread reads.
#[derive(Debug)]
pub struct SharedHistogram(Mutex<Histogram<u64>>);

impl Default for SharedHistogram {
    fn default() -> Self {
        SharedHistogram(Mutex::new(new_histogram()))
    }
}

impl SharedHistogram {
    /// Merges a worker-local histogram into this one and clears it.
    pub fn merge(&self, local: &mut LatencyRecorder) {
        if local.histogram.is_empty() {
            return;
        }
        if let Ok(mut shared) = self.0.lock() {
            // Both histograms have the same bounds, so adding cannot fail.
            let _ = shared.add(&local.histogram);
        }
        local.histogram.reset();
    }

    /// A copy, for percentiles.
    pub fn snapshot(&self) -> Histogram<u64> {
        self.0.lock().map(|h| h.clone()).unwrap_or_else(|_| new_histogram())
    }
}

fn new_histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low, 3 digits).
    Histogram::new_with_bounds(1, FANOUT_MAX_MICROS, 3).expect("valid constant histogram bounds")
}

impl WorkerMetrics {
    /// Adds `n` to a counter. Only the owning worker calls this.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts `n` from a gauge.
    #[inline]
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }
}

/// The worker-private side of a [`SharedHistogram`].
#[derive(Debug)]
pub struct LatencyRecorder {
    histogram: Histogram<u64>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        LatencyRecorder { histogram: new_histogram() }
    }
}

impl LatencyRecorder {
    /// Records one time (clamped to 1 µs .. 60 s).
    pub fn record(&mut self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).clamp(1, FANOUT_MAX_MICROS);
        let _ = self.histogram.record(micros);
    }
}

/// Percentiles of a latency histogram recorded in microseconds, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarizes a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        LatencySummary {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_add_up() {
        let a = WorkerMetrics::default();
        let b = WorkerMetrics::default();
        WorkerMetrics::add(&a.counters.drops, 2);
        WorkerMetrics::add(&b.counters.drops, 3);
        WorkerMetrics::add(&b.counters.writes_immediate, 19);
        WorkerMetrics::add(&b.counters.writes_would_block, 1);
        let sum = a.counters.snapshot() + b.counters.snapshot();
        assert_eq!(sum.drops, 5);
        assert_eq!(sum.write_success_rate(), 95.0);
    }

    #[test]
    fn fanout_times_reach_the_shared_histogram() {
        let metrics = WorkerMetrics::default();
        let mut local = LatencyRecorder::default();
        local.record(Duration::from_micros(250));
        local.record(Duration::from_millis(3));
        metrics.fanout.merge(&mut local);
        let summary = LatencySummary::of(&metrics.fanout.snapshot());
        assert_eq!(summary.count, 2);
        assert!((summary.max_ms - 3.0).abs() < 0.01);
    }
}
