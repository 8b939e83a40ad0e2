//! The acceptor: a small thread with its own `Poll` that accepts connections and deals them out
//! to the workers in turn, and turns SIGINT/SIGTERM (or a stop request) into a shutdown.
//!
//! An accept error other than WouldBlock — above all EMFILE at the open-file limit — pauses
//! accepting for a moment instead of retrying at once: with an edge-triggered listener a retry
//! loop would spin, and the workers keep serving the connections they have meanwhile.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use super::peers::Peers;
use super::worker::Envelope;

const LISTENER: Token = Token(0);
const STOP: Token = Token(1);
const SIGNALS: Token = Token(2);

/// How long accepting pauses after an accept error such as EMFILE.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

pub(crate) struct Acceptor<M> {
    pub(crate) poll: Poll,
    pub(crate) listener: TcpListener,
    pub(crate) workers: Peers<M>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) handle_signals: bool,
}

impl<M: Send + 'static> Acceptor<M> {
    pub(crate) fn run(mut self) {
        if let Err(e) = self.poll.registry().register(&mut self.listener, LISTENER, Interest::READABLE) {
            warn!("could not register the listener: {e}");
            return self.shutdown_workers();
        }
        let mut signals = if self.handle_signals { self.register_signals() } else { None };
        let mut events = Events::with_capacity(64);
        let mut next_worker = 0usize;
        let mut paused_until: Option<Instant> = None;
        let mut accept_errors = 0u64;
        loop {
            let timeout = paused_until.map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("acceptor poll failed: {e}");
                break;
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if let Some(signals) = signals.as_mut() {
                if events.iter().any(|e| e.token() == SIGNALS) && signals.pending().next().is_some() {
                    info!("signal received: stopping");
                    break;
                }
            }
            let resume = paused_until.is_some_and(|t| Instant::now() >= t);
            if resume || events.iter().any(|e| e.token() == LISTENER) {
                paused_until = None;
                if let Err(e) = self.accept_ready(&mut next_worker) {
                    accept_errors += 1;
                    // Logged once per pause, not per attempt.
                    warn!("accept failed ({e}); pausing accepts for {} ms ({accept_errors} so far)", ACCEPT_PAUSE.as_millis());
                    paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                }
            }
        }
        self.shutdown_workers();
    }

    fn register_signals(&mut self) -> Option<Signals> {
        let mut signals = match Signals::new([SIGINT, SIGTERM]) {
            Ok(s) => s,
            Err(e) => {
                warn!("could not install signal handlers: {e}");
                return None;
            }
        };
        match self.poll.registry().register(&mut signals, SIGNALS, Interest::READABLE) {
            Ok(()) => Some(signals),
            Err(e) => {
                warn!("could not register signal handlers: {e}");
                None
            }
        }
    }

    /// Accepts until WouldBlock; returns the error that stopped it otherwise.
    fn accept_ready(&mut self, next_worker: &mut usize) -> io::Result<()> {
        loop {
            match self.listener.accept() {
                Ok((socket, peer)) => {
                    let worker = *next_worker % self.workers.len();
                    *next_worker = next_worker.wrapping_add(1);
                    if !self.workers.deliver(worker, Envelope::Adopt(socket, peer)) {
                        warn!("worker {worker} inbox full; refusing connection from {peer}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn shutdown_workers(&self) {
        for worker in 0..self.workers.len() {
            // A full inbox cannot refuse this: keep trying briefly, the worker is draining it.
            let deadline = Instant::now() + Duration::from_secs(1);
            while !self.workers.deliver(worker, Envelope::Shutdown) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Wakes an acceptor's poll from another thread to make it stop.
pub(crate) fn stop_token() -> Token {
    STOP
}
