//! The live dashboard: an HTTP server on its own port (`FLUX_DASHBOARD_PORT`) serving the page
//! in `static/` (compiled in), the JSON it polls (`/api/...`) and Prometheus metrics
//! (`/metrics`).
//!
//! It owns its threads: a sampler that turns counters into per-second rates, and a few
//! tiny_http request threads. It reads the gateway only through an [`Observer`] (atomic
//! counters, the pool's counters, merged histograms, the eviction log, and connection
//! snapshots asked of workers through their bounded inboxes), so it never runs on a worker's
//! thread, never holds a lock a worker takes per frame, and never makes a worker wait.

pub mod api;
mod assets;
pub mod prometheus;
pub mod sampler;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, warn};
use prometheus_client::registry::Registry;
use serde::Serialize;
use thiserror::Error;
use tiny_http::{Header, Method, Server};

use crate::gateway::Observer;
use api::{SnapshotCache, DEFAULT_CONNECTIONS_LIMIT, MAX_CONNECTIONS_LIMIT};
use assets::Asset;
use sampler::History;

/// Request threads: one can wait for a connection snapshot while another serves the rest.
const REQUEST_THREADS: usize = 2;

/// What can go wrong in the dashboard. Only [`Bind`](Self::Bind) and [`Spawn`](Self::Spawn)
/// are fatal (to starting it); the rest fail one request.
#[derive(Debug, Error)]
pub enum DashboardError {
    /// The dashboard's port could not be bound.
    #[error("could not listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("could not start a dashboard thread: {0}")]
    Spawn(#[source] io::Error),
    /// A request's `limit` was not a number in range.
    #[error("limit must be a number from 0 to {MAX_CONNECTIONS_LIMIT}")]
    InvalidLimit,
    /// A JSON document could not be encoded.
    #[error("could not encode JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The metrics could not be encoded.
    #[error("could not encode the metrics")]
    Metrics(#[from] fmt::Error),
}

impl DashboardError {
    fn status(&self) -> u16 {
        match self {
            DashboardError::InvalidLimit => 400,
            _ => 500,
        }
    }
}

/// A running dashboard. Stopping it (or dropping it) ends and joins its threads.
pub struct Dashboard {
    local_addr: SocketAddr,
    server: Arc<Server>,
    stopping: Arc<AtomicBool>,
    /// Dropping it stops the sampler.
    stop_sampler: Option<crossbeam_channel::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

/// What the request threads share.
struct Shared {
    observer: Observer,
    history: Arc<History>,
    registry: Registry,
    snapshots: SnapshotCache,
}

impl Dashboard {
    /// Listens on `addr` (port 0 picks a free one) and serves the node seen by `observer`.
    pub fn start(addr: SocketAddr, observer: Observer) -> Result<Dashboard, DashboardError> {
        let bind_error = |source| DashboardError::Bind { addr, source };
        let server = Server::http(addr).map_err(|e| bind_error(io::Error::other(e)))?;
        let local_addr = server.server_addr().to_ip().ok_or_else(|| bind_error(io::Error::other("the server is not on an IP address")))?;
        let server = Arc::new(server);
        let history = Arc::new(History::default());
        let (stop_sampler, sampler_stop) = crossbeam_channel::bounded(1);
        let mut dashboard = Dashboard {
            local_addr,
            server: server.clone(),
            stopping: Arc::new(AtomicBool::new(false)),
            stop_sampler: Some(stop_sampler),
            threads: Vec::with_capacity(REQUEST_THREADS + 1),
        };
        // From here on, a failed spawn drops `dashboard`, which stops the threads already started.
        let sampler = sampler::spawn(observer.clone(), history.clone(), sampler_stop).map_err(DashboardError::Spawn)?;
        dashboard.threads.push(sampler);
        let shared =
            Arc::new(Shared { registry: prometheus::registry(observer.clone()), observer, history, snapshots: SnapshotCache::default() });
        for index in 0..REQUEST_THREADS {
            let (server, shared, stopping) = (server.clone(), shared.clone(), dashboard.stopping.clone());
            let thread = std::thread::Builder::new()
                .name(format!("flux-dashboard-{index}"))
                .spawn(move || serve(&server, &shared, &stopping))
                .map_err(DashboardError::Spawn)?;
            dashboard.threads.push(thread);
        }
        Ok(dashboard)
    }

    /// The address the dashboard listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops serving and waits for the dashboard's threads.
    pub fn stop(self) {
        // Dropping does it.
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        self.stop_sampler = None;
        // Each unblock wakes exactly one thread waiting in `recv`; a busy one finds it when it
        // asks for its next request.
        for _ in 0..REQUEST_THREADS {
            self.server.unblock();
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                warn!("a dashboard thread panicked");
            }
        }
    }
}

/// A request thread: answers requests until the dashboard stops.
fn serve(server: &Server, shared: &Shared, stopping: &AtomicBool) {
    loop {
        let request = server.recv();
        if stopping.load(Ordering::Acquire) {
            return;
        }
        match request {
            Ok(request) => {
                let reply = answer(shared, request.method(), request.url());
                if let Err(e) = request.respond(reply.into_response()) {
                    debug!("dashboard: could not answer a request: {e}");
                }
            }
            Err(e) => debug!("dashboard: could not receive a request: {e}"),
        }
    }
}

/// The dashboard's paths.
#[derive(Debug, Clone, Copy)]
enum Route {
    Asset(&'static Asset),
    Stats,
    History,
    Connections,
    Evictions,
    Metrics,
}

impl Route {
    fn of(path: &str) -> Option<Route> {
        Some(match path {
            "/api/stats" => Route::Stats,
            "/api/history" => Route::History,
            "/api/connections" => Route::Connections,
            "/api/evictions" => Route::Evictions,
            "/metrics" => Route::Metrics,
            _ => Route::Asset(assets::find(path)?),
        })
    }
}

/// A response, before it is handed to tiny_http.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// Every route answers GET (and HEAD) only; said in 405s.
    allow_get: bool,
}

const JSON: &str = "application/json";

impl Reply {
    fn json(value: &impl Serialize) -> Result<Reply, DashboardError> {
        Ok(Reply { status: 200, content_type: JSON, body: serde_json::to_vec(value)?, allow_get: false })
    }

    fn error(status: u16, message: &str) -> Reply {
        let body = serde_json::json!({ "error": message }).to_string().into_bytes();
        Reply { status, content_type: JSON, body, allow_get: status == 405 }
    }

    fn into_response(self) -> tiny_http::Response<io::Cursor<Vec<u8>>> {
        let mut response = tiny_http::Response::from_data(self.body)
            .with_status_code(self.status)
            .with_header(header("Content-Type", self.content_type))
            // Live numbers must never come from a cache; the page is small enough to refetch.
            .with_header(header("Cache-Control", "no-store"));
        if self.allow_get {
            response = response.with_header(header("Allow", "GET, HEAD"));
        }
        response
    }
}

fn header(name: &str, value: &str) -> Header {
    // Only called with the constant names and values above, which are valid ASCII.
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a valid constant header")
}

/// Routes one request and builds its answer.
fn answer(shared: &Shared, method: &Method, url: &str) -> Reply {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let Some(route) = Route::of(path) else {
        return Reply::error(
            404,
            "not found: the dashboard serves /, /api/stats, /api/history, /api/connections, /api/evictions and /metrics",
        );
    };
    if !matches!(method, Method::Get | Method::Head) {
        return Reply::error(405, "method not allowed: use GET");
    }
    route_reply(shared, route, query).unwrap_or_else(|e| {
        if e.status() >= 500 {
            warn!("dashboard: {e}");
        }
        Reply::error(e.status(), &e.to_string())
    })
}

fn route_reply(shared: &Shared, route: Route, query: &str) -> Result<Reply, DashboardError> {
    match route {
        Route::Asset(asset) => Ok(Reply { status: 200, content_type: asset.content_type, body: asset.body.to_vec(), allow_get: false }),
        Route::Stats => Reply::json(&api::stats(&shared.observer, &shared.history)),
        Route::History => Reply::json(&api::history(&shared.history)),
        Route::Connections => {
            let limit = connections_limit(query)?;
            let snapshot = shared.snapshots.get(&shared.observer);
            Reply::json(&api::connections(&snapshot, limit))
        }
        Route::Evictions => Reply::json(&api::evictions(&shared.observer)),
        Route::Metrics => Ok(Reply {
            status: 200,
            content_type: prometheus::CONTENT_TYPE,
            body: prometheus::render(&shared.registry)?.into_bytes(),
            allow_get: false,
        }),
    }
}

/// The `limit` query parameter of `/api/connections`.
fn connections_limit(query: &str) -> Result<usize, DashboardError> {
    match form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == "limit") {
        None => Ok(DEFAULT_CONNECTIONS_LIMIT),
        Some((_, value)) => match value.parse::<usize>() {
            Ok(limit) if limit <= MAX_CONNECTIONS_LIMIT => Ok(limit),
            _ => Err(DashboardError::InvalidLimit),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connections_limit_is_checked() {
        assert_eq!(connections_limit("").ok(), Some(DEFAULT_CONNECTIONS_LIMIT));
        assert_eq!(connections_limit("x=1&limit=5").ok(), Some(5));
        assert!(matches!(connections_limit("limit=lots"), Err(DashboardError::InvalidLimit)));
        assert!(matches!(connections_limit("limit=1000001"), Err(DashboardError::InvalidLimit)));
    }

    #[test]
    fn every_asset_is_routed_and_unknown_paths_are_not() {
        for asset in assets::ASSETS {
            assert!(matches!(Route::of(asset.path), Some(Route::Asset(a)) if a.path == asset.path));
        }
        assert!(matches!(Route::of("/index.html"), Some(Route::Asset(_))));
        assert!(Route::of("/api/nope").is_none());
        assert!(Route::of("/../Cargo.toml").is_none());
    }
}
