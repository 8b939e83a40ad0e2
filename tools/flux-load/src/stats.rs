//! What the load tool counts: per client role, deliveries, sequence gaps, duplicates,
//! disconnects, evictions and an HdrHistogram of delivery latency, plus per-publish completion
//! (the time from a publish to its last delivery). Shards send deltas once a second; the
//! coordinator adds them up. Everything here serializes to JSON lines between processes.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::death::Removals;

/// Latencies are recorded in microseconds, up to an hour, at 3 significant digits.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A client's part in a scenario; each is counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Reads everything: the clients whose figures the targets are about.
    Healthy,
    /// Stops reading, or reads with a long delay: expected to be evicted.
    Slow,
    /// Drops its connection and reconnects with backoff.
    Partitioned,
    /// Leaves and rejoins continuously (presence churn).
    Churn,
    /// Holds many channels of its own, then closes for good with every other vacater at once.
    Vacater,
    /// On the node that is killed (node-death): loses its connection with it and stays away.
    Victim,
}

impl Role {
    /// Every role, in report order.
    pub const ALL: [Role; 6] = [Role::Healthy, Role::Slow, Role::Partitioned, Role::Churn, Role::Vacater, Role::Victim];

    /// Index into per-role arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name for tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Role::Healthy => "healthy",
            Role::Slow => "slow",
            Role::Partitioned => "partitioned",
            Role::Churn => "churn",
            Role::Vacater => "vacater",
            Role::Victim => "victim",
        }
    }
}

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        // The bounds are constants within HdrHistogram's limits, so creation cannot fail.
        Latency(Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds"))
    }
}

impl Latency {
    /// Records one latency, clamped into the histogram's range.
    pub fn record(&mut self, micros: u64) {
        self.0.saturating_record(micros.clamp(1, MAX_LATENCY_US));
    }

    /// Adds another histogram's counts.
    pub fn add(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// Number of recorded values.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// The latency at `quantile` (0..=1), in milliseconds.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// The largest latency, in milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }

    /// The summary the JSON report carries.
    pub fn summary(&self) -> LatencyMs {
        LatencyMs { p50: self.quantile_ms(0.50), p95: self.quantile_ms(0.95), p99: self.quantile_ms(0.99), max: self.max_ms() }
    }

    fn clear(&mut self) {
        self.0.reset();
    }
}

/// Histograms cross process boundaries as (value, count) pairs of their recorded buckets.
impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(u64, u64)> = self.0.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect();
        pairs.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let pairs = Vec::<(u64, u64)>::deserialize(deserializer)?;
        let mut latency = Latency::default();
        for (value, count) in pairs {
            let _ = latency.0.record_n(value.clamp(1, MAX_LATENCY_US), count);
        }
        Ok(latency)
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LatencyMs {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// Counts for the clients of one role.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoleCounts {
    /// Events received.
    pub delivered: u64,
    /// Events received for the first time, in sequence order or after a gap.
    pub unique: u64,
    /// Sequence numbers skipped while connected (some may come later: see `late`).
    pub seq_gaps: u64,
    /// Skipped numbers that came after all, behind later ones.
    pub late: u64,
    /// Events received again (or too late to tell: see `SeqWindow`).
    pub duplicates: u64,
    /// Connections lost (closed by the server, reset, or dropped on purpose).
    pub disconnects: u64,
    /// Reconnections that subscribed again.
    pub reconnects: u64,
    /// Closes with code 4100 (evicted as a slow consumer).
    pub evicted: u64,
    /// Delivery latency.
    pub latency: Latency,
}

impl RoleCounts {
    /// Sequence numbers skipped that never came.
    pub fn gaps(&self) -> u64 {
        self.seq_gaps.saturating_sub(self.late)
    }

    fn add(&mut self, other: &RoleCounts) {
        self.delivered += other.delivered;
        self.unique += other.unique;
        self.seq_gaps += other.seq_gaps;
        self.late += other.late;
        self.duplicates += other.duplicates;
        self.disconnects += other.disconnects;
        self.reconnects += other.reconnects;
        self.evicted += other.evicted;
        self.latency.add(&other.latency);
    }
}

/// When the last delivery of one publish arrived, and how many there were.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Completion {
    /// Deliveries of this publish.
    pub deliveries: u64,
    /// The latest delivery's latency, in microseconds.
    pub last_us: u64,
}

/// What a shard counted since its previous report (gauges are current values).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tick {
    /// Clients with an open, established connection (gauge).
    pub connected: u64,
    /// Clients subscribed to all their channels (gauge).
    pub subscribed: u64,
    /// Subscriptions confirmed and held, every client (gauge).
    pub subscriptions: u64,
    /// Per-role counts since the previous tick.
    pub roles: [RoleCounts; Role::ALL.len()],
    /// Per publish (keyed by its timestamp), when tracked: deliveries and the last one's latency.
    pub completions: BTreeMap<u64, Completion>,
    /// When the latest delivery of this tick was read (Unix microseconds; 0 if none), so the
    /// run's delivery rate is not rounded up to the next tick.
    pub last_delivery_unix_us: u64,
    /// Events received, every role, by the node the client was on (index into the plan's nodes).
    pub delivered_per_node: Vec<u64>,
    /// `pusher_internal:member_added` and `member_removed` events received.
    pub member_events: u64,
    /// Presence rosters the server sent again, to members whose rings had no room for changes.
    pub presence_resyncs: u64,
    /// From a member's join (the time in its `user_info`) to another member hearing of it.
    pub member_added_latency: Latency,
    /// `pusher_internal:subscription_count` events the healthy clients received.
    pub count_events: u64,
    /// Subscriptions the vacaters had asked for when they closed: what the server held, unless
    /// it refused some (a lost confirmation does not mean a lost subscription).
    pub subscriptions_vacated: u64,
    /// Of those, the ones whose `subscription_succeeded` had arrived.
    pub confirmed_subscriptions_vacated: u64,
    /// node-death: the member_removed events the remaining members received after the kill.
    pub removals: Removals,
    /// Slow consumers' stalls (`stop` mode), and how those that ended did.
    pub stalls: Stalls,
}

