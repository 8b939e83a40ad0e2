//! The delivery thread: takes events off the bounded queue into the [`Batcher`], posts each due
//! batch signed, retries failed posts after the [`Retry`] delays, and counts every outcome.
//!
//! It is the only place webhooks touch the network, and it runs on its own thread, so a post
//! that hangs until its timeout delays only later webhooks (whose queue then fills, and `emit`
//! drops), never an event loop. Posts are sequential: batches reach the endpoint in order.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Select};
use log::{debug, warn};

use super::batch::Batcher;
use super::event::{self, WebhookEvent};
use super::{DeliverySettings, Endpoint, StatCells};

/// The most of a response body read, only so the connection can be reused; receivers answer
/// webhooks with nothing or a few bytes.
const MAX_RESPONSE_BODY: u64 = 64 * 1024;

/// Why one post failed. Every one is retried until the batch's attempts run out.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// The endpoint could not be reached, or did not answer within the timeout.
    #[error("{0}")]
    Http(#[from] ureq::Error),
    /// The endpoint answered with a status other than 2xx.
    #[error("the endpoint answered {0}")]
    Status(u16),
}

/// What the thread was doing when a stop or the end of the queue arrived.
enum Wake {
    /// Nothing new: a batch may be due.
    Timeout,
    /// Stop, posting what is left until this deadline.
    Stop(Instant),
}

/// The delivery thread's state.
pub struct Courier {
    endpoint: Endpoint,
    settings: DeliverySettings,
    agent: ureq::Agent,
    events: Receiver<WebhookEvent>,
    stop: Receiver<Instant>,
    batcher: Batcher,
    stats: Arc<StatCells>,
    /// Set once a stop arrives: the time by which the thread must be done.
    deadline: Option<Instant>,
}

