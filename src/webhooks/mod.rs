//! Webhooks: telling the app's server what happened on the node, the way Pusher does it
//! (`channel_occupied`, `channel_vacated`, `member_added`, `member_removed`, `cache_miss`,
//! `client_event`, posted as `{"time_ms", "events"}` with `X-Pusher-Key` and `X-Pusher-Signature`).
//!
//! This module owns the path from an event to the apps' endpoints: the cheap [`Webhooks`] handle
//! that workers call [`Webhooks::emit`] on, which routes each event to the webhooks of its
//! channel's app that want it (`event_types`, channel-name prefix), and per endpoint a bounded
//! queue and a delivery thread that batches, signs with the app's secret, posts and retries. It
//! must never make a caller wait: `emit` is a `try_send`, and an event that finds a queue full is
//! dropped and counted. A slow or dead endpoint therefore costs the event loops nothing but those
//! counted drops, and costs other endpoints nothing at all.
//!
//! It does not decide when events happen; the Pusher session logic does, and calls `emit`.

mod batch;
mod delivery;
mod event;

use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Sender, TrySendError};
use log::warn;
use serde::Serialize;
use ureq::http::Uri;

pub use batch::{Batcher, Retry};
pub use event::{body, signature, WebhookEvent};

use crate::apps::{AppWebhook, Apps};
use crate::config::Config;

/// The delay before the first retry of a failed post; it doubles with each further retry.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The longest wait between two attempts, so a batch is given up within a bounded time.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Where webhooks go: an `http://` URL. Flux's HTTP client is built without TLS, so an
/// `https://` URL is refused when the settings are read, not at the first post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(Uri);

/// Why a webhook URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidWebhookUrl {
    /// Not a URL at all.
    #[error("not a URL: {0}")]
    Syntax(String),
    /// A scheme other than `http`.
    #[error("webhook URLs must start with http:// (Flux's webhook client has no TLS; put a TLS proxy in front)")]
    Scheme,
    /// No host to post to.
    #[error("the webhook URL has no host")]
    NoHost,
}

impl FromStr for WebhookUrl {
    type Err = InvalidWebhookUrl;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uri: Uri = s.parse().map_err(|e: ureq::http::uri::InvalidUri| InvalidWebhookUrl::Syntax(e.to_string()))?;
        if uri.scheme_str() != Some("http") {
            return Err(InvalidWebhookUrl::Scheme);
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(InvalidWebhookUrl::NoHost);
        }
        Ok(WebhookUrl(uri))
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where one webhook goes and the app it speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL posted to.
    pub url: WebhookUrl,
    /// Sent as `X-Pusher-Key`, so the receiver knows which app's secret verifies the body.
    pub app_key: String,
    /// Signs each body.
    pub app_secret: String,
}

/// How webhooks are delivered, to every endpoint (the node's settings).
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// The longest an event waits for others to share its post.
    pub batch_window: Duration,
    /// The most events in one post.
    pub batch_max: usize,
    /// Events each endpoint's queue holds before `emit` drops them.
    pub queue: usize,
    /// The longest one post may take, connect to response.
    pub timeout: Duration,
    /// How failed posts are retried.
    pub retry: Retry,
    /// At shutdown, how long queued events may take to be posted before they are given up.
    pub drain: Duration,
}

impl DeliverySettings {
    /// The settings in `config`.
    pub fn from_config(config: &Config) -> DeliverySettings {
        DeliverySettings {
            batch_window: Duration::from_millis(config.webhook_batch_ms),
            batch_max: config.webhook_batch_max as usize,
            queue: config.webhook_queue as usize,
            timeout: Duration::from_millis(config.webhook_timeout_ms),
            retry: Retry { attempts: config.webhook_attempts, first_delay: FIRST_RETRY_DELAY, max_delay: MAX_RETRY_DELAY },
            drain: config.shutdown_grace(),
        }
    }
}

