//! A running gateway node: the server shell with a [`PusherService`] on every worker, and the
//! ways to observe it (metrics, connection snapshots) and to stop it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Message, PusherService, Settings};
use crate::config::Config;
use crate::fanout::pool::{FramePool, PoolStats};
use crate::fanout::WorkerId;
use crate::metrics::{Counters, LatencySummary};
use crate::pusher::session::Timeouts;
use crate::pusher::App;
use crate::server::{self, ConnLimits, Server, ServerSettings};

/// Largest HTTP request head (request line and headers).
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// How long a closing connection waits for the client's close frame before the socket is
/// dropped; also the chance an evicted slow consumer gets to read its 4100.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// One connection as seen from outside its worker.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionSnapshot {
    /// The worker that owns it.
    pub worker: usize,
    /// Its socket id.
    pub socket_id: String,
    /// The client's address.
    pub peer: String,
    /// Channels it subscribes to.
    pub channels: Vec<String>,
    /// Frames queued in its ring.
    pub ring_len: usize,
    /// Its ring's bound.
    pub ring_slots: usize,
    /// Frames dropped because its ring was full.
    pub dropped: u64,
    /// How long it has been backpressured, if it is.
    pub backpressured_ms: Option<u64>,
}

/// A running Flux node.
pub struct Gateway {
    server: Server<Message>,
}

impl Gateway {
    /// Starts a node configured by `config`. With `handle_signals`, SIGINT and SIGTERM stop it.
    pub fn start(config: &Config, handle_signals: bool) -> io::Result<Gateway> {
        let settings = Arc::new(Settings {
            app: App::from_config(config),
            timeouts: Timeouts { activity: config.activity_timeout(), pong: config.pong_timeout() },
            max_payload: config.max_payload,
        });
        let server_settings = ServerSettings {
            listen: config.listen_addr(),
            workers: config.worker_count(),
            limits: ConnLimits {
                ring_slots: config.ring_slots as usize,
                max_head: MAX_REQUEST_HEAD,
                max_body: config.max_body_bytes(),
                max_message: config.max_message_bytes(),
                close_linger: CLOSE_LINGER,
            },
            evict_after: config.evict_after(),
            request_timeout: config.handshake_timeout(),
            shutdown_grace: config.shutdown_grace(),
            write_coalesce: config.write_coalesce(),
            handle_signals,
        };
        let server = server::start(server_settings, FramePool::default(), |context| {
            PusherService::new(context, settings.clone())
        })?;
        Ok(Gateway { server })
    }

    /// The address clients and REST callers use.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.server.peers().len()
    }

    /// All workers' counters, added up.
    pub fn counters(&self) -> Counters {
        self.server.counters()
    }

    /// The frame pool's counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.server.pool().stats()
    }

    /// Fan-out time (publish to the last ring of each worker) percentiles, over the node's life.
    pub fn fanout_latency(&self) -> LatencySummary {
        let mut merged = None::<hdrhistogram::Histogram<u64>>;
        for metrics in self.server.worker_metrics() {
            let histogram = metrics.fanout_histogram();
            match merged.as_mut() {
                None => merged = Some(histogram),
                Some(m) => {
                    let _ = m.add(&histogram);
                }
            }
        }
        merged.map(|h| LatencySummary::of(&h)).unwrap_or_default()
    }

    /// Every open WebSocket connection, asked of each worker (waiting at most `timeout` for a
    /// busy one; its connections are then missing from the answer).
    pub fn connections(&self, timeout: Duration) -> Vec<ConnectionSnapshot> {
        let (tx, rx) = crossbeam_channel::bounded(self.workers());
        let asked = (0..self.workers())
            .filter(|&w| self.server.peers().send_now(WorkerId(w), Message::Snapshot(tx.clone())))
            .count();
        let deadline = Instant::now() + timeout;
        let mut all = Vec::new();
        for _ in 0..asked {
            match rx.recv_deadline(deadline) {
                Ok(part) => all.extend(part),
                Err(_) => break,
            }
        }
        all
    }

    /// Asks the node to stop: no more accepts, close 4200 to every client, flush, then exit.
    pub fn stop(&self) {
        self.server.stop();
    }

    /// Waits until the node has stopped.
    pub fn join(self) {
        self.server.join();
    }
}
