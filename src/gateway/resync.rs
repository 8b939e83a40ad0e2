//! Presence members that missed a change of a roster, and the whole roster each is owed instead.
//!
//! A member whose ring has no room for a `member_added` or `member_removed` would keep a wrong
//! roster for good (a ghost member, or a missing one). So it is marked here, per channel: from
//! then on that channel's changes are not offered to it (they would only crowd its ring, and the
//! roster it will get holds them), and once its ring has drained it is sent the whole roster as
//! a second `subscription_succeeded`, which pusher-js takes as its new member list. Waiting for
//! the drain means a member that lags through a storm gets one roster when it can take it, not
//! one per dropped change.
//!
//! The roster comes from the channel's owner worker. Changes that reached this worker before
//! the owner's answer are in the roster it carries, since the owner sends both down the same
//! inbox in order; so they are skipped until the answer is here, and the ones after it are
//! offered again. Plain data, no I/O: the service asks [`Resyncs::due`] which members can take
//! their roster now.

use std::collections::HashMap;

use crate::fanout::ConnId;
use crate::pusher::protocol::{ChannelMap, ChannelName, SocketId};

/// Where a member's resync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Its ring has not drained yet; the connection's key, to look at the ring.
    Draining(ConnId),
    /// The roster was asked for.
    Asked,
}

/// The members owed a roster, by channel.
#[derive(Debug, Default)]
pub struct Resyncs {
    channels: ChannelMap<HashMap<SocketId, Stage>>,
    draining: usize,
}

/// One member owed its roster now: ask the channel's owner for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The channel.
    pub channel: ChannelName,
    /// The member's socket id.
    pub socket: SocketId,
    /// Its key.
    pub id: ConnId,
}

impl Resyncs {
    /// Member `socket` (key `id`) had no room for a change of `channel`. True if it was not
    /// owed a roster already.
    pub fn missed(&mut self, channel: &ChannelName, socket: SocketId, id: ConnId) -> bool {
        let members = self.channels.entry(channel.clone()).or_default();
        if members.contains_key(&socket) {
            return false;
        }
        members.insert(socket, Stage::Draining(id));
        self.draining += 1;
        true
    }

    /// Whether `channel`'s changes are withheld from `socket` (it is owed the roster).
    pub fn withholds(&self, channel: &ChannelName) -> Option<impl Fn(SocketId) -> bool + '_> {
        let members = self.channels.get(channel)?;
        Some(move |socket| members.contains_key(&socket))
    }

    /// The members whose rings have drained (`drained` says so by key), now marked asked.
    pub fn due(&mut self, drained: impl Fn(ConnId) -> bool) -> Vec<Due> {
        let mut due = Vec::new();
        if self.draining == 0 {
            return due;
        }
        for (channel, members) in &mut self.channels {
            for (&socket, stage) in members.iter_mut() {
                if let Stage::Draining(id) = *stage {
                    if drained(id) {
                        *stage = Stage::Asked;
                        due.push(Due { channel: channel.clone(), socket, id });
                    }
                }
            }
        }
        self.draining -= due.len();
        due
    }

    /// Whether some member's ring has still to drain before its roster is asked for.
    pub fn is_draining(&self) -> bool {
        self.draining > 0
    }

    /// The ask for `due` was lost: it waits to be asked again.
    pub fn ask_again(&mut self, due: &Due) {
        if let Some(stage) = self.channels.get_mut(&due.channel).and_then(|m| m.get_mut(&due.socket)) {
            if *stage == Stage::Asked {
                *stage = Stage::Draining(due.id);
                self.draining += 1;
            }
        }
    }

    /// The roster for `socket` on `channel` is here (or the member has gone): its changes are
    /// offered again.
    pub fn answered(&mut self, channel: &ChannelName, socket: SocketId) {
        let Some(members) = self.channels.get_mut(channel) else { return };
        if let Some(Stage::Draining(_)) = members.remove(&socket) {
            self.draining -= 1;
        }
        if members.is_empty() {
            self.channels.remove(channel);
        }
    }

    /// Connection `socket` closed while subscribed to `channels`.
    pub fn forget<'a>(&mut self, socket: SocketId, channels: impl IntoIterator<Item = &'a ChannelName>) {
        if self.channels.is_empty() {
            return;
        }
        for channel in channels {
            self.answered(channel, socket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pusher::presence::tests::{room, socket};

    #[test]
    fn a_member_is_owed_one_roster_and_its_changes_are_withheld_until_it_comes() {
        let mut resyncs = Resyncs::default();
        assert!(resyncs.withholds(&room()).is_none());
        assert!(resyncs.missed(&room(), socket(1), ConnId(7)));
        assert!(!resyncs.missed(&room(), socket(1), ConnId(7)), "one roster, however many changes it missed");
        {
            let withheld = resyncs.withholds(&room()).unwrap();
            assert!(withheld(socket(1)) && !withheld(socket(2)));
        }

        assert!(resyncs.due(|_| false).is_empty(), "not before its ring has drained");
        let due = resyncs.due(|id| id == ConnId(7));
        assert_eq!(due, [Due { channel: room(), socket: socket(1), id: ConnId(7) }]);
        assert!(resyncs.due(|_| true).is_empty(), "asked once");
        assert!(resyncs.withholds(&room()).unwrap()(socket(1)), "withheld until the roster is here");

        resyncs.answered(&room(), socket(1));
        assert!(resyncs.withholds(&room()).is_none());
    }

    #[test]
    fn a_lost_ask_is_asked_again_and_a_closed_member_is_forgotten() {
        let mut resyncs = Resyncs::default();
        resyncs.missed(&room(), socket(1), ConnId(1));
        resyncs.missed(&room(), socket(2), ConnId(2));
        let due = resyncs.due(|id| id == ConnId(1));
        resyncs.ask_again(&due[0]);
        assert_eq!(resyncs.due(|_| true).len(), 2);
        resyncs.forget(socket(1), [&room()]);
        resyncs.forget(socket(2), [&room()]);
        assert!(resyncs.withholds(&room()).is_none());
        assert_eq!(resyncs.draining, 0);
    }
}
