//! The cluster: several Flux nodes on one Redis act as one server.
//!
//! It owns everything a node knows of the others and everything it tells them, and nothing else:
//! - [`wire`]: the messages nodes exchange, one Redis message each (postcard).
//! - [`state`]: the sans-IO view of the cluster (which nodes live, what each holds), driven by
//!   messages and a clock.
//! - [`link`]: the thin I/O part, four threads of its own: one publishes to Redis, one reads
//!   the cluster's Redis channel, one runs the [`state`] machine, and one reads the cache
//!   channels' last events back from Redis whenever the node (re)joins.
//!
//! The workers never touch a Redis socket. They hand their broadcasts and count changes to a
//! [`ClusterLink`] (bounded queues that never block them; what does not fit is dropped and
//! counted), and the cluster threads reach them only through their inboxes, with [`Delivery`]
//! messages: an event from another node is framed once, by the thread that reads it, into a
//! pooled buffer, and goes to the worker that owns its channel, which fans the same bytes out on
//! the node as if it had been published there. With no `FLUX_REDIS_URL` none of this
//! runs and a worker's only extra cost is checking that it has no link.
//!
//! Cache channels: every node reads every event, so each keeps every cache channel's last event
//! as it goes by. A node that was not there to see one (it started later, or its link was down)
//! finds it in Redis: the publishing node also stores each cache channel's event under
//! `{prefix}:cache:{app id}:{channel}` with the cache TTL (`SET ... PX`, in the same pipeline as its
//! `PUBLISH`), and a node reads them all back (`SCAN`) each time its subscription to the
//! cluster's channel is (re)made, so it misses none published meanwhile. Redis expires them.
//!
//! Apps: nodes may number their apps differently (an app added by a reload takes the next
//! free number), so a channel travels as its app's id and its name, and each node finds its own
//! app by the id. A channel of an app this node does not serve is not its business.

mod link;
pub mod state;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::Sender;
use serde::Serialize;

use crate::apps::{Apps, SharedApps};
use crate::config::Config;
use crate::fanout::directory::OccupancyBatch;
use crate::metrics::LatencySummary;
use crate::pusher::protocol::{ChannelName, SocketId};
use crate::pusher::AppIndex;
pub use link::Cluster;
pub use state::{NodeId, RemoteMember};
use wire::{Body, Channel, Envelope, Kept};

/// Broadcasts waiting to be published on Redis; past this they are dropped and counted.
pub const EVENT_QUEUE: usize = 65_536;

/// Heartbeats and state messages waiting to be published. Kept apart from the broadcasts, so a
/// flood of events can never delay a heartbeat into a false death.
pub const CONTROL_QUEUE: usize = 4_096;

/// Why the cluster could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `FLUX_REDIS_URL` is not a Redis URL.
    #[error("FLUX_REDIS_URL is not a valid redis:// URL: {0}")]
    Url(redis::RedisError),
    /// A cluster thread could not be started.
    #[error("could not start a cluster thread: {0}")]
    Thread(std::io::Error),
}

/// How this node joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// The Redis to meet the others on.
    pub redis_url: String,
    /// This node's id.
    pub node_id: NodeId,
    /// Names of this cluster's Redis channels start with this, so clusters can share a Redis.
    pub prefix: String,
    /// A node silent this long is dead.
    pub node_timeout: Duration,
    /// How long a cache channel's last event is kept, in Redis as on the nodes.
    pub cache_ttl: Duration,
}

impl ClusterSettings {
    /// The settings `config` asks for, if it names a Redis. A node without `FLUX_NODE_ID` gets a
    /// random one.
    pub fn from_config(config: &Config) -> Option<ClusterSettings> {
        let redis_url = config.redis_url.clone()?;
        let node_id = config.node_id.clone().unwrap_or_else(|| format!("flux-{:08x}", fastrand::u32(..)));
        Some(ClusterSettings {
            redis_url,
            node_id: node_id.into(),
            prefix: config.redis_prefix.clone(),
            node_timeout: Duration::from_millis(config.node_timeout_ms),
            cache_ttl: config.cache_ttl(),
        })
    }

    /// The one Redis channel every node of the cluster publishes on and reads.
    pub fn bus(&self) -> String {
        format!("{}:bus", self.prefix)
    }

    /// The start of the Redis keys that hold the cache channels' last events: the app's id, a
    /// colon and the channel's name follow (channel names hold no colon).
    pub fn kept_prefix(&self) -> String {
        format!("{}:cache:", self.prefix)
    }
}

