//! Cache channels (sans-IO): the last event of every cache channel, kept for the cache TTL so
//! that each new subscriber gets it right after its `subscription_succeeded`, and which misses
//! are worth telling the app's server about with a `cache_miss` webhook.
//!
//! Every worker owns one [`LastEvents`], and every cached event reaches every worker of the node
//! (however few of them have subscribers), so a subscription is answered from its own worker's
//! copy with no round trip to another thread. The copies share the event's bytes: an event is
//! kept as the WebSocket frame its live subscribers got, so a hit queues a reference-counted
//! handle exactly as a broadcast does, and nothing is serialized or copied per subscriber.
//!
//! Memory is bounded twice: by the TTL, and by a byte budget over what the entries hold (frame,
//! name and a fixed overhead each). An event that would pass the budget makes room by dropping
//! the events nearest to expiry, as if their TTL had run out: the next subscriber of such a
//! channel misses, and the app's server is told. Time is an input (`now`), so expiry is tested
//! with a virtual clock.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::protocol::{ChannelKey, ChannelMap, ChannelName};

/// How long after a reported miss the channel's further misses are not reported: a crowd that
/// subscribes to an empty channel at once (a page many people open) costs the app's server one
/// `cache_miss` webhook, and an app that did not answer it hears again while misses go on.
pub const MISS_REPORT_EVERY: Duration = Duration::from_secs(5);

/// What a kept channel costs beyond its frame and name: its map entry, its deadline in the
/// heap, and the frame's handle.
const ENTRY_OVERHEAD: usize = 128;

#[derive(Debug)]
enum Entry {
    /// The channel's last event, as the frame its subscribers got.
    Event { frame: Bytes, published_at_us: u64, expires: Instant },
    /// No event is kept, and a miss was reported: until `until`, others are not.
    MissReported { until: Instant },
}

impl Entry {
    fn expires(&self) -> Instant {
        match self {
            Entry::Event { expires, .. } => *expires,
            Entry::MissReported { until } => *until,
        }
    }

    fn cost(&self, channel: &str) -> usize {
        let frame = match self {
            Entry::Event { frame, .. } => frame.len(),
            Entry::MissReported { .. } => 0,
        };
        ENTRY_OVERHEAD + channel.len() + frame
    }
}

/// One worker's copy of the cache channels' last events.
#[derive(Debug)]
pub struct LastEvents {
    ttl: Duration,
    max_bytes: usize,
    /// What the entries cost now, by [`Entry::cost`].
    bytes: usize,
    entries: ChannelMap<Entry>,
    /// Every entry has at least one deadline here, and none later than its expiry, so the top
    /// is never later than the next expiry. A kept event whose TTL starts again keeps its old
    /// deadline; when that comes, it is queued again at the real expiry. So a busy channel
    /// costs one deadline, not one per event.
    deadlines: BinaryHeap<Reverse<(Instant, ChannelName)>>,
}

impl LastEvents {
    /// Keeps events for `ttl`, and entries of at most `max_bytes` together.
    pub fn new(ttl: Duration, max_bytes: usize) -> Self {
        LastEvents { ttl, max_bytes, bytes: 0, entries: ChannelMap::default(), deadlines: BinaryHeap::new() }
    }

    /// Keeps `frame`, published at `published_at_us` (microseconds since the Unix epoch), as
    /// `channel`'s last event for the TTL from `now`. Returns how many other events were dropped
    /// to stay within the budget.
    pub fn store(&mut self, channel: &ChannelName, frame: Bytes, published_at_us: u64, now: Instant) -> usize {
        self.put(channel, Entry::Event { frame, published_at_us, expires: now + self.ttl })
    }

    /// Keeps an event read back from outside the node (another node's, through Redis) with
    /// `remaining` of its TTL, unless the event kept for `channel` is as new. Returns how many
    /// other events were dropped to stay within the budget.
    pub fn restore(&mut self, channel: &ChannelName, frame: Bytes, published_at_us: u64, remaining: Duration, now: Instant) -> usize {
        if let Some(Entry::Event { published_at_us: kept, expires, .. }) = self.entries.get(channel) {
            if *expires > now && *kept >= published_at_us {
                return 0;
            }
        }
        self.put(channel, Entry::Event { frame, published_at_us, expires: now + remaining })
    }

