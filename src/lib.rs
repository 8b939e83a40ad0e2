//! Flux: a Pusher Channels protocol 7 WebSocket fan-out gateway.
//!
//! The crate is laid out the way the gateway works:
//!
//! - [`server`]: the I/O shell. An acceptor thread hands sockets to worker threads; each worker
//!   is one mio `Poll` loop that owns its connections and only dispatches readiness to them.
//! - [`ws`] and [`http`]: the codecs (sans-IO). HTTP/1.1 requests on the shared port, WebSocket
//!   frames in and out.
//! - [`fanout`]: the frame pool, the per-connection outbound ring with its backpressure state
//!   machine, the channel registry, and the node-wide channel directory (all sans-IO).
//! - [`pusher`]: the Pusher protocol: messages, the per-connection session, the REST API and its
//!   request signatures (sans-IO, driven by events and a clock).
//! - [`gateway`]: the Pusher service on top of the shell, and [`gateway::Gateway`], a running node.
//! - [`metrics`]: per-worker counters written without locks and read as snapshots.
//! - [`heap`]: the counting allocator the `flux` binary installs, and the process's allocation
//!   totals it keeps for `/metrics` and the dashboard.
//! - [`dashboard`]: the live dashboard, its JSON API and Prometheus metrics, on its own port and
//!   threads, reading the node only through [`gateway::Observer`].
//! - [`webhooks`]: Pusher-style webhooks to the app's server, from their own thread through a
//!   bounded queue, so a slow endpoint never slows an event loop.
//! - [`cluster`]: several nodes on one Redis acting as one server: the sans-IO view of the
//!   cluster and the threads that carry it to and from Redis and the workers.
//! - [`config`]: settings, each a flag and an environment variable.
//! - [`clock`]: wall-clock time for timestamps that leave the process.
//! - [`panics`]: a panic on any thread ends the process (no half-alive node).

#![deny(missing_docs)]

pub mod apps;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod fanout;
pub mod gateway;
pub mod heap;
pub mod http;
pub mod metrics;
pub mod panics;
pub mod pusher;
pub mod server;
pub mod webhooks;
pub mod ws;
