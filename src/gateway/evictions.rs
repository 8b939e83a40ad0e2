//! The node's log of recent evictions: who was evicted, from which channels, after how long.
//!
//! Workers append to it when they evict a slow consumer, and the dashboard reads it. Evictions
//! are rare (one per slow consumer, at most one per connection), so a mutex around a small
//! bounded queue is cheap here; nothing on the per-frame path ever touches it. The oldest entry
//! is forgotten when the log is full, so its memory is bounded whatever the clients do.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

/// Evictions kept by a node's log.
pub const EVICTION_LOG_CAPACITY: usize = 100;

/// One evicted slow consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Eviction {
    /// When it was evicted, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// The worker that owned it.
    pub worker: usize,
    /// Its socket id.
    pub socket_id: String,
    /// The client's address.
    pub peer: String,
    /// Channels it was subscribed to.
    pub channels: Vec<String>,
    /// How long it had been backpressured.
    pub backpressured_ms: u64,
    /// Frames still queued in its ring, discarded by the close.
    pub frames_queued: usize,
    /// Frames dropped on its full ring over its life.
    pub dropped: u64,
}

/// A bounded, thread-safe log of the most recent evictions.
#[derive(Debug)]
pub struct EvictionLog {
    entries: Mutex<VecDeque<Eviction>>,
    capacity: usize,
}

impl EvictionLog {
    /// A log that keeps the last `capacity` evictions.
    pub fn new(capacity: usize) -> Self {
        EvictionLog { entries: Mutex::new(VecDeque::with_capacity(capacity)), capacity: capacity.max(1) }
    }

    /// Appends an eviction, forgetting the oldest when the log is full.
    pub fn record(&self, eviction: Eviction) {
        // A panic elsewhere while holding the lock cannot leave a VecDeque half-written in a
        // way that matters to a log, so a poisoned lock is used as it is.
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() == self.capacity {
            entries.pop_front();
        }
        entries.push_back(eviction);
    }

    /// The evictions in the log, newest first.
    pub fn recent(&self) -> Vec<Eviction> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).iter().rev().cloned().collect()
    }
}

impl Default for EvictionLog {
    fn default() -> Self {
        EvictionLog::new(EVICTION_LOG_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eviction(n: u64) -> Eviction {
        Eviction {
            at_unix_ms: n,
            worker: 0,
            socket_id: format!("1.{n}"),
            peer: "127.0.0.1:1".into(),
            channels: vec!["c".into()],
            backpressured_ms: 5001,
            frames_queued: 256,
            dropped: n,
        }
    }

    #[test]
    fn keeps_the_newest_entries_newest_first() {
        let log = EvictionLog::new(2);
        for n in 1..=3 {
            log.record(eviction(n));
        }
        let recent: Vec<u64> = log.recent().iter().map(|e| e.at_unix_ms).collect();
        assert_eq!(recent, [3, 2]);
    }
}
