//! When to post and when to try again (sans-IO): the [`Batcher`] that gathers events into
//! batches of at most N events or T time, and the [`Retry`] policy that spaces failed attempts.
//!
//! Both are driven by the caller's clock (`now`), the way quinn-proto's connection is, so the
//! tests run them with a virtual clock and the delivery thread only waits and posts.

use std::mem;
use std::time::{Duration, Instant};

use super::event::WebhookEvent;

/// Gathers events into batches: a batch is due when it holds `max` events, or when its oldest
/// event has waited `window`.
#[derive(Debug)]
pub struct Batcher {
    window: Duration,
    max: usize,
    pending: Vec<WebhookEvent>,
    /// When the oldest pending event arrived; `None` while nothing is pending.
    opened_at: Option<Instant>,
}

impl Batcher {
    /// A batcher of at most `max` events (at least 1) or `window` of waiting.
    pub fn new(window: Duration, max: usize) -> Self {
        let max = max.max(1);
        Batcher { window, max, pending: Vec::with_capacity(max), opened_at: None }
    }

    /// Adds an event that arrived at `now`.
    pub fn handle_event(&mut self, event: WebhookEvent, now: Instant) {
        self.opened_at.get_or_insert(now);
        self.pending.push(event);
    }

    /// When the pending batch falls due, if anything is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.opened_at.map(|opened| opened + self.window)
    }

    /// The next batch to post at `now`: a full one, or one whose window has passed.
    pub fn poll_batch(&mut self, now: Instant) -> Option<Vec<WebhookEvent>> {
        let due = self.poll_timeout().is_some_and(|at| at <= now);
        if self.pending.len() >= self.max || due {
            self.flush()
        } else {
            None
        }
    }

    /// The next batch regardless of its window (on shutdown): at most `max` events.
    pub fn flush(&mut self) -> Option<Vec<WebhookEvent>> {
        if self.pending.is_empty() {
            return None;
        }
        if self.pending.len() <= self.max {
            self.opened_at = None;
            return Some(mem::replace(&mut self.pending, Vec::with_capacity(self.max)));
        }
        // Events beyond `max` stay pending. They keep the batch's opening time: they have
        // already waited at least that long, so the rest is due at once.
        let rest = self.pending.split_off(self.max);
        Some(mem::replace(&mut self.pending, rest))
    }

    /// Events pending.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// How failed posts of a batch are retried: at most `attempts` posts in all, the n-th retry
/// after `first_delay * 2^(n-1)`, each delay capped at `max_delay`. So a batch costs at most
/// `attempts` request timeouts plus `(attempts - 1) * max_delay` before it is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Posts of one batch in all (1: never retry).
    pub attempts: u32,
    /// The delay before the first retry.
    pub first_delay: Duration,
    /// The longest delay between two attempts.
    pub max_delay: Duration,
}

