//! A channel's identity: the app it belongs to and its name. The same name in two apps is two
//! channels, so every map of channels is keyed by both, and a name alone finds nothing.
//!
//! A [`ChannelName`] is shared (one allocation per channel, cloned by reference count) between
//! the registry, the sessions and in-flight broadcasts; it dereferences to the bare name, which
//! is all a client or an app's server ever sees. A [`ChannelKey`] borrows the same pair, so a
//! map is searched with a name straight from a message without allocating.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

use equivalent::Equivalent;

use super::AppIndex;

/// A channel of an app.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelName {
    app: AppIndex,
    name: Arc<str>,
}

/// A borrowed channel identity, for lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelKey<'a> {
    /// The app.
    pub app: AppIndex,
    /// The channel's name in it.
    pub name: &'a str,
}

/// A map keyed by channel, searchable by [`ChannelKey`]. std's `RandomState` keeps the
/// hashing keyed per process: channel names come from clients.
pub type ChannelMap<V> = hashbrown::HashMap<ChannelName, V, std::hash::RandomState>;

/// A set of channels, searchable by [`ChannelKey`].
pub type ChannelSet = hashbrown::HashSet<ChannelName, std::hash::RandomState>;

impl ChannelName {
    /// The channel `name` of `app`.
    pub fn new(app: AppIndex, name: &str) -> Self {
        ChannelName { app, name: name.into() }
    }

    /// The app it belongs to.
    pub fn app(&self) -> AppIndex {
        self.app
    }

    /// Borrowed, for lookups.
    pub fn key(&self) -> ChannelKey<'_> {
        ChannelKey { app: self.app, name: &self.name }
    }
}

impl<'a> ChannelKey<'a> {
    /// The channel `name` of `app`.
    pub fn new(app: AppIndex, name: &'a str) -> Self {
        ChannelKey { app, name }
    }
}

// Both hash the app, then the name as `str` does, so a key finds its name in any map.
impl Hash for ChannelName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.app.hash(state);
        (*self.name).hash(state);
    }
}

impl Hash for ChannelKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.app.hash(state);
        self.name.hash(state);
    }
}

impl Equivalent<ChannelName> for ChannelKey<'_> {
    fn equivalent(&self, channel: &ChannelName) -> bool {
        self.app == channel.app && self.name == &*channel.name
    }
}

// Ordered by app, then name: for timer heaps, where ties need some order.
impl Ord for ChannelName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.app, &*self.name).cmp(&(other.app, &*other.name))
    }
}

impl PartialOrd for ChannelName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Deref for ChannelName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.name
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}@{}", &*self.name, self.app.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_name_in_two_apps_is_two_channels() {
        let mut map: ChannelMap<u32> = ChannelMap::default();
        map.insert(ChannelName::new(AppIndex(0), "chat"), 1);
        map.insert(ChannelName::new(AppIndex(1), "chat"), 2);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get(&ChannelKey::new(AppIndex(0), "chat")), Some(&1));
        assert_eq!(map.get(&ChannelKey::new(AppIndex(1), "chat")), Some(&2));
        assert_eq!(map.get(&ChannelKey::new(AppIndex(2), "chat")), None);
        assert_eq!(map.get(&ChannelName::new(AppIndex(1), "chat")), Some(&2));
        let channel = ChannelName::new(AppIndex(1), "chat");
        assert_eq!((&*channel, channel.to_string().as_str()), ("chat", "chat"), "clients see the bare name");
    }
}
