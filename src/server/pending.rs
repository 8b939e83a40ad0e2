//! Connections that have not finished their handshake, and the caps on them.
//!
//! A connection is *pending* from its accept until it is an open WebSocket, or until it is
//! gone: while its HTTP request is still being read, its TLS handshake is under way, or it is a
//! keep-alive HTTP connection between requests. Pending connections cost a descriptor and a
//! request buffer and do nothing for anyone, so a client that opens thousands and never finishes
//! them (half-sent upgrades, silent sockets, one byte every few seconds) could fill the file
//! table for everyone until the handshake timeout. Two caps bound them: one for the node, and
//! one per source address (an IPv6 address counts by its /64, the block one host is usually
//! given), so one address's flood leaves the rest of the node's room to the others.
//!
//! The acceptor owns the count ([`Pending`]): it admits each accepted connection or refuses it
//! there and then, before a worker ever sees it. A worker says when one of its connections stops
//! being pending through a [`Releaser`], a channel the acceptor reads before it admits the next
//! connection; it never needs waking for it, and the channel holds at most as many messages as
//! connections were admitted, so the node cap bounds it too. Counting in one place keeps the
//! per-address count exact while each worker still owns its connections alone.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

/// The caps on connections that have not finished their handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingCaps {
    /// For the whole node.
    pub per_node: u32,
    /// For one source address (an IPv6 /64).
    pub per_source: u32,
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The node holds its cap of pending connections.
    Node,
    /// The source address holds its cap.
    Source,
}

impl Refused {
    fn describe(self) -> &'static str {
        match self {
            Refused::Node => "the node holds FLUX_MAX_PENDING_HANDSHAKES unfinished handshakes",
            Refused::Source => "its address holds FLUX_MAX_PENDING_HANDSHAKES_PER_IP unfinished handshakes",
        }
    }
}

/// What a source address counts as: itself for IPv4, its /64 for IPv6 (an IPv4-mapped IPv6
/// address is its IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source(IpAddr);

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(_) => Source(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => Source(IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1)))),
            },
        }
    }
}

/// The acceptor's count of pending connections, whole node and per source.
pub(crate) struct Pending {
    caps: PendingCaps,
    total: u32,
    by_source: HashMap<Source, u32>,
    released: Receiver<Source>,
}

impl Pending {
    /// The count, and the releaser the workers hand their connections back with.
    pub(crate) fn new(caps: PendingCaps) -> (Pending, Releaser) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Pending { caps, total: 0, by_source: HashMap::new(), released: rx }, Releaser(tx))
    }

    /// Counts a connection from `ip` as pending, unless a cap is reached. Reads the workers'
    /// releases first, so the counts are current.
    pub(crate) fn admit(&mut self, ip: IpAddr) -> Result<(), Refused> {
        while let Ok(source) = self.released.try_recv() {
            self.release(source);
        }
        if self.total >= self.caps.per_node {
            return Err(Refused::Node);
        }
        let count = self.by_source.entry(Source::of(ip)).or_insert(0);
        if *count >= self.caps.per_source {
            return Err(Refused::Source);
        }
        *count += 1;
        self.total += 1;
        Ok(())
    }

    fn release(&mut self, source: Source) {
        if let Some(count) = self.by_source.get_mut(&source) {
            *count -= 1;
            self.total -= 1;
            if *count == 0 {
                self.by_source.remove(&source);
            }
        }
    }

    /// Pending connections on the node, as of the last [`admit`](Self::admit).
    #[cfg(test)]
    fn total(&self) -> u32 {
        self.total
    }
}

/// A worker's side: says that a connection from an address is no longer pending. Each admitted
/// connection is released exactly once (the worker keeps a flag per connection).
#[derive(Clone)]
pub(crate) struct Releaser(Sender<Source>);

impl Releaser {
    pub(crate) fn release(&self, ip: IpAddr) {
        // Fails only once the acceptor is gone, when nothing is admitted any more.
        let _ = self.0.send(Source::of(ip));
    }
}

/// How often refusals are summed up in the log while they go on.
pub(crate) const REFUSAL_SUMMARY: Duration = Duration::from_secs(10);

/// Keeps a flood of refusals from flooding the log: the first refusal of an episode is logged
/// at once, the ones after it are summed up at most every [`REFUSAL_SUMMARY`], and a summary
/// window without any refusal ends the episode.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    /// Since when refusals are being summed up, and how many so far.
    episode: Option<(Instant, u64)>,
}