impl Courier {
    /// A courier to `endpoint` as `settings` say, reading `events` until `stop` says when to
    /// be done.
    pub fn new(
        endpoint: Endpoint,
        settings: DeliverySettings,
        events: Receiver<WebhookEvent>,
        stop: Receiver<Instant>,
        stats: Arc<StatCells>,
    ) -> Courier {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(settings.timeout))
            // Statuses are outcomes to count and retry, not errors to unpack.
            .http_status_as_error(false)
            // A webhook is signed for one endpoint; a redirect elsewhere is a failure.
            .max_redirects(0)
            .build()
            .into();
        let batcher = Batcher::new(settings.batch_window, settings.batch_max);
        Courier { endpoint, settings, agent, events, stop, batcher, stats, deadline: None }
    }

    /// Runs until stopped, then posts what is queued until the deadline and gives up the rest.
    pub fn run(mut self) {
        loop {
            let now = Instant::now();
            while let Some(batch) = self.batcher.poll_batch(now) {
                self.deliver(batch);
            }
            if let Some(deadline) = self.deadline {
                self.drain(deadline);
                return;
            }
            match self.wait(self.batcher.poll_timeout()) {
                Wake::Timeout => {}
                Wake::Stop(deadline) => self.deadline = Some(deadline),
            }
        }
    }

    /// Waits for the next event (taking it into the batcher), a stop, or `until`.
    fn wait(&mut self, until: Option<Instant>) -> Wake {
        let mut select = Select::new();
        let events = select.recv(&self.events);
        let stop = select.recv(&self.stop);
        let ready = match until {
            Some(at) => select.select_deadline(at),
            None => Ok(select.select()),
        };
        let Ok(operation) = ready else { return Wake::Timeout };
        // A selected operation must be completed, so there are exactly two arms.
        if operation.index() == events {
            match operation.recv(&self.events) {
                Ok(event) => {
                    self.batcher.handle_event(event, Instant::now());
                    Wake::Timeout
                }
                // Every handle is gone, so nothing more can come: post what is pending.
                Err(_) => Wake::Stop(Instant::now() + self.settings.drain),
            }
        } else {
            debug_assert_eq!(operation.index(), stop);
            match operation.recv(&self.stop) {
                Ok(deadline) => Wake::Stop(deadline),
                // The thread's owner vanished without a word (it always sends one): stop.
                Err(_) => Wake::Stop(Instant::now() + self.settings.drain),
            }
        }
    }

    /// At shutdown: posts the events already queued, in batches, until `deadline`; what is still
    /// unsent then is given up. Only the events queued now are taken, so producers that are
    /// still running cannot keep the thread alive.
    fn drain(&mut self, deadline: Instant) {
        let now = Instant::now();
        for event in self.events.try_iter().take(self.events.len()) {
            self.batcher.handle_event(event, now);
        }
        while let Some(batch) = self.batcher.flush() {
            if Instant::now() >= deadline {
                self.give_up(batch.len());
                continue;
            }
            self.deliver(batch);
        }
    }

    /// Posts one batch, retrying as the settings say; counts the outcome.
    fn deliver(&mut self, batch: Vec<WebhookEvent>) {
        let time_ms = crate::clock::since_unix_epoch().as_millis() as u64;
        let body = match event::body(&batch, time_ms) {
            Ok(body) => body,
            Err(e) => {
                // Events hold only strings, so this cannot happen; if it ever does, the batch is
                // lost and said so rather than crashing the thread.
                warn!("could not encode a webhook batch: {e}");
                self.give_up(batch.len());
                return;
            }
        };
        // Signed once: every retry sends the very same body, so the receiver can dedupe on it.
        let signature = event::signature(&self.endpoint.app_secret, &body);
        let mut failed = 0;
        // Each attempt gets the post timeout, or what is left of the drain once stopping.
        while let Some(timeout) = self.budget(self.settings.timeout) {
            if failed > 0 {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            match self.post(&body, &signature, timeout) {
                Ok(()) => {
                    self.stats.batches_delivered.fetch_add(1, Ordering::Relaxed);
                    self.stats.events_delivered.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    self.stats.attempts_failed.fetch_add(1, Ordering::Relaxed);
                    failed += 1;
                    debug!("webhook post to {} failed (attempt {failed}): {e}", self.endpoint.url);
                    let Some(delay) = self.settings.retry.delay_after(failed) else {
                        warn!("giving up a webhook batch of {} events after {failed} attempts: {e}", batch.len());
                        break;
                    };
                    if !self.pause(delay) {
                        break;
                    }
                }
            }
        }
        self.give_up(batch.len());
    }

    /// `want`, shortened to what is left before the deadline once stopping; `None` when no
    /// time is left.
    fn budget(&self, want: Duration) -> Option<Duration> {
        match self.deadline {
            None => Some(want),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                (!left.is_zero()).then(|| want.min(left))
            }
        }
    }

    /// Waits `delay` before a retry; a stop that arrives meanwhile sets the deadline and the
    /// retry goes ahead within it. Returns `false` when the deadline leaves no room for it.
    fn pause(&mut self, delay: Duration) -> bool {
        if self.deadline.is_none() {
            match self.stop.recv_timeout(delay) {
                Err(RecvTimeoutError::Timeout) => return true,
                Ok(deadline) => self.deadline = Some(deadline),
                Err(RecvTimeoutError::Disconnected) => self.deadline = Some(Instant::now() + self.settings.drain),
            }
        }
        // Stopping: wait out what is left of the delay only if a retry still fits after it.
        let Some(deadline) = self.deadline else { return true };
        let retry_at = Instant::now() + delay;
        if retry_at >= deadline {
            return false;
        }
        std::thread::sleep(retry_at.saturating_duration_since(Instant::now()));
        true
    }

    /// One POST of a signed body.
    fn post(&self, body: &str, signature: &str, timeout: Duration) -> Result<(), PostError> {
        let response = self
            .agent
            .post(&self.endpoint.url.0)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("Content-Type", "application/json")
            .header("X-Pusher-Key", &self.endpoint.app_key)
            .header("X-Pusher-Signature", signature)
            .send(body)?;
        let status = response.status();
        // Read (a bounded part of) the answer so the connection can carry the next post; what
        // it says does not matter, and failing to read it only costs a new connection.
        let _ = response.into_body().with_config().limit(MAX_RESPONSE_BODY).read_to_vec();
        if status.is_success() {
            Ok(())
        } else {
            Err(PostError::Status(status.as_u16()))
        }
    }

    fn give_up(&self, events: usize) {
        self.stats.batches_given_up.fetch_add(1, Ordering::Relaxed);
        self.stats.events_given_up.fetch_add(events as u64, Ordering::Relaxed);
    }
}
