//! Handles to every worker of a node: how threads talk to a worker (its bounded inbox) and wake
//! it (its mio `Waker`).
//!
//! Inboxes are bounded: a sender that finds one full gets its message back instead of waiting,
//! so no worker ever blocks on another. Wakes are batched by [`Outbox`]: a worker that sends
//! many messages in one loop turn wakes each receiver once, at the end of the turn.
//!
//! A worker's messages to a full inbox are not lost: its [`Outbox`] keeps them, in order, in a
//! backlog of its own for that receiver and retries with backoff (1 ms, doubling to 64 ms), so a
//! busy receiver is neither spun on nor made to lose broadcasts. The backlog is bounded too
//! ([`BACKLOG_CAPACITY`]); only past it is a message lost, and the caller counts it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use log::warn;

use super::worker::Envelope;
use crate::fanout::directory::WorkerSet;
use crate::fanout::WorkerId;

struct Handle<M> {
    inbox: Sender<Envelope<M>>,
    waker: Arc<mio::Waker>,
}

/// Handles to all the workers of the node, shared by every thread that talks to them.
pub struct Peers<M> {
    handles: Arc<[Handle<M>]>,
}

impl<M> Clone for Peers<M> {
    fn clone(&self) -> Self {
        Peers { handles: self.handles.clone() }
    }
}

impl<M> Peers<M> {
    pub(crate) fn new(handles: Vec<(Sender<Envelope<M>>, Arc<mio::Waker>)>) -> Self {
        Peers { handles: handles.into_iter().map(|(inbox, waker)| Handle { inbox, waker }).collect() }
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// No workers (never true for a running node).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Puts `envelope` in worker `index`'s inbox and wakes it. Hands it back if the inbox is full
    /// or the worker is gone.
    pub(crate) fn deliver(&self, index: usize, envelope: Envelope<M>) -> Result<(), Envelope<M>> {
        let Some(handle) = self.handles.get(index) else {
            return Err(envelope);
        };
        match handle.inbox.try_send(envelope) {
            Ok(()) => {
                wake(handle);
                Ok(())
            }
            Err(TrySendError::Full(refused) | TrySendError::Disconnected(refused)) => Err(refused),
        }
    }

    /// Sends a service message to `worker` and wakes it now. False if its inbox is full or
    /// the worker is gone.
    pub fn send_now(&self, worker: WorkerId, message: M) -> bool {
        self.deliver(worker.0, Envelope::Service(message)).is_ok()
    }
}

fn wake<M>(handle: &Handle<M>) {
    if let Err(e) = handle.waker.wake() {
        warn!("could not wake a worker: {e}");
    }
}

/// Messages one sender holds for a receiver whose inbox was full, at most.
pub const BACKLOG_CAPACITY: usize = 65_536;

/// First wait before a full inbox is tried again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(1);
const RETRY_MAX: Duration = Duration::from_millis(64);

/// What became of a message given to [`Outbox::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// It is in the receiver's inbox.
    Now,
    /// The inbox was full: it waits in this sender's backlog and goes before anything later.
    Later,
    /// The backlog is full too, or the receiver is gone: it is lost.
    Lost,
}

/// Messages waiting for one receiver's inbox to have room.
struct Backlog<M> {
    waiting: VecDeque<Envelope<M>>,
    retry_at: Instant,
    backoff: Duration,
}

/// One sender's view of the workers: sends now, wakes once per batch, and holds what a full
/// inbox refused.
pub struct Outbox<M> {
    peers: Peers<M>,
    to_wake: WorkerSet,
    backlogs: Vec<Option<Backlog<M>>>,
}

impl<M> Outbox<M> {
    /// An outbox over `peers`.
    pub fn new(peers: Peers<M>) -> Self {
        let backlogs = (0..peers.len()).map(|_| None).collect();
        Outbox { peers, to_wake: WorkerSet::default(), backlogs }
    }

    /// Queues `message` for `worker`, which is woken at the next [`wake_all`](Self::wake_all).
    /// Behind earlier messages that are still waiting for room, whatever happens, so one
    /// receiver gets one sender's messages in order.
    pub fn send(&mut self, worker: WorkerId, message: M, now: Instant) -> Sent {
        let (Some(handle), Some(backlog)) = (self.peers.handles.get(worker.0), self.backlogs.get_mut(worker.0)) else {
            return Sent::Lost;
        };
        let envelope = Envelope::Service(message);
        let refused = match backlog {
            Some(waiting) if waiting.waiting.len() >= BACKLOG_CAPACITY => return Sent::Lost,
            Some(waiting) => {
                waiting.waiting.push_back(envelope);
                return Sent::Later;
            }
            None => match handle.inbox.try_send(envelope) {
                Ok(()) => {
                    self.to_wake.insert(worker);
                    return Sent::Now;
                }
                Err(TrySendError::Disconnected(_)) => return Sent::Lost,
                Err(TrySendError::Full(refused)) => refused,
            },
        };
        *backlog = Some(Backlog { waiting: VecDeque::from([refused]), retry_at: now + RETRY_FIRST, backoff: RETRY_FIRST });
        Sent::Later
    }