crate::metrics::counters! {
    /// The webhook counters, written by `emit` callers and the delivery thread.
    StatCells,
    /// A copy of the webhook counters.
    WebhookCounters {
        /// Events accepted into the queue by `emit`.
        events_queued,
        /// Events `emit` dropped because the queue was full.
        events_dropped,
        /// Events in batches the endpoint accepted (2xx).
        events_delivered,
        /// Events in batches given up after their last attempt, or unsent at shutdown.
        events_given_up,
        /// Posts the endpoint accepted (one per batch).
        batches_delivered,
        /// Batches given up.
        batches_given_up,
        /// Posts that failed: a network error, a timeout, or a status other than 2xx.
        attempts_failed,
        /// Posts that were a retry of a failed one.
        retries,
    }
}

/// The webhook figures for the dashboard and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WebhookStats {
    /// Whether some app has a webhook.
    pub enabled: bool,
    /// Counters since start.
    #[serde(flatten)]
    pub counters: WebhookCounters,
    /// Events waiting in the endpoints' queues now (not those already taken into a batch).
    pub queue_depth: u64,
    /// The queues' bounds, added up.
    pub queue_capacity: u64,
}

/// What became of an emitted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Emitted {
    /// It is queued for delivery (to every webhook of its app that wants it).
    Queued,
    /// A queue was full; it was dropped there and counted.
    Dropped,
    /// No webhook of its app wants it; nothing was done.
    Disabled,
}

/// One webhook of one app: what it wants, and the queue of its endpoint's delivery thread.
struct Route {
    endpoint: Endpoint,
    hook: AppWebhook,
    queue: Sender<WebhookEvent>,
}

/// The webhooks of every app, by app index, as last configured.
#[derive(Default)]
struct Routes {
    by_app: Vec<Vec<Route>>,
}

impl Routes {
    fn is_empty(&self) -> bool {
        self.by_app.iter().all(Vec::is_empty)
    }

    fn all(&self) -> impl Iterator<Item = &Route> {
        self.by_app.iter().flatten()
    }
}

/// What every clone of a [`Webhooks`] handle shares.
struct Router {
    delivery: DeliverySettings,
    routes: ArcSwap<Routes>,
    stats: Arc<StatCells>,
    /// Every delivery thread started, joined at [`Webhooks::stop`]. Only configuring and
    /// stopping take the lock, never `emit`.
    threads: Mutex<Vec<DeliveryThread>>,
}

/// The handle every producer of webhook events holds. Cheap to clone, `Send + Sync`, and never
/// blocks: see [`emit`](Self::emit). Each endpoint has its own delivery thread and bounded
/// queue, so one app's slow endpoint delays none of the others'.
#[derive(Clone)]
pub struct Webhooks {
    /// `None`: webhooks are off for good (tests of parts that emit).
    router: Option<Arc<Router>>,
}

impl fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhooks").field("stats", &self.stats()).finish()
    }
}

impl Webhooks {
    /// A handle with webhooks off: `emit` does nothing.
    pub fn disabled() -> Webhooks {
        Webhooks { router: None }
    }

    /// A handle that delivers with `delivery`, to no endpoint until [`configure`](Self::configure)d.
    pub fn new(delivery: DeliverySettings) -> Webhooks {
        let router = Router { delivery, routes: ArcSwap::default(), stats: Arc::default(), threads: Mutex::new(Vec::new()) };
        Webhooks { router: Some(Arc::new(router)) }
    }

    /// Routes each enabled app's events to its webhooks from now on. An endpoint that was
    /// already served keeps its thread (and what it has queued); a new one gets a thread; one
    /// no app names any more finishes what it has queued and stops.
    pub fn configure(&self, apps: &Apps) -> io::Result<()> {
        let Some(router) = &self.router else { return Ok(()) };
        let current = router.routes.load();
        let mut routes = Routes::default();
        for (index, app) in apps.iter().filter(|(_, app)| app.enabled) {
            let slot = index.0 as usize;
            if routes.by_app.len() <= slot {
                routes.by_app.resize_with(slot + 1, Vec::new);
            }
            for hook in &app.webhooks {
                let endpoint = Endpoint { url: hook.url.clone(), app_key: app.app.key.clone(), app_secret: app.app.secret.clone() };
                let served = current.all().chain(routes.all()).find(|r| r.endpoint == endpoint).map(|r| r.queue.clone());
                let queue = match served {
                    Some(queue) => queue,
                    None => self.start_endpoint(router, endpoint.clone())?,
                };
                routes.by_app[slot].push(Route { endpoint, hook: hook.clone(), queue });
            }
        }
        router.routes.store(Arc::new(routes));
        Ok(())
    }

