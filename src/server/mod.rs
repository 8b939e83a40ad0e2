//! The I/O shell: the threads, the sockets, the event loops. Generic over the [`Service`] that
//! gives connections their meaning, so the Pusher gateway and the conformance echo server run
//! on the same loop.
//!
//! [`start`] binds the listener, creates one worker per thread (each a mio `Poll` with a
//! `Waker` and a bounded inbox) and the acceptor thread, and returns a [`Server`] handle to
//! read metrics, talk to workers, and stop.
//!
//! Stopping drains the node: the workers close their clients, and the listener stays open (HTTP
//! only; new WebSocket clients are refused by the service, which sees
//! [`NodeStatus::is_draining`]) until the node holds no connection or the shutdown grace is
//! over, so a load balancer's health checks are answered "not ready" instead of refused while
//! the node goes.

mod acceptor;
mod conns;
mod peers;
mod pending;
mod service;
mod status;
mod tls;
mod worker;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::error;
use mio::net::TcpListener;
use mio::{Poll, Waker};

pub use conns::{ConnInfo, ConnLimits, Conns, Flush};
pub use peers::{Outbox, Peers, Sent};
pub use pending::PendingCaps;
pub use service::{Ended, Routed, Service};
pub use status::NodeStatus;
pub use tls::{TlsConfig, TlsError, TlsFiles};

use crate::fanout::pool::FramePool;
use crate::fanout::WorkerId;
use crate::metrics::WorkerMetrics;
use acceptor::Acceptor;
use pending::{Pending, RefusalLog};
use tls::Certificate;
use worker::{Timing, Worker, WAKER};

/// Connections the kernel completes and holds for the acceptor (it caps this at
/// `net.core.somaxconn`, 4096 by default since Linux 5.4). mio and std listen with 128, which a
/// burst of connects (a reconnect storm, a flood) overflows whenever the acceptor is off the CPU
/// for a moment: the kernel then drops SYNs, and those clients wait a second or more for their
/// retry.
const LISTEN_BACKLOG: i32 = 4096;

/// A non-blocking listener on `addr` with [`LISTEN_BACKLOG`].
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    // As mio does: rebind at once after a restart, without waiting out TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Messages a worker's inbox holds before senders are refused.
pub const INBOX_CAPACITY: usize = 65_536;

/// How the shell runs.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Worker threads.
    pub workers: usize,
    /// Per-connection limits.
    pub limits: ConnLimits,
    /// Backpressure longer than this evicts a connection.
    pub evict_after: Duration,
    /// Time allowed for an HTTP request to arrive, and for an idle keep-alive connection.
    pub request_timeout: Duration,
    /// Time allowed to flush close frames at shutdown.
    pub shutdown_grace: Duration,
    /// How long a large fan-out's writes may be held to coalesce more frames into each write.
    pub write_coalesce: Duration,
    /// Stop on SIGINT and SIGTERM; reload on SIGHUP.
    pub handle_signals: bool,
    /// Serve TLS with this certificate and key; `None`: plain TCP.
    pub tls: Option<TlsFiles>,
    /// Caps on connections that have not finished their handshake.
    pub pending_caps: PendingCaps,
}

/// What a service is built with, one per worker.
pub struct WorkerContext<M> {
    /// This worker's index.
    pub id: WorkerId,
    /// Handles to every worker (this one included).
    pub peers: Peers<M>,
    /// This worker's metrics.
    pub metrics: Arc<WorkerMetrics>,
    /// The whole node: its open connections, and whether it is draining.
    pub node: NodeStatus,
    /// The node's frame pool.
    pub pool: FramePool,
}

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A socket, poll or thread could not be made.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The TLS certificate or key was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl From<StartError> for io::Error {
    /// For callers that report any start failure as I/O; a refused certificate is a bad
    /// setting (`InvalidInput`), with its reason in the message.
    fn from(error: StartError) -> io::Error {
        match error {
            StartError::Io(e) => e,
            StartError::Tls(e) => io::Error::new(io::ErrorKind::InvalidInput, e),
        }
    }
}

