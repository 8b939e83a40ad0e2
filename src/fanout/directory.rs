//! The node's channel directory: for every occupied channel, how many subscriptions each worker
//! holds.
//!
//! Every worker keeps its own replica, fed in order by occupancy updates that the workers send
//! each other through their inboxes, so reading it (routing a broadcast, answering the REST API)
//! takes no lock. A worker sends its update before it confirms the subscription to the client,
//! and drains its inbox before it reads sockets, so a publish that follows a confirmed
//! subscription always sees it. In a cluster, the replica also holds the other nodes'
//! subscriptions per channel (one total for all of them, kept by the cluster), so the REST API
//! answers for the whole cluster; routing a broadcast only ever looks at this node's workers.

use std::collections::HashMap;
use std::sync::Arc;

use super::WorkerId;
use crate::pusher::protocol::ChannelName;

/// Most workers a node may run: worker sets are 64-bit masks.
pub const MAX_WORKERS: usize = 64;

/// "Worker `worker` now holds `count` subscriptions to `channel`."
#[derive(Debug, Clone)]
pub struct Occupancy {
    /// The worker reporting.
    pub worker: WorkerId,
    /// The channel.
    pub channel: ChannelName,
    /// Its subscriptions on that worker now.
    pub count: u32,
}

/// The channels whose count changed on one worker during one loop turn, each once, with its
/// count at the end of the turn. However many channels a turn touched (a mass disconnect can
/// vacate hundreds of thousands), this is the one message each other worker gets about them,
/// and the entries are shared, not copied, between those messages.
#[derive(Debug, Clone)]
pub struct OccupancyBatch {
    /// The worker reporting.
    pub worker: WorkerId,
    /// Each changed channel with its subscriptions on that worker now.
    pub counts: Arc<[(ChannelName, u32)]>,
}

impl OccupancyBatch {
    /// The batch as single updates.
    pub fn updates(&self) -> impl Iterator<Item = Occupancy> + '_ {
        self.counts.iter().map(|(channel, count)| Occupancy { worker: self.worker, channel: channel.clone(), count: *count })
    }
}

/// A set of workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerSet(u64);

impl WorkerSet {
    /// The first `workers` workers (at most [`MAX_WORKERS`]).
    pub fn all(workers: usize) -> Self {
        match workers {
            0 => WorkerSet(0),
            n if n >= MAX_WORKERS => WorkerSet(u64::MAX),
            n => WorkerSet((1 << n) - 1),
        }
    }

    /// Adds a worker.
    pub fn insert(&mut self, worker: WorkerId) {
        self.0 |= 1 << worker.0;
    }

    /// Whether `worker` is in the set.
    pub fn contains(&self, worker: WorkerId) -> bool {
        self.0 & (1 << worker.0) != 0
    }

    /// The workers in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = WorkerId> + '_ {
        (0..MAX_WORKERS).filter(|w| self.0 & (1 << w) != 0).map(WorkerId)
    }

    /// No worker.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

/// One worker's replica of the node's channel occupancy (and, in a cluster, the other nodes').
#[derive(Debug)]
pub struct Directory {
    workers: usize,
    channels: HashMap<ChannelName, Box<[u32]>>,
    /// Subscriptions on the other nodes of the cluster, per channel.
    remote: HashMap<ChannelName, u32>,
}

impl Directory {
    /// An empty directory for a node of `workers` workers (at most [`MAX_WORKERS`]).
    pub fn new(workers: usize) -> Self {
        Directory { workers: workers.clamp(1, MAX_WORKERS), channels: HashMap::new(), remote: HashMap::new() }
    }

    /// Sets the subscriptions to `channel` on the other nodes of the cluster together.
    pub fn apply_remote(&mut self, channel: &ChannelName, count: u32) {
        if count == 0 {
            self.remote.remove(channel);
        } else {
            self.remote.insert(channel.clone(), count);
        }
    }

