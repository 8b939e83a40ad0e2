//! The acceptor: a small thread with its own `Poll` that accepts connections and deals them out
//! to the workers in turn, and turns SIGINT/SIGTERM (or a stop request) into a shutdown.
//!
//! A shutdown is a drain: the node is marked draining, the workers are told to close their
//! clients, and accepting goes on until the node holds no connection (every client gone) or the
//! grace is over, so that a load balancer's `GET /ready` is answered 503 meanwhile instead of
//! being refused. Then the workers are told to finish and the acceptor returns, closing the
//! listener. A worker finishes once its connections are gone: one accepted just before the end
//! reaches its inbox ahead of the finish, so it is served, not dropped.
//!
//! An accept error other than WouldBlock — above all EMFILE at the open-file limit — pauses
//! accepting for a moment instead of retrying at once: with an edge-triggered listener a retry
//! loop would spin, and the workers keep serving the connections they have meanwhile. Such an
//! episode is logged when it starts and summed up when it ends, not once per retry.
//!
//! On a TLS port, SIGHUP reloads the certificate for the connections accepted after it (see
//! [`Acceptor::reload_tls`]). The apps file has a SIGHUP listener of its own
//! ([`crate::gateway`]'s reload thread): each part reloads on its own, and a bad file of one
//! does not stop the other. A plain port does not listen for SIGHUP.
//!
//! A connection is never refused because a worker is busy: one whose inbox is full is skipped
//! for the next, and when every inbox is full the connection is held and accepting stops (the
//! kernel's backlog keeps the rest) until a retry, with backoff, hands it over.
//!
//! A connection is refused, closed as soon as it is accepted, when the node or its source
//! address already holds its cap of connections that have not finished their handshake (see
//! [`super::pending`]); refusals are counted and logged once per episode, then summed up.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use super::peers::Peers;
use super::pending::{Pending, RefusalLog, Refused};
use super::status::NodeStatus;
use super::tls::Certificate;
use super::worker::Envelope;
use crate::metrics::WorkerMetrics;

const LISTENER: Token = Token(0);
const STOP: Token = Token(1);
const SIGNALS: Token = Token(2);

/// How often a drain looks whether the node's connections are all gone. Reading the workers'
/// gauges, rather than having each worker report when it empties, keeps the drain's end in one
/// place; a drain lasts at most the shutdown grace, so this costs a few hundred wake-ups at most.
const DRAIN_CHECK: Duration = Duration::from_millis(10);

/// How long accepting pauses after an accept error such as EMFILE.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// First wait before a held connection is offered to the workers again; it doubles up to
/// [`HAND_OVER_RETRY_MAX`].
const HAND_OVER_RETRY_FIRST: Duration = Duration::from_millis(1);
const HAND_OVER_RETRY_MAX: Duration = Duration::from_millis(64);

/// Why accepting stopped before WouldBlock.
enum Stopped<M> {
    /// Every worker's inbox is full; a connection is held.
    WorkersBusy(Envelope<M>),
    /// accept() failed (EMFILE and the like).
    Failed(io::Error),
}

/// A run of failed accepts, logged once when it starts and once when it ends.
struct FailedEpisode {
    since: Instant,
    failures: u64,
}

pub(crate) struct Acceptor<M> {
    pub(crate) poll: Poll,
    pub(crate) listener: TcpListener,
    pub(crate) workers: Peers<M>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) handle_signals: bool,
    /// Marked draining when the shutdown begins; its connection count ends the drain.
    pub(crate) node: NodeStatus,
    /// The longest a drain lasts.
    pub(crate) grace: Duration,
    /// The certificate of a TLS port; `None` on a plain one.
    pub(crate) tls: Option<Certificate>,
    /// Connections accepted that have not finished their handshake, against their caps.
    pub(crate) pending: Pending,
    pub(crate) refusals: RefusalLog,
}