impl RefusalLog {
    /// A connection from `ip` was refused: the line to log now, if any.
    pub(crate) fn refused(&mut self, ip: IpAddr, why: Refused, now: Instant) -> Option<String> {
        if let Some(line) = self.summary(now) {
            // A window ended: its summary stands for this refusal too.
            self.episode = Some((now, 0));
            return Some(format!("{line}; the last from {ip}: {}", why.describe()));
        }
        match &mut self.episode {
            Some((_, count)) => {
                *count += 1;
                None
            }
            None => {
                self.episode = Some((now, 0));
                let every = REFUSAL_SUMMARY.as_secs();
                Some(format!("refusing a connection from {ip}: {}; further refusals are summed up every {every} s", why.describe()))
            }
        }
    }

    /// The summary line due at `now`, if a window has ended; ends an episode that had no
    /// refusal in its last window.
    pub(crate) fn summary(&mut self, now: Instant) -> Option<String> {
        let (since, count) = self.episode?;
        let window = now.saturating_duration_since(since);
        if window < REFUSAL_SUMMARY {
            return None;
        }
        if count == 0 {
            self.episode = None;
            return None;
        }
        self.episode = Some((now, 0));
        Some(format!("refused {count} more connections over the unfinished-handshake caps in the last {} s", window.as_secs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn one_source_is_capped_while_another_still_gets_in() {
        let (mut pending, releaser) = Pending::new(PendingCaps { per_node: 10, per_source: 3 });
        for _ in 0..3 {
            assert_eq!(pending.admit(ip("127.0.0.2")), Ok(()));
        }
        assert_eq!(pending.admit(ip("127.0.0.2")), Err(Refused::Source));
        assert_eq!(pending.admit(ip("127.0.0.3")), Ok(()), "another address is not held back");
        releaser.release(ip("127.0.0.2"));
        assert_eq!(pending.admit(ip("127.0.0.2")), Ok(()), "a released connection makes room for its address");
        assert_eq!(pending.admit(ip("127.0.0.2")), Err(Refused::Source));
        assert_eq!(pending.total(), 4);
    }

    #[test]
    fn the_node_cap_holds_over_every_source_and_releases_make_room() {
        let (mut pending, releaser) = Pending::new(PendingCaps { per_node: 4, per_source: 3 });
        for last in 1..=4 {
            assert_eq!(pending.admit(ip(&format!("10.0.0.{last}"))), Ok(()));
        }
        assert_eq!(pending.admit(ip("10.0.0.9")), Err(Refused::Node));
        // A refused connection is not counted: releasing every admitted one empties the count.
        for last in 1..=4 {
            releaser.release(ip(&format!("10.0.0.{last}")));
        }
        assert_eq!(pending.admit(ip("10.0.0.9")), Ok(()));
        assert_eq!(pending.total(), 1);
        assert!(pending.by_source.len() == 1, "sources with nothing pending are forgotten: {:?}", pending.by_source);
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64_and_a_mapped_ipv4_address_as_itself() {
        assert_eq!(Source::of(ip("2001:db8:1:2::1")), Source::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(Source::of(ip("2001:db8:1:2::1")), Source::of(ip("2001:db8:1:3::1")));
        assert_eq!(Source::of(ip("::ffff:192.0.2.7")), Source::of(ip("192.0.2.7")));
        let (mut pending, _releaser) = Pending::new(PendingCaps { per_node: 10, per_source: 1 });
        assert_eq!(pending.admit(ip("2001:db8::1")), Ok(()));
        assert_eq!(pending.admit(ip("2001:db8::2")), Err(Refused::Source), "same /64");
    }

    #[test]
    fn refusals_are_logged_once_then_summed_up_per_window() {
        let mut log = RefusalLog::default();
        let start = Instant::now();
        let first = log.refused(ip("127.0.0.2"), Refused::Source, start).expect("the first is logged");
        assert!(first.contains("127.0.0.2") && first.contains("PER_IP"), "{first}");
        for i in 1..1000 {
            assert_eq!(log.refused(ip("127.0.0.2"), Refused::Source, start + Duration::from_millis(i)), None);
        }
        assert_eq!(log.summary(start + Duration::from_secs(5)), None, "not before the window ends");
        let summary = log.summary(start + REFUSAL_SUMMARY).expect("summed up");
        assert!(summary.contains("refused 999 more"), "{summary}");
        // A window without refusals ends the episode; the next refusal is logged at once again.
        assert_eq!(log.summary(start + 2 * REFUSAL_SUMMARY), None);
        let again = log.refused(ip("127.0.0.4"), Refused::Node, start + 2 * REFUSAL_SUMMARY).expect("a new episode");
        assert!(again.starts_with("refusing a connection from 127.0.0.4"), "{again}");
    }
}
