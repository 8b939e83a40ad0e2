//! A running gateway node: the server shell with a [`PusherService`] on every worker, the
//! webhook delivery thread when a webhook URL is set, the ways to observe it ([`Observer`]:
//! metrics, connection snapshots, evictions, webhooks) and to stop it.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

use hdrhistogram::Histogram;

use super::evictions::{Eviction, EvictionLog};
use super::reload::{AppsSource, ReloadOnHangup};
use super::{Message, PusherService};
use crate::apps::{AppConfig, Apps, SharedApps};
use crate::cluster::{Cluster, ClusterLink, ClusterSettings, ClusterStatus};
use crate::config::Config;
use crate::fanout::pool::{FramePool, PoolStats};
use crate::fanout::WorkerId;
use crate::heap::HeapCounts;
use crate::metrics::{Counters, LatencySummary, SharedHistogram, WorkerMetrics};
use crate::pusher::session::Policy;
use crate::server::{self, ConnLimits, NodeStatus, Peers, Server, ServerSettings};
use crate::webhooks::{DeliverySettings, WebhookStats, Webhooks};

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

/// The apps `config` names: its apps file's (apps `previous` had keep their indices), or the one
/// app of its `FLUX_APP_*` settings.
fn load_apps(config: &Config, previous: Option<&Apps>) -> io::Result<Apps> {
    match &config.apps_file {
        Some(_) if config.webhook_url.is_some() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "FLUX_WEBHOOK_URL is the webhook of the FLUX_APP_* app; with an apps file, list each app's [[apps.webhooks]] there",
        )),
        Some(path) => Apps::load(path, config.max_payload, previous).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        None => Ok(Apps::new(vec![AppConfig::from_settings(config)])),
    }
}

/// A running Flux node.
pub struct Gateway {
    server: Server<Message>,
    observer: Observer,
    /// Stopped after the server, so the webhooks of the last connections' closes are posted.
    webhooks: Webhooks,
    /// Stopped after the server too, so the other nodes hear of the last closes before this
    /// node says it leaves.
    cluster: Option<Cluster>,
    /// The apps file, if the apps come from one.
    apps_source: Option<AppsSource>,
    /// Reloads it on SIGHUP, when the node handles signals.
    reload: Option<ReloadOnHangup>,
    shutdown_grace: Duration,
}

/// A read-only view of a running node for other threads (the dashboard, tests). Cheap to clone
/// and `Send + Sync`: it reads the workers' atomic counters and asks workers for snapshots
/// through their bounded inboxes, so no call on it ever blocks a worker.
#[derive(Clone)]
pub struct Observer {
    peers: Peers<Message>,
    status: NodeStatus,
    pool: FramePool,
    evictions: Arc<EvictionLog>,
    webhooks: Webhooks,
    cluster: Option<ClusterLink>,
    apps: SharedApps,
}

impl Gateway {
    /// Starts a node configured by `config`. With `handle_signals`, SIGINT and SIGTERM stop it.
    pub fn start(config: &Config, handle_signals: bool) -> io::Result<Gateway> {
        let apps: SharedApps = Arc::new(ArcSwap::from_pointee(load_apps(config, None)?));
        // Started first, so every worker's service gets its handle. Should the server then fail
        // to start, dropping the last handle stops the delivery threads again.
        let webhooks = Webhooks::new(DeliverySettings::from_config(config));
        webhooks.configure(&apps.load())?;
        let policy = Arc::new(Policy::from_config(config));
        let server_settings = ServerSettings {
            listen: config.listen_addr(),
            workers: config.worker_count(),
            limits: ConnLimits {
                ring_slots: config.ring_slots as usize,
                max_head: MAX_REQUEST_HEAD,
                max_body: config.max_body_bytes(),
                max_message: config.max_message_bytes(),
                close_linger: CLOSE_LINGER,
                send_buffer: config.send_buffer(),
            },
            evict_after: config.evict_after(),
            request_timeout: config.handshake_timeout(),
            shutdown_grace: config.shutdown_grace(),
            write_coalesce: config.write_coalesce(),
            handle_signals,
            tls: config.tls_files(),
            pending_caps: config.pending_caps(),
        };
        let evictions = Arc::new(EvictionLog::default());
        let subscriptions = Arc::new(AtomicUsize::new(0));
        let prepared = ClusterSettings::from_config(config)
            .map(|settings| Cluster::prepare(settings, apps.clone()))
            .transpose()
            .map_err(io::Error::other)?;
        let link = prepared.as_ref().map(|p| p.link().clone());
        let server = server::start(server_settings, FramePool::default(), |context| {
            PusherService::new(
                context,
                policy.clone(),
                apps.clone(),
                evictions.clone(),
                subscriptions.clone(),
                webhooks.clone(),
                link.clone(),
            )
        })?;
        let status = server.status().clone();
        let cluster = match prepared {
            Some(prepared) => {
                let node = status.clone();
                let connections = move || node.websockets();
                let started = prepared.start(server.peers().clone(), server.pool().clone(), server.local_addr().to_string(), connections);
                match started {
                    Ok(cluster) => Some(cluster),
                    Err(e) => {
                        server.stop();
                        server.join();
                        return Err(io::Error::other(e));
                    }
                }
            }
            None => None,
        };
        let observer = Observer {
            peers: server.peers().clone(),
            status,
            pool: server.pool().clone(),
            evictions,
            webhooks: webhooks.clone(),
            cluster: link,
            apps: apps.clone(),
        };
        let apps_source = config.apps_file.clone().map(|path| AppsSource {
            path,
            max_payload: config.max_payload,
            apps: apps.clone(),
            webhooks: webhooks.clone(),
        });
        let reload = match (&apps_source, handle_signals) {
            (Some(source), true) => Some(ReloadOnHangup::start(source.clone())?),
            _ => None,
        };
        Ok(Gateway { server, observer, webhooks, cluster, apps_source, reload, shutdown_grace: config.shutdown_grace() })
    }

