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

use std::sync::Arc;

use super::WorkerId;
use crate::pusher::protocol::{ChannelKey, ChannelMap, ChannelName};
use crate::pusher::AppIndex;

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
    channels: ChannelMap<Box<[u32]>>,
    /// Subscriptions on the other nodes of the cluster, per channel.
    remote: ChannelMap<u32>,
}

impl Directory {
    /// An empty directory for a node of `workers` workers (at most [`MAX_WORKERS`]).
    pub fn new(workers: usize) -> Self {
        Directory { workers: workers.clamp(1, MAX_WORKERS), channels: ChannelMap::default(), remote: ChannelMap::default() }
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
            if let Some(counts) = self.channels.get_mut(&update.channel) {
                counts[worker] = 0;
                if counts.iter().all(|&c| c == 0) {
                    self.channels.remove(&update.channel);
                }
            }
            return;
        }
        let workers = self.workers;
        let counts = self.channels.entry(update.channel.clone()).or_insert_with(|| vec![0; workers].into());
        counts[worker] = update.count;
    }

    /// Subscriptions to `channel` across the node (and the cluster).
    pub fn subscription_count(&self, channel: ChannelKey<'_>) -> u32 {
        self.local_count(channel) + self.remote.get(&channel).copied().unwrap_or(0)
    }

    /// The shared name of `channel`, if the node has held subscribers of it: a publish to it
    /// then costs no allocation for the name.
    pub fn name(&self, channel: ChannelKey<'_>) -> Option<&ChannelName> {
        self.channels.get_key_value(&channel).map(|(name, _)| name)
    }

    /// Subscriptions to `channel` on this node.
    pub fn local_count(&self, channel: ChannelKey<'_>) -> u32 {
        self.channels.get(&channel).map_or(0, |counts| counts.iter().sum())
    }

    /// Workers holding at least one subscriber of `channel`.
    pub fn workers_with(&self, channel: ChannelKey<'_>) -> WorkerSet {
        let mut set = WorkerSet::default();
        if let Some(counts) = self.channels.get(&channel) {
            for (w, _) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
                set.insert(WorkerId(w));
            }
        }
        set
    }

    /// Every occupied channel of `app` with its subscription count across the node (and the
    /// cluster).
    pub fn channels(&self, app: AppIndex) -> impl Iterator<Item = (&str, u32)> + '_ {
        let here = self
            .local_channels()
            .filter(move |(name, _)| name.app() == app)
            .map(|(name, count)| (&**name, count + self.remote.get(name).copied().unwrap_or(0)));
        let elsewhere = self
            .remote
            .iter()
            .filter(move |(name, _)| name.app() == app && !self.channels.contains_key(*name))
            .map(|(name, &count)| (&**name, count));
        here.chain(elsewhere)
    }

    /// Every channel occupied on this node, with its subscription count here.
    pub fn local_channels(&self) -> impl Iterator<Item = (&ChannelName, u32)> + '_ {
        self.channels.iter().map(|(name, counts)| (name, counts.iter().sum()))
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

    const APP: AppIndex = AppIndex(0);

    fn occ(worker: usize, channel: &str, count: u32) -> Occupancy {
        Occupancy { worker: WorkerId(worker), channel: ChannelName::new(APP, channel), count }
    }

    fn key(channel: &str) -> ChannelKey<'_> {
        ChannelKey::new(APP, channel)
    }

    #[test]
    fn counts_add_up_across_workers_and_vanish_at_zero() {
        let mut dir = Directory::new(3);
        dir.apply(&occ(0, "chat", 2));
        dir.apply(&occ(2, "chat", 5));
        dir.apply(&occ(1, "news", 1));
        assert_eq!(dir.subscription_count(key("chat")), 7);
        assert_eq!(dir.workers_with(key("chat")).iter().collect::<Vec<_>>(), vec![WorkerId(0), WorkerId(2)]);
        dir.apply(&occ(0, "chat", 0));
        assert_eq!(dir.subscription_count(key("chat")), 5);
        dir.apply(&occ(2, "chat", 0));
        assert_eq!(dir.subscription_count(key("chat")), 0);
        assert!(dir.workers_with(key("chat")).is_empty());
        assert_eq!(dir.len(), 1, "only news is left");
    }

    #[test]
    fn the_other_nodes_counts_add_to_queries_but_not_to_routing() {
        let mut dir = Directory::new(2);
        dir.apply(&occ(0, "chat", 2));
        dir.apply_remote(&ChannelName::new(APP, "chat"), 3);
        dir.apply_remote(&ChannelName::new(APP, "elsewhere"), 4);
        assert_eq!((dir.subscription_count(key("chat")), dir.local_count(key("chat"))), (5, 2));
        let mut all: Vec<_> = dir.channels(APP).collect();
        all.sort();
        assert_eq!(all, [("chat", 5), ("elsewhere", 4)]);
        assert!(dir.workers_with(key("elsewhere")).is_empty(), "no worker here delivers it");
        assert_eq!(dir.local_channels().map(|(c, n)| (&**c, n)).collect::<Vec<_>>(), [("chat", 2)]);
        dir.apply_remote(&ChannelName::new(AppIndex(1), "chat"), 6);
        assert_eq!(dir.channels(AppIndex(1)).collect::<Vec<_>>(), [("chat", 6)], "another app's channel of that name");
        assert_eq!(dir.subscription_count(key("chat")), 5);
        dir.apply_remote(&ChannelName::new(APP, "elsewhere"), 0);
        assert_eq!(dir.channels(APP).count(), 1);
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