/// A running server.
pub struct Server<M> {
    local_addr: SocketAddr,
    peers: Peers<M>,
    status: NodeStatus,
    pool: FramePool,
    stop: Arc<AtomicBool>,
    acceptor_waker: Arc<Waker>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts the acceptor and `settings.workers` workers, each running a service from
/// `make_service`.
pub fn start<Svc, F>(settings: ServerSettings, pool: FramePool, mut make_service: F) -> Result<Server<Svc::Message>, StartError>
where
    Svc: Service + Send,
    F: FnMut(WorkerContext<Svc::Message>) -> Svc,
{
    // First: a certificate that cannot serve is refused before anything runs.
    let tls = settings.tls.clone().map(Certificate::load).transpose()?;
    let listener = bind(settings.listen)?;
    let local_addr = listener.local_addr()?;
    let workers = settings.workers.clamp(1, crate::fanout::directory::MAX_WORKERS);

    let mut parts = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::bounded(INBOX_CAPACITY);
        handles.push((tx, waker.clone()));
        parts.push((poll, waker, rx));
    }
    let peers = Peers::new(handles);
    let timing = Timing {
        evict_after: settings.evict_after,
        request_timeout: settings.request_timeout,
        shutdown_grace: settings.shutdown_grace,
        write_coalesce: settings.write_coalesce,
    };

    let (pending, releaser) = Pending::new(settings.pending_caps);
    let metrics: Arc<[Arc<WorkerMetrics>]> = (0..workers).map(|_| Arc::new(WorkerMetrics::default())).collect();
    let status = NodeStatus::new(metrics.clone());

    let mut threads = Vec::with_capacity(workers + 1);
    for (index, (poll, waker, inbox)) in parts.into_iter().enumerate() {
        let worker_metrics = metrics[index].clone();
        let context = WorkerContext {
            id: WorkerId(index),
            peers: peers.clone(),
            metrics: worker_metrics.clone(),
            node: status.clone(),
            pool: pool.clone(),
        };
        let service = make_service(context);
        let (limits, pool, timing, releaser) = (settings.limits.clone(), pool.clone(), timing.clone(), releaser.clone());
        // Built on its own thread: sessions never cross threads, so they need not be `Send`.
        let run = move || {
            let conns = Conns::new(limits, pool, worker_metrics.clone());
            Worker::new(poll, waker, conns, service, inbox, worker_metrics, timing, releaser).run();
        };
        threads.push(std::thread::Builder::new().name(format!("flux-worker-{index}")).spawn(run)?);
    }

    let poll = Poll::new()?;
    let acceptor_waker = Arc::new(Waker::new(poll.registry(), acceptor::stop_token())?);
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = Acceptor {
        poll,
        listener,
        workers: peers.clone(),
        stop: stop.clone(),
        handle_signals: settings.handle_signals,
        node: status.clone(),
        grace: settings.shutdown_grace,
        tls,
        pending,
        refusals: RefusalLog::default(),
    };
    threads.push(std::thread::Builder::new().name("flux-acceptor".into()).spawn(move || acceptor.run())?);

    Ok(Server { local_addr, peers, status, pool, stop, acceptor_waker, threads })
}

impl<M> Server<M> {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Handles to the workers, to send them service messages.
    pub fn peers(&self) -> &Peers<M> {
        &self.peers
    }

    /// The node as a whole: every worker's metrics, its open connections, whether it drains.
    pub fn status(&self) -> &NodeStatus {
        &self.status
    }

    /// The frame pool.
    pub fn pool(&self) -> &FramePool {
        &self.pool
    }

    /// Asks the server to stop: close 4200 to every client, flush, exit; until its connections
    /// are gone the listener stays open for HTTP (see the module doc).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.acceptor_waker.wake() {
            error!("could not wake the acceptor to stop: {e}");
        }
    }

    /// Waits until every thread has finished (after [`stop`](Self::stop) or a signal).
    pub fn join(self) {
        for thread in self.threads {
            if thread.join().is_err() {
                error!("a server thread panicked");
            }
        }
    }
}
