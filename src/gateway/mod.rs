//! The Pusher gateway: the [`Service`] that gives Flux's connections their meaning, and
//! [`Gateway`], the running node.
//!
//! Each worker runs one [`PusherService`]. It owns that worker's sessions' channel registry,
//! its replica of the node's channel directory, and its end of the fan-out. Every broadcast —
//! from the REST API, client events, presence, or another node of the cluster — is serialized
//! and framed once into a pooled buffer, queued to this worker's subscribers, and the same bytes
//! are handed to every other worker that has subscribers of the channel. Events published on
//! this node enter through one seam, [`PusherService::publish`], which in a cluster also hands
//! them, once, to the [`ClusterLink`] for the other nodes. A cache channel's events go to every
//! worker, subscribers or not: each keeps the last one for the channel's next subscribers.

pub mod evictions;
pub mod health;
mod node;
mod reload;
mod resync;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Sender;
use indexmap::IndexSet;
use log::{debug, info, warn};
use serde_json::value::RawValue;
use tungstenite::protocol::frame::coding::{Data, OpCode};

pub use node::{ConnectionSnapshot, Gateway, Observer};

use crate::apps::{Apps, Connected, SharedApps};
use crate::cluster::state::RemoteMember;
use crate::cluster::{ClusterLink, Delivery, NodeId, RemoteBroadcast};
use crate::fanout::directory::{Directory, Occupancy, OccupancyBatch, WorkerSet};
use crate::fanout::pool::FramePool;
use crate::fanout::registry::Registry;
use crate::fanout::ring::Offer;
use crate::fanout::{ConnId, WorkerId};
use crate::http::{json_error, Request, Response};
use crate::metrics::{LatencyRecorder, WorkerMetrics};
use crate::pusher::cache::LastEvents;
use crate::pusher::counts::{SubscriptionCounts, ANNOUNCE_EVERY};
use crate::pusher::presence::{owner_of, Change, Member, Membership, Rosters};
use crate::pusher::protocol::{
    self, code, is_cache_channel, ChannelKey, ChannelKind, ChannelName, EventMessage, SocketId, PROTOCOL_VERSIONS,
};
use crate::pusher::rest::{self, Publish, RestContext};
use crate::pusher::session::{Action, Policy, Session};
use crate::pusher::signature::Verifier;
use crate::pusher::AppIndex;
use crate::server::{Conns, Ended, Flush, NodeStatus, Outbox, Routed, Sent, Service, WorkerContext};
use crate::webhooks::{WebhookEvent, Webhooks};
use crate::ws::{data_frame, payload_of, text_frame, EncodeError, Incoming};
use evictions::{Eviction, EvictionLog};
use health::Readiness;
use resync::{Due, Resyncs};

/// What workers of a gateway send each other.
pub enum Message {
    /// A framed event for the local subscribers of a channel.
    Broadcast(Broadcast),
    /// A worker's new subscription counts for the channels that changed in one of its turns.
    Occupancy(OccupancyBatch),
    /// A request for this worker's connections.
    Snapshot(Sender<Vec<ConnectionSnapshot>>),
    /// Close every connection of this app signed in as this user (REST `terminate_connections`
    /// on this node).
    TerminateUser(AppIndex, Arc<str>),
    /// To a presence channel's owner: connection `conn` of worker `from` joins as `member`.
    PresenceJoin {
        /// The channel.
        channel: ChannelName,
        /// Who joins.
        member: Member,
        /// Members the channel's app allows.
        max_members: usize,
        /// The joining connection's socket id.
        socket: SocketId,
        /// Its worker and key there, for the answer.
        from: WorkerId,
        /// Its key in that worker.
        conn: ConnId,
    },
    /// From a presence channel's owner: the answer to a join (the member list, or why not).
    PresenceJoined {
        /// The channel.
        channel: ChannelName,
        /// The joining connection's socket id (to check the key still means that connection).
        socket: SocketId,
        /// The connection's key in the receiving worker.
        conn: ConnId,
        /// `subscription_succeeded` data, or the reason for refusing.
        result: Result<String, String>,
    },
    /// To a presence channel's owner: member `conn` of worker `from` missed a change and needs
    /// the whole roster again.
    PresenceResync {
        /// The channel.
        channel: ChannelName,
        /// The member's socket id.
        socket: SocketId,
        /// Its worker, for the answer.
        from: WorkerId,
        /// Its key in that worker.
        conn: ConnId,
    },
    /// From a presence channel's owner: the roster for a resync (`None`: the member has left).
    PresenceResynced {
        /// The channel.
        channel: ChannelName,
        /// The member's socket id.
        socket: SocketId,
        /// Its key in the receiving worker.
        conn: ConnId,
        /// `subscription_succeeded` data.
        roster: Option<String>,
    },
    /// To a presence channel's owner: this connection left the channel.
    PresenceLeave {
        /// The channel.
        channel: ChannelName,
        /// The connection.
        socket: SocketId,
    },
    /// From a presence channel's owner to every worker: a user is (or no longer is) a member.
    Membership {
        /// The channel.
        channel: ChannelName,
        /// The user.
        user_id: String,
        /// Member now, or not.
        present: bool,
    },
    /// To a cache channel's owner worker: a subscriber found no event kept (each sending worker
    /// tells of a channel's misses once a report interval), for the `cache_miss` webhook.
    CacheMiss(ChannelName),
    /// From the cluster's threads: what another node published or changed.
    Cluster(Delivery),
}

impl From<Delivery> for Message {
    fn from(delivery: Delivery) -> Self {
        Message::Cluster(delivery)
    }
}

/// One event for one channel, framed once and shared by every worker that delivers it.
#[derive(Debug, Clone)]
pub struct Broadcast {
    /// The channel.
    pub channel: ChannelName,
    /// The complete WebSocket frame.
    pub frame: Bytes,
    /// A connection that must not receive it (the publisher's own).
    pub except: Option<SocketId>,
    /// When publishing began, for the fan-out time metric.
    pub published_at: Instant,
    /// A presence change (`member_added` / `member_removed`). It has already waited a coalescing
    /// window, so its writes may wait a little longer for other traffic to share them; and it
    /// must not be lost: a member whose ring cannot take it would keep a wrong roster for good (a
    /// ghost member, or a missing one), so that member is sent the whole roster again instead
    /// (see [`resync`]).
    pub roster_change: bool,
    /// Set on an app's event on a cache channel (see [`Broadcast::kept`]): when it was
    /// published, in microseconds since the Unix epoch. Every worker keeps the frame as the
    /// channel's last event.
    pub kept_at_us: Option<u64>,
}

impl Broadcast {
    /// This event, to be kept as its cache channel's last, published at `published_at_us`. A
    /// kept event stays up to the TTL: an exact-size copy pins only its own bytes, not a pooled
    /// buffer (of up to 16 KiB), which returns to the pool as soon as the original is dropped.
    fn kept(self, published_at_us: u64) -> Broadcast {
        Broadcast { frame: Bytes::copy_from_slice(&self.frame), kept_at_us: Some(published_at_us), ..self }
    }
}