    /// Starts the delivery thread of one endpoint; returns its queue.
    fn start_endpoint(&self, router: &Router, endpoint: Endpoint) -> io::Result<Sender<WebhookEvent>> {
        let (queue, events) = crossbeam_channel::bounded(router.delivery.queue.max(1));
        // Capacity 1: one deadline is all a stop needs to say, and sending it never blocks.
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let drain = router.delivery.drain;
        let courier = delivery::Courier::new(endpoint, router.delivery.clone(), events, stopped, router.stats.clone());
        let thread = std::thread::Builder::new().name("flux-webhooks".into()).spawn(move || courier.run())?;
        let mut threads = router.threads.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        threads.push(DeliveryThread { stop, drain, thread: Some(thread) });
        Ok(queue)
    }

    /// Whether some app has a webhook. A caller may check it to skip building events at all.
    pub fn is_enabled(&self) -> bool {
        self.router.as_ref().is_some_and(|router| !router.routes.load().is_empty())
    }

    /// Queues `event` for each webhook of its channel's app that wants it, without ever
    /// waiting: where a queue is full (its endpoint is slow or down) the event is dropped there
    /// and counted.
    pub fn emit(&self, event: WebhookEvent) -> Emitted {
        let Some(router) = &self.router else { return Emitted::Disabled };
        let routes = router.routes.load();
        let Some(hooks) = routes.by_app.get(event.channel().app().0 as usize) else { return Emitted::Disabled };
        let mut emitted = Emitted::Disabled;
        for route in hooks.iter().filter(|route| route.hook.wants(event.name(), event.channel())) {
            match route.queue.try_send(event.clone()) {
                Ok(()) => {
                    router.stats.events_queued.fetch_add(1, Ordering::Relaxed);
                    if emitted == Emitted::Disabled {
                        emitted = Emitted::Queued;
                    }
                }
                // Disconnected only after the delivery thread has stopped: at shutdown, the same
                // fate as a full queue.
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    router.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
                    emitted = Emitted::Dropped;
                }
            }
        }
        emitted
    }

    /// The counters and the queues' depth now.
    pub fn stats(&self) -> WebhookStats {
        let Some(router) = &self.router else { return WebhookStats::default() };
        let routes = router.routes.load();
        let (queue_depth, queue_capacity) = routes
            .all()
            .map(|r| (r.queue.len() as u64, r.queue.capacity().unwrap_or(0) as u64))
            .fold((0, 0), |(depth, capacity), (d, c)| (depth + d, capacity + c));
        WebhookStats { enabled: !routes.is_empty(), counters: router.stats.snapshot(), queue_depth, queue_capacity }
    }

    /// Stops delivery: every endpoint's thread posts what it has queued for at most the drain
    /// time, gives up the rest, and is joined. Events emitted afterwards are dropped.
    pub fn stop(&self) {
        let Some(router) = &self.router else { return };
        router.routes.store(Arc::default());
        let threads = std::mem::take(&mut *router.threads.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        // Every thread is told first, so they drain side by side; each is joined as it drops.
        let deadline = Instant::now() + router.delivery.drain;
        threads.iter().for_each(|thread| thread.stop_by(deadline));
        drop(threads);
    }
}

/// One endpoint's running delivery thread. Dropping it lets it post what is queued for at most
/// the drain time (from when it is told, see [`DeliveryThread::stop_by`]), gives up the rest,
/// and joins it.
#[derive(Debug)]
struct DeliveryThread {
    stop: Sender<Instant>,
    drain: Duration,
    thread: Option<JoinHandle<()>>,
}

