//! Subscription-count events (sans-IO): when to tell the subscribers of a public or private
//! channel its subscriber count (`pusher_internal:subscription_count`, which pusher-js hands to
//! the channel's `pusher:subscription_count` binding).
//!
//! A channel's owner worker hears of every change of the channel's count: its replica of the
//! directory sees this node's workers' changes and, in a cluster, the other nodes'. The first
//! change after a quiet [`ANNOUNCE_EVERY`] is announced at once (at the end of the loop turn);
//! the changes inside an interval wait for its end and go out as one, with the count then. So a
//! channel of 20,000 that churns costs one announcement (20,000 deliveries) a second, not one
//! per join and leave, and a change that undoes itself within the interval announces nothing.
//! Time is an input (`now`), so all of this is tested with a virtual clock.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::protocol::{ChannelMap, ChannelName};

/// The shortest time between two announcements of one channel's count. A count is for display:
/// a second behind is not noticed, while each announcement costs a delivery per subscriber.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

/// What was last announced of a channel, and whether a change waits.
#[derive(Debug, Default)]
struct Announced {
    /// When the last announcement went out (`None`: never).
    at: Option<Instant>,
    /// The count it told.
    count: u32,
    /// A change waits in [`SubscriptionCounts::due`].
    waiting: bool,
}

/// The announcements one worker owes, for the channels it owns.
#[derive(Debug)]
pub struct SubscriptionCounts {
    every: Duration,
    /// Channels with an announcement out or due; a channel is forgotten once it is empty.
    channels: ChannelMap<Announced>,
    /// When each waiting channel is due: one entry per waiting channel.
    due: BinaryHeap<Reverse<(Instant, ChannelName)>>,
}

impl SubscriptionCounts {
    /// Announcements at most `every` apart per channel.
    pub fn new(every: Duration) -> Self {
        SubscriptionCounts { every, channels: ChannelMap::default(), due: BinaryHeap::new() }
    }

    /// `channel`'s subscriber count changed at `now`.
    pub fn handle_change(&mut self, channel: &ChannelName, now: Instant) {
        let announced = self.channels.entry(channel.clone()).or_default();
        if announced.waiting {
            return;
        }
        announced.waiting = true;
        let due = announced.at.map_or(now, |at| now.max(at + self.every));
        self.due.push(Reverse((due, channel.clone())));
    }

    /// When [`poll_due`](Self::poll_due) next has something to give.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((due, _))| *due)
    }

    /// The announcements due at `now`, each with the channel's count now (read with
    /// `count_of`). A channel whose count is what it last announced has nothing to say; one
    /// with no subscriber left has no one to say it to, and is forgotten.
    pub fn poll_due(&mut self, now: Instant, count_of: impl Fn(&ChannelName) -> u32) -> Vec<(ChannelName, u32)> {
        let mut due = Vec::new();
        while self.poll_timeout().is_some_and(|at| at <= now) {
            let Some(Reverse((_, channel))) = self.due.pop() else { break };
            let count = count_of(&channel);
            if count == 0 {
                self.channels.remove(&channel);
                continue;
            }
            let Some(announced) = self.channels.get_mut(&channel) else { continue };
            announced.waiting = false;
            if announced.at.is_some() && announced.count == count {
                continue;
            }
            *announced = Announced { at: Some(now), count, waiting: false };
            due.push((channel, count));
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: Duration = ANNOUNCE_EVERY;

    fn name(channel: &str) -> ChannelName {
        ChannelName::new(crate::pusher::AppIndex(0), channel)
    }

    /// A start time, no announcement owed, and the channel most tests use.
    fn room_counts() -> (Instant, SubscriptionCounts, ChannelName) {
        (Instant::now(), SubscriptionCounts::new(EVERY), name("room"))
    }

    #[test]
    fn the_first_change_is_announced_at_once_and_the_next_ones_together_an_interval_later() {
        let (t0, mut counts, room) = room_counts();
        counts.handle_change(&room, t0);
        assert_eq!(counts.poll_timeout(), Some(t0));
        assert_eq!(counts.poll_due(t0, |_| 1), [(room.clone(), 1)]);
        assert_eq!(counts.poll_timeout(), None);
        for ms in [10, 200, 900] {
            counts.handle_change(&room, t0 + Duration::from_millis(ms));
        }
        assert_eq!(counts.poll_timeout(), Some(t0 + EVERY), "an interval after the last announcement");
        assert!(counts.poll_due(t0 + EVERY - Duration::from_millis(1), |_| 4).is_empty());
        assert_eq!(counts.poll_due(t0 + EVERY, |_| 4), [(room.clone(), 4)], "three changes, one announcement of where they ended");
        counts.handle_change(&room, t0 + EVERY * 5);
        assert_eq!(counts.poll_due(t0 + EVERY * 5, |_| 5), [(room, 5)], "after a quiet interval, at once again");
    }

    #[test]
    fn a_change_that_undoes_itself_or_empties_the_channel_announces_nothing() {
        let (t0, mut counts, room) = room_counts();
        counts.handle_change(&room, t0);
        assert_eq!(counts.poll_due(t0, |_| 3).len(), 1);
        counts.handle_change(&room, t0 + Duration::from_millis(100)); // A leave ...
        counts.handle_change(&room, t0 + Duration::from_millis(200)); // ... and a join.
        assert!(counts.poll_due(t0 + EVERY, |_| 3).is_empty(), "still 3");
        counts.handle_change(&room, t0 + EVERY * 2);
        assert!(counts.poll_due(t0 + EVERY * 2, |_| 0).is_empty(), "no one left to tell");
        assert!(counts.channels.is_empty(), "an empty channel is forgotten");
    }

    #[test]
    fn a_channel_of_20000_that_churns_is_announced_once_a_second() {
        let t0 = Instant::now();
        let mut counts = SubscriptionCounts::new(EVERY);
        let big = name("big");
        let (mut announcements, mut now) = (0, t0);
        // For ten seconds, with the loop turning every millisecond, each turn a subscriber
        // leaves and comes back and another joins: 30,000 changes, up to 30,000 subscribers.
        for turn in 0..10_000u32 {
            now = t0 + Duration::from_millis(u64::from(turn));
            for _ in 0..3 {
                counts.handle_change(&big, now);
            }
            announcements += counts.poll_due(now, |_| 20_000 + turn).len();
        }
        assert_eq!(announcements, 10, "once a second, the first at once");
        assert_eq!(counts.due.len(), 1, "one waiting entry, however many changes");
        assert!(now < t0 + EVERY * 10);
    }

    #[test]
    fn channels_are_announced_apart() {
        let t0 = Instant::now();
        let mut counts = SubscriptionCounts::new(EVERY);
        counts.handle_change(&name("a"), t0);
        counts.handle_change(&name("b"), t0);
        let mut due = counts.poll_due(t0, |channel| if &**channel == "a" { 1 } else { 2 });
        due.sort();
        assert_eq!(due, [(name("a"), 1), (name("b"), 2)]);
    }
}