/// One worker's Pusher service.
pub struct PusherService {
    id: WorkerId,
    policy: Arc<Policy>,
    /// The node's apps as last (re)loaded.
    apps: SharedApps,
    /// The apps this worker's connections were last checked against (see [`Self::on_tick`]).
    apps_checked: Arc<Apps>,
    registry: Registry,
    directory: Directory,
    outbox: Outbox<Message>,
    pool: FramePool,
    metrics: Arc<WorkerMetrics>,
    /// The whole node, for readiness and the connection limit.
    node: NodeStatus,
    fanout_times: LatencyRecorder,
    /// Times from a publish on another node to its delivery here.
    remote_times: LatencyRecorder,
    socket_id_high: u32,
    socket_id_next: u32,
    /// Channels whose local count changed this turn, each once; told to the other workers in
    /// one batch at turn end.
    changed_occupancy: IndexSet<ChannelName>,
    /// The node's eviction log, shared by every worker.
    evictions: Arc<EvictionLog>,
    /// Subscriptions held by every worker of the node together, against the policy's maximum.
    subscriptions: Arc<AtomicUsize>,
    /// Rosters of the presence channels this worker owns.
    rosters: Rosters,
    /// This worker's copy of the cache channels' last events.
    last_events: LastEvents,
    /// The subscription-count events due for the channels this worker owns.
    subscription_counts: SubscriptionCounts,
    /// This worker's replica of every presence channel's users (for the REST API).
    membership: Membership,
    /// Where webhook events go (never blocks; a no-op without a webhook URL).
    webhooks: Webhooks,
    /// Presence channels that emptied while member changes were still to be announced: their
    /// `channel_vacated` waits for the last `member_removed`, as on Pusher.
    vacated_after_presence: Vec<ChannelName>,
    /// Members whose ring was full for the presence change being delivered (scratch space).
    missed_changes: Vec<ConnId>,
    /// Scratch space for REST signatures, kept from one call to the next.
    verifier: Verifier,
    /// Members that missed a roster change, owed the whole roster.
    resyncs: Resyncs,
    /// When to look again for members owed a roster whose rings have drained.
    resync_due: Option<Instant>,
    /// Closed connections whose subscriptions are still to be removed, oldest first.
    vacating: VecDeque<Vacating>,
    /// When the next turn must come to go on removing them.
    vacate_due: Option<Instant>,
    /// The other nodes of the cluster, if this node is in one.
    cluster: Option<ClusterLink>,
    /// The live nodes of the cluster, this one included, as last told by the cluster.
    cluster_nodes: Option<Arc<[NodeId]>>,
}

/// Subscriptions removed per loop turn when connections close. A mass disconnect can leave
/// hundreds of thousands to remove (a worker with 250 clients of 1,000 channels each); done in
/// one turn, that held the worker (and, through their directories, the others) for most of a
/// second. In slices of this size each turn stays within a few milliseconds, and the
/// occupancy batches that carry the changes to the other workers stay as small.
const VACATE_BUDGET: usize = 512;

/// Now, in microseconds since the Unix epoch: the publish time that travels with an event.
fn unix_micros() -> u64 {
    crate::clock::since_unix_epoch().as_micros() as u64
}

/// How often a worker looks for members owed a roster whose rings have drained, while there are
/// any: a ring drains on socket writes, which come with no event of the service's own.
const RESYNC_CHECK: Duration = Duration::from_millis(10);

/// A closed connection's subscriptions, removed a slice per turn. Until they are all removed
/// its key stays in the registry: broadcasts skip it (no open connection has it), and a new
/// connection that is given the key finishes the removal before it can subscribe.
struct Vacating {
    id: ConnId,
    socket: SocketId,
    channels: indexmap::set::IntoIter<ChannelName>,
}

impl PusherService {
    /// The service of the worker described by `context`.
    pub fn new(
        context: WorkerContext<Message>,
        policy: Arc<Policy>,
        apps: SharedApps,
        evictions: Arc<EvictionLog>,
        subscriptions: Arc<AtomicUsize>,
        webhooks: Webhooks,
        cluster: Option<ClusterLink>,
    ) -> Self {
        let workers = context.peers.len();
        PusherService {
            id: context.id,
            apps_checked: apps.load_full(),
            apps,
            registry: Registry::new(),
            directory: Directory::new(workers),
            outbox: Outbox::new(context.peers),
            pool: context.pool,
            metrics: context.metrics,
            node: context.node,
            fanout_times: LatencyRecorder::default(),
            remote_times: LatencyRecorder::default(),
            // Random per worker, so ids differ across workers, restarts and (later) nodes.
            socket_id_high: fastrand::u32(1..1_000_000_000),
            socket_id_next: fastrand::u32(1..1_000_000),
            changed_occupancy: IndexSet::new(),
            evictions,
            subscriptions,
            rosters: Rosters::new(policy.presence_coalesce, policy.presence_batch),
            last_events: LastEvents::new(policy.cache_ttl, policy.cache_max_bytes),
            subscription_counts: SubscriptionCounts::new(ANNOUNCE_EVERY),
            membership: Membership::default(),
            policy,
            webhooks,
            vacated_after_presence: Vec::new(),
            missed_changes: Vec::new(),
            verifier: Verifier::default(),
            resyncs: Resyncs::default(),
            resync_due: None,
            vacating: VecDeque::new(),
            vacate_due: None,
            cluster,
            cluster_nodes: None,
        }
    }

    fn next_socket_id(&mut self) -> SocketId {
        self.socket_id_next = self.socket_id_next.wrapping_add(1).max(1);
        SocketId { high: self.socket_id_high, low: self.socket_id_next }
    }

    /// The one entry point of every event published on this node: frames `publish` once, hands
    /// it to each worker with subscribers of its channel, this one included, and to the other
    /// nodes of the cluster.
    pub fn publish(&mut self, conns: &mut Conns<Session>, publish: &Publish) -> Result<(), EncodeError> {
        let mut broadcast = self.frame(publish)?;
        // Only an app's own events are kept: Flux's announcements are framed elsewhere.
        if is_cache_channel(&publish.channel) {
            broadcast = broadcast.kept(unix_micros());
        }
        if let Some(cluster) = &self.cluster {
            // The frame's payload is the event message, serialized here just now as UTF-8 JSON.
            let message = std::str::from_utf8(payload_of(&broadcast.frame)).unwrap_or_default();
            let published_at_us = broadcast.kept_at_us.unwrap_or_else(unix_micros);
            cluster.broadcast(&publish.channel, publish.except, message, published_at_us);
            if broadcast.kept_at_us.is_some() {
                cluster.keep(&publish.channel, message, published_at_us);
            }
        }
        self.fan_out(conns, &broadcast);
        Ok(())
    }