    /// `channel`'s last event, unless none is kept or it has expired.
    pub fn get(&self, channel: ChannelKey<'_>, now: Instant) -> Option<&Bytes> {
        match self.entries.get(&channel) {
            Some(Entry::Event { frame, expires, .. }) if *expires > now => Some(frame),
            _ => None,
        }
    }

    /// A subscriber of `channel` found no event. Returns whether to report it: not if an event
    /// is kept after all (it arrived meanwhile), nor if a miss was reported less than
    /// [`MISS_REPORT_EVERY`] ago.
    pub fn miss(&mut self, channel: &ChannelName, now: Instant) -> bool {
        if self.entries.get(channel).is_some_and(|entry| entry.expires() > now) {
            return false;
        }
        self.put(channel, Entry::MissReported { until: now + MISS_REPORT_EVERY });
        true
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has an entry to remove.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((deadline, _))| *deadline)
    }

    /// Removes the entries that expired by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while self.remove_first(Some(now)).is_some() {}
    }

    /// Entries kept (events and reported misses).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entry is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Replaces `channel`'s entry and keeps the total within the budget. Returns how many
    /// events were dropped for that.
    fn put(&mut self, channel: &ChannelName, entry: Entry) -> usize {
        let expires = entry.expires();
        self.bytes += entry.cost(channel);
        match self.entries.insert(channel.clone(), entry) {
            Some(old) => {
                self.bytes -= old.cost(channel);
                // The deadline queued for it is no later than the old expiry; an earlier one
                // needs its own.
                if expires < old.expires() {
                    self.deadlines.push(Reverse((expires, channel.clone())));
                }
            }
            None => self.deadlines.push(Reverse((expires, channel.clone()))),
        }
        let mut dropped = 0;
        while self.bytes > self.max_bytes {
            match self.remove_first(None) {
                Some(Entry::Event { .. }) => dropped += 1,
                Some(Entry::MissReported { .. }) => {}
                None => break,
            }
        }
        dropped
    }

    /// Removes the entry that expires first, if it expires by `by` (with `None`: whenever).
    fn remove_first(&mut self, by: Option<Instant>) -> Option<Entry> {
        while let Some(Reverse((deadline, _))) = self.deadlines.peek() {
            if by.is_some_and(|by| *deadline > by) {
                return None;
            }
            let Reverse((deadline, channel)) = self.deadlines.pop()?;
            match self.entries.get(&channel).map(Entry::expires) {
                // Removed before its deadline came, or queued twice.
                None => {}
                Some(expires) if expires <= deadline => {
                    let entry = self.entries.remove(&channel)?;
                    self.bytes -= entry.cost(&channel);
                    return Some(entry);
                }
                // Its TTL started again since: this is its deadline now.
                Some(expires) => self.deadlines.push(Reverse((expires, channel))),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(1800);

    fn frame(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    fn name(channel: &str) -> ChannelName {
        ChannelName::new(crate::pusher::AppIndex(0), channel)
    }

    /// A start time, an empty cache of 1 MiB and the channel most tests use.
    fn price_cache() -> (Instant, LastEvents, ChannelName) {
        (Instant::now(), LastEvents::new(TTL, 1 << 20), name("cache-price"))
    }

    #[test]
    fn an_event_is_kept_for_the_ttl_and_then_forgotten() {
        let (t0, mut cache, price) = price_cache();
        assert!(cache.get(price.key(), t0).is_none());
        cache.store(&price, frame("42"), 1, t0);
        assert_eq!(cache.get(price.key(), t0 + TTL - Duration::from_millis(1)).map(|f| &f[..]), Some(&b"42"[..]));
        assert_eq!(cache.poll_timeout(), Some(t0 + TTL));
        assert!(cache.get(price.key(), t0 + TTL).is_none(), "expired, even before the timer ran");
        cache.handle_timeout(t0 + TTL - Duration::from_millis(1));
        assert_eq!(cache.len(), 1);
        cache.handle_timeout(t0 + TTL);
        assert!(cache.is_empty());
        assert_eq!((cache.bytes, cache.poll_timeout()), (0, None));
    }

    #[test]
    fn a_newer_event_replaces_the_last_and_starts_the_ttl_again() {
        let (t0, mut cache, price) = price_cache();
        cache.store(&price, frame("1"), 1, t0);
        let later = t0 + TTL / 2;
        cache.store(&price, frame("2"), 2, later);
        cache.handle_timeout(t0 + TTL);
        assert_eq!(cache.get(price.key(), t0 + TTL).map(|f| &f[..]), Some(&b"2"[..]), "the first deadline only moved");
        assert_eq!(cache.poll_timeout(), Some(later + TTL));
        assert_eq!(cache.deadlines.len(), 1, "one deadline per channel, however many events");
        cache.handle_timeout(later + TTL);
        assert!(cache.is_empty());
    }

    #[test]
    fn an_event_read_back_is_kept_only_if_it_is_newer() {
        let (t0, mut cache, price) = price_cache();
        cache.store(&price, frame("new"), 20, t0);
        cache.restore(&price, frame("old"), 10, Duration::from_secs(60), t0);
        assert_eq!(cache.get(price.key(), t0).map(|f| &f[..]), Some(&b"new"[..]));
        let other = name("cache-other");
        cache.restore(&other, frame("elsewhere"), 10, Duration::from_secs(60), t0);
        assert_eq!(cache.get(other.key(), t0 + Duration::from_secs(59)).map(|f| &f[..]), Some(&b"elsewhere"[..]));
        assert!(cache.get(other.key(), t0 + Duration::from_secs(60)).is_none(), "only what was left of its TTL");
        cache.restore(&price, frame("newer"), 30, Duration::from_secs(60), t0);
        assert_eq!(cache.get(price.key(), t0).map(|f| &f[..]), Some(&b"newer"[..]));
        cache.handle_timeout(t0 + Duration::from_secs(60));
        assert!(cache.is_empty(), "its shorter TTL got a deadline of its own");
    }

    #[test]
    fn past_the_budget_the_events_nearest_to_expiry_go_first() {
        let t0 = Instant::now();
        let entry = ENTRY_OVERHEAD + "cache-0".len() + 100;
        let mut cache = LastEvents::new(TTL, 3 * entry);
        let data = "x".repeat(100);
        for i in 0..3u32 {
            let dropped = cache.store(&name(&format!("cache-{i}")), frame(&data), 1, t0 + Duration::from_secs(u64::from(i)));
            assert_eq!(dropped, 0);
        }
        // cache-0 is renewed, so cache-1 now expires first.
        assert_eq!(cache.store(&name("cache-0"), frame(&data), 2, t0 + Duration::from_secs(3)), 0);
        assert_eq!(cache.store(&name("cache-3"), frame(&data), 1, t0 + Duration::from_secs(4)), 1);
        let now = t0 + Duration::from_secs(4);
        let kept: Vec<bool> = (0..4).map(|i| cache.get(name(&format!("cache-{i}")).key(), now).is_some()).collect();
        assert_eq!(kept, [true, false, true, true]);
        assert_eq!(cache.bytes, 3 * entry);
    }

    #[test]
    fn a_miss_is_reported_once_a_window_until_an_event_is_kept() {
        let (t0, mut cache, price) = price_cache();
        assert!(cache.miss(&price, t0), "the first miss is reported");
        assert!(!cache.miss(&price, t0 + MISS_REPORT_EVERY - Duration::from_millis(1)), "a crowd of misses is one report");
        assert!(cache.get(price.key(), t0).is_none(), "a reported miss is still a miss");
        assert!(cache.miss(&price, t0 + MISS_REPORT_EVERY), "an app that did not answer hears again");
        cache.store(&price, frame("1"), 1, t0 + MISS_REPORT_EVERY);
        assert!(!cache.miss(&price, t0 + MISS_REPORT_EVERY * 2), "the event came: no miss to report");
        cache.handle_timeout(t0 + MISS_REPORT_EVERY * 3);
        assert_eq!(cache.len(), 1, "the event outlives the reported miss it replaced");
    }
}
