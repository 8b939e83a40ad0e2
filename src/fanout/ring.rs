//! The outbound ring: one connection's bounded queue of frames waiting for its socket, and the
//! backpressure state machine that decides when the connection is a slow consumer.
//!
//! This is the "Day 23" core, with no socket and no clock of its own: the I/O shell reports
//! what the socket did (`advance` after a write, `handle_would_block` when the kernel buffer is
//! full) and the time, and asks whether the connection is due for eviction.
//!
//! - A broadcast offered to a full ring is dropped and counted; the producer never waits.
//! - Replies (the answers to a client's own requests) are never dropped. They are queued in the
//!   same ring, so order is kept, but they count against a bound of their own: the connection
//!   may only be read while [`Outbound::may_read`] says a reply still fits, so the client is
//!   slowed down (backpressure on its reader, as in any request-response protocol) instead of
//!   losing answers, and its replies can never crowd out broadcasts or the other way round.
//! - A connection enters backpressure when a write would block with frames still queued, and
//!   leaves it only when its ring drains; leaving resets the clock.
//! - Backpressured continuously for longer than the eviction threshold, it is due for eviction.
//!
//! Frames are shared [`Bytes`] handles: queueing one is a reference-count increment, never a copy.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Slots allocated up front. Rings grow to their bound only for connections that queue, which
/// keeps an idle connection small.
const INITIAL_SLOTS: usize = 8;

/// What happened to an offered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// The frame is queued.
    Queued,
    /// The ring was full; the frame was dropped and counted.
    Dropped,
    /// The connection is closing; nothing more is queued.
    Closed,
}

/// A queued frame, and whether it answers one of the client's own requests.
#[derive(Debug)]
struct Queued {
    frame: Bytes,
    reply: bool,
}

/// The queue state of one connection.
#[derive(Debug)]
pub struct Outbound {
    ring: VecDeque<Queued>,
    /// The bound on queued broadcasts, and separately on replies (queued plus promised).
    slots: usize,
    /// Reply frames in `ring`.
    replies: usize,
    /// Replies owed to requests being answered elsewhere (another worker), not yet queued.
    promised: usize,
    /// Bytes of the front frame already written to the socket.
    front_written: usize,
    backpressured_since: Option<Instant>,
    dropped: u64,
    closing: bool,
}

impl Outbound {
    /// An empty ring holding at most `slots` frames.
    pub fn new(slots: usize) -> Self {
        let slots = slots.max(1);
        Outbound {
            ring: VecDeque::with_capacity(slots.min(INITIAL_SLOTS)),
            slots,
            replies: 0,
            promised: 0,
            front_written: 0,
            backpressured_since: None,
            dropped: 0,
            closing: false,
        }
    }

    /// Queues a clone of the broadcast `frame` if fewer than `slots` broadcasts are queued.
    #[inline]
    pub fn offer(&mut self, frame: &Bytes) -> Offer {
        if self.closing {
            Offer::Closed
        } else if self.ring.len() - self.replies >= self.slots {
            self.dropped += 1;
            Offer::Dropped
        } else {
            self.ring.push_back(Queued { frame: frame.clone(), reply: false });
            Offer::Queued
        }
    }

    /// Queues a reply: the answer to one of the client's requests, or a frame the server owes
    /// the connection itself (its `connection_established`, an activity ping). Never dropped:
    /// the reader gate ([`may_read`](Self::may_read)) is what keeps their number bounded.
    pub fn push_reply(&mut self, frame: &Bytes) -> Offer {
        if self.closing {
            return Offer::Closed;
        }
        self.ring.push_back(Queued { frame: frame.clone(), reply: true });
        self.replies += 1;
        Offer::Queued
    }

    /// Reserves room for a reply that will come later (a request answered by another worker).
    pub fn promise_reply(&mut self) {
        self.promised += 1;
    }

    /// Queues the reply that a [`promise_reply`](Self::promise_reply) reserved room for.
    pub fn push_promised(&mut self, frame: &Bytes) -> Offer {
        self.promised = self.promised.saturating_sub(1);
        self.push_reply(frame)
    }

    /// Whether the connection's input may be read: one more request's reply still fits.
    pub fn may_read(&self) -> bool {
        self.replies + self.promised < self.slots
    }

    /// Queues a final frame (a WebSocket close, or the last HTTP response) and refuses anything
    /// after it. Frames not yet begun are discarded first, so a close reaches even a connection
    /// whose ring is full; a partly written frame is kept so the byte stream stays well-formed.
    pub fn close_with(&mut self, last: Bytes) {
        if self.closing {
            return;
        }
        let keep = usize::from(self.front_written > 0);
        self.ring.truncate(keep);
        self.replies = self.ring.iter().filter(|queued| queued.reply).count();
        self.ring.push_back(Queued { frame: last, reply: false });
        self.closing = true;
    }

    /// Like [`close_with`](Self::close_with) but after everything already queued: used for an
    /// HTTP response that ends its connection, where nothing queued may be lost.
    pub fn finish_with(&mut self, last: Bytes) {
        if self.closing {
            return;
        }
        self.ring.push_back(Queued { frame: last, reply: false });
        self.closing = true;
    }