    /// Frames an event once, for every recipient on the node: an app's event, or one of Flux's
    /// own announcements.
    fn frame(&self, publish: &Publish) -> Result<Broadcast, EncodeError> {
        let published_at = Instant::now();
        let message = EventMessage {
            event: &publish.event,
            channel: Some(&publish.channel),
            data: &publish.data,
            user_id: publish.user_id.as_deref(),
        };
        let frame = data_frame(&self.pool, OpCode::Data(Data::Text), |buf| Ok(serde_json::to_writer(buf, &message)?))?;
        Ok(Broadcast {
            channel: publish.channel.clone(),
            frame,
            except: publish.except,
            published_at,
            roster_change: false,
            kept_at_us: None,
        })
    }

    /// Hands a framed event to each worker of this node with subscribers of its channel (to
    /// every worker, if it is to be kept).
    fn fan_out(&mut self, conns: &mut Conns<Session>, broadcast: &Broadcast) {
        WorkerMetrics::add(&self.metrics.counters.broadcasts, 1);
        if let Some(cells) = self.apps.load().cells(broadcast.channel.app()) {
            WorkerMetrics::add(&cells.broadcasts, 1);
        }
        let workers = match broadcast.kept_at_us {
            Some(_) => WorkerSet::all(self.outbox.workers()),
            None => self.directory.workers_with(broadcast.channel.key()),
        };
        for worker in workers.iter() {
            if worker == self.id {
                self.deliver(conns, broadcast);
            } else {
                self.send_to(worker, Message::Broadcast(broadcast.clone()), format_args!("a broadcast on {}", broadcast.channel));
            }
        }
    }

    /// An event published on another node, framed once for the whole node by the cluster's
    /// reader, given to this worker because it owns the channel.
    fn deliver_remote(&mut self, conns: &mut Conns<Session>, remote: RemoteBroadcast) {
        // Every node reads every event (one Redis channel for the cluster): one for a channel
        // with no subscriber here is neither a broadcast nor a delivery time of this node, unless
        // it is to be kept. Only the apps' events cross nodes, so a cache channel's are kept.
        let subscribed = !self.directory.workers_with(remote.channel.key()).is_empty();
        let kept = is_cache_channel(&remote.channel);
        if !subscribed && !kept {
            return;
        }
        let broadcast = Broadcast {
            frame: remote.frame,
            channel: remote.channel,
            except: remote.except,
            published_at: Instant::now(),
            roster_change: false,
            kept_at_us: None,
        };
        let broadcast = if kept { broadcast.kept(remote.published_at_us) } else { broadcast };
        self.fan_out(conns, &broadcast);
        if subscribed {
            // Up to this worker's rings: the other workers' part of it is in their fan-out times.
            self.remote_times.record(Duration::from_micros(unix_micros().saturating_sub(remote.published_at_us)));
        }
    }

    /// Queues a broadcast to this worker's subscribers of its channel: per recipient, one
    /// reference-count increment and one ring slot. A cache channel's event is kept first.
    fn deliver(&mut self, conns: &mut Conns<Session>, broadcast: &Broadcast) {
        if let Some(published_at_us) = broadcast.kept_at_us {
            let dropped = self.last_events.store(&broadcast.channel, broadcast.frame.clone(), published_at_us, Instant::now());
            self.count_cache_evictions(dropped);
        }
        let Some(subscribers) = self.registry.subscribers(broadcast.channel.key()) else {
            return;
        };
        // Waiting up to one more coalescing window lets a presence batch ride along with the
        // next message to each member instead of costing every member a write of its own.
        let flush = if broadcast.roster_change { Flush::By(Instant::now() + self.policy.presence_coalesce) } else { Flush::Now };
        let (mut queued, mut dropped) = (0u64, 0u64);
        {
            // A member owed the whole roster is not offered the changes that roster will hold.
            let withheld = if broadcast.roster_change { self.resyncs.withholds(&broadcast.channel) } else { None };
            for &id in subscribers {
                let wanted = |s: &Session| Some(s.socket_id()) != broadcast.except && !withheld.as_ref().is_some_and(|w| w(s.socket_id()));
                match conns.offer(id, &broadcast.frame, flush, wanted) {
                    Offer::Queued => queued += 1,
                    Offer::Dropped => {
                        dropped += 1;
                        if broadcast.roster_change {
                            self.missed_changes.push(id);
                        }
                    }
                    Offer::Closed => {}
                }
            }
        }
        let counters = &self.metrics.counters;
        WorkerMetrics::add(&counters.deliveries, queued);
        WorkerMetrics::add(&counters.drops, dropped);
        if let Some(cells) = self.apps.load().cells(broadcast.channel.app()) {
            WorkerMetrics::add(&cells.deliveries, queued);
        }
        self.fanout_times.record(broadcast.published_at.elapsed());
        // Taken out and put back, so the scratch keeps its capacity.
        let mut missed = std::mem::take(&mut self.missed_changes);
        for id in missed.drain(..) {
            let Some(socket) = conns.session(id).map(Session::socket_id) else { continue };
            if self.resyncs.missed(&broadcast.channel, socket, id) {
                WorkerMetrics::add(&self.metrics.counters.presence_resyncs, 1);
            }
        }
        self.missed_changes = missed;
    }

    /// Asks the owners for the rosters of the members that missed changes and whose rings have
    /// drained since (see [`resync`]).
    fn resync_rosters(&mut self, conns: &mut Conns<Session>, now: Instant) {
        let drained = conns.ring_slots() / 4;
        for due in self.resyncs.due(|id| conns.queued(id).is_none_or(|n| n <= drained)) {
            let owner = owner_of(&due.channel, self.outbox.workers());
            if owner == self.id {
                let roster = self.rosters.listing(&due.channel, due.socket);
                self.roster_resynced(conns, due.id, due.socket, &due.channel, roster);
            } else {
                let Due { channel, socket, id } = &due;
                let ask = Message::PresenceResync { channel: channel.clone(), socket: *socket, from: self.id, conn: *id };
                if !self.send_to(owner, ask, format_args!("a presence resync on {channel}")) {
                    self.resyncs.ask_again(&due);
                }
            }
        }
        self.resync_due = self.resyncs.is_draining().then_some(now + RESYNC_CHECK);
    }

    /// The owner's roster for a resync reached the member's worker: queued behind what the
    /// member's ring holds, as a reply (never dropped). `None`: the member has left meanwhile.
    fn roster_resynced(&mut self, conns: &mut Conns<Session>, id: ConnId, socket: SocketId, channel: &ChannelName, roster: Option<String>) {
        self.resyncs.answered(channel, socket);
        let subscribed = conns.session(id).is_some_and(|s| s.socket_id() == socket && s.subscriptions().contains(channel));
        if let (true, Some(data)) = (subscribed, roster) {
            let reply = protocol::presence_subscription_succeeded(channel, &data);
            conns.send(id, &text_frame(&self.pool, &reply));
        }
    }

