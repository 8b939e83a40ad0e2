//! What any thread may know about the whole node without asking a worker: how many WebSocket
//! sessions and connections are open, and whether the node is draining for a shutdown.
//!
//! The open count is the sum of the workers' own `websockets` gauges, which each worker moves
//! when a session opens and when it leaves the open phase however it leaves (closed by either
//! side, evicted, refused, dropped). There is no second count to fall out of step with them,
//! so a limit checked against it cannot get stuck after connections leave. Every read is a
//! relaxed atomic load: for admission and readiness a figure a few connections or a moment
//! stale is good enough, and nothing on the hot path takes a lock for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::metrics::{CounterCells, Counters, WorkerMetrics};

/// A cheap, shareable view of the node: the workers' metrics, the acceptor's counters and the
/// drain flag.
#[derive(Clone)]
pub struct NodeStatus {
    workers: Arc<[Arc<WorkerMetrics>]>,
    /// The acceptor's own counters (connections it refused); it is their one writer.
    acceptor: Arc<CounterCells>,
    draining: Arc<AtomicBool>,
}

impl NodeStatus {
    pub(crate) fn new(workers: Arc<[Arc<WorkerMetrics>]>) -> Self {
        NodeStatus { workers, acceptor: Arc::default(), draining: Arc::new(AtomicBool::new(false)) }
    }

    /// The counters the acceptor writes.
    pub(crate) fn acceptor_counters(&self) -> &CounterCells {
        &self.acceptor
    }

    /// Every worker's metrics, in worker order.
    pub fn workers(&self) -> &[Arc<WorkerMetrics>] {
        &self.workers
    }

    /// WebSocket sessions open on the node now.
    pub fn websockets(&self) -> u64 {
        self.workers.iter().map(|m| m.counters.websockets.load(Ordering::Relaxed)).sum()
    }

    /// Connections open on the node now, in any phase (HTTP, WebSocket, closing).
    pub fn connections(&self) -> u64 {
        self.workers.iter().map(|m| m.counters.connections.load(Ordering::Relaxed)).sum()
    }

    /// All workers' counters and the acceptor's, added up.
    pub fn counters(&self) -> Counters {
        self.workers.iter().map(|m| m.counters.snapshot()).fold(self.acceptor.snapshot(), |a, b| a + b)
    }

    /// The node is shutting down: its clients have been told to go, and it only answers HTTP
    /// until it holds no connection or the shutdown grace is over.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the node as draining, before the workers are told to close their clients.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_count_is_the_sum_of_the_workers_gauges() {
        let workers: Vec<Arc<WorkerMetrics>> = (0..3).map(|_| Arc::new(WorkerMetrics::default())).collect();
        let status = NodeStatus::new(workers.clone().into());
        WorkerMetrics::add(&workers[0].counters.websockets, 2);
        WorkerMetrics::add(&workers[2].counters.websockets, 5);
        assert_eq!(status.websockets(), 7);
        WorkerMetrics::sub(&workers[2].counters.websockets, 5);
        assert_eq!(status.websockets(), 2, "connections that leave are no longer counted");
        assert!(!status.is_draining());
        status.clone().start_draining();
        assert!(status.is_draining(), "every clone sees the drain");
    }
}
