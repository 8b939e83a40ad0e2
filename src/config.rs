//! Settings: every one is a command-line flag and an environment variable (`FLUX_*`), with the
//! defaults a Pusher user expects, so `flux` with no arguments serves one app on 127.0.0.1:6001.
//!
//! This module only describes and validates settings; nothing here touches a socket.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::server::{PendingCaps, TlsFiles};
use crate::webhooks::WebhookUrl;

/// The one app a node serves: the same flags (and `FLUX_APP_*` variables) for `flux` and for
/// the load tool that drives it.
#[derive(Debug, Clone, clap::Args)]
pub struct AppArgs {
    /// The app id used by the REST API (/apps/{id}).
    #[arg(long, env = "FLUX_APP_ID", default_value = "app-id")]
    pub app_id: String,

    /// The app key clients connect with (/app/{key}).
    #[arg(long, env = "FLUX_APP_KEY", default_value = "app-key")]
    pub app_key: String,

    /// The app secret that signs REST requests and channel authorizations.
    #[arg(long, env = "FLUX_APP_SECRET", default_value = "app-secret", hide_env_values = true)]
    pub app_secret: String,

    /// Tell subscribers of public and private channels the channel's subscription count
    /// (`pusher:subscription_count` in pusher-js) when it changes, at most once a second.
    #[arg(long, env = "FLUX_SUBSCRIPTION_COUNT_EVENTS")]
    pub subscription_count_events: bool,
}

/// Gateway settings. `flux --help` lists them with their environment variables.
#[derive(Debug, Clone, Parser)]
#[command(name = "flux", version, about = "A Pusher-compatible WebSocket fan-out gateway")]
pub struct Config {
    /// Address to listen on, for WebSocket clients and the REST API alike.
    #[arg(long, env = "FLUX_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port for WebSocket clients (/app/{key}) and the REST API (/apps/{id}/...).
    #[arg(long, env = "FLUX_PORT", default_value_t = 6001)]
    pub port: u16,

    /// TLS certificate chain (PEM, the server's certificate first): with --tls-key, the main
    /// port speaks TLS (wss:// and https://). SIGHUP loads the pair again for new connections.
    #[arg(long, env = "FLUX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The TLS certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1); with --tls-cert.
    #[arg(long, env = "FLUX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Port of the live dashboard and its JSON and Prometheus endpoints.
    #[arg(long, env = "FLUX_DASHBOARD_PORT", default_value_t = 8080)]
    pub dashboard_port: u16,

    /// The app Flux serves, unless an apps file is given.
    #[command(flatten)]
    pub app: AppArgs,

    /// A TOML file of the apps to serve (`[[apps]]` tables: id, key, secret, enabled and
    /// limits, as soketi and Sockudo name them). SIGHUP reads it again. Unset: one app, from the
    /// `FLUX_APP_*` settings.
    #[arg(long, env = "FLUX_APPS_FILE")]
    pub apps_file: Option<PathBuf>,

    /// Client events (`client-*`) one connection may send per second; over it they are refused
    /// with `pusher:error` 4301.
    #[arg(long, env = "FLUX_CLIENT_EVENTS_PER_SEC", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub client_events_per_sec: u32,

    /// Most members (distinct users) of one presence channel; joins beyond it are refused.
    #[arg(long, env = "FLUX_PRESENCE_MAX_MEMBERS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub presence_max_members: u32,

    /// Milliseconds over which a user's presence changes collapse into their net effect, so a
    /// reconnect flap announces nothing and a burst goes out together (0: announce at once). An
    /// announcement may then wait as long again to share a write with other traffic.
    #[arg(long, env = "FLUX_PRESENCE_COALESCE_MS", default_value_t = 150)]
    pub presence_coalesce_ms: u64,

    /// Subscriptions the whole node holds at most (one connection on one channel is one);
    /// subscribing past it gets `pusher:subscription_error` (LimitReached, status 503). Each
    /// costs about a kilobyte, so this bounds what anonymous clients can make the node hold.
    #[arg(long, env = "FLUX_MAX_SUBSCRIPTIONS", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_subscriptions: u64,

    /// Seconds a cache channel's last event is kept for its new subscribers (Pusher keeps it 30
    /// minutes).
    #[arg(long, env = "FLUX_CACHE_TTL_S", default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub cache_ttl_s: u64,