    /// Moves waiting messages into the inboxes whose retry is due, until each is full again.
    pub fn retry(&mut self, now: Instant) {
        for (index, slot) in self.backlogs.iter_mut().enumerate() {
            let (Some(backlog), Some(handle)) = (slot.as_mut(), self.peers.handles.get(index)) else {
                continue;
            };
            if backlog.retry_at > now {
                continue;
            }
            while let Some(envelope) = backlog.waiting.pop_front() {
                match handle.inbox.try_send(envelope) {
                    Ok(()) => self.to_wake.insert(WorkerId(index)),
                    Err(TrySendError::Full(refused)) => {
                        backlog.waiting.push_front(refused);
                        break;
                    }
                    // The receiver is gone (shutting down): nothing waiting for it matters.
                    Err(TrySendError::Disconnected(_)) => backlog.waiting.clear(),
                }
            }
            if backlog.waiting.is_empty() {
                *slot = None;
            } else {
                backlog.backoff = (backlog.backoff * 2).min(RETRY_MAX);
                backlog.retry_at = now + backlog.backoff;
            }
        }
    }

    /// When [`retry`](Self::retry) is next due, if anything is waiting.
    pub fn retry_due(&self) -> Option<Instant> {
        self.backlogs.iter().flatten().map(|backlog| backlog.retry_at).min()
    }

    /// Wakes every worker sent to since the last call.
    pub fn wake_all(&mut self) {
        for worker in self.to_wake.iter() {
            if let Some(handle) = self.peers.handles.get(worker.0) {
                wake(handle);
            }
        }
        self.to_wake = WorkerSet::default();
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox to one worker whose inbox holds `capacity` messages, and that inbox.
    fn outbox(capacity: usize) -> (Outbox<u32>, crossbeam_channel::Receiver<Envelope<u32>>, mio::Poll) {
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (Outbox::new(Peers::new(vec![(tx, waker)])), rx, poll)
    }

    fn received(rx: &crossbeam_channel::Receiver<Envelope<u32>>) -> Vec<u32> {
        rx.try_iter().filter_map(|e| if let Envelope::Service(m) = e { Some(m) } else { None }).collect()
    }

    #[test]
    fn a_full_inbox_holds_messages_back_in_order_and_retries_with_backoff() {
        let (mut outbox, rx, _poll) = outbox(2);
        let t0 = Instant::now();
        let w = WorkerId(0);
        assert_eq!(outbox.send(w, 1, t0), Sent::Now);
        assert_eq!(outbox.send(w, 2, t0), Sent::Now);
        assert_eq!(outbox.send(w, 3, t0), Sent::Later, "the inbox is full");
        assert_eq!(outbox.retry_due(), Some(t0 + RETRY_FIRST));
        assert_eq!(received(&rx), [1, 2]);
        assert_eq!(outbox.send(w, 4, t0), Sent::Later, "behind 3, though the inbox has room now");
        outbox.retry(t0);
        assert!(rx.is_empty(), "not before the retry is due");
        outbox.retry(t0 + RETRY_FIRST);
        assert_eq!(received(&rx), [3, 4], "in the order they were sent");
        assert_eq!(outbox.retry_due(), None, "nothing waits");
    }

    #[test]
    fn the_retry_wait_doubles_while_the_inbox_stays_full() {
        let (mut outbox, _rx, _poll) = outbox(1);
        let t0 = Instant::now();
        outbox.send(WorkerId(0), 1, t0);
        outbox.send(WorkerId(0), 2, t0);
        let mut now = t0 + RETRY_FIRST;
        let mut waits = Vec::new();
        for _ in 0..8 {
            outbox.retry(now);
            let due = outbox.retry_due().expect("still waiting");
            waits.push((due - now).as_millis());
            now = due;
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 64, 64]);
    }

    #[test]
    fn only_a_full_backlog_loses_a_message() {
        let (mut outbox, _rx, _poll) = outbox(1);
        let t0 = Instant::now();
        outbox.send(WorkerId(0), 0, t0);
        for i in 0..BACKLOG_CAPACITY as u32 {
            assert_eq!(outbox.send(WorkerId(0), i, t0), Sent::Later);
        }
        assert_eq!(outbox.send(WorkerId(0), 0, t0), Sent::Lost);
        assert_eq!(outbox.send(WorkerId(7), 0, t0), Sent::Lost, "no such worker");
    }
}
