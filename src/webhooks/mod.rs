//! Webhooks: telling the app's server what happened on the node, the way Pusher does it
//! (`channel_occupied`, `channel_vacated`, `member_added`, `member_removed`, `cache_miss`,
//! `client_event`, posted as `{"time_ms", "events"}` with `X-Pusher-Key` and `X-Pusher-Signature`).
//!
//! This module owns the path from an event to the app's endpoint: the cheap [`Webhooks`] handle
//! that workers call [`Webhooks::emit`] on, the bounded queue behind it, and one delivery thread
//! that batches, signs, posts and retries. It must never make a caller wait: `emit` is a
//! `try_send`, and an event that finds the queue full is dropped and counted. A slow or dead
//! endpoint therefore costs the event loops nothing but those counted drops.
//!
//! It does not decide when events happen; the Pusher session logic does, and calls `emit`.

mod batch;
mod delivery;
mod event;

use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use log::warn;
use serde::Serialize;
use ureq::http::Uri;

pub use batch::{Batcher, Retry};
pub use event::{body, signature, WebhookEvent};

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

/// How webhooks are delivered.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// The endpoint.
    pub url: WebhookUrl,
    /// Sent as `X-Pusher-Key`, so the receiver knows which app's secret verifies the body.
    pub app_key: String,
    /// Signs each body.
    pub app_secret: String,
    /// The longest an event waits for others to share its post.
    pub batch_window: Duration,
    /// The most events in one post.
    pub batch_max: usize,
    /// Events the queue holds before `emit` drops them.
    pub queue: usize,
    /// The longest one post may take, connect to response.
    pub timeout: Duration,
    /// How failed posts are retried.
    pub retry: Retry,
    /// At shutdown, how long queued events may take to be posted before they are given up.
    pub drain: Duration,
}

impl WebhookSettings {
    /// The settings in `config`, or `None` when no webhook URL is set (webhooks are off).
    pub fn from_config(config: &Config) -> Option<WebhookSettings> {
        Some(WebhookSettings {
            url: config.webhook_url.clone()?,
            app_key: config.app.app_key.clone(),
            app_secret: config.app.app_secret.clone(),
            batch_window: Duration::from_millis(config.webhook_batch_ms),
            batch_max: config.webhook_batch_max as usize,
            queue: config.webhook_queue as usize,
            timeout: Duration::from_millis(config.webhook_timeout_ms),
            retry: Retry { attempts: config.webhook_attempts, first_delay: FIRST_RETRY_DELAY, max_delay: MAX_RETRY_DELAY },
            drain: config.shutdown_grace(),
        })
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
    /// Whether a webhook URL is set.
    pub enabled: bool,
    /// Counters since start.
    #[serde(flatten)]
    pub counters: WebhookCounters,
    /// Events waiting in the queue now (not those already taken into a batch).
    pub queue_depth: u64,
    /// The queue's bound.
    pub queue_capacity: u64,
}

/// What became of an emitted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Emitted {
    /// It is queued for delivery.
    Queued,
    /// The queue was full; it was dropped and counted.
    Dropped,
    /// Webhooks are off; nothing was done.
    Disabled,
}

/// The handle every producer of webhook events holds. Cheap to clone, `Send + Sync`, and never
/// blocks: see [`emit`](Self::emit).
#[derive(Clone)]
pub struct Webhooks {
    /// `None` when webhooks are off.
    queue: Option<Sender<WebhookEvent>>,
    stats: Arc<StatCells>,
}

impl fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhooks").field("stats", &self.stats()).finish()
    }
}

impl Webhooks {
    /// A handle with webhooks off: `emit` does nothing.
    pub fn disabled() -> Webhooks {
        Webhooks { queue: None, stats: Arc::default() }
    }

    /// Starts the delivery thread for `settings` and returns the handle producers use and the
    /// thread, which stops (draining for at most `settings.drain`) when stopped or dropped.
    pub fn start(settings: WebhookSettings) -> io::Result<(Webhooks, DeliveryThread)> {
        let (queue, events) = crossbeam_channel::bounded(settings.queue.max(1));
        // Capacity 1: one deadline is all a stop needs to say, and sending it never blocks.
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let stats = Arc::new(StatCells::default());
        let drain = settings.drain;
        let courier = delivery::Courier::new(settings, events, stopped, stats.clone());
        let thread = std::thread::Builder::new().name("flux-webhooks".into()).spawn(move || courier.run())?;
        Ok((Webhooks { queue: Some(queue), stats }, DeliveryThread { stop, drain, thread: Some(thread) }))
    }

    /// Whether webhooks are on. A caller may check it to skip building an event at all.
    pub fn is_enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// Queues `event` for delivery without ever waiting: if the queue is full (the endpoint is
    /// slow or down) the event is dropped and counted.
    pub fn emit(&self, event: WebhookEvent) -> Emitted {
        let Some(queue) = &self.queue else { return Emitted::Disabled };
        match queue.try_send(event) {
            Ok(()) => {
                self.stats.events_queued.fetch_add(1, Ordering::Relaxed);
                Emitted::Queued
            }
            // Disconnected only after the delivery thread has stopped: at shutdown, the same
            // fate as a full queue.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
                Emitted::Dropped
            }
        }
    }

    /// The counters and the queue's depth now.
    pub fn stats(&self) -> WebhookStats {
        let (queue_depth, queue_capacity) = self.queue.as_ref().map_or((0, 0), |q| (q.len() as u64, q.capacity().unwrap_or(0) as u64));
        WebhookStats { enabled: self.is_enabled(), counters: self.stats.snapshot(), queue_depth, queue_capacity }
    }
}

/// The running delivery thread. [`stop`](Self::stop) (or dropping it) lets it post what is
/// queued for at most the drain time, gives up the rest, and joins it.
#[derive(Debug)]
pub struct DeliveryThread {
    stop: Sender<Instant>,
    drain: Duration,
    thread: Option<JoinHandle<()>>,
}

impl DeliveryThread {
    /// Stops delivery and waits for the thread: at most the drain time, plus what remains of a
    /// post in flight when the deadline passes (at most the post timeout).
    pub fn stop(self) {
        // Dropping does it.
    }
}

impl Drop for DeliveryThread {
    fn drop(&mut self) {
        // The deadline is fixed now, not when the thread notices, so a post in flight does not
        // extend it. A full channel means a deadline is already there.
        let _ = self.stop.try_send(Instant::now() + self.drain);
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
    fn settings_come_from_the_config_only_with_a_url() {
        assert!(WebhookSettings::from_config(&Config::default()).is_none());
        let url: WebhookUrl = "http://127.0.0.1:1/".parse().expect("valid");
        let config = Config { webhook_url: Some(url.clone()), ..Config::default() };
        let settings = WebhookSettings::from_config(&config).expect("on");
        assert_eq!(settings.url, url);
        assert_eq!((settings.batch_max, settings.retry.attempts), (50, 4));
        assert_eq!(settings.app_key, "app-key");
    }
}