/// What the cluster hands a worker, through its inbox.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// An event published on another node, for this node's subscribers of its channel.
    Broadcast(RemoteBroadcast),
    /// The other nodes' subscription counts for the channels where they changed.
    Occupancy(Arc<[(ChannelName, u32)]>),
    /// Close the connections of this user of this app.
    Terminate(AppIndex, Arc<str>),
    /// Users whose presence on the other nodes changed, in channels this worker owns.
    Presence(Arc<[RemoteMember]>),
    /// The live nodes, this one included, sorted: who reports which channel's webhooks.
    Nodes(Arc<[NodeId]>),
    /// To a cache channel's owner worker: a subscriber on another node found no event kept.
    CacheMiss(ChannelName),
    /// Cache channels' last events read back from Redis, for every worker to keep.
    LastEvents(Arc<[KeptEvent]>),
}

/// The node that sends the webhooks of `channel` among the live `nodes`: the same answer on
/// every node that sees the same nodes, whatever its build (rendezvous hashing with XXH3, so a
/// node's death moves only its own channels to others).
pub fn reporter_of<'n>(channel: &str, nodes: &'n [NodeId]) -> Option<&'n NodeId> {
    nodes.iter().max_by_key(|node| {
        let mut key = Vec::with_capacity(channel.len() + node.len() + 1);
        key.extend_from_slice(channel.as_bytes());
        key.push(0); // Channel names and node ids hold no NUL: ("ab", "c") is not ("a", "bc").
        key.extend_from_slice(node.as_bytes());
        xxhash_rust::xxh3::xxh3_64(&key)
    })
}

/// How a channel of this node travels: its app's id and its name (`None` if its app was removed).
fn wire_channel<'a>(apps: &'a Apps, channel: &'a ChannelName) -> Option<Channel<'a>> {
    Some((apps.get(channel.app())?.app.id.as_str(), channel))
}

/// This node's channel for one that travelled (`None` for an app this node does not serve).
fn local_channel(apps: &Apps, (app_id, name): Channel<'_>) -> Option<ChannelName> {
    let (index, _) = apps.by_id(app_id)?;
    Some(ChannelName::new(index, name))
}

/// An event from another node.
#[derive(Debug, Clone)]
pub struct RemoteBroadcast {
    /// The channel.
    pub channel: ChannelName,
    /// A connection that must not receive it.
    pub except: Option<SocketId>,
    /// The event's WebSocket frame, made once for every recipient on this node.
    pub frame: Bytes,
    /// When it was published, in microseconds since the Unix epoch.
    pub published_at_us: u64,
}

/// A cache channel's last event, read back from Redis.
#[derive(Debug, Clone)]
pub struct KeptEvent {
    /// The cache channel.
    pub channel: ChannelName,
    /// Its WebSocket frame, exact-size (see [`crate::pusher::cache`]).
    pub frame: Bytes,
    /// When it was published, in microseconds since the Unix epoch.
    pub published_at_us: u64,
    /// What is left of its TTL.
    pub remaining: Duration,
}

crate::metrics::counters! {
    /// The cluster's live counters.
    StatCells,
    /// A copy of the cluster's counters.
    ClusterCounters {
        /// Messages published on Redis, and cache channels' events stored there.
        messages_out,
        /// Their bytes.
        bytes_out,
        /// Messages read from Redis (the node's own excluded).
        messages_in,
        /// Their bytes.
        bytes_in,
        /// Broadcasts not published because the queue to Redis was full (or the link down
        /// long enough to fill it).
        dropped,
        /// Times the link to Redis was established again after it was lost.
        reconnects,
        /// Events from other nodes that waited for a worker's inbox to have room.
        inbox_waits,
        /// Changes of this node's counts or presence that never reached the cluster thread (its
        /// queue was full): the other nodes see this node's state wrong until it restarts.
        inputs_lost,
        /// Cache channels' last events read back from Redis (when the node joins the cluster,
        /// and again after each reconnect).
        last_events_loaded,
        /// Times those were read back completely.
        last_event_loads,
    }
}

/// What a dashboard shows of the cluster.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterStatus {
    /// This node's id.
    pub node_id: String,
    /// Whether both Redis connections are up.
    pub link_up: bool,
    /// The other live nodes, by id.
    pub nodes: Vec<PeerStatus>,
    /// Counters since start.
    #[serde(flatten)]
    pub counters: ClusterCounters,
    /// Time from a publish on another node to its delivery here, since start.
    pub remote_delivery: LatencySummary,
}

/// Another node, for the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Its id.
    pub id: String,
    /// Where its clients connect.
    pub addr: String,
    /// Its open connections at its last heartbeat.
    pub connections: u64,
    /// Milliseconds since it was last heard from.
    pub last_heard_ms: u64,
    /// Whether its counts are current.
    pub synced: bool,
}

/// What the cluster's threads share with the rest of the node.
#[derive(Debug, Default)]
struct Shared {
    stats: StatCells,
    publisher_up: AtomicBool,
    subscriber_up: AtomicBool,
    nodes: Mutex<Vec<PeerStatus>>,
}