    /// Fills `out` with the unwritten bytes, oldest first, for one vectored write. Returns how
    /// many slices were filled.
    pub fn write_slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (i, Queued { frame, .. }) in self.ring.iter().enumerate() {
            if filled == out.len() {
                break;
            }
            let start = if i == 0 { self.front_written } else { 0 };
            out[filled] = IoSlice::new(&frame[start..]);
            filled += 1;
        }
        filled
    }

    /// Records that the socket accepted `written` bytes. Frames fully written leave the ring;
    /// a drained ring ends backpressure. Returns how many frames were completed.
    pub fn advance(&mut self, mut written: usize) -> usize {
        let mut completed = 0;
        while written > 0 {
            let Some(front) = self.ring.front() else {
                break;
            };
            let remaining = front.frame.len() - self.front_written;
            if written < remaining {
                self.front_written += written;
                written = 0;
            } else {
                written -= remaining;
                self.front_written = 0;
                self.replies -= usize::from(front.reply);
                self.ring.pop_front();
                completed += 1;
            }
        }
        if self.ring.is_empty() {
            self.backpressured_since = None;
        }
        completed
    }

    /// Records that the socket refused more bytes while frames are queued. Returns `true` when
    /// this starts a period of backpressure (the clock starts now), `false` when one continues.
    pub fn handle_would_block(&mut self, now: Instant) -> bool {
        if self.ring.is_empty() || self.backpressured_since.is_some() {
            return false;
        }
        self.backpressured_since = Some(now);
        true
    }

    /// True when the connection has been backpressured for longer than `evict_after`.
    pub fn eviction_due(&self, now: Instant, evict_after: Duration) -> bool {
        self.backpressured_for(now).is_some_and(|d| d > evict_after)
    }

    /// How long the current period of backpressure has lasted, if there is one.
    pub fn backpressured_for(&self, now: Instant) -> Option<Duration> {
        self.backpressured_since.map(|since| now.saturating_duration_since(since))
    }

    /// When the current period of backpressure began.
    pub fn backpressured_since(&self) -> Option<Instant> {
        self.backpressured_since
    }

    /// Frames queued (including a partly written one).
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Nothing is waiting to be written.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// The ring's bound.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Frames dropped because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// A final frame is queued; nothing more will be.
    pub fn is_closing(&self) -> bool {
        self.closing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The virtual clock: a fixed origin plus offsets, so no test sleeps.
    fn at(origin: Instant, ms: u64) -> Instant {
        origin + Duration::from_millis(ms)
    }

    fn frame(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    fn unwritten(out: &Outbound) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); 64];
        let n = out.write_slices(&mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn a_full_ring_drops_and_counts() {
        let mut out = Outbound::new(2);
        let f = frame("x");
        assert_eq!(out.offer(&f), Offer::Queued);
        assert_eq!(out.offer(&f), Offer::Queued);
        assert_eq!(out.offer(&f), Offer::Dropped);
        assert_eq!(out.offer(&f), Offer::Dropped);
        assert_eq!(out.len(), 2);
        assert_eq!(out.dropped(), 2);
    }

    #[test]
    fn replies_are_never_dropped_and_do_not_take_broadcast_slots() {
        let mut out = Outbound::new(2);
        let f = frame("b");
        out.offer(&f);
        out.offer(&f);
        assert_eq!(out.push_reply(&frame("r")), Offer::Queued, "a full ring of broadcasts still takes a reply");
        assert_eq!(out.push_reply(&frame("r")), Offer::Queued);
        assert_eq!(out.offer(&f), Offer::Dropped, "broadcasts keep their own bound");
        assert_eq!(out.len(), 4);
        assert_eq!(out.dropped(), 1);
        assert_eq!(unwritten(&out), b"bbrr", "one queue, in order");
    }

    #[test]
    fn the_reader_gate_closes_when_replies_fill_their_bound_and_opens_as_they_drain() {
        let mut out = Outbound::new(2);
        assert!(out.may_read());
        out.push_reply(&frame("a"));
        assert!(out.may_read(), "one more reply fits");
        out.push_reply(&frame("b"));
        assert!(!out.may_read(), "no room for another request's answer: stop reading");
        for _ in 0..10 {
            out.offer(&frame("x"));
        }
        out.advance(1);
        assert!(out.may_read(), "a written reply makes room");
    }

    #[test]
    fn broadcasts_never_close_the_reader_gate() {
        let mut out = Outbound::new(2);
        for _ in 0..5 {
            out.offer(&frame("x"));
        }
        assert!(out.may_read(), "a slow consumer is evicted for its broadcasts, not stopped from asking");
    }

    #[test]
    fn promised_replies_hold_room_until_they_arrive() {
        let mut out = Outbound::new(2);
        out.promise_reply();
        out.push_reply(&frame("a"));
        assert!(!out.may_read(), "the promised answer still needs its room");
        assert_eq!(out.push_promised(&frame("p")), Offer::Queued);
        out.advance(2);
        assert!(out.may_read());
        assert!(out.is_empty());
    }

    #[test]
    fn closing_forgets_the_replies_it_discards() {
        let mut out = Outbound::new(1);
        out.push_reply(&frame("a"));
        out.close_with(frame("CLOSE"));
        assert!(out.may_read(), "the discarded reply no longer counts");
        assert_eq!(out.push_reply(&frame("late")), Offer::Closed);
    }

    #[test]
    fn partial_writes_resume_mid_frame() {
        let mut out = Outbound::new(8);
        out.offer(&frame("abc"));
        out.offer(&frame("defg"));
        out.advance(2);
        assert_eq!(unwritten(&out), b"cdefg");
        assert_eq!(out.advance(2), 1, "the first frame is complete");
        assert_eq!(out.len(), 1);
        assert_eq!(unwritten(&out), b"efg");
        assert_eq!(out.advance(3), 1);
        assert!(out.is_empty());
    }

    #[test]
    fn would_block_starts_backpressure_once_and_draining_ends_it() {
        let t0 = Instant::now();
        let mut out = Outbound::new(8);
        out.offer(&frame("abcd"));
        assert!(out.handle_would_block(at(t0, 0)), "first WouldBlock enters backpressure");
        assert!(!out.handle_would_block(at(t0, 300)), "a second one continues it");
        assert_eq!(out.backpressured_since(), Some(t0));
        out.advance(2);
        assert!(out.backpressured_since().is_some(), "a partial drain is no relief");
        out.advance(2);
        assert_eq!(out.backpressured_since(), None, "a drained ring leaves backpressure");
    }

    #[test]
    fn would_block_with_nothing_queued_is_not_backpressure() {
        let mut out = Outbound::new(8);
        assert!(!out.handle_would_block(Instant::now()));
        assert_eq!(out.backpressured_since(), None);
    }

    #[test]
    fn eviction_is_due_only_after_the_threshold_of_continuous_backpressure() {
        let t0 = Instant::now();
        let evict_after = Duration::from_millis(5000);
        let mut out = Outbound::new(8);
        out.offer(&frame("a"));
        out.handle_would_block(t0);
        assert!(!out.eviction_due(at(t0, 4999), evict_after));
        assert!(!out.eviction_due(at(t0, 5000), evict_after), "more than 5 s, not exactly 5 s");
        assert!(out.eviction_due(at(t0, 5001), evict_after));
    }

    #[test]
    fn relief_restarts_the_eviction_clock() {
        let t0 = Instant::now();
        let evict_after = Duration::from_millis(5000);
        let mut out = Outbound::new(8);
        out.offer(&frame("a"));
        out.handle_would_block(t0);
        out.advance(1); // drained at 4 s
        out.offer(&frame("b"));
        out.handle_would_block(at(t0, 4000));
        assert!(!out.eviction_due(at(t0, 8000), evict_after), "only 4 s since the clock restarted");
        assert!(out.eviction_due(at(t0, 9001), evict_after));
    }

    #[test]
    fn close_discards_unstarted_frames_but_finishes_a_partial_one() {
        let mut out = Outbound::new(2);
        out.offer(&frame("abc"));
        out.offer(&frame("def"));
        out.advance(1);
        out.close_with(frame("CLOSE"));
        assert_eq!(unwritten(&out), b"bcCLOSE");
        assert_eq!(out.offer(&frame("late")), Offer::Closed);
    }

    #[test]
    fn close_on_an_untouched_ring_sends_only_the_close() {
        let mut out = Outbound::new(2);
        out.offer(&frame("abc"));
        out.offer(&frame("def"));
        out.close_with(frame("CLOSE"));
        assert_eq!(unwritten(&out), b"CLOSE");
    }

    #[test]
    fn finish_keeps_everything_queued() {
        let mut out = Outbound::new(4);
        out.offer(&frame("a"));
        out.finish_with(frame("b"));
        assert_eq!(unwritten(&out), b"ab");
        assert!(out.is_closing());
    }

    #[test]
    fn write_slices_respects_the_slice_budget() {
        let mut out = Outbound::new(16);
        for _ in 0..10 {
            out.offer(&frame("z"));
        }
        let mut slices = [IoSlice::new(&[]); 4];
        assert_eq!(out.write_slices(&mut slices), 4);
    }

    #[test]
    fn queued_frames_share_the_producer_bytes() {
        let mut a = Outbound::new(4);
        let mut b = Outbound::new(4);
        let shared = frame("payload");
        a.offer(&shared);
        b.offer(&shared);
        let mut sa = [IoSlice::new(&[]); 1];
        let mut sb = [IoSlice::new(&[]); 1];
        a.write_slices(&mut sa);
        b.write_slices(&mut sb);
        assert_eq!(sa[0].as_ptr(), shared.as_ptr(), "no copy per recipient");
        assert_eq!(sb[0].as_ptr(), shared.as_ptr());
    }
}