    /// Megabytes of cache channels' last events the node keeps at most (each event counts its
    /// frame, its channel's name and about 128 bytes); past it the events nearest to expiry are
    /// dropped first.
    #[arg(long, env = "FLUX_CACHE_MAX_MB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub cache_max_mb: u64,
    /// Channels one connection may subscribe to; past it the subscription gets
    /// `pusher:subscription_error` (LimitReached, status 400), so one client cannot make the node
    /// hold an unbounded set of channels for it.
    #[arg(long, env = "FLUX_MAX_CHANNELS_PER_CONNECTION", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_channels_per_connection: u32,

    /// WebSocket connections this node holds at most; past it a new client gets `pusher:error`
    /// 4004 (Over connection quota) and is closed with 4004, so Pusher clients do not retry, and
    /// `GET /ready` answers 503. Unset: no cap but the open-file limit.
    #[arg(long, env = "FLUX_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,

    /// Connections the node holds that have not finished their handshake (accepted, not yet an
    /// open WebSocket: request being read, TLS handshake under way, keep-alive HTTP); past it
    /// new connections are closed as soon as they are accepted, and counted.
    #[arg(long, env = "FLUX_MAX_PENDING_HANDSHAKES", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_handshakes: u32,

    /// As --max-pending-handshakes, for one source address (an IPv6 address counts by its /64),
    /// so one address's flood leaves room for the others. Behind a load balancer that does not
    /// pass client addresses on, every client shares the balancer's few addresses: set it to
    /// --max-pending-handshakes and cap per client at the balancer.
    #[arg(long, env = "FLUX_MAX_PENDING_HANDSHAKES_PER_IP", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_handshakes_per_ip: u32,

    /// Frames each connection may have queued before new frames are dropped.
    #[arg(long, env = "FLUX_RING_SLOTS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub ring_slots: u32,

    /// A connection backpressured for longer than this is evicted (close code 4100).
    #[arg(long, env = "FLUX_EVICT_AFTER_MS", default_value_t = 5000)]
    pub evict_after_ms: u64,

    /// Bytes of kernel send buffer each connection may hold (`SO_SNDBUF`; Linux doubles the value
    /// for its own bookkeeping and caps it at `net.core.wmem_max`). A slow consumer fills it
    /// soon, so its backpressure and eviction clock start soon, and the kernel memory it pins
    /// stays bounded (about 76 KiB per stalled reader with the default). One connection's
    /// throughput is then at most about twice this per round trip (the default: 64 KiB per
    /// round trip, about 650 KB/s at 100 ms). 0: the kernel's autotuning (up to
    /// `net.ipv4.tcp_wmem`'s maximum, 4 MiB by default).
    #[arg(long, env = "FLUX_SEND_BUFFER_BYTES", default_value_t = 32_768, value_parser = clap::value_parser!(u32).range(0..=1 << 30))]
    pub send_buffer_bytes: u32,

    /// Event-loop threads; connections are spread across them. Default: the number of cores.
    #[arg(long, env = "FLUX_WORKERS", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: Option<u16>,

    /// Largest event `data`, in bytes, from a client or the REST API (Pusher's limit is 10 KiB).
    #[arg(long, env = "FLUX_MAX_PAYLOAD", default_value_t = 10 * 1024)]
    pub max_payload: usize,

    /// Seconds of client silence before the server pings it; also told to clients.
    #[arg(long, env = "FLUX_ACTIVITY_TIMEOUT", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub activity_timeout: u64,

    /// Seconds to wait for a pong after a server ping before closing with 4201.
    #[arg(long, env = "FLUX_PONG_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub pong_timeout: u64,

    /// Milliseconds a client has to complete its HTTP request or WebSocket handshake.
    #[arg(long, env = "FLUX_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,

    /// Microseconds between two flushes of large fan-outs under steady load, so several frames
    /// share each socket write (0: flush every loop turn). Small fan-outs and a broadcast after a
    /// quiet spell are written at once.
    #[arg(long, env = "FLUX_WRITE_COALESCE_US", default_value_t = 10000)]
    pub write_coalesce_us: u64,

    /// Milliseconds to flush close frames to clients on shutdown before exiting (and, after
    /// that, to post the webhooks still queued).
    #[arg(long, env = "FLUX_SHUTDOWN_GRACE_MS", default_value_t = 2_000)]
    pub shutdown_grace_ms: u64,