    /// The shared name of `channel` of `app`: the registry's, if it has subscribers here.
    fn channel_name(&self, app: AppIndex, channel: &str) -> ChannelName {
        self.registry.name(ChannelKey::new(app, channel)).cloned().unwrap_or_else(|| ChannelName::new(app, channel))
    }

    fn subscribe(&mut self, conns: &mut Conns<Session>, id: ConnId, channel: String, now: Instant) {
        let Some(app) = conns.session(id).map(Session::app) else { return };
        let name = self.channel_name(app, &channel);
        self.add_subscriber(&name, id, now);
        if let Some(session) = conns.session_mut(id) {
            session.subscribed(name.clone());
        }
        self.send_text(conns, id, &protocol::subscription_succeeded(&name));
        self.replay_last_event(conns, id, &name, now);
    }

    /// Right after its `subscription_succeeded`, a new subscriber of a cache channel gets the
    /// channel's last event (the kept frame itself: nothing is serialized), or
    /// `pusher:cache_miss`, and then the app's server may hear of the miss.
    fn replay_last_event(&mut self, conns: &mut Conns<Session>, id: ConnId, channel: &ChannelName, now: Instant) {
        if !is_cache_channel(channel) {
            return;
        }
        if let Some(frame) = self.last_events.get(channel.key(), now) {
            conns.send(id, frame);
            WorkerMetrics::add(&self.metrics.counters.cache_hits, 1);
            return;
        }
        WorkerMetrics::add(&self.metrics.counters.cache_misses, 1);
        self.send_text(conns, id, &protocol::cache_miss(channel));
        if !self.webhooks.is_enabled() {
            return;
        }
        // The channel's owner worker decides for the node, so a crowd of misses over every
        // worker is still one report; each worker tells it once a report interval at most.
        let owner = owner_of(channel, self.outbox.workers());
        if owner == self.id {
            self.report_cache_miss(channel, now);
        } else if self.last_events.miss(channel, now) {
            self.send_to(owner, Message::CacheMiss(channel.clone()), format_args!("a cache miss on {channel}"));
        }
    }

    /// The owner worker's side of a cache miss: the first in a report interval is posted as a
    /// `cache_miss` webhook by the node that reports the channel's webhooks, which the others
    /// tell (and which deduplicates again, as several may tell it).
    fn report_cache_miss(&mut self, channel: &ChannelName, now: Instant) {
        if !self.last_events.miss(channel, now) {
            return;
        }
        match &self.cluster {
            Some(cluster) if !self.reports_webhooks(channel) => cluster.cache_miss(channel),
            _ => {
                self.webhooks.emit(WebhookEvent::CacheMiss { channel: channel.clone() });
            }
        }
    }

    /// Counts events dropped from the cache for its budget, once for the node: every worker
    /// keeps the same events and drops the same ones, so worker 0 counts them.
    fn count_cache_evictions(&self, dropped: usize) {
        if dropped > 0 && self.id == WorkerId(0) {
            WorkerMetrics::add(&self.metrics.counters.cache_evictions, dropped as u64);
        }
    }

    /// Adds connection `id` to `channel`'s local subscribers, counted node-wide and told to the
    /// other workers if it was not there yet.
    fn add_subscriber(&mut self, channel: &ChannelName, id: ConnId, now: Instant) {
        if let Some(count) = self.registry.subscribe(channel, id) {
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
            self.occupancy_changed(channel, count, now);
        }
    }

    fn unsubscribe(&mut self, id: ConnId, socket: SocketId, channel: &ChannelName, now: Instant) {
        if let Some(count) = self.registry.unsubscribe(channel.key(), id) {
            self.subscriptions.fetch_sub(1, Ordering::Relaxed);
            self.occupancy_changed(channel, count, now);
        }
        if ChannelKind::of(channel) == ChannelKind::Presence {
            let owner = owner_of(channel, self.outbox.workers());
            if owner == self.id {
                self.roster_leave(channel, socket, now);
            } else {
                let leave = Message::PresenceLeave { channel: channel.clone(), socket };
                self.send_to(owner, leave, format_args!("a presence leave on {channel}"));
            }
        }
    }

    /// Connection `id` asks to join a presence channel: its owner decides, here or on its worker.
    fn join_presence(&mut self, conns: &mut Conns<Session>, id: ConnId, channel: String, member: Member, max_members: usize, now: Instant) {
        let Some((socket, app)) = conns.session(id).map(|s| (s.socket_id(), s.app())) else {
            return;
        };
        let name = self.channel_name(app, &channel);
        // The answer may come from another worker, later: hold its room until it does.
        conns.promise_reply(id);
        let owner = owner_of(&name, self.outbox.workers());
        if owner == self.id {
            let result = self.roster_join(&name, &member, max_members, socket, now);
            self.presence_joined(conns, id, socket, &name, result, now);
        } else {
            let join = Message::PresenceJoin { channel: name.clone(), member, max_members, socket, from: self.id, conn: id };
            if !self.send_to(owner, join, format_args!("a presence join on {name}")) {
                self.presence_joined(conns, id, socket, &name, Err("The server is busy; try again".into()), now);
            }
        }
    }

    /// The owner's side of a join: the roster's answer, news of a new member for every
    /// worker's replica, and of the user's first connection here for the other nodes.
    fn roster_join(
        &mut self,
        channel: &ChannelName,
        member: &Member,
        max_members: usize,
        socket: SocketId,
        now: Instant,
    ) -> Result<String, String> {
        let joined = self.rosters.join(channel, member, max_members, socket, now).map_err(|e| e.to_string())?;
        if joined.new_member {
            self.membership_changed(channel, &member.user_id, true);
        }
        if let (true, Some(cluster)) = (joined.first_here, &self.cluster) {
            cluster.presence(channel, &member.user_id, Some(member.user_info.get()));
        }
        Ok(joined.data)
    }

    /// The owner's side of a leave.
    fn roster_leave(&mut self, channel: &ChannelName, socket: SocketId, now: Instant) {
        let Some(left) = self.rosters.leave(channel, socket, now) else { return };
        if left.gone {
            self.membership_changed(channel, &left.user_id, false);
        }
        if let (true, Some(cluster)) = (left.last_here, &self.cluster) {
            cluster.presence(channel, &left.user_id, None);
        }
    }

    /// The cluster's news of users whose connections are on other nodes, for the rosters this
    /// worker owns.
    fn members_elsewhere(&mut self, members: &[RemoteMember], now: Instant) {
        for member in members {
            let user_info = match member.user_info.as_deref().map(|info| RawValue::from_string(info.to_string())).transpose() {
                Ok(info) => info,
                Err(e) => {
                    warn!("cluster: user_info of {} on {} is not JSON ({e}); ignored", member.user_id, member.channel);
                    continue;
                }
            };
            if let Some(present) = self.rosters.set_elsewhere(&member.channel, &member.user_id, user_info, now) {
                self.membership_changed(&member.channel, &member.user_id, present);
            }
        }
    }