impl<M: Send + 'static> Acceptor<M> {
    pub(crate) fn run(mut self) {
        if let Err(e) = self.poll.registry().register(&mut self.listener, LISTENER, Interest::READABLE) {
            warn!("could not register the listener: {e}");
            return self.tell_workers(|| Envelope::Finish);
        }
        let mut signals = if self.handle_signals { self.register_signals() } else { None };
        let mut events = Events::with_capacity(64);
        let mut next_worker = 0usize;
        // Accepting waits until this instant: after an accept error, or while a connection is held.
        let mut paused_until: Option<Instant> = None;
        let mut held: Option<Envelope<M>> = None;
        let mut hand_over_backoff = HAND_OVER_RETRY_FIRST;
        let mut failing: Option<FailedEpisode> = None;
        // When the drain must end at the latest, once it has begun.
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let wait = paused_until.map(|t| t.saturating_duration_since(Instant::now()));
            let timeout = if drain_deadline.is_some() { Some(wait.map_or(DRAIN_CHECK, |w| w.min(DRAIN_CHECK))) } else { wait };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("acceptor poll failed: {e}");
                break;
            }
            // Read every time, so that signals arriving during the drain are consumed too.
            let (mut signalled, mut reload) = (false, false);
            if let Some(signals) = signals.as_mut().filter(|_| events.iter().any(|e| e.token() == SIGNALS)) {
                for signal in signals.pending() {
                    match signal {
                        SIGHUP => reload = true,
                        _ => signalled = true,
                    }
                }
            }
            if reload {
                self.reload_tls();
            }
            if let Some(line) = self.refusals.summary(Instant::now()) {
                warn!("{line}");
            }
            if drain_deadline.is_none() && (signalled || self.stop.load(Ordering::Acquire)) {
                let cause = if signalled { "signal received" } else { "stop requested" };
                info!("{cause}: stopping; health checks are answered until every client is gone");
                drain_deadline = Some(Instant::now() + self.grace);
                self.node.start_draining();
                self.tell_workers(|| Envelope::Shutdown);
            }
            if drain_deadline.is_some_and(|end| self.node.connections() == 0 || Instant::now() >= end) {
                break;
            }
            if paused_until.is_some_and(|t| Instant::now() < t) {
                continue; // After an accept error, or with a connection held: not yet.
            }
            let resumed = paused_until.take().is_some();
            if let Some(connection) = held.take() {
                if let Err(still_held) = self.hand_over(connection, &mut next_worker) {
                    held = Some(still_held);
                    hand_over_backoff = (hand_over_backoff * 2).min(HAND_OVER_RETRY_MAX);
                    paused_until = Some(Instant::now() + hand_over_backoff);
                    continue;
                }
                hand_over_backoff = HAND_OVER_RETRY_FIRST;
            }
            if !resumed && !events.iter().any(|e| e.token() == LISTENER) {
                continue;
            }
            match self.accept_ready(&mut next_worker) {
                Ok(()) => {}
                Err(Stopped::WorkersBusy(connection)) => {
                    if let Envelope::Adopt(_, peer, _) = &connection {
                        warn!("every worker's inbox is full; holding the connection from {peer} until one has room");
                    }
                    held = Some(connection);
                    paused_until = Some(Instant::now() + hand_over_backoff);
                    continue;
                }
                Err(Stopped::Failed(e)) => {
                    let episode = failing.get_or_insert_with(|| {
                        warn!("accept failed ({e}); pausing accepts, retrying every {} ms until it works", ACCEPT_PAUSE.as_millis());
                        FailedEpisode { since: Instant::now(), failures: 0 }
                    });
                    episode.failures += 1;
                    paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    continue;
                }
            }
            if let Some(episode) = failing.take() {
                info!("accepting again after {} failed attempts over {} ms", episode.failures, episode.since.elapsed().as_millis());
            }
        }
        // Also after a failed poll, with no drain: the workers close their clients and finish.
        self.tell_workers(|| Envelope::Finish);
    }

    /// Loads the certificate and key again; connections accepted from now on get the new pair,
    /// the ones open keep theirs. A refused pair leaves the current one in place.
    fn reload_tls(&mut self) {
        let Some(certificate) = self.tls.as_mut() else {
            return;
        };
        match certificate.reload() {
            Ok(()) => info!("TLS certificate reloaded from {} for new connections", certificate.cert_path().display()),
            Err(e) => error!("TLS reload refused, new connections keep the previous certificate: {e}"),
        }
    }

    fn register_signals(&mut self) -> Option<Signals> {
        // SIGHUP only on a TLS port, where there is a certificate to reload.
        let hangup = self.tls.as_ref().map(|_| SIGHUP);
        let mut signals = match Signals::new([SIGINT, SIGTERM].into_iter().chain(hangup)) {
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

    /// Accepts until WouldBlock, handing each connection to a worker; says why it stopped
    /// otherwise.
    fn accept_ready(&mut self, next_worker: &mut usize) -> Result<(), Stopped<M>> {
        loop {
            match self.listener.accept() {
                Ok((socket, peer)) => {
                    if let Err(why) = self.pending.admit(peer.ip()) {
                        self.refuse(socket, peer, why);
                        continue;
                    }
                    let tls = self.tls.as_ref().map(|certificate| certificate.current().clone());
                    self.hand_over(Envelope::Adopt(socket, peer, tls), next_worker).map_err(Stopped::WorkersBusy)?
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(e) => return Err(Stopped::Failed(e)),
            }
        }
    }

    /// Closes a connection over a cap on unfinished handshakes: nothing is read or written, and
    /// no worker sees it.
    fn refuse(&mut self, socket: mio::net::TcpStream, peer: std::net::SocketAddr, why: Refused) {
        drop(socket);
        let counters = self.node.acceptor_counters();
        match why {
            Refused::Node => WorkerMetrics::add(&counters.handshakes_refused_node, 1),
            Refused::Source => WorkerMetrics::add(&counters.handshakes_refused_per_ip, 1),
        }
        if let Some(line) = self.refusals.refused(peer.ip(), why, Instant::now()) {
            warn!("{line}");
        }
    }

    /// Gives the connection in `adopt` to the next worker in turn, or to the first after it whose inbox has
    /// room; hands it back when every inbox is full.
    fn hand_over(&self, mut adopt: Envelope<M>, next_worker: &mut usize) -> Result<(), Envelope<M>> {
        for _ in 0..self.workers.len() {
            let worker = *next_worker % self.workers.len();
            *next_worker = next_worker.wrapping_add(1);
            match self.workers.deliver(worker, adopt) {
                Ok(()) => return Ok(()),
                Err(refused) => adopt = refused,
            }
        }
        Err(adopt)
    }

    /// Puts an envelope made by `envelope` in every worker's inbox. A full inbox cannot refuse
    /// it: keep trying briefly, the worker is draining it.
    fn tell_workers(&self, envelope: impl Fn() -> Envelope<M>) {
        for worker in 0..self.workers.len() {
            let deadline = Instant::now() + Duration::from_secs(1);
            while self.workers.deliver(worker, envelope()).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Wakes an acceptor's poll from another thread to make it stop.
pub(crate) fn stop_token() -> Token {
    STOP
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::WorkerId;
    use crate::server::pending::PendingCaps;

    /// An acceptor over two workers whose inboxes hold `capacity` envelopes each, those inboxes,
    /// and the workers' polls (a waker needs a poll of its own).
    fn acceptor(capacity: usize) -> (Acceptor<u32>, Vec<crossbeam_channel::Receiver<Envelope<u32>>>, Vec<Poll>) {
        let (mut handles, mut inboxes, mut polls) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..2 {
            let poll = Poll::new().expect("poll");
            let waker = Arc::new(mio::Waker::new(poll.registry(), Token(10)).expect("waker"));
            let (tx, rx) = crossbeam_channel::bounded(capacity);
            handles.push((tx, waker));
            inboxes.push(rx);
            polls.push(poll);
        }
        let listener = TcpListener::bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let acceptor = Acceptor {
            poll: Poll::new().expect("poll"),
            listener,
            workers: Peers::new(handles),
            stop: Arc::new(AtomicBool::new(false)),
            handle_signals: false,
            node: NodeStatus::new(Arc::new([])),
            grace: Duration::from_secs(1),
            tls: None,
            pending: Pending::new(PendingCaps { per_node: 100, per_source: 100 }).0,
            refusals: RefusalLog::default(),
        };
        (acceptor, inboxes, polls)
    }

    fn connection(acceptor: &Acceptor<u32>) -> Envelope<u32> {
        let addr = acceptor.listener.local_addr().expect("address");
        let socket = mio::net::TcpStream::connect(addr).expect("connect");
        Envelope::Adopt(socket, addr, None)
    }

    #[test]
    fn a_busy_worker_is_skipped_and_a_connection_is_held_only_while_every_worker_is_busy() {
        let (acceptor, inboxes, _polls) = acceptor(1);
        let mut next_worker = 0;
        assert!(acceptor.workers.send_now(WorkerId(0), 7), "worker 0's inbox is now full");
        assert!(acceptor.hand_over(connection(&acceptor), &mut next_worker).is_ok(), "worker 1 takes it");
        assert!(matches!(inboxes[1].try_recv(), Ok(Envelope::Adopt(..))));
        assert!(acceptor.workers.send_now(WorkerId(1), 7), "worker 1's inbox is now full too");
        let held = acceptor.hand_over(connection(&acceptor), &mut next_worker).expect_err("nobody has room: held");
        assert!(matches!(inboxes[0].try_recv(), Ok(Envelope::Service(7))), "worker 0 drains its inbox");
        assert!(acceptor.hand_over(held, &mut next_worker).is_ok(), "the held connection goes to worker 0");
        assert!(matches!(inboxes[0].try_recv(), Ok(Envelope::Adopt(..))));
    }

    /// A loopback connection to `addr` from `source`.
    fn connect_from(source: [u8; 4], addr: std::net::SocketAddr) -> std::net::TcpStream {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.bind(&std::net::SocketAddr::from((source, 0)).into()).expect("bind the source address");
        socket.connect(&addr.into()).expect("connect");
        socket.into()
    }

    #[test]
    fn past_an_address_cap_connections_are_refused_at_accept_and_counted_while_others_get_in() {
        let (mut acceptor, inboxes, _polls) = acceptor(64);
        let (pending, releaser) = Pending::new(PendingCaps { per_node: 100, per_source: 3 });
        acceptor.pending = pending;
        let addr = acceptor.listener.local_addr().expect("address");
        let flood: Vec<_> = (0..5).map(|_| connect_from([127, 0, 0, 2], addr)).collect();
        let other = connect_from([127, 0, 0, 3], addr);
        std::thread::sleep(Duration::from_millis(50)); // Into the listen backlog.
        let mut next_worker = 0;
        assert!(acceptor.accept_ready(&mut next_worker).is_ok());
        let handed: Vec<_> = inboxes
            .iter()
            .flat_map(|inbox| inbox.try_iter())
            .map(|envelope| match envelope {
                Envelope::Adopt(_, peer, _) => peer.ip().to_string(),
                _ => panic!("only connections are handed over"),
            })
            .collect();
        assert_eq!(handed.iter().filter(|ip| *ip == "127.0.0.2").count(), 3, "{handed:?}");
        assert_eq!(handed.iter().filter(|ip| *ip == "127.0.0.3").count(), 1, "{handed:?}");
        let counters = acceptor.node.counters();
        assert_eq!((counters.handshakes_refused_per_ip, counters.handshakes_refused_node), (2, 0));
        // A worker releasing one of them makes room for one more from that address.
        releaser.release(flood[0].local_addr().expect("address").ip());
        let _late = connect_from([127, 0, 0, 2], addr);
        std::thread::sleep(Duration::from_millis(50));
        assert!(acceptor.accept_ready(&mut next_worker).is_ok());
        assert_eq!(inboxes.iter().map(|inbox| inbox.try_iter().count()).sum::<usize>(), 1);
        drop((flood, other));
    }

    #[test]
    fn a_drain_accepts_until_the_node_holds_no_connection_then_tells_the_workers_to_finish() {
        let (mut acceptor, inboxes, _polls) = acceptor(8);
        let metrics = Arc::new(WorkerMetrics::default());
        WorkerMetrics::add(&metrics.counters.connections, 1); // A client still closing.
        acceptor.node = NodeStatus::new(Arc::new([metrics.clone()]));
        acceptor.grace = Duration::from_secs(60);
        let (node, addr) = (acceptor.node.clone(), acceptor.listener.local_addr().expect("address"));
        let waker = mio::Waker::new(acceptor.poll.registry(), stop_token()).expect("waker");
        acceptor.stop.store(true, Ordering::Release);
        waker.wake().expect("wake");
        let running = std::thread::spawn(move || acceptor.run());

        // Draining, with the listener still open: what it accepts now is handed over.
        let _late = std::net::TcpStream::connect(addr).expect("the listener is open during the drain");
        let mut seen: Vec<Vec<&str>> = vec![Vec::new(); inboxes.len()];
        let kind = |envelope: Envelope<u32>| match envelope {
            Envelope::Adopt(..) => "adopt",
            Envelope::Shutdown => "shutdown",
            Envelope::Finish => "finish",
            Envelope::Service(_) => "service",
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen.iter().flatten().any(|&k| k == "adopt") {
            assert!(Instant::now() < deadline, "the late connection was never handed over: {seen:?}");
            for (worker, inbox) in inboxes.iter().enumerate() {
                seen[worker].extend(inbox.try_iter().map(kind));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(node.is_draining());

        // The last connection goes: the drain ends, the acceptor returns.
        WorkerMetrics::sub(&metrics.counters.connections, 1);
        running.join().expect("the acceptor returns");
        for (worker, inbox) in inboxes.iter().enumerate() {
            seen[worker].extend(inbox.try_iter().map(kind));
        }
        for inbox in &seen {
            assert_eq!(inbox.first(), Some(&"shutdown"), "{seen:?}");
            assert_eq!(inbox.last(), Some(&"finish"), "after every connection handed over: {seen:?}");
        }
        assert_eq!(seen.concat().iter().filter(|&&k| k == "adopt").count(), 1, "{seen:?}");
    }
}
