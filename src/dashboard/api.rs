//! The JSON documents behind the dashboard: `/api/stats`, `/api/history`, `/api/connections`
//! and `/api/evictions`. Each is built from the [`Observer`] and the sampler's history; this
//! module only shapes them.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::sampler::{History, Sample, HISTORY_LEN, SAMPLE_INTERVAL};
use crate::apps::AppStatus;
use crate::cluster::ClusterStatus;
use crate::fanout::pool::PoolStats;
use crate::gateway::evictions::Eviction;
use crate::gateway::{ConnectionSnapshot, Observer};
use crate::heap::HeapCounts;
use crate::metrics::{Counters, LatencySummary};
use crate::webhooks::WebhookStats;

/// The write success rate the dashboard holds the node to, in percent.
pub const WRITE_SUCCESS_TARGET: f64 = 95.0;

/// Connections listed when the request names no limit: enough for the grid's 10,000 and more.
pub const DEFAULT_CONNECTIONS_LIMIT: usize = 20_000;

/// The most connections one request may list.
pub const MAX_CONNECTIONS_LIMIT: usize = 100_000;

/// How long one connection snapshot answers every request. Building one costs each worker a
/// walk over its connections, so however many browsers poll, workers do it at most this often.
const SNAPSHOT_TTL: Duration = Duration::from_millis(500);

/// How long a snapshot waits for a busy worker; its connections are missing from that answer.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_millis(500);

/// `/api/stats`: totals since start, the last second's rates, and the headline ratios.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Seconds between two samples.
    pub interval_s: f64,
    /// Counters since start (`connections` and `websockets` are gauges: open now).
    pub totals: Counters,
    /// The last interval's rates and ratios; absent during the first second.
    pub latest: Option<Sample>,
    /// Share of flushes since start that wrote everything at once, in percent.
    pub write_success_rate: f64,
    /// The rate the node should stay above, in percent.
    pub write_success_target: f64,
    /// The frame pool since start.
    pub frame_pool: FramePoolStats,
    /// The process's heap allocations since start (absent when they are not counted).
    pub heap: Option<HeapCounts>,
    /// Fan-out time percentiles since start.
    pub fanout: LatencySummary,
    /// The webhook sender: counters since start and the queue's depth now.
    pub webhooks: WebhookStats,
    /// The cluster as this node sees it (absent for a single node).
    pub cluster: Option<ClusterStatus>,
    /// Each app's connections, messages and deliveries on this node.
    pub apps: Vec<AppStatus>,
}

/// The frame pool's counters and hit rate.
#[derive(Debug, Serialize)]
pub struct FramePoolStats {
    /// Checkouts, hits and idle buffers.
    #[serde(flatten)]
    pub stats: PoolStats,
    /// Share of checkouts served by a recycled buffer, in percent.
    pub hit_rate: f64,
}

/// Builds `/api/stats`.
pub fn stats(observer: &Observer, history: &History) -> Stats {
    let totals = observer.counters();
    let pool = observer.pool_stats();
    Stats {
        interval_s: SAMPLE_INTERVAL.as_secs_f64(),
        totals,
        latest: history.latest(),
        write_success_rate: totals.write_success_rate(),
        write_success_target: WRITE_SUCCESS_TARGET,
        frame_pool: FramePoolStats { stats: pool, hit_rate: pool.hit_rate() },
        heap: observer.heap(),
        fanout: observer.fanout_latency(),
        webhooks: observer.webhooks(),
        cluster: observer.cluster(),
        apps: observer.apps().status(),
    }
}

/// `/api/history`: the samples of the last five minutes, oldest first.
#[derive(Debug, Serialize)]
pub struct HistoryDoc {
    /// Seconds between two samples.
    pub interval_s: f64,
    /// The most samples kept.
    pub capacity: usize,
    /// The samples.
    pub samples: Vec<Sample>,
}

/// Builds `/api/history`.
pub fn history(history: &History) -> HistoryDoc {
    HistoryDoc { interval_s: SAMPLE_INTERVAL.as_secs_f64(), capacity: HISTORY_LEN, samples: history.all() }
}