    /// Whether this node sends the webhooks of `channel`: in a cluster exactly one live node
    /// does (see [`crate::cluster::reporter_of`]); a single node always does.
    fn reports_webhooks(&self, channel: &str) -> bool {
        match (&self.cluster, &self.cluster_nodes) {
            (Some(cluster), Some(nodes)) => crate::cluster::reporter_of(channel, nodes) == Some(cluster.node_id()),
            _ => true,
        }
    }

    fn membership_changed(&mut self, channel: &ChannelName, user_id: &str, present: bool) {
        self.membership.apply(channel, user_id, present);
        for worker in self.other_workers() {
            let update = Message::Membership { channel: channel.clone(), user_id: user_id.to_string(), present };
            self.send_to(worker, update, format_args!("a presence user list update for {channel}"));
        }
    }

    /// Every worker of the node but this one.
    fn other_workers(&self) -> impl Iterator<Item = WorkerId> {
        let me = self.id;
        (0..self.outbox.workers()).map(WorkerId).filter(move |&w| w != me)
    }

    /// Puts `message` in `worker`'s inbox, or in this worker's backlog for it while the inbox
    /// is full. Only a full backlog loses it: that is counted and logged as `lost`, and false
    /// is returned.
    fn send_to(&mut self, worker: WorkerId, message: Message, lost: std::fmt::Arguments<'_>) -> bool {
        match self.outbox.send(worker, message, Instant::now()) {
            Sent::Now => true,
            Sent::Later => {
                WorkerMetrics::add(&self.metrics.counters.inbox_full, 1);
                true
            }
            Sent::Lost => {
                WorkerMetrics::add(&self.metrics.counters.inbox_overflows, 1);
                warn!("worker {} inbox and backlog full: {lost} was lost", worker.0);
                false
            }
        }
    }

    /// The roster's answer reached the joining connection's worker: subscribe and confirm with
    /// the member list, or refuse, in the reply room promised at the join. A connection that
    /// has gone meanwhile already sent its leave.
    fn presence_joined(
        &mut self,
        conns: &mut Conns<Session>,
        id: ConnId,
        socket: SocketId,
        channel: &ChannelName,
        result: Result<String, String>,
        now: Instant,
    ) {
        let Some(session) = conns.session_mut(id).filter(|s| s.socket_id() == socket) else {
            return;
        };
        match result {
            Ok(data) => {
                self.add_subscriber(channel, id, now);
                conns.send_promised(id, &text_frame(&self.pool, &protocol::presence_subscription_succeeded(channel, &data)));
                self.replay_last_event(conns, id, channel, now);
            }
            Err(reason) => {
                session.unsubscribed(channel);
                conns.send_promised(id, &text_frame(&self.pool, &protocol::subscription_error(channel, "LimitReached", &reason, 403)));
            }
        }
    }