    /// URL that receives Pusher-style webhooks (http:// only). Unset: no webhooks.
    #[arg(long, env = "FLUX_WEBHOOK_URL")]
    pub webhook_url: Option<WebhookUrl>,

    /// Milliseconds a webhook event may wait for others to share its POST.
    #[arg(long, env = "FLUX_WEBHOOK_BATCH_MS", default_value_t = 100)]
    pub webhook_batch_ms: u64,

    /// Most webhook events in one POST.
    #[arg(long, env = "FLUX_WEBHOOK_BATCH_MAX", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub webhook_batch_max: u32,

    /// Webhook events queued for delivery; over it, new events are dropped and counted.
    #[arg(long, env = "FLUX_WEBHOOK_QUEUE", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub webhook_queue: u32,

    /// Milliseconds one webhook POST may take, connect to response, before it counts as failed.
    #[arg(long, env = "FLUX_WEBHOOK_TIMEOUT_MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub webhook_timeout_ms: u64,

    /// POSTs of one webhook batch before it is given up (1: no retries). Retries back off
    /// exponentially from 100 ms, at most 2 s apart.
    #[arg(long, env = "FLUX_WEBHOOK_ATTEMPTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub webhook_attempts: u32,

    /// Redis that joins this node to a cluster (`redis://[user:password@]host:port[/db]`): every
    /// node on the same Redis and prefix serves the same apps as one server. Unset: one node.
    #[arg(long, env = "FLUX_REDIS_URL", hide_env_values = true, value_parser = redis_url)]
    pub redis_url: Option<String>,

    /// This node's id in the cluster. Default: random, logged at start.
    #[arg(long, env = "FLUX_NODE_ID", value_parser = cluster_name)]
    pub node_id: Option<String>,

    /// Milliseconds a node may be silent before the others declare it dead (its members leave
    /// every roster, its subscriptions every count). Heartbeats go out five times as often.
    #[arg(long, env = "FLUX_NODE_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(500..=600_000))]
    pub node_timeout_ms: u64,

    /// Start of the cluster's Redis channel names, so several clusters can share one Redis.
    #[arg(long, env = "FLUX_REDIS_PREFIX", default_value = "flux", value_parser = cluster_name)]
    pub redis_prefix: String,
}

/// A Redis URL the `redis` crate can connect with (checked at start, not at first use).
fn redis_url(url: &str) -> Result<String, String> {
    redis::Client::open(url)
        .map(|_| url.to_string())
        .map_err(|e| format!("not a Redis URL ({e}); expected redis://[user:password@]host:port[/db]"))
}

/// A node id or prefix: 1 to 64 letters, digits, `-`, `_`, `.` or `:`.
fn cluster_name(id: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.:".contains(c);
    if id.is_empty() || id.len() > 64 || !id.chars().all(allowed) {
        return Err("use 1 to 64 letters, digits, '-', '_', '.' or ':'".into());
    }
    Ok(id.to_string())
}

impl Default for Config {
    fn default() -> Self {
        // The defaults live in the clap attributes; parsing no arguments yields them (the
        // environment is ignored here so tests are not affected by the caller's FLUX_* vars).
        Config {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 6001,
            dashboard_port: 8080,
            tls_cert: None,
            tls_key: None,
            app: AppArgs {
                app_id: "app-id".into(),
                app_key: "app-key".into(),
                app_secret: "app-secret".into(),
                subscription_count_events: false,
            },
            apps_file: None,
            client_events_per_sec: 10,
            presence_max_members: 100,
            presence_coalesce_ms: 150,
            max_subscriptions: 1_000_000,
            cache_ttl_s: 1800,
            cache_max_mb: 64,
            max_channels_per_connection: 1000,
            max_connections: None,
            max_pending_handshakes: 10_000,
            max_pending_handshakes_per_ip: 1_000,
            ring_slots: 256,
            evict_after_ms: 5000,
            send_buffer_bytes: 32_768,
            workers: None,
            max_payload: 10 * 1024,
            activity_timeout: 120,
            pong_timeout: 30,
            handshake_timeout_ms: 10_000,
            write_coalesce_us: 10000,
            shutdown_grace_ms: 2_000,
            webhook_url: None,
            webhook_batch_ms: 100,
            webhook_batch_max: 50,
            webhook_queue: 4096,
            webhook_timeout_ms: 2_000,
            webhook_attempts: 4,
            redis_url: None,
            node_id: None,
            node_timeout_ms: 10_000,
            redis_prefix: "flux".into(),
        }
    }
}