/// `/api/connections`: open WebSocket connections, in a stable order.
#[derive(Debug, Serialize)]
pub struct ConnectionsDoc<'a> {
    /// Connections open (that answered in time).
    pub total: usize,
    /// Connections listed here (at most the limit).
    pub shown: usize,
    /// The listed connections, by worker and socket id, so each keeps its place in the grid.
    pub connections: Vec<&'a ConnectionSnapshot>,
}

/// Builds `/api/connections` from a snapshot, listing at most `limit` connections. Over the
/// limit, the ones in trouble are kept: backpressured longest first, then the fullest rings.
pub fn connections(all: &[ConnectionSnapshot], limit: usize) -> ConnectionsDoc<'_> {
    let mut chosen: Vec<&ConnectionSnapshot> = all.iter().collect();
    if chosen.len() > limit {
        chosen.select_nth_unstable_by(limit, |a, b| severity(b).cmp(&severity(a)));
        chosen.truncate(limit);
    }
    chosen.sort_unstable_by(|a, b| (a.worker, &a.socket_id).cmp(&(b.worker, &b.socket_id)));
    ConnectionsDoc { total: all.len(), shown: chosen.len(), connections: chosen }
}

/// How much trouble a connection is in, for choosing which to list: its backpressure time,
/// then its ring's fill in per mille, then its drops.
fn severity(c: &ConnectionSnapshot) -> (Option<u64>, usize, u64) {
    (c.backpressured_ms, c.ring_len * 1000 / c.ring_slots.max(1), c.dropped)
}

/// `/api/evictions`: the evictions since start, and the most recent ones.
#[derive(Debug, Serialize)]
pub struct EvictionsDoc {
    /// Evictions since start.
    pub total: u64,
    /// The most recent, newest first.
    pub recent: Vec<Eviction>,
}

/// Builds `/api/evictions`.
pub fn evictions(observer: &Observer) -> EvictionsDoc {
    EvictionsDoc { total: observer.counters().evictions, recent: observer.evictions() }
}

/// The last connection snapshot, shared by every request within [`SNAPSHOT_TTL`].
#[derive(Debug, Default)]
pub struct SnapshotCache {
    latest: Mutex<Option<(Instant, Arc<Vec<ConnectionSnapshot>>)>>,
}

impl SnapshotCache {
    /// A snapshot at most [`SNAPSHOT_TTL`] old. Concurrent requests wait on the lock for the
    /// one snapshot being taken, rather than each asking the workers.
    pub fn get(&self, observer: &Observer) -> Arc<Vec<ConnectionSnapshot>> {
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((taken, snapshot)) = latest.as_ref() {
            if taken.elapsed() < SNAPSHOT_TTL {
                return snapshot.clone();
            }
        }
        let snapshot = Arc::new(observer.connections(SNAPSHOT_TIMEOUT));
        *latest = Some((Instant::now(), snapshot.clone()));
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(worker: usize, socket_id: &str, ring_len: usize, backpressured_ms: Option<u64>) -> ConnectionSnapshot {
        ConnectionSnapshot {
            worker,
            socket_id: socket_id.into(),
            peer: "127.0.0.1:1".into(),
            channels: vec!["c".into()],
            ring_len,
            ring_slots: 256,
            dropped: 0,
            backpressured_ms,
        }
    }

    #[test]
    fn over_the_limit_the_troubled_connections_are_kept_in_a_stable_order() {
        let all = vec![
            conn(1, "1.1", 0, None),
            conn(0, "9.9", 256, Some(4000)),
            conn(0, "1.2", 200, None),
            conn(1, "1.3", 10, None),
            conn(0, "1.4", 256, Some(100)),
        ];
        let doc = connections(&all, 3);
        assert_eq!((doc.total, doc.shown), (5, 3));
        let ids: Vec<&str> = doc.connections.iter().map(|c| c.socket_id.as_str()).collect();
        assert_eq!(ids, ["1.2", "1.4", "9.9"]);
        assert_eq!(connections(&all, 0).shown, 0);
        assert_eq!(connections(&all, 10).shown, 5);
    }
}