/// A worker's (or any thread's) way to tell the cluster something. Cheap to clone; no call
/// blocks.
#[derive(Clone)]
pub struct ClusterLink {
    node: NodeId,
    incarnation: u64,
    apps: SharedApps,
    /// `{prefix}:cache:`, the start of a cache channel's key in Redis.
    kept_prefix: Arc<str>,
    events: Sender<link::Outgoing>,
    inputs: Sender<link::Input>,
    shared: Arc<Shared>,
}

impl ClusterLink {
    /// Publishes an event to the other nodes: one Redis message, whatever their number.
    pub fn broadcast(&self, channel: &ChannelName, except: Option<SocketId>, message: &str, published_at_us: u64) {
        let apps = self.apps.load();
        if let Some(channel) = wire_channel(&apps, channel) {
            self.publish(Body::Broadcast { channel, except: except.map(|s| (s.high, s.low)), published_at_us, message });
        }
    }

    /// Stores a cache channel's last event (just broadcast) in Redis for the cache TTL, for the
    /// nodes that were not there to see it.
    pub fn keep(&self, channel: &ChannelName, message: &str, published_at_us: u64) {
        let apps = self.apps.load();
        if let Some((app_id, name)) = wire_channel(&apps, channel) {
            let key = format!("{}{app_id}:{name}", self.kept_prefix);
            self.queue(link::Outgoing::Keep { key, value: Kept { published_at_us, message }.encode() });
        }
    }

    /// Tells the node that reports `channel`'s webhooks that a subscriber here found no event.
    pub fn cache_miss(&self, channel: &ChannelName) {
        let apps = self.apps.load();
        if let Some(channel) = wire_channel(&apps, channel) {
            self.publish(Body::CacheMiss { channel });
        }
    }

    /// Closes the connections of a user of `app` on the other nodes.
    pub fn terminate(&self, app: AppIndex, user_id: &str) {
        let apps = self.apps.load();
        if let Some(app) = apps.get(app) {
            self.publish(Body::Terminate { app: &app.app.id, user_id });
        }
    }

    /// Queues `body` for Redis behind the other events.
    fn publish(&self, body: Body<'_>) {
        self.queue(link::Outgoing::Publish(Envelope { node: &self.node, incarnation: self.incarnation, body }.encode()));
    }

    /// Queues a command for Redis behind the other events; counted as dropped if the queue is
    /// full.
    fn queue(&self, outgoing: link::Outgoing) {
        if self.events.try_send(outgoing).is_err() {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A worker's changed counts, for the other nodes.
    pub fn occupancy(&self, batch: OccupancyBatch) {
        self.tell(link::Input::Local(batch));
    }

    /// A user's first connection to a presence channel on this node (`Some(user_info)`, raw
    /// JSON), or their last one left (`None`).
    pub fn presence(&self, channel: &ChannelName, user_id: &str, user_info: Option<&str>) {
        self.tell(link::Input::Presence {
            channel: channel.clone(),
            user_id: user_id.to_string(),
            user_info: user_info.map(str::to_string),
        });
    }

    /// Hands a change of this node's state to the cluster thread; counted as lost if its queue
    /// is full.
    fn tell(&self, input: link::Input) {
        if self.inputs.try_send(input).is_err() {
            self.shared.stats.inputs_lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.node
    }

    /// The cluster as this node sees it now.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            node_id: self.node.to_string(),
            link_up: self.shared.publisher_up.load(Ordering::Relaxed) && self.shared.subscriber_up.load(Ordering::Relaxed),
            nodes: self.shared.nodes.lock().map(|n| n.clone()).unwrap_or_default(),
            counters: self.shared.stats.snapshot(),
            remote_delivery: LatencySummary::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_live_node_reports_each_channel_and_a_death_moves_only_its_own() {
        let all: Vec<NodeId> = ["a", "b", "c"].into_iter().map(NodeId::from).collect();
        let channels: Vec<String> = (0..300).map(|i| format!("chat-{i}")).collect();
        let before: Vec<&NodeId> = channels.iter().map(|c| reporter_of(c, &all).expect("a reporter")).collect();
        for node in &all {
            let share = before.iter().filter(|r| **r == node).count();
            assert!((50..=150).contains(&share), "node {node} reports {share} of 300: spread");
        }
        let without_c: Vec<NodeId> = all[..2].to_vec();
        for (channel, was) in channels.iter().zip(&before) {
            let now = reporter_of(channel, &without_c).expect("a reporter");
            if &***was != "c" {
                assert_eq!(now, *was, "{channel} stays with its reporter");
            }
        }
        // Pinned: a change of hash would split a mixed-build cluster's webhooks.
        let pinned: Vec<&str> =
            ["chat-0", "chat-1", "presence-guild"].iter().map(|c| &**reporter_of(c, &all).expect("a reporter")).collect();
        assert_eq!(pinned, ["b", "a", "a"]);
        assert_eq!(reporter_of("x", &[]), None);
    }
}