/// Room for the JSON envelope around an event's `data` in one client WebSocket message
/// (event name, channel name, quoting). Messages above `max_payload + this` are refused with 1009.
pub const MESSAGE_ENVELOPE_BYTES: usize = 4 * 1024;

/// Pusher lets one REST batch carry 10 events; a body may also escape its data. Bodies larger
/// than this many times `max_payload` are refused with 413 before they are read.
pub const BODY_PAYLOAD_FACTOR: usize = 24;

impl Config {
    /// The address the gateway listens on.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// The certificate and key of a TLS main port; `None` for plain TCP. Clap makes sure both
    /// are given or neither.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.clone(), key: key.clone() }),
            _ => None,
        }
    }

    /// The dashboard's address.
    pub fn dashboard_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.dashboard_port)
    }

    /// Number of worker threads to run.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            Some(n) => usize::from(n),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// How long a connection may stay backpressured before it is evicted.
    pub fn evict_after(&self) -> Duration {
        Duration::from_millis(self.evict_after_ms)
    }

    /// The kernel send buffer to give every accepted socket; `None`: the kernel's autotuning.
    pub fn send_buffer(&self) -> Option<usize> {
        Some(self.send_buffer_bytes as usize).filter(|&bytes| bytes > 0)
    }

    /// Client silence before a server ping.
    pub fn activity_timeout(&self) -> Duration {
        Duration::from_secs(self.activity_timeout)
    }

    /// Wait for a pong before closing with 4201.
    pub fn pong_timeout(&self) -> Duration {
        Duration::from_secs(self.pong_timeout)
    }

    /// The caps on connections that have not finished their handshake.
    pub fn pending_caps(&self) -> PendingCaps {
        PendingCaps { per_node: self.max_pending_handshakes, per_source: self.max_pending_handshakes_per_ip }
    }

    /// Deadline for a request or handshake to arrive complete.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The presence coalescing window.
    pub fn presence_coalesce(&self) -> Duration {
        Duration::from_millis(self.presence_coalesce_ms)
    }

    /// How long a cache channel's last event is kept.
    pub fn cache_ttl(&self) -> Duration {
        Duration::from_secs(self.cache_ttl_s)
    }

    /// Bytes of cache channels' last events the node keeps at most.
    pub fn cache_max_bytes(&self) -> usize {
        usize::try_from(self.cache_max_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }

    /// How long a large fan-out's writes may be held to coalesce them.
    pub fn write_coalesce(&self) -> Duration {
        Duration::from_micros(self.write_coalesce_us)
    }

    /// Time allowed to flush close frames at shutdown.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// Largest WebSocket message accepted from a client.
    pub fn max_message_bytes(&self) -> usize {
        self.max_payload.saturating_add(MESSAGE_ENVELOPE_BYTES)
    }

    /// Largest REST request body accepted.
    pub fn max_body_bytes(&self) -> usize {
        self.max_payload.saturating_mul(BODY_PAYLOAD_FACTOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_no_arguments_gives_the_documented_defaults() {
        let parsed = Config::try_parse_from(["flux"]).expect("defaults parse");
        let defaults = Config::default();
        assert_eq!(parsed.listen_addr(), defaults.listen_addr());
        assert_eq!(parsed.dashboard_port, 8080);
        assert_eq!(parsed.ring_slots, 256);
        assert_eq!(parsed.evict_after_ms, 5000);
        assert_eq!(parsed.max_payload, 10 * 1024);
        assert_eq!(parsed.activity_timeout, 120);
        assert_eq!(parsed.app.app_key, "app-key");
        assert_eq!((parsed.cache_ttl(), parsed.cache_max_bytes()), (Duration::from_secs(1800), 64 << 20));
        assert_eq!((parsed.cache_ttl_s, parsed.cache_max_mb), (defaults.cache_ttl_s, defaults.cache_max_mb));
        assert_eq!((parsed.max_connections, parsed.max_channels_per_connection), (None, defaults.max_channels_per_connection));
        assert_eq!(parsed.webhook_url, None);
        assert_eq!(parsed.pending_caps(), defaults.pending_caps());
        assert_eq!(parsed.pending_caps(), PendingCaps { per_node: 10_000, per_source: 1_000 });
        assert!(Config::try_parse_from(["flux", "--max-pending-handshakes-per-ip", "0"]).is_err());
        assert_eq!(
            (parsed.webhook_batch_ms, parsed.webhook_batch_max, parsed.webhook_queue),
            (defaults.webhook_batch_ms, defaults.webhook_batch_max, defaults.webhook_queue)
        );
        assert_eq!((parsed.webhook_timeout_ms, parsed.webhook_attempts), (defaults.webhook_timeout_ms, defaults.webhook_attempts));
    }

    #[test]
    fn a_webhook_url_must_be_plain_http() {
        let parsed = Config::try_parse_from(["flux", "--webhook-url", "http://127.0.0.1:9000/hooks"]).expect("http parses");
        assert_eq!(parsed.webhook_url.map(|u| u.to_string()).as_deref(), Some("http://127.0.0.1:9000/hooks"));
        assert!(Config::try_parse_from(["flux", "--webhook-url", "https://example.com/hooks"]).is_err());
        assert!(Config::try_parse_from(["flux", "--webhook-attempts", "0"]).is_err());
    }

    #[test]
    fn cluster_settings_are_checked_when_parsed() {
        let parsed =
            Config::try_parse_from(["flux", "--redis-url", "redis://user:pw@127.0.0.1:6390/2", "--node-id", "node-1"]).expect("parses");
        assert_eq!(parsed.redis_url.as_deref(), Some("redis://user:pw@127.0.0.1:6390/2"));
        assert_eq!((parsed.node_timeout_ms, parsed.redis_prefix.as_str()), (10_000, "flux"));
        assert!(Config::try_parse_from(["flux", "--redis-url", "http://127.0.0.1"]).is_err());
        assert!(Config::try_parse_from(["flux", "--node-id", "has space"]).is_err());
        assert!(Config::try_parse_from(["flux", "--node-timeout-ms", "10"]).is_err());
    }

    #[test]
    fn subscription_count_events_are_off_unless_asked_for() {
        assert!(!Config::try_parse_from(["flux"]).expect("parses").app.subscription_count_events);
        let on = Config::try_parse_from(["flux", "--subscription-count-events"]).expect("parses");
        assert!(on.app.subscription_count_events);
    }

    #[test]
    fn node_limits_are_positive_when_set() {
        let parsed = Config::try_parse_from(["flux", "--max-connections", "5000", "--max-channels-per-connection", "50"]).expect("parses");
        assert_eq!((parsed.max_connections, parsed.max_channels_per_connection), (Some(5000), 50));
        assert!(Config::try_parse_from(["flux", "--max-connections", "0"]).is_err());
        assert!(Config::try_parse_from(["flux", "--max-channels-per-connection", "0"]).is_err());
    }

    #[test]
    fn tls_takes_a_certificate_and_a_key_or_neither() {
        assert_eq!(Config::try_parse_from(["flux"]).expect("parses").tls_files(), None);
        let both = Config::try_parse_from(["flux", "--tls-cert", "c.pem", "--tls-key", "k.pem"]).expect("parses");
        assert_eq!(both.tls_files(), Some(TlsFiles { cert: "c.pem".into(), key: "k.pem".into() }));
        assert!(Config::try_parse_from(["flux", "--tls-cert", "c.pem"]).is_err(), "a certificate without its key");
        assert!(Config::try_parse_from(["flux", "--tls-key", "k.pem"]).is_err(), "a key without its certificate");
    }

    #[test]
    fn the_send_buffer_is_capped_unless_zero_asks_for_autotuning() {
        let parsed = Config::try_parse_from(["flux"]).expect("parses");
        assert_eq!((parsed.send_buffer(), Config::default().send_buffer()), (Some(32_768), Some(32_768)));
        assert_eq!(Config::try_parse_from(["flux", "--send-buffer-bytes", "0"]).expect("parses").send_buffer(), None);
        assert!(Config::try_parse_from(["flux", "--send-buffer-bytes", "-1"]).is_err());
    }

    #[test]
    fn zero_ring_slots_is_refused() {
        assert!(Config::try_parse_from(["flux", "--ring-slots", "0"]).is_err());
    }
}