/// Slow consumers' stalls: each one stops reading for the stall time, then reads for a grace
/// period. A stall ends evicted (the 4100 close frame was read: counted as the role's
/// `evicted`), closed (the server closed the connection, but its close frame was not there to
/// read: the stall outlasted the server's close linger), or survived (the connection still
/// worked after the grace period: the server never evicted it). Stalls under way when the run
/// stops ended in none of these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stalls {
    /// Stalls begun.
    pub begun: u64,
    /// Ended with the connection closed by the server without a close frame to read.
    pub closed: u64,
    /// Ended with the connection still open and working.
    pub survived: u64,
}

impl Stalls {
    fn add(&mut self, other: &Stalls) {
        self.begun += other.begun;
        self.closed += other.closed;
        self.survived += other.survived;
    }
}

impl Tick {
    /// Adds another tick's deltas; gauges add too (shards are disjoint).
    pub fn add(&mut self, other: &Tick) {
        self.connected += other.connected;
        self.subscribed += other.subscribed;
        self.subscriptions += other.subscriptions;
        for (mine, theirs) in self.roles.iter_mut().zip(&other.roles) {
            mine.add(theirs);
        }
        for (key, theirs) in &other.completions {
            let mine = self.completions.entry(*key).or_default();
            mine.deliveries += theirs.deliveries;
            mine.last_us = mine.last_us.max(theirs.last_us);
        }
        self.last_delivery_unix_us = self.last_delivery_unix_us.max(other.last_delivery_unix_us);
        if self.delivered_per_node.len() < other.delivered_per_node.len() {
            self.delivered_per_node.resize(other.delivered_per_node.len(), 0);
        }
        for (mine, theirs) in self.delivered_per_node.iter_mut().zip(&other.delivered_per_node) {
            *mine += theirs;
        }
        self.member_events += other.member_events;
        self.presence_resyncs += other.presence_resyncs;
        self.member_added_latency.add(&other.member_added_latency);
        self.count_events += other.count_events;
        self.subscriptions_vacated += other.subscriptions_vacated;
        self.confirmed_subscriptions_vacated += other.confirmed_subscriptions_vacated;
        self.removals.add(&other.removals);
        self.stalls.add(&other.stalls);
    }

    /// Takes the deltas out, leaving gauges and empty counters.
    pub fn take_deltas(&mut self) -> Tick {
        let taken = self.clone();
        for role in &mut self.roles {
            let mut latency = std::mem::take(&mut role.latency);
            latency.clear();
            *role = RoleCounts { latency, ..RoleCounts::default() };
        }
        self.completions.clear();
        self.delivered_per_node.iter_mut().for_each(|n| *n = 0);
        self.member_events = 0;
        self.presence_resyncs = 0;
        self.member_added_latency.clear();
        self.count_events = 0;
        self.subscriptions_vacated = 0;
        self.confirmed_subscriptions_vacated = 0;
        self.removals = Removals::default();
        self.stalls = Stalls::default();
        taken
    }

    /// All deliveries, every role.
    pub fn delivered(&self) -> u64 {
        self.roles.iter().map(|r| r.delivered).sum()
    }

    /// Evictions seen, every role.
    pub fn evicted(&self) -> u64 {
        self.roles.iter().map(|r| r.evicted).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_json_and_merge() {
        let mut a = Latency::default();
        for us in [100, 200, 300, 40_000] {
            a.record(us);
        }
        let json = serde_json::to_string(&a).unwrap();
        let b: Latency = serde_json::from_str(&json).unwrap();
        assert_eq!(b.len(), 4);
        assert!((b.max_ms() - 40.0).abs() < 0.1);
        let mut merged = Latency::default();
        merged.add(&a);
        merged.add(&b);
        assert_eq!(merged.len(), 8);
        assert!((merged.quantile_ms(0.5) - 0.2).abs() < 0.01);
    }

    #[test]
    fn ticks_add_and_reset() {
        let mut tick = Tick { connected: 3, ..Tick::default() };
        tick.roles[0].delivered = 5;
        tick.roles[0].latency.record(10);
        tick.completions.insert(7, Completion { deliveries: 2, last_us: 50 });
        tick.delivered_per_node = vec![2, 3];
        let taken = tick.take_deltas();
        assert_eq!((taken.delivered(), taken.roles[0].latency.len()), (5, 1));
        assert_eq!((tick.delivered(), tick.roles[0].latency.len(), tick.connected), (0, 0, 3));
        assert_eq!(tick.delivered_per_node, [0, 0]);
        // A sum starts with no nodes and takes on the shards' number of them.
        let mut sum = Tick::default();
        sum.add(&taken);
        sum.add(&taken);
        assert_eq!(sum.completions[&7].deliveries, 4);
        assert_eq!(sum.delivered_per_node, [4, 6]);
        assert_eq!(sum.completions[&7].last_us, 50);
    }
}