    /// Announces the presence changes whose coalescing window has passed.
    fn announce_presence(&mut self, conns: &mut Conns<Session>, now: Instant) {
        for change in self.rosters.poll_changes(now) {
            let channel = match &change {
                Change::Added { channel, .. } | Change::Removed { channel, .. } => channel,
            };
            if self.webhooks.is_enabled() && self.reports_webhooks(channel) {
                self.webhooks.emit(match &change {
                    Change::Added { channel, member, .. } => {
                        WebhookEvent::MemberAdded { channel: channel.clone(), user_id: member.user_id.clone() }
                    }
                    Change::Removed { channel, user_id } => {
                        WebhookEvent::MemberRemoved { channel: channel.clone(), user_id: user_id.clone() }
                    }
                });
            }
            let publish = match change {
                Change::Added { channel, member, except } => Publish {
                    channel,
                    event: "pusher_internal:member_added".into(),
                    data: protocol::member_added_data(&member.user_id, &member.user_info).into(),
                    except,
                    user_id: None,
                },
                Change::Removed { channel, user_id } => Publish {
                    channel,
                    event: "pusher_internal:member_removed".into(),
                    data: protocol::member_removed_data(&user_id).into(),
                    except: None,
                    user_id: None,
                },
            };
            // Presence changes stay on this node: each node announces its own view to its own
            // clients.
            match self.frame(&publish) {
                Ok(broadcast) => self.fan_out(conns, &Broadcast { roster_change: true, ..broadcast }),
                Err(e) => warn!("could not frame a presence change for {}: {e}", publish.channel),
            }
        }
        let rosters = &self.rosters;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.vacated_after_presence).into_iter().partition(|c| !rosters.has_pending(c));
        self.vacated_after_presence = waiting;
        for channel in ready {
            self.webhooks.emit(WebhookEvent::ChannelVacated { channel });
        }
    }

    /// Applies a local count change to this worker's directory and marks it for the others.
    fn occupancy_changed(&mut self, channel: &ChannelName, count: u32, now: Instant) {
        self.apply_occupancy(&Occupancy { worker: self.id, channel: channel.clone(), count }, now);
        self.changed_occupancy.insert(channel.clone());
    }

    /// Applies a worker's count to this replica.
    fn apply_occupancy(&mut self, update: &Occupancy, now: Instant) {
        self.track_occupancy(&update.channel, now, |directory| directory.apply(update));
    }

    /// Makes a change to this replica. The channel's owner worker (the same one that owns
    /// presence rosters) notes it for the channel's subscription-count event and, on the node
    /// that reports the channel's webhooks, sends `channel_occupied` and `channel_vacated` when
    /// its count across the node (and the cluster) leaves or reaches 0, so each is sent once.
    fn track_occupancy(&mut self, channel: &ChannelName, now: Instant, change: impl FnOnce(&mut Directory)) {
        let counted = ChannelKind::of(channel) != ChannelKind::Presence
            && self.apps.load().get(channel.app()).is_some_and(|app| app.app.subscription_count_events);
        if counted && owner_of(channel, self.outbox.workers()) == self.id {
            self.subscription_counts.handle_change(channel, now);
        }
        if !self.webhooks.is_enabled() || owner_of(channel, self.outbox.workers()) != self.id || !self.reports_webhooks(channel) {
            change(&mut self.directory);
            return;
        }
        let before = self.directory.subscription_count(channel.key());
        change(&mut self.directory);
        let after = self.directory.subscription_count(channel.key());
        let channel = channel.clone();
        match (before, after) {
            (0, n) if n > 0 => {
                // Occupied again before a deferred vacated went out: neither happened.
                if let Some(i) = self.vacated_after_presence.iter().position(|c| *c == channel) {
                    self.vacated_after_presence.swap_remove(i);
                } else {
                    self.webhooks.emit(WebhookEvent::ChannelOccupied { channel });
                }
            }
            (n, 0) if n > 0 => {
                if self.rosters.has_pending(&channel) {
                    self.vacated_after_presence.push(channel);
                } else {
                    self.webhooks.emit(WebhookEvent::ChannelVacated { channel });
                }
            }
            _ => {}
        }
    }

    /// Frames each due `pusher_internal:subscription_count` once, with the channel's count across
    /// the node (and the cluster), for this node's subscribers of it. Like presence changes it
    /// stays on this node: every node announces the same count to its own subscribers.
    fn announce_counts(&mut self, conns: &mut Conns<Session>, now: Instant) {
        let directory = &self.directory;
        for (channel, count) in self.subscription_counts.poll_due(now, |channel| directory.subscription_count(channel.key())) {
            let publish = Publish {
                channel,
                event: "pusher_internal:subscription_count".into(),
                data: protocol::subscription_count_data(count).into(),
                except: None,
                user_id: None,
            };
            if self.webhooks.is_enabled() && self.reports_webhooks(&publish.channel) {
                self.webhooks.emit(WebhookEvent::SubscriptionCount { channel: publish.channel.clone(), subscription_count: count });
            }
            match self.frame(&publish) {
                Ok(broadcast) => {
                    WorkerMetrics::add(&self.metrics.counters.subscription_count_events, 1);
                    self.fan_out(conns, &broadcast);
                }
                Err(e) => warn!("could not frame a subscription count for {}: {e}", publish.channel),
            }
        }
    }

    fn send_text(&self, conns: &mut Conns<Session>, id: ConnId, text: &str) {
        conns.send(id, &text_frame(&self.pool, text));
    }

    fn carry_out(&mut self, conns: &mut Conns<Session>, id: ConnId, action: Action, now: Instant) {
        match action {
            Action::None => {}
            Action::Reply(text) => self.send_text(conns, id, &text),
            Action::Subscribe(channel) | Action::JoinPresence { channel, .. } if self.node_is_full() => {
                if let Some(session) = conns.session_mut(id) {
                    session.unsubscribed(&channel); // A presence join was recorded in advance.
                }
                let message = format!("This server holds its maximum of {} subscriptions; try again later", self.policy.max_subscriptions);
                self.send_text(conns, id, &protocol::subscription_error(&channel, "LimitReached", &message, 503));
            }
            Action::Subscribe(channel) => self.subscribe(conns, id, channel, now),
            Action::Unsubscribe(channel) => {
                if let Some(socket) = conns.session(id).map(Session::socket_id) {
                    self.unsubscribe(id, socket, &channel, now);
                }
            }
            Action::JoinPresence { channel, member, max_members } => self.join_presence(conns, id, channel, member, max_members, now),
            Action::ClientEvent { channel, event, data, user_id } => {
                let except = conns.session(id).map(Session::socket_id);
                if let (true, Some(socket_id)) = (self.webhooks.is_enabled(), except) {
                    self.webhooks.emit(WebhookEvent::ClientEvent {
                        channel: channel.clone(),
                        event: event.clone(),
                        data: data.clone(),
                        socket_id,
                        user_id: user_id.clone(),
                    });
                }
                let publish = Publish { channel, event: event.into(), data: data.into(), except, user_id };
                if let Err(e) = self.publish(conns, &publish) {
                    warn!("could not frame a client event for {}: {e}", publish.channel);
                }
            }
            Action::Close(code, reason) => {
                if let Some(session) = conns.close(id, code, reason, now) {
                    self.forget(id, session);
                }
            }
        }
    }

    /// Whether the node holds its maximum of subscriptions. Workers check and count apart, so
    /// the maximum may be passed by the few subscriptions that other workers are making at the
    /// same moment; it bounds memory, it is no quota.
    fn node_is_full(&self) -> bool {
        self.subscriptions.load(Ordering::Relaxed) >= self.policy.max_subscriptions
    }

    /// Queues a closed connection's subscriptions for removal at the end of this and the next
    /// turns (see [`Vacating`]).
    fn forget(&mut self, id: ConnId, mut session: Session) {
        let channels = session.take_subscriptions();
        if !channels.is_empty() {
            self.vacating.push_back(Vacating { id, socket: session.socket_id(), channels: channels.into_iter() });
        }
    }

    /// Removes up to `budget` subscriptions of closed connections, oldest first.
    fn vacate(&mut self, mut budget: usize, now: Instant) {
        while budget > 0 {
            let Some(closed) = self.vacating.front_mut() else { return };
            let (id, socket) = (closed.id, closed.socket);
            let Some(channel) = closed.channels.next() else {
                self.vacating.pop_front();
                continue;
            };
            self.unsubscribe(id, socket, &channel, now);
            budget -= 1;
        }
    }

    /// Finishes the removal of a closed connection's subscriptions that used key `id`, so a new
    /// connection given the same key starts with none of them.
    fn vacate_key(&mut self, id: ConnId, now: Instant) {
        let Some(index) = self.vacating.iter().position(|closed| closed.id == id) else { return };
        if let Some(closed) = self.vacating.remove(index) {
            for channel in closed.channels {
                self.unsubscribe(id, closed.socket, &channel, now);
            }
        }
    }

    fn handle_rest(&mut self, conns: &mut Conns<Session>, request: &Request) -> Response {
        let unix_now = crate::clock::since_unix_epoch().as_secs();
        let apps = self.apps.load();
        let (index, app, rates) = match rest::resolve(request, &apps) {
            Ok(found) => found,
            Err(refused) => return refused,
        };
        let rates = (rates, Instant::now());
        let context = RestContext { app, index, directory: &self.directory, membership: &self.membership, unix_now, rates };
        let outcome = rest::handle(request, &context, &mut self.verifier);
        if outcome.response.status == 429 {
            if let Some(cells) = apps.cells(index) {
                WorkerMetrics::add(&cells.rate_limited, 1);
            }
        }
        drop(apps);
        if let Some(user) = outcome.terminate_user {
            if let Some(cluster) = &self.cluster {
                cluster.terminate(index, &user);
            }
            let user: Arc<str> = user.into();
            for worker in self.other_workers() {
                self.send_to(worker, Message::TerminateUser(index, user.clone()), format_args!("terminate_connections for a user"));
            }
            self.terminate_user(conns, index, &user, Instant::now());
        }
        for publish in &outcome.publishes {
            if let Err(e) = self.publish(conns, publish) {
                warn!("could not frame an event for {}: {e}", publish.channel);
                return json_error(500, "could not encode the event");
            }
        }
        outcome.response
    }

    /// Closes this worker's connections of `app` signed in as `user`, the way Pusher does (4009).
    fn terminate_user(&mut self, conns: &mut Conns<Session>, app: AppIndex, user: &str, now: Instant) {
        let theirs: Vec<ConnId> = conns.sessions().filter(|(_, s)| s.app() == app && s.user_id() == Some(user)).map(|(id, _)| id).collect();
        for id in theirs {
            self.carry_out(conns, id, Action::Close(code::UNAUTHORIZED, "Connections of this user were terminated"), now);
        }
    }

    /// After a reload, closes this worker's connections of apps that were removed or disabled,
    /// with Pusher's 4003. Everything else keeps its connection.
    fn close_disabled_apps(&mut self, conns: &mut Conns<Session>, now: Instant) {
        let apps = self.apps.load_full();
        if Arc::ptr_eq(&apps, &self.apps_checked) {
            return;
        }
        let closing: Vec<ConnId> = conns.sessions().filter(|(_, s)| !apps.serves(s.app())).map(|(id, _)| id).collect();
        if !closing.is_empty() {
            info!("worker {}: closing {} connections of disabled or removed apps", self.id.0, closing.len());
        }
        for id in closing {
            self.carry_out(conns, id, Action::Close(code::APP_DISABLED, "App disabled"), now);
        }
        self.apps_checked = apps;
    }

    /// Whether the node takes new clients now.
    fn readiness(&self) -> Readiness {
        Readiness::of(self.node.is_draining(), self.node.websockets(), self.policy.max_connections)
    }

    /// Decides whether `/app/{key}?protocol=N` may connect, Pusher's way: a known, enabled
    /// app, a protocol version Flux speaks, an `Origin` the app allows, and room on the node and
    /// in the app's quota. Workers admit apart, so at a limit each of the others may admit one
    /// more at the same moment: a limit may be passed by fewer connections than there are
    /// workers, and is never stuck, since the counts are gauges of open sessions.
    fn admit(&mut self, key: &str, request: &Request, now: Instant) -> Routed<Session> {
        let refuse = |pool: &FramePool, code: u16, message: &str, reason: &'static str| Routed::Refuse {
            frame: text_frame(pool, &protocol::error(Some(code), message)),
            code,
            reason,
        };
        let apps = self.apps.load();
        let Some((index, app)) = apps.by_key(key) else {
            let message = format!("App key {} does not exist", protocol::truncate(key, 64));
            return refuse(&self.pool, code::APP_NOT_FOUND, &message, "App not found");
        };
        let Some(cells) = apps.cells(index).filter(|_| app.enabled) else {
            return refuse(&self.pool, code::APP_DISABLED, "App is disabled", "App disabled");
        };
        match request.query_param("protocol") {
            None => refuse(&self.pool, code::NO_PROTOCOL_VERSION, "No protocol version supplied", "No protocol version"),
            Some(version) => match version.parse::<u32>() {
                Err(_) => refuse(&self.pool, code::INVALID_VERSION_FORMAT, "Invalid version string format", "Invalid version"),
                Ok(v) if !PROTOCOL_VERSIONS.contains(&v) => {
                    let message = format!("Unsupported protocol version {v}; this server speaks 7");
                    refuse(&self.pool, code::UNSUPPORTED_PROTOCOL, &message, "Unsupported protocol version")
                }
                Ok(_) if !app.limits.allows_origin(request.header("origin")) => {
                    let message = format!(
                        "Origin {} is not allowed for this app",
                        protocol::truncate(request.header("origin").unwrap_or_default(), 64)
                    );
                    refuse(&self.pool, code::UNAUTHORIZED, &message, "Origin not allowed")
                }
                Ok(_) => match self.readiness().refusal() {
                    Some(refusal) => refuse(&self.pool, refusal.code, &refusal.message, refusal.reason),
                    // Counted across the cluster: the other nodes' as of their last heartbeats.
                    None if app.limits.max_connections.is_some_and(|most| {
                        cells.connections.load(Ordering::Relaxed) + cells.connections_elsewhere.load(Ordering::Relaxed) >= most
                    }) =>
                    {
                        WorkerMetrics::add(&cells.over_quota, 1);
                        let message = "Over connection quota: the app holds its max_connections";
                        refuse(&self.pool, code::OVER_QUOTA, message, "Over connection quota")
                    }
                    None => {
                        let connected = Connected::new(cells);
                        Routed::Upgrade(Session::new(self.next_socket_id(), index, connected, now))
                    }
                },
            },
        }
    }

    fn snapshot(&self, conns: &Conns<Session>, now: Instant) -> Vec<ConnectionSnapshot> {
        conns
            .sessions()
            .filter_map(|(id, session)| {
                let info = conns.info(id, now)?;
                Some(ConnectionSnapshot {
                    worker: self.id.0,
                    socket_id: session.socket_id().to_string(),
                    peer: info.peer.to_string(),
                    channels: session.subscriptions().iter().map(|c| c.to_string()).collect(),
                    ring_len: info.ring_len,
                    ring_slots: info.ring_slots,
                    dropped: info.dropped,
                    backpressured_ms: info.backpressured_for.map(|d| d.as_millis() as u64),
                })
            })
            .collect()
    }
}

