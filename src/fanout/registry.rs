//! One worker's channel registry: which of its connections subscribe to which channel.
//!
//! Owned by exactly one worker, so it needs no lock. Subscriber sets are dense (`IndexSet`), so a
//! broadcast walks a contiguous array of connection ids, and leaving is O(1).

use indexmap::IndexSet;

use super::ConnId;
use crate::pusher::protocol::{ChannelKey, ChannelMap, ChannelName};

/// Channel name to local subscribers.
#[derive(Debug, Default)]
pub struct Registry {
    channels: ChannelMap<IndexSet<ConnId>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `conn` to `channel`. Returns the channel's new local subscriber count, or `None` if
    /// `conn` was already subscribed.
    pub fn subscribe(&mut self, channel: &ChannelName, conn: ConnId) -> Option<u32> {
        let subscribers = self.channels.entry(channel.clone()).or_default();
        subscribers.insert(conn).then(|| count(subscribers))
    }

    /// Removes `conn` from `channel`. Returns the channel's new local subscriber count, or
    /// `None` if `conn` was not subscribed. A channel with no subscribers left is forgotten.
    pub fn unsubscribe(&mut self, channel: ChannelKey<'_>, conn: ConnId) -> Option<u32> {
        let subscribers = self.channels.get_mut(&channel)?;
        if !subscribers.swap_remove(&conn) {
            return None;
        }
        let left = count(subscribers);
        if left == 0 {
            self.channels.remove(&channel);
        }
        Some(left)
    }

    /// The local subscribers of `channel`, in a dense set.
    pub fn subscribers(&self, channel: ChannelKey<'_>) -> Option<&IndexSet<ConnId>> {
        self.channels.get(&channel)
    }

    /// The shared name of a channel that has local subscribers.
    pub fn name(&self, channel: ChannelKey<'_>) -> Option<&ChannelName> {
        self.channels.get_key_value(&channel).map(|(name, _)| name)
    }

    /// Number of channels with local subscribers.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// No channel has local subscribers.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

fn count(set: &IndexSet<ConnId>) -> u32 {
    u32::try_from(set.len()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pusher::AppIndex;

    #[test]
    fn subscribe_and_unsubscribe_report_local_counts() {
        let mut reg = Registry::new();
        let chat = ChannelName::new(AppIndex(0), "chat");
        let other_apps_chat = ChannelName::new(AppIndex(1), "chat");
        assert_eq!(reg.subscribe(&chat, ConnId(1)), Some(1));
        assert_eq!(reg.subscribe(&chat, ConnId(2)), Some(2));
        assert_eq!(reg.subscribe(&chat, ConnId(2)), None, "already subscribed");
        assert_eq!(reg.subscribe(&other_apps_chat, ConnId(2)), Some(1), "another app's channel");
        assert_eq!(reg.unsubscribe(chat.key(), ConnId(3)), None, "never subscribed");
        assert_eq!(reg.unsubscribe(chat.key(), ConnId(1)), Some(1));
        assert_eq!(reg.subscribers(chat.key()).map(|s| s.len()), Some(1));
        assert_eq!(reg.unsubscribe(chat.key(), ConnId(2)), Some(0));
        assert!(reg.subscribers(chat.key()).is_none(), "an empty channel is forgotten");
        assert_eq!(reg.unsubscribe(other_apps_chat.key(), ConnId(2)), Some(0));
        assert!(reg.is_empty());
    }
}
