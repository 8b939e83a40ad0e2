//! The node's channel directory: for every occupied channel, how many subscriptions each worker
//! holds.
//!
//! Every worker keeps its own replica, fed in order by occupancy updates that the workers send
//! each other through their inboxes, so reading it (routing a broadcast, answering the REST API)
//! takes no lock. A worker sends its update before it confirms the subscription to the client,
//! and drains its inbox before it reads sockets, so a publish that follows a confirmed
//! subscription always sees it. A cluster adapter would keep one more replica, fed by other nodes.

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

/// One worker's replica of the node's channel occupancy.
#[derive(Debug)]
pub struct Directory {
    workers: usize,
    channels: HashMap<ChannelName, Box<[u32]>>,
}

impl Directory {
    /// An empty directory for a node of `workers` workers (at most [`MAX_WORKERS`]).
    pub fn new(workers: usize) -> Self {
        Directory { workers: workers.clamp(1, MAX_WORKERS), channels: HashMap::new() }
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

    /// Subscriptions to `channel` across the node.
    pub fn subscription_count(&self, channel: &str) -> u32 {
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

    /// Every occupied channel with its node-wide subscription count.
    pub fn channels(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        self.channels.iter().map(|(name, counts)| (&**name, counts.iter().sum()))
    }

    /// Number of occupied channels.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// No channel is occupied.
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
    fn updates_from_unknown_workers_are_ignored() {
        let mut dir = Directory::new(2);
        dir.apply(&occ(7, "chat", 1));
        assert!(dir.is_empty());
    }
}