impl Service for PusherService {
    type Session = Session;
    type Message = Message;

    fn on_request(&mut self, conns: &mut Conns<Session>, _id: ConnId, request: &Request, now: Instant) -> Routed<Session> {
        if let Some(key) = request.path.strip_prefix("/app/") {
            return self.admit(key, request, now);
        }
        if rest::is_rest_path(&request.path) {
            return Routed::Respond(self.handle_rest(conns, request));
        }
        match request.path.as_str() {
            "/up" => Routed::Respond(health::up()),
            "/ready" => Routed::Respond(self.readiness().response()),
            "/" => Routed::Respond(Response::json(200, r#"{"ok":true}"#)),
            _ => Routed::Respond(json_error(404, "not found: WebSocket clients connect to /app/{key}, the REST API is under /apps/{id}")),
        }
    }

    fn on_open(&mut self, conns: &mut Conns<Session>, id: ConnId, now: Instant) {
        self.vacate_key(id, now);
        let Some(session) = conns.session(id) else {
            return;
        };
        let established = protocol::connection_established(session.socket_id(), self.policy.timeouts.activity.as_secs());
        self.send_text(conns, id, &established);
    }

    fn on_message(&mut self, conns: &mut Conns<Session>, id: ConnId, message: Incoming<'_>, now: Instant) {
        let Some(session) = conns.session_mut(id) else {
            return;
        };
        let apps = self.apps.load();
        let action = match message {
            Incoming::Text(text) => {
                WorkerMetrics::add(&session.app_cells().messages_in, 1);
                match apps.get(session.app()).filter(|app| app.enabled) {
                    Some(app) => session.handle_text(text, now, &self.policy, app),
                    // Disabled or removed by a reload this worker has not swept yet.
                    None => Action::Close(code::APP_DISABLED, "App disabled"),
                }
            }
            Incoming::Binary(_) => {
                session.heard(now);
                Action::Reply(protocol::error(None, "Binary messages are not supported; send JSON text"))
            }
            Incoming::Ping(_) | Incoming::Pong(_) | Incoming::Close(_) => {
                session.heard(now);
                Action::None
            }
        };
        drop(apps);
        self.carry_out(conns, id, action, now);
    }

    fn on_close(&mut self, conns: &mut Conns<Session>, id: ConnId, session: Session, why: Ended) {
        debug!("socket {} closed: {why:?}", session.socket_id());
        self.resyncs.forget(session.socket_id(), session.subscriptions());
        if let Ended::Evicted { backpressured_for, dropped, queued } = why {
            self.evictions.record(Eviction {
                at_unix_ms: crate::clock::since_unix_epoch().as_millis() as u64,
                worker: self.id.0,
                socket_id: session.socket_id().to_string(),
                peer: conns.peer(id).map_or_else(String::new, |peer| peer.to_string()),
                channels: session.subscriptions().iter().map(|c| c.to_string()).collect(),
                backpressured_ms: backpressured_for.as_millis() as u64,
                frames_queued: queued,
                dropped,
            });
        }
        self.forget(id, session);
    }

    fn on_tick(&mut self, conns: &mut Conns<Session>, now: Instant) {
        let timeouts = self.policy.timeouts;
        let due: Vec<ConnId> = conns.sessions().filter(|(_, s)| s.poll_timeout(&timeouts) <= now).map(|(id, _)| id).collect();
        for id in due {
            if let Some(session) = conns.session_mut(id) {
                let action = session.handle_timeout(now, &timeouts);
                self.carry_out(conns, id, action, now);
            }
        }
        self.metrics.fanout.merge(&mut self.fanout_times);
        self.metrics.remote_delivery.merge(&mut self.remote_times);
        self.close_disabled_apps(conns, now);
    }

    fn on_inbox(&mut self, conns: &mut Conns<Session>, message: Message, now: Instant) {
        match message {
            Message::Broadcast(broadcast) => self.deliver(conns, &broadcast),
            Message::Occupancy(batch) => {
                for update in batch.updates() {
                    self.apply_occupancy(&update, now);
                }
            }
            Message::Snapshot(reply) => {
                // The asker may have given up waiting; that is fine.
                let _ = reply.send(self.snapshot(conns, now));
            }
            Message::TerminateUser(app, user) | Message::Cluster(Delivery::Terminate(app, user)) => {
                self.terminate_user(conns, app, &user, now)
            }
            // Sent only by other workers: a worker that owns the channel joins it directly.
            Message::PresenceJoin { channel, member, max_members, socket, from, conn } => {
                let result = self.roster_join(&channel, &member, max_members, socket, now);
                let answer = Message::PresenceJoined { channel: channel.clone(), socket, conn, result };
                if !self.send_to(from, answer, format_args!("the answer to a presence join on {channel}")) {
                    // The joiner will never hear back, so undo the join rather than leak it.
                    self.roster_leave(&channel, socket, now);
                }
            }
            Message::PresenceJoined { channel, socket, conn, result } => self.presence_joined(conns, conn, socket, &channel, result, now),
            Message::PresenceResync { channel, socket, from, conn } => {
                let roster = self.rosters.listing(&channel, socket);
                let answer = Message::PresenceResynced { channel: channel.clone(), socket, conn, roster };
                self.send_to(from, answer, format_args!("a presence resync answer on {channel}"));
            }
            Message::PresenceResynced { channel, socket, conn, roster } => self.roster_resynced(conns, conn, socket, &channel, roster),
            Message::CacheMiss(channel) => self.report_cache_miss(&channel, now),
            Message::PresenceLeave { channel, socket } => self.roster_leave(&channel, socket, now),
            Message::Membership { channel, user_id, present } => self.membership.apply(&channel, &user_id, present),
            Message::Cluster(Delivery::Broadcast(remote)) => self.deliver_remote(conns, remote),
            Message::Cluster(Delivery::Occupancy(counts)) => {
                for (channel, count) in counts.iter() {
                    self.track_occupancy(channel, now, |directory| directory.apply_remote(channel, *count));
                }
            }
            Message::Cluster(Delivery::Presence(members)) => self.members_elsewhere(&members, now),
            Message::Cluster(Delivery::Nodes(nodes)) => self.cluster_nodes = Some(nodes),
            // Never told on: a node that no longer reports the channel drops it, rather than
            // bounce it between nodes that see the cluster differently for a moment.
            Message::Cluster(Delivery::CacheMiss(channel)) => {
                if self.webhooks.is_enabled() && self.reports_webhooks(&channel) && self.last_events.miss(&channel, now) {
                    self.webhooks.emit(WebhookEvent::CacheMiss { channel });
                }
            }
            Message::Cluster(Delivery::LastEvents(events)) => {
                for event in events.iter() {
                    let dropped =
                        self.last_events.restore(&event.channel, event.frame.clone(), event.published_at_us, event.remaining, now);
                    self.count_cache_evictions(dropped);
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let timers = [
            self.rosters.poll_timeout(),
            self.subscription_counts.poll_timeout(),
            self.outbox.retry_due(),
            self.vacate_due,
            self.resync_due,
            self.last_events.poll_timeout(),
        ];
        timers.into_iter().flatten().min()
    }

    fn on_turn_end(&mut self, conns: &mut Conns<Session>, now: Instant) {
        if self.rosters.poll_timeout().is_some_and(|due| due <= now) {
            self.announce_presence(conns, now);
        }
        if self.subscription_counts.poll_timeout().is_some_and(|due| due <= now) {
            self.announce_counts(conns, now);
        }
        if self.resync_due.is_some_and(|due| due <= now) || self.resyncs.is_draining() && self.resync_due.is_none() {
            self.resync_rosters(conns, now);
        }
        self.outbox.retry(now);
        self.last_events.handle_timeout(now);
        self.vacate(VACATE_BUDGET, now);
        self.vacate_due = (!self.vacating.is_empty()).then_some(now);
        // Occupancy goes out before this turn's frames are flushed, so another worker learns of
        // a subscription before the client hears it succeeded: one batch per worker per turn,
        // with absolute counts, whatever the number of channels that changed.
        if !self.changed_occupancy.is_empty() {
            let registry = &self.registry;
            let counts = self
                .changed_occupancy
                .drain(..)
                .map(|channel| {
                    let count = registry.subscribers(channel.key()).map_or(0, |s| s.len() as u32);
                    (channel, count)
                })
                .collect();
            let batch = OccupancyBatch { worker: self.id, counts };
            for worker in self.other_workers() {
                self.send_to(worker, Message::Occupancy(batch.clone()), format_args!("an occupancy update"));
            }
            if let Some(cluster) = &self.cluster {
                cluster.occupancy(batch);
            }
        }
        self.outbox.wake_all();
    }
}