    /// The address clients and REST callers use.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.server.peers().len()
    }

    /// The node's observer: counters, pool, fan-out times, connections and evictions.
    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// The node's webhook handle, for emitting from outside the workers (inside them, the
    /// service holds the same handle).
    pub fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }

    /// Reads the apps file again, as SIGHUP does: `Ok(None)` without an apps file, else the
    /// number of apps now served. A bad file changes nothing.
    pub fn reload_apps(&self) -> Result<Option<usize>, crate::apps::AppsError> {
        self.apps_source.as_ref().map(AppsSource::reload).transpose()
    }

    /// Asks the node to stop: no more accepts, close 4200 to every client, flush, then exit.
    pub fn stop(&self) {
        self.server.stop();
    }

    /// Waits until the node has stopped, then posts the webhooks still queued (for at most
    /// `FLUX_SHUTDOWN_GRACE_MS`) and stops the webhook thread.
    pub fn join(self) {
        self.server.join();
        if let Some(reload) = self.reload {
            reload.stop();
        }
        if let Some(cluster) = self.cluster {
            cluster.stop(self.shutdown_grace);
        }
        self.webhooks.stop();
    }
}

impl Observer {
    /// The apps the node serves now.
    pub fn apps(&self) -> Arc<Apps> {
        self.apps.load_full()
    }

    /// All workers' counters, added up.
    pub fn counters(&self) -> Counters {
        self.status.counters()
    }

    /// The frame pool's counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// The process's heap allocations since start, if the counting allocator is installed (the
    /// `flux` binary installs it). Process-wide: with several nodes in one process (tests) each
    /// reports the same.
    pub fn heap(&self) -> Option<HeapCounts> {
        Some(crate::heap::totals()).filter(HeapCounts::counting)
    }

    /// Every worker's fan-out times (publish to the last ring of each worker, in microseconds)
    /// merged into one histogram, over the node's life.
    pub fn fanout_histogram(&self) -> Option<Histogram<u64>> {
        self.merged(|metrics| &metrics.fanout)
    }

    /// Every worker's times from a publish on another node to its delivery here, merged, over
    /// the node's life.
    pub fn remote_delivery_histogram(&self) -> Option<Histogram<u64>> {
        self.merged(|metrics| &metrics.remote_delivery)
    }

    fn merged(&self, which: impl Fn(&WorkerMetrics) -> &SharedHistogram) -> Option<Histogram<u64>> {
        let mut merged = None::<Histogram<u64>>;
        for metrics in self.status.workers() {
            let histogram = which(metrics).snapshot();
            match merged.as_mut() {
                None => merged = Some(histogram),
                Some(m) => {
                    // Every worker's histogram has the same bounds, so adding cannot fail.
                    let _ = m.add(&histogram);
                }
            }
        }
        merged
    }

    /// Fan-out time percentiles, over the node's life.
    pub fn fanout_latency(&self) -> LatencySummary {
        self.fanout_histogram().map(|h| LatencySummary::of(&h)).unwrap_or_default()
    }

    /// The webhook counters and queue depth (all zero when webhooks are off).
    pub fn webhooks(&self) -> WebhookStats {
        self.webhooks.stats()
    }

    /// The cluster as this node sees it; `None` for a single node.
    pub fn cluster(&self) -> Option<ClusterStatus> {
        let mut status = self.cluster.as_ref().map(ClusterLink::status)?;
        status.remote_delivery = self.remote_delivery_histogram().map(|h| LatencySummary::of(&h)).unwrap_or_default();
        Some(status)
    }

    /// The most recent evictions, newest first.
    pub fn evictions(&self) -> Vec<Eviction> {
        self.evictions.recent()
    }

    /// Every open WebSocket connection, asked of each worker (waiting at most `timeout` for a
    /// busy one; its connections are then missing from the answer). A worker whose inbox is
    /// full is not asked, so this never waits on a worker to make room.
    pub fn connections(&self, timeout: Duration) -> Vec<ConnectionSnapshot> {
        let workers = self.peers.len();
        let (tx, rx) = crossbeam_channel::bounded(workers);
        let asked = (0..workers).filter(|&w| self.peers.send_now(WorkerId(w), Message::Snapshot(tx.clone()))).count();
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
}