impl Retry {
    /// The wait before trying again after `failed` failed attempts, or `None` to give up.
    pub fn delay_after(&self, failed: u32) -> Option<Duration> {
        if failed == 0 || failed >= self.attempts {
            return None;
        }
        // 2^(failed-1), saturating: past 2^31 the cap has long applied anyway.
        let factor = 1u32.checked_shl(failed - 1).unwrap_or(u32::MAX);
        Some(self.first_delay.saturating_mul(factor).min(self.max_delay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pusher::protocol::ChannelName;
    use crate::pusher::AppIndex;

    fn event(n: usize) -> WebhookEvent {
        WebhookEvent::ChannelOccupied { channel: ChannelName::new(AppIndex(0), &format!("c{n}")) }
    }

    fn channels(batch: &[WebhookEvent]) -> Vec<String> {
        batch
            .iter()
            .map(|e| match e {
                WebhookEvent::ChannelOccupied { channel } => channel.to_string(),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    const WINDOW: Duration = Duration::from_millis(100);

    #[test]
    fn a_batch_waits_for_its_window_from_the_first_event() {
        let t0 = Instant::now();
        let mut batcher = Batcher::new(WINDOW, 10);
        assert_eq!(batcher.poll_timeout(), None, "nothing pending, nothing to wake for");
        batcher.handle_event(event(0), t0);
        batcher.handle_event(event(1), t0 + Duration::from_millis(60));
        assert_eq!(batcher.poll_timeout(), Some(t0 + WINDOW), "the first event opens the window");
        assert!(batcher.poll_batch(t0 + Duration::from_millis(99)).is_none());
        let batch = batcher.poll_batch(t0 + WINDOW).expect("due");
        assert_eq!(channels(&batch), ["c0", "c1"]);
        assert!(batcher.is_empty());
        assert_eq!(batcher.poll_timeout(), None);

        // The next event opens a new window.
        batcher.handle_event(event(2), t0 + Duration::from_millis(500));
        assert_eq!(batcher.poll_timeout(), Some(t0 + Duration::from_millis(600)));
    }

    #[test]
    fn a_full_batch_goes_at_once() {
        let t0 = Instant::now();
        let mut batcher = Batcher::new(WINDOW, 3);
        for n in 0..3 {
            assert!(batcher.poll_batch(t0).is_none());
            batcher.handle_event(event(n), t0);
        }
        assert_eq!(channels(&batcher.poll_batch(t0).expect("full")), ["c0", "c1", "c2"]);
        assert!(batcher.poll_batch(t0 + WINDOW).is_none());
    }

    /// A batcher of at most `max` events holding `events` that all arrived at `at`.
    fn backlog(max: usize, events: usize, at: Instant) -> Batcher {
        let mut batcher = Batcher::new(WINDOW, max);
        for n in 0..events {
            batcher.handle_event(event(n), at);
        }
        batcher
    }

    #[test]
    fn a_backlog_leaves_in_batches_of_at_most_max_in_order() {
        let t0 = Instant::now();
        let mut batcher = backlog(2, 5, t0);
        let first = batcher.poll_batch(t0).expect("full");
        let second = batcher.poll_batch(t0).expect("still full");
        assert_eq!((channels(&first), channels(&second)), (vec!["c0".into(), "c1".into()], vec!["c2".into(), "c3".into()]));
        assert!(batcher.poll_batch(t0).is_none(), "one event waits for its window");
        assert_eq!(batcher.poll_timeout(), Some(t0 + WINDOW), "it keeps the backlog's opening time");
        assert_eq!(channels(&batcher.poll_batch(t0 + WINDOW).expect("due")), ["c4"]);
    }

    #[test]
    fn flush_ignores_the_window_but_not_the_size() {
        let mut batcher = backlog(2, 3, Instant::now());
        assert_eq!(batcher.flush().map(|b| b.len()), Some(2));
        assert_eq!(batcher.flush().map(|b| b.len()), Some(1));
        assert_eq!(batcher.flush(), None);
        assert_eq!(batcher.len(), 0);
    }

    #[test]
    fn retries_back_off_exponentially_up_to_a_cap_and_then_give_up() {
        let retry = Retry { attempts: 5, first_delay: Duration::from_millis(100), max_delay: Duration::from_millis(350) };
        let delays: Vec<Option<Duration>> = (1..=5).map(|failed| retry.delay_after(failed)).collect();
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(delays, [ms(100), ms(200), ms(350), ms(350), None]);
        assert_eq!(retry.delay_after(0), None, "nothing failed, nothing to wait for");
        let once = Retry { attempts: 1, ..retry };
        assert_eq!(once.delay_after(1), None, "one attempt: never retried");
        let huge = Retry { attempts: u32::MAX, first_delay: Duration::from_secs(1), max_delay: Duration::from_secs(2) };
        assert_eq!(huge.delay_after(200), Some(Duration::from_secs(2)), "no overflow far out");
    }
}
