//! Handles to every worker of a node: how threads talk to a worker (its bounded inbox) and wake
//! it (its mio `Waker`).
//!
//! Inboxes are bounded: a sender that finds one full gets its message back instead of waiting,
//! so no worker ever blocks on another. Wakes are batched by [`Outbox`]: a worker that sends
//! many messages in one loop turn wakes each receiver once, at the end of the turn.

use std::sync::Arc;

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

    /// Puts `envelope` in worker `index`'s inbox and wakes it. False if the inbox is full.
    pub(crate) fn deliver(&self, index: usize, envelope: Envelope<M>) -> bool {
        let Some(handle) = self.handles.get(index) else { return false };
        match handle.inbox.try_send(envelope) {
            Ok(()) => {
                wake(handle);
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Sends a service message to `worker` and wakes it now. False if its inbox is full or
    /// the worker is gone.
    pub fn send_now(&self, worker: WorkerId, message: M) -> bool {
        self.deliver(worker.0, Envelope::Service(message))
    }
}

fn wake<M>(handle: &Handle<M>) {
    if let Err(e) = handle.waker.wake() {
        warn!("could not wake a worker: {e}");
    }
}

/// One sender's view of the workers: sends now, wakes once per batch.
pub struct Outbox<M> {
    peers: Peers<M>,
    to_wake: WorkerSet,
}

impl<M> Outbox<M> {
    /// An outbox over `peers`.
    pub fn new(peers: Peers<M>) -> Self {
        Outbox { peers, to_wake: WorkerSet::default() }
    }

    /// Queues `message` for `worker`; it is woken at the next [`wake_all`](Self::wake_all).
    /// False if the worker's inbox is full (the message is dropped) or the worker is gone.
    pub fn send(&mut self, worker: WorkerId, message: M) -> bool {
        let Some(handle) = self.peers.handles.get(worker.0) else { return false };
        let sent = handle.inbox.try_send(Envelope::Service(message)).is_ok();
        if sent {
            self.to_wake.insert(worker);
        }
        sent
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