impl DeliveryThread {
    /// Tells the thread to be done by `deadline`, without waiting for it. The deadline is fixed
    /// now, not when the thread notices, so a post in flight does not extend it; a full channel
    /// means a deadline is already there.
    fn stop_by(&self, deadline: Instant) {
        let _ = self.stop.try_send(deadline);
    }
}

impl Drop for DeliveryThread {
    fn drop(&mut self) {
        self.stop_by(Instant::now() + self.drain);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("the webhook delivery thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pusher::protocol::ChannelName;
    use crate::pusher::AppIndex;

    #[test]
    fn only_http_urls_with_a_host_are_accepted() {
        let url: WebhookUrl = "http://127.0.0.1:9000/pusher/webhooks".parse().expect("valid");
        assert_eq!(url.to_string(), "http://127.0.0.1:9000/pusher/webhooks");
        assert_eq!("https://example.com/hook".parse::<WebhookUrl>(), Err(InvalidWebhookUrl::Scheme));
        assert!("example.com/hook".parse::<WebhookUrl>().is_err());
        assert!(matches!("http://exa mple/".parse::<WebhookUrl>(), Err(InvalidWebhookUrl::Syntax(_))));
    }

    #[test]
    fn a_disabled_handle_does_nothing_and_counts_nothing() {
        let webhooks = Webhooks::disabled();
        assert!(!webhooks.is_enabled());
        assert_eq!(webhooks.emit(WebhookEvent::ChannelOccupied { channel: ChannelName::new(AppIndex(0), "c") }), Emitted::Disabled);
        assert_eq!(webhooks.stats(), WebhookStats::default());
    }

    #[test]
    fn delivery_settings_come_from_the_config() {
        let settings = DeliverySettings::from_config(&Config::default());
        assert_eq!((settings.batch_max, settings.retry.attempts, settings.queue), (50, 4, 4096));
    }

    #[test]
    fn events_go_only_to_the_webhooks_of_their_app_that_want_them() {
        use crate::apps::{AppConfig, Apps};
        let hook = |event_types: &[&str], prefix: Option<&str>| AppWebhook {
            url: "http://127.0.0.1:1/".parse().expect("valid"),
            event_types: event_types.iter().map(|t| t.to_string()).collect(),
            channel_prefix: prefix.map(str::to_string),
        };
        let mut with_hooks = AppConfig::from_settings(&Config::default());
        with_hooks.webhooks = vec![hook(&["channel_occupied"], Some("presence-"))];
        let mut without = with_hooks.clone();
        (without.app.id, without.app.key, without.webhooks) = ("b".into(), "b-key".into(), Vec::new());
        let webhooks = Webhooks::new(DeliverySettings { queue: 10, ..DeliverySettings::from_config(&Config::default()) });
        assert!(!webhooks.is_enabled());
        webhooks.configure(&Apps::new(vec![with_hooks, without])).expect("configures");
        assert!(webhooks.is_enabled());
        let occupied = |app, name: &str| WebhookEvent::ChannelOccupied { channel: ChannelName::new(AppIndex(app), name) };
        assert_eq!(webhooks.emit(occupied(0, "presence-room")), Emitted::Queued);
        assert_eq!(webhooks.emit(occupied(0, "private-room")), Emitted::Disabled, "outside the prefix");
        assert_eq!(webhooks.emit(occupied(1, "presence-room")), Emitted::Disabled, "app b has no webhook");
        let vacated = WebhookEvent::ChannelVacated { channel: ChannelName::new(AppIndex(0), "presence-room") };
        assert_eq!(webhooks.emit(vacated), Emitted::Disabled, "not one of its event types");
        assert_eq!(webhooks.stats().counters.events_queued, 1);
        webhooks.stop();
        assert_eq!(webhooks.emit(occupied(0, "presence-room")), Emitted::Disabled, "stopped");
    }
}