    /// Applies one worker's new count for a channel.
    pub fn apply(&mut self, update: &Occupancy) {
        let WorkerId(worker) = update.worker;
        if worker >= self.workers {
            return;
        }
        if update.count == 0 {
            if let Some(counts) = self.channels.get_mut(&*update.channel) {
                counts[worker] = 0;
                if counts.iter().all(|&c| c == 0) {
                    self.channels.remove(&*update.channel);
                }
            }
            return;
        }
        let workers = self.workers;
        let counts = self.channels.entry(update.channel.clone()).or_insert_with(|| vec![0; workers].into());
        counts[worker] = update.count;
    }

    /// Subscriptions to `channel` across the node (and the cluster).
    pub fn subscription_count(&self, channel: &str) -> u32 {
        self.local_count(channel) + self.remote.get(channel).copied().unwrap_or(0)
    }

    /// Subscriptions to `channel` on this node.
    pub fn local_count(&self, channel: &str) -> u32 {
        self.channels.get(channel).map_or(0, |counts| counts.iter().sum())
    }

    /// Workers holding at least one subscriber of `channel`.
    pub fn workers_with(&self, channel: &str) -> WorkerSet {
        let mut set = WorkerSet::default();
        if let Some(counts) = self.channels.get(channel) {
            for (w, _) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
                set.insert(WorkerId(w));
            }
        }
        set
    }

    /// Every occupied channel with its subscription count across the node (and the cluster).
    pub fn channels(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        let here = self.local_channels().map(|(name, count)| (name, count + self.remote.get(name).copied().unwrap_or(0)));
        let elsewhere = self.remote.iter().filter(|(name, _)| !self.channels.contains_key(*name)).map(|(name, &count)| (&**name, count));
        here.chain(elsewhere)
    }

    /// Every channel occupied on this node, with its subscription count here.
    pub fn local_channels(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        self.channels.iter().map(|(name, counts)| (&**name, counts.iter().sum()))
    }

    /// Number of channels occupied on this node.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// No channel is occupied on this node.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn occ(worker: usize, channel: &str, count: u32) -> Occupancy {
        Occupancy { worker: WorkerId(worker), channel: channel.into(), count }
    }

    #[test]
    fn counts_add_up_across_workers_and_vanish_at_zero() {
        let mut dir = Directory::new(3);
        dir.apply(&occ(0, "chat", 2));
        dir.apply(&occ(2, "chat", 5));
        dir.apply(&occ(1, "news", 1));
        assert_eq!(dir.subscription_count("chat"), 7);
        assert_eq!(dir.workers_with("chat").iter().collect::<Vec<_>>(), vec![WorkerId(0), WorkerId(2)]);
        dir.apply(&occ(0, "chat", 0));
        assert_eq!(dir.subscription_count("chat"), 5);
        dir.apply(&occ(2, "chat", 0));
        assert_eq!(dir.subscription_count("chat"), 0);
        assert!(dir.workers_with("chat").is_empty());
        assert_eq!(dir.len(), 1, "only news is left");
    }

    #[test]
    fn the_other_nodes_counts_add_to_queries_but_not_to_routing() {
        let mut dir = Directory::new(2);
        dir.apply(&occ(0, "chat", 2));
        dir.apply_remote(&"chat".into(), 3);
        dir.apply_remote(&"elsewhere".into(), 4);
        assert_eq!((dir.subscription_count("chat"), dir.local_count("chat")), (5, 2));
        let mut all: Vec<_> = dir.channels().collect();
        all.sort();
        assert_eq!(all, [("chat", 5), ("elsewhere", 4)]);
        assert!(dir.workers_with("elsewhere").is_empty(), "no worker here delivers it");
        assert_eq!(dir.local_channels().collect::<Vec<_>>(), [("chat", 2)]);
        dir.apply_remote(&"elsewhere".into(), 0);
        assert_eq!(dir.channels().count(), 1);
    }

    #[test]
    fn all_is_every_worker_of_a_node() {
        assert_eq!(WorkerSet::all(3).iter().collect::<Vec<_>>(), [WorkerId(0), WorkerId(1), WorkerId(2)]);
        assert!(WorkerSet::all(0).is_empty());
        assert_eq!(WorkerSet::all(MAX_WORKERS).iter().count(), MAX_WORKERS);
    }

    #[test]
    fn updates_from_unknown_workers_are_ignored() {
        let mut dir = Directory::new(2);
        dir.apply(&occ(7, "chat", 1));
        assert!(dir.is_empty());
    }
}
