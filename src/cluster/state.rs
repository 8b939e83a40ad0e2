//! The cluster as this node sees it (sans-IO): which other nodes are alive, what each of them
//! holds, and what this node must tell them. Driven by their messages, this node's own changes
//! and `now`; it answers with bytes to publish and with the cluster-wide counts the workers need.
//! No socket and no clock here, so heartbeats, deaths and rejoins are tested with a virtual clock.
//!
//! Each node's state (its subscription counts per channel, and the presence members with a
//! connection on it) reaches the others as a stream of
//! numbered deltas. A receiver applies them in order; one that sees a gap (a message lost while
//! its link was down, or dropped by the sender's bounded queue) asks for a snapshot, which
//! replaces everything it knew of that node. Heartbeats carry the number of the last state
//! message, so even a lost last delta is noticed. A node silent for the node timeout is dead: its
//! counts leave the cluster's totals. A node that reappears (restarted, unfrozen, or back from a
//! partition) is asked for a snapshot, so what it held before it was declared dead never comes
//! back unless it still holds it.
//!
//! Presence is kept per node and summed: a user is a member of a channel on the other nodes
//! while at least one of them holds a connection of theirs. Only the transitions of that are
//! handed to the workers, whose rosters add this node's own connections and announce the
//! cluster-wide changes with their usual coalescing.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::{IndexMap, IndexSet};
use log::warn;

use super::wire::{Body, Channel, Count, Envelope, MemberChange};
use super::{local_channel, wire_channel, PeerStatus};
use crate::apps::SharedApps;
use crate::fanout::directory::{Directory, OccupancyBatch};
use crate::pusher::protocol::{ChannelKey, ChannelMap, ChannelName};

/// A node's id (`FLUX_NODE_ID`).
pub type NodeId = Arc<str>;

/// How long a changed count may wait for others to share its message.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// How long a node asked for a snapshot has to answer before it is asked again.
const SYNC_RETRY: Duration = Duration::from_secs(1);

/// Heartbeats per node timeout: a node is declared dead only after missing this many.
const HEARTBEATS_PER_TIMEOUT: u32 = 5;

/// What happened to a node, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A node was heard from for the first time (or after it was forgotten).
    Joined(NodeId),
    /// A node was heard from with a new incarnation: it restarted.
    Restarted(NodeId),
    /// A node said it is stopping.
    Left(NodeId),
    /// A node was silent for the node timeout.
    Died(NodeId),
}

#[derive(Debug)]
struct Peer {
    incarnation: u64,
    last_heard: Instant,
    /// The sequence number of the next state message expected; `None` until a snapshot arrives.
    next_seq: Option<u64>,
    /// When it was last asked for a snapshot.
    asked_at: Option<Instant>,
    counts: ChannelMap<u32>,
    /// Presence members with a connection on it: channel, user, user_info.
    members: ChannelMap<HashMap<String, String>>,
    addr: String,
    connections: u64,
    /// Its open connections per app id, as of its last heartbeat.
    app_connections: HashMap<String, u64>,
}

impl Peer {
    /// A node first heard from `now`, whose state is unknown until its snapshot.
    fn new(incarnation: u64, now: Instant) -> Self {
        Peer {
            incarnation,
            last_heard: now,
            next_seq: None,
            asked_at: None,
            counts: ChannelMap::default(),
            members: ChannelMap::default(),
            addr: String::new(),
            connections: 0,
            app_connections: HashMap::new(),
        }
    }
}

/// A user's presence on the other nodes changed: present there now (with this `user_info`, raw
/// JSON), or not any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMember {
    /// The presence channel.
    pub channel: ChannelName,
    /// The user.
    pub user_id: String,
    /// `Some(user_info)` while another node holds a connection of the user's.
    pub user_info: Option<String>,
}

/// This node's view of the cluster.
#[derive(Debug)]
pub struct ClusterState {
    me: NodeId,
    /// The node's apps: channels travel named by their app's id, not this node's index of it.
    apps: SharedApps,
    incarnation: u64,
    addr: String,
    timeout: Duration,
    /// This node's subscription counts, per worker (fed by the workers' occupancy batches).
    local: Directory,
    /// Channels whose count on this node changed since the last state message.
    local_changed: IndexSet<ChannelName>,
    /// Presence members with a connection on this node: channel, user, user_info.
    local_members: ChannelMap<HashMap<String, String>>,
    /// Presence changes on this node since the last state message, in order.
    local_member_changes: Vec<(ChannelName, String, Option<String>)>,
    /// The sequence number of the last state message this node sent.
    last_seq: u64,
    /// A snapshot is to go out at the next flush instead of a delta.
    snapshot_due: bool,
    flush_due: Option<Instant>,
    next_heartbeat: Instant,
    /// When `handle_timeout` last ran, to notice that this process itself was frozen.
    last_tick: Instant,
    connections: u64,
    /// This node's open connections per app id, for its heartbeats.
    app_connections: Vec<(String, u64)>,
    peers: HashMap<NodeId, Peer>,
    /// Subscriptions per channel on every other node together.
    remote: ChannelMap<u32>,
    remote_changed: IndexSet<ChannelName>,
    /// Per presence channel and user: how many other nodes hold them, and the latest user_info.
    remote_members: ChannelMap<HashMap<String, (u32, String)>>,
    /// Users whose remote presence changed since the last poll, each with whether they were
    /// present before the first of those changes (so a leave and return within one poll, as in
    /// a resync, is no change at all).
    remote_members_changed: IndexMap<(ChannelName, String), bool>,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<NodeEvent>,
    /// Whether another node using this node's id was already reported.
    twin_reported: bool,
}

impl ClusterState {
    /// The view of node `me` (this run: `incarnation`) serving `apps`, whose clients connect at
    /// `addr`, of a node of `workers` workers, with nodes declared dead after `timeout` of
    /// silence.
    pub fn new(me: NodeId, incarnation: u64, apps: SharedApps, addr: String, workers: usize, timeout: Duration, now: Instant) -> Self {
        ClusterState {
            me,
            apps,
            incarnation,
            addr,
            timeout,
            local: Directory::new(workers),
            local_changed: IndexSet::new(),
            local_members: ChannelMap::default(),
            local_member_changes: Vec::new(),
            last_seq: 0,
            snapshot_due: false,
            flush_due: None,
            next_heartbeat: now,
            last_tick: now,
            connections: 0,
            app_connections: Vec::new(),
            peers: HashMap::new(),
            remote: ChannelMap::default(),
            remote_changed: IndexSet::new(),
            remote_members: ChannelMap::default(),
            remote_members_changed: IndexMap::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            twin_reported: false,
        }
    }

    fn heartbeat_every(&self) -> Duration {
        self.timeout / HEARTBEATS_PER_TIMEOUT
    }

    /// The link to Redis is (again) up: whatever was said meanwhile may be lost both ways, so ask
    /// every node for its state and tell them this node's.
    pub fn handle_link_up(&mut self, now: Instant) {
        for peer in self.peers.values_mut() {
            peer.next_seq = None;
            peer.asked_at = Some(now);
        }
        self.send(Body::SyncRequest { target: None });
        self.snapshot_due = true;
        self.flush_due = Some(now);
        self.next_heartbeat = now;
    }

    /// A state message could not be queued for Redis: the others will see a gap, so send
    /// everything again at the next flush.
    pub fn handle_lost_output(&mut self, now: Instant) {
        self.snapshot_due = true;
        self.flush_due = Some(now);
    }

    /// One worker's new counts for the channels that changed in one of its turns.
    pub fn handle_local_occupancy(&mut self, batch: &OccupancyBatch, now: Instant) {
        for update in batch.updates() {
            self.local.apply(&update);
            self.local_changed.insert(update.channel);
        }
        if self.flush_due.is_none() {
            self.flush_due = Some(now + FLUSH_EVERY);
        }
    }

    /// A user now has a first connection on this node in a presence channel (`Some(user_info)`),
    /// or no connection left (`None`).
    pub fn handle_local_presence(&mut self, channel: ChannelName, user_id: String, user_info: Option<String>, now: Instant) {
        match &user_info {
            Some(info) => {
                self.local_members.entry(channel.clone()).or_default().insert(user_id.clone(), info.clone());
            }
            None => {
                if let Some(users) = self.local_members.get_mut(&channel) {
                    users.remove(&user_id);
                    if users.is_empty() {
                        self.local_members.remove(&channel);
                    }
                }
            }
        }
        self.local_member_changes.push((channel, user_id, user_info));
        if self.flush_due.is_none() {
            self.flush_due = Some(now + FLUSH_EVERY);
        }
    }

    /// This node's open connections, in all and per app id, for its heartbeats.
    pub fn set_connections(&mut self, connections: u64, per_app: Vec<(String, u64)>) {
        self.connections = connections;
        self.app_connections = per_app;
    }

    /// Every other live node's open connections per app id, added up.
    pub fn remote_app_connections(&self) -> HashMap<&str, u64> {
        let mut sums = HashMap::new();
        for (app, count) in self.peers.values().flat_map(|peer| peer.app_connections.iter()) {
            *sums.entry(app.as_str()).or_insert(0) += count;
        }
        sums
    }

    /// A message from Redis (this node's own come back too, and are ignored).
    pub fn handle_message(&mut self, envelope: &Envelope<'_>, now: Instant) {
        if *envelope.node == *self.me {
            if envelope.incarnation != self.incarnation && !self.twin_reported {
                self.twin_reported = true;
                warn!("another node uses this node's id {}: give each node its own FLUX_NODE_ID", self.me);
            }
            return;
        }
        let node: NodeId = envelope.node.into();
        let peer = self.heard_from(&node, envelope.incarnation, now);
        match &envelope.body {
            // Handed straight to the workers by the thread that reads them.
            Body::Broadcast { .. } | Body::Terminate { .. } | Body::CacheMiss { .. } => {}
            Body::Heartbeat { addr, connections, last_seq, apps } => {
                peer.addr.clear();
                peer.addr.push_str(addr);
                peer.connections = *connections;
                peer.app_connections = apps.iter().map(|&(app, count)| (app.to_string(), count)).collect();
                if peer.next_seq.is_none_or(|next| *last_seq >= next) {
                    self.ask_sync(&node, now);
                }
            }
            Body::Delta { seq, counts, members } => {
                if peer.next_seq == Some(*seq) {
                    peer.next_seq = Some(seq + 1);
                    self.apply_counts(&node, counts);
                    self.apply_members(&node, members);
                } else {
                    self.ask_sync(&node, now);
                }
            }
            Body::Snapshot { seq, counts, members } => {
                peer.next_seq = Some(seq + 1);
                peer.asked_at = None;
                self.clear_state(&node);
                self.apply_counts(&node, counts);
                self.apply_members(&node, members);
            }
            Body::SyncRequest { target } => {
                if target.is_none_or(|t| *t == *self.me) {
                    self.handle_lost_output(now);
                }
            }
            Body::Leaving => {
                self.forget(&node);
                self.events.push_back(NodeEvent::Left(node));
            }
        }
    }

    /// The peer that sent a message, heard from `now`: created, or started afresh if its
    /// incarnation is new (it restarted: nothing it held before counts any more).
    fn heard_from(&mut self, node: &NodeId, incarnation: u64, now: Instant) -> &mut Peer {
        match self.peers.get(node).map(|p| p.incarnation) {
            Some(known) if known == incarnation => {}
            Some(_) => {
                self.forget(node);
                self.events.push_back(NodeEvent::Restarted(node.clone()));
            }
            None => self.events.push_back(NodeEvent::Joined(node.clone())),
        }
        let peer = self.peers.entry(node.clone()).or_insert_with(|| Peer::new(incarnation, now));
        peer.last_heard = now;
        peer
    }

    /// Asks `node` for a snapshot, unless it was asked less than [`SYNC_RETRY`] ago. Until it
    /// answers, its deltas are ignored.
    fn ask_sync(&mut self, node: &NodeId, now: Instant) {
        let Some(peer) = self.peers.get_mut(node) else { return };
        peer.next_seq = None;
        if peer.asked_at.is_some_and(|at| now < at + SYNC_RETRY) {
            return;
        }
        peer.asked_at = Some(now);
        self.send(Body::SyncRequest { target: Some(node) });
    }

    /// This node's name for a channel of the wire, found among those already known (so it is
    /// shared, not allocated again); `None` for an app this node does not serve.
    fn known<V>(&self, known: &ChannelMap<V>, channel: Channel<'_>) -> Option<ChannelName> {
        let apps = self.apps.load();
        let (index, _) = apps.by_id(channel.0)?;
        match known.get_key_value(&ChannelKey::new(index, channel.1)) {
            Some((name, _)) => Some(name.clone()),
            None => local_channel(&apps, channel),
        }
    }

    fn apply_counts(&mut self, node: &NodeId, counts: &[Count<'_>]) {
        for &(channel, count) in counts {
            if let Some(channel) = self.known(&self.remote, channel) {
                self.set_count(node, channel, count);
            }
        }
    }

    /// Sets `node`'s count for `channel`, and the cluster's remote total with it.
    fn set_count(&mut self, node: &NodeId, name: ChannelName, count: u32) {
        let Some(peer) = self.peers.get_mut(node) else { return };
        let before = if count == 0 { peer.counts.remove(&name).unwrap_or(0) } else { peer.counts.insert(name.clone(), count).unwrap_or(0) };
        if before == count {
            return;
        }
        let total = self.remote.entry(name.clone()).or_insert(0);
        *total = (*total + count).saturating_sub(before);
        if *total == 0 {
            self.remote.remove(&name);
        }
        self.remote_changed.insert(name);
    }

    fn apply_members(&mut self, node: &NodeId, members: &[MemberChange<'_>]) {
        for &(channel, user_id, user_info) in members {
            if let Some(channel) = self.known(&self.remote_members, channel) {
                self.set_member(node, channel, user_id, user_info);
            }
        }
    }

    /// Sets whether `node` holds `user_id` in `channel`, and the cluster's remote roster with it.
    fn set_member(&mut self, node: &NodeId, name: ChannelName, user_id: &str, user_info: Option<&str>) {
        let Some(peer) = self.peers.get_mut(node) else { return };
        let held = peer.members.entry(name.clone()).or_default();
        let was_held = match user_info {
            Some(info) => held.insert(user_id.to_string(), info.to_string()).is_some(),
            None => held.remove(user_id).is_some(),
        };
        if held.is_empty() {
            peer.members.remove(&name);
        }
        let users = self.remote_members.entry(name.clone()).or_default();
        // Only a user's first node and last node change the cluster's roster as seen from here.
        let transition = match (was_held, user_info) {
            (false, Some(info)) => {
                let entry = users.entry(user_id.to_string()).or_insert((0, String::new()));
                entry.0 += 1;
                entry.1 = info.to_string();
                entry.0 == 1
            }
            (true, Some(info)) => {
                if let Some(entry) = users.get_mut(user_id) {
                    entry.1 = info.to_string();
                }
                false
            }
            (true, None) => match users.get_mut(user_id) {
                Some(entry) if entry.0 > 1 => {
                    entry.0 -= 1;
                    false
                }
                Some(_) => users.remove(user_id).is_some(),
                None => false,
            },
            (false, None) => false,
        };
        if users.is_empty() {
            self.remote_members.remove(&name);
        }
        if transition {
            let present_now = user_info.is_some();
            self.remote_members_changed.entry((name, user_id.to_string())).or_insert(!present_now);
        }
    }

    /// Takes everything `node` held out of the totals and the rosters.
    fn clear_state(&mut self, node: &NodeId) {
        let Some(peer) = self.peers.get_mut(node) else { return };
        let held: Vec<ChannelName> = peer.counts.keys().cloned().collect();
        let members: Vec<(ChannelName, String)> =
            peer.members.iter().flat_map(|(channel, users)| users.keys().map(move |user| (channel.clone(), user.clone()))).collect();
        for channel in held {
            self.set_count(node, channel, 0);
        }
        for (channel, user_id) in members {
            self.set_member(node, channel, &user_id, None);
        }
    }

    fn forget(&mut self, node: &NodeId) {
        self.clear_state(node);
        self.peers.remove(node);
    }

    /// Heartbeats, flushes and deaths that are due by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Far longer than any wait between two calls means this process was frozen (SIGSTOP, a
        // swapped-out host): the others' heartbeats of that time are still unread, so do not
        // hold the silence against them.
        if now.saturating_duration_since(self.last_tick) > self.timeout / 2 {
            let grace = now - self.heartbeat_every();
            for peer in self.peers.values_mut() {
                peer.last_heard = peer.last_heard.max(grace);
            }
        }
        self.last_tick = now;
        let dead: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_heard) >= self.timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for node in dead {
            self.forget(&node);
            self.events.push_back(NodeEvent::Died(node));
        }
        if self.flush_due.is_some_and(|due| due <= now) {
            self.flush_due = None;
            self.flush();
        }
        if self.next_heartbeat <= now {
            self.next_heartbeat = now + self.heartbeat_every();
            let apps = self.app_connections.iter().map(|(app, count)| (app.as_str(), *count)).collect();
            let heartbeat = Body::Heartbeat { addr: &self.addr, connections: self.connections, last_seq: self.last_seq, apps };
            let bytes = Envelope { node: &self.me, incarnation: self.incarnation, body: heartbeat }.encode();
            self.transmit.push_back(bytes);
        }
    }

    /// Sends this node's changes, or everything it holds when a snapshot is due.
    fn flush(&mut self) {
        let apps = self.apps.load();
        if self.snapshot_due {
            self.snapshot_due = false;
            self.local_changed.clear();
            self.local_member_changes.clear();
            self.last_seq += 1;
            let counts: Vec<Count<'_>> =
                self.local.local_channels().filter_map(|(channel, count)| Some((wire_channel(&apps, channel)?, count))).collect();
            let members: Vec<MemberChange<'_>> = self
                .local_members
                .iter()
                .filter_map(|(channel, users)| Some((wire_channel(&apps, channel)?, users)))
                .flat_map(|(channel, users)| users.iter().map(move |(user, info)| (channel, user.as_str(), Some(info.as_str()))))
                .collect();
            let body = Body::Snapshot { seq: self.last_seq, counts, members };
            self.transmit.push_back(Envelope { node: &self.me, incarnation: self.incarnation, body }.encode());
        } else if !self.local_changed.is_empty() || !self.local_member_changes.is_empty() {
            self.last_seq += 1;
            let local = &self.local;
            let counts: Vec<Count<'_>> =
                self.local_changed.iter().filter_map(|c| Some((wire_channel(&apps, c)?, local.local_count(c.key())))).collect();
            let members: Vec<MemberChange<'_>> = self
                .local_member_changes
                .iter()
                .filter_map(|(channel, user, info)| Some((wire_channel(&apps, channel)?, user.as_str(), info.as_deref())))
                .collect();
            let body = Body::Delta { seq: self.last_seq, counts, members };
            self.transmit.push_back(Envelope { node: &self.me, incarnation: self.incarnation, body }.encode());
            self.local_changed.clear();
            self.local_member_changes.clear();
        }
    }

    fn send(&mut self, body: Body<'_>) {
        let bytes = Envelope { node: &self.me, incarnation: self.incarnation, body }.encode();
        self.transmit.push_back(bytes);
    }

    /// This node is stopping: the last message it sends.
    pub fn handle_stop(&mut self) {
        self.send(Body::Leaving);
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next run.
    pub fn poll_timeout(&self) -> Instant {
        let deaths = self.peers.values().map(|p| p.last_heard + self.timeout).min();
        [Some(self.next_heartbeat), self.flush_due, deaths].into_iter().flatten().min().unwrap_or(self.next_heartbeat)
    }

    /// The next message to publish on Redis.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The channels whose count on the other nodes changed, each with its new total there.
    pub fn poll_remote_counts(&mut self) -> Option<Vec<(ChannelName, u32)>> {
        if self.remote_changed.is_empty() {
            return None;
        }
        let remote = &self.remote;
        Some(self.remote_changed.drain(..).map(|c| (c.clone(), remote.get(&c).copied().unwrap_or(0))).collect())
    }

    /// The users whose presence on the other nodes changed, each with where it stands now.
    pub fn poll_remote_members(&mut self) -> Option<Vec<RemoteMember>> {
        if self.remote_members_changed.is_empty() {
            return None;
        }
        let roster = &self.remote_members;
        let changed: Vec<RemoteMember> = self
            .remote_members_changed
            .drain(..)
            .filter_map(|((channel, user_id), was_present)| {
                let user_info = roster.get(&channel).and_then(|users| users.get(&user_id)).map(|(_, info)| info.clone());
                (user_info.is_some() != was_present).then_some(RemoteMember { channel, user_id, user_info })
            })
            .collect();
        (!changed.is_empty()).then_some(changed)
    }

    /// The ids of every live node, this one included, sorted.
    pub fn live_nodes(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.peers.keys().cloned().chain([self.me.clone()]).collect();
        ids.sort();
        ids
    }

    /// The next thing that happened to a node.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// The other nodes alive, by id.
    pub fn nodes(&self, now: Instant) -> Vec<PeerStatus> {
        let mut nodes: Vec<PeerStatus> = self
            .peers
            .iter()
            .map(|(id, p)| PeerStatus {
                id: id.to_string(),
                addr: p.addr.clone(),
                connections: p.connections,
                last_heard_ms: now.saturating_duration_since(p.last_heard).as_millis() as u64,
                synced: p.next_seq.is_some(),
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes
    }

    /// Subscriptions to `channel` on the other nodes together.
    #[cfg(test)]
    fn remote_count(&self, channel: &str) -> u32 {
        self.remote.get(&ChannelKey::new(crate::pusher::AppIndex(0), channel)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apps::{AppConfig, Apps};
    use crate::config::Config;
    use crate::fanout::WorkerId;
    use crate::pusher::AppIndex;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn node(id: &str, incarnation: u64, t0: Instant) -> ClusterState {
        let mut state = ClusterState::new(id.into(), incarnation, two_apps(), format!("{id}:6001"), 2, TIMEOUT, t0);
        state.handle_link_up(t0);
        state
    }

    /// One published message, delivered to each of `to` (as Redis would; a node ignores its own).
    fn deliver(bytes: &[u8], to: &mut [&mut ClusterState], now: Instant) {
        let envelope = Envelope::decode(bytes).expect("decodes");
        for node in to.iter_mut() {
            node.handle_message(&envelope, now);
        }
    }

    /// Everything `from` has to publish, delivered to each of `to`.
    fn carry(from: &mut ClusterState, to: &mut [&mut ClusterState], now: Instant) {
        while let Some(bytes) = from.poll_transmit() {
            deliver(&bytes, to, now);
        }
    }

    /// The node's default app (index 0) and a second one, "other".
    fn two_apps() -> SharedApps {
        let default = AppConfig::from_settings(&Config::default());
        let mut other = default.clone();
        (other.app.id, other.app.key) = ("other".into(), "other-key".into());
        Arc::new(arc_swap::ArcSwap::from_pointee(Apps::new(vec![default, other])))
    }

    fn chan(name: &str) -> ChannelName {
        ChannelName::new(AppIndex(0), name)
    }

    fn occupancy(worker: usize, counts: &[(&str, u32)]) -> OccupancyBatch {
        OccupancyBatch { worker: WorkerId(worker), counts: counts.iter().map(|&(c, n)| (chan(c), n)).collect() }
    }

    /// Runs every node's timers and carries each one's messages to all the others (as Redis
    /// would), until they are quiet.
    fn settle(nodes: &mut [&mut ClusterState], now: Instant) {
        for _ in 0..4 {
            for node in nodes.iter_mut() {
                node.handle_timeout(now);
            }
            for from in 0..nodes.len() {
                while let Some(bytes) = nodes[from].poll_transmit() {
                    deliver(&bytes, nodes, now);
                }
            }
        }
    }

    #[test]
    fn counts_reach_the_other_node_and_add_up_across_workers() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node("a", 1, t0), node("b", 2, t0));
        settle(&mut [&mut a, &mut b], t0);
        a.handle_local_occupancy(&occupancy(0, &[("chat", 2), ("news", 1)]), t0);
        a.handle_local_occupancy(&occupancy(1, &[("chat", 3)]), t0);
        settle(&mut [&mut a, &mut b], t0 + FLUSH_EVERY);
        assert_eq!((b.remote_count("chat"), b.remote_count("news")), (5, 1));
        let changed = b.poll_remote_counts().expect("changes");
        assert!(changed.contains(&(chan("chat"), 5)) && changed.contains(&(chan("news"), 1)), "{changed:?}");
        a.handle_local_occupancy(&occupancy(0, &[("chat", 0), ("news", 0)]), t0 + FLUSH_EVERY);
        settle(&mut [&mut a, &mut b], t0 + 2 * FLUSH_EVERY);
        assert_eq!((b.remote_count("chat"), b.remote_count("news")), (3, 0));
        assert_eq!(a.remote_count("chat"), 0, "a's own counts are not remote to it");
    }

    #[test]
    fn the_same_channel_name_in_two_apps_is_counted_apart_across_nodes() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node("a", 1, t0), node("b", 2, t0));
        settle(&mut [&mut a, &mut b], t0);
        let others_chat = ChannelName::new(AppIndex(1), "chat");
        let batch = OccupancyBatch { worker: WorkerId(0), counts: vec![(chan("chat"), 2), (others_chat.clone(), 7)].into() };
        a.handle_local_occupancy(&batch, t0);
        settle(&mut [&mut a, &mut b], t0 + FLUSH_EVERY);
        let mut changed = b.poll_remote_counts().expect("changes");
        changed.sort();
        assert_eq!(changed, [(chan("chat"), 2), (others_chat, 7)]);
    }

    #[test]
    fn a_silent_node_dies_at_the_timeout_and_its_counts_leave_the_totals() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node("a", 1, t0), node("b", 2, t0));
        a.handle_local_occupancy(&occupancy(0, &[("chat", 4)]), t0);
        settle(&mut [&mut a, &mut b], t0 + FLUSH_EVERY);
        assert_eq!(b.remote_count("chat"), 4);
        assert!(matches!(b.poll_event(), Some(NodeEvent::Joined(n)) if &*n == "a"));
        b.poll_remote_counts();
        // a goes silent; b keeps ticking at its own heartbeat pace.
        let mut now = t0 + FLUSH_EVERY;
        while now < t0 + FLUSH_EVERY + TIMEOUT - Duration::from_millis(10) {
            now += Duration::from_secs(1);
            b.handle_timeout(now.min(t0 + FLUSH_EVERY + TIMEOUT - Duration::from_millis(10)));
        }
        assert_eq!(b.remote_count("chat"), 4, "not dead before the timeout");
        b.handle_timeout(t0 + FLUSH_EVERY + TIMEOUT);
        assert_eq!(b.remote_count("chat"), 0);
        assert_eq!(b.poll_event(), Some(NodeEvent::Died("a".into())));
        assert_eq!(b.poll_remote_counts(), Some(vec![(chan("chat"), 0)]));
        assert!(b.nodes(now).is_empty());
    }

    #[test]
    fn heartbeats_carry_each_apps_connections_and_a_dead_nodes_leave_the_sums() {
        let t0 = Instant::now();
        let (mut a, mut b, mut c) = (node("a", 1, t0), node("b", 2, t0), node("c", 3, t0));
        a.set_connections(7, vec![("app-id".into(), 5), ("other".into(), 2)]);
        b.set_connections(3, vec![("app-id".into(), 3)]);
        settle(&mut [&mut a, &mut b, &mut c], t0);
        let sums = c.remote_app_connections();
        assert_eq!((sums.get("app-id"), sums.get("other")), (Some(&8), Some(&2)));
        assert_eq!(a.remote_app_connections().get("app-id"), Some(&3), "a node's own are not remote to it");
        // b goes silent; a and c keep beating.
        for step in 1..=11 {
            settle(&mut [&mut a, &mut c], t0 + TIMEOUT * step / 10 + Duration::from_millis(1));
        }
        assert_eq!(c.nodes(t0 + TIMEOUT * 2).len(), 1, "b is dead");
        assert_eq!(c.remote_app_connections().get("app-id"), Some(&5), "b's died with it");
    }

    #[test]
    fn heartbeats_keep_a_quiet_node_alive() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node("a", 1, t0), node("b", 2, t0));
        let mut now = t0;
        for _ in 0..100 {
            now += Duration::from_millis(500);
            settle(&mut [&mut a, &mut b], now);
        }
        assert_eq!(b.nodes(now).len(), 1, "50 s of heartbeats, no death");
        assert!(b.nodes(now)[0].synced);
        assert_eq!(b.nodes(now)[0].addr, "a:6001");
    }

    #[test]
    fn a_lost_delta_is_noticed_and_repaired_by_a_snapshot() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node("a", 1, t0), node("b", 2, t0));
        settle(&mut [&mut a, &mut b], t0);
        a.handle_local_occupancy(&occupancy(0, &[("lost", 1)]), t0);
        a.handle_timeout(t0 + FLUSH_EVERY);
        while a.poll_transmit().is_some() {} // Redis lost it on the way to b.
        a.handle_local_occupancy(&occupancy(0, &[("later", 2)]), t0 + FLUSH_EVERY);
        settle(&mut [&mut a, &mut b], t0 + 2 * FLUSH_EVERY);
        assert_eq!((b.remote_count("lost"), b.remote_count("later")), (1, 2), "the gap was seen and a snapshot sent");
    }

    #[test]
    fn a_lost_last_delta_is_noticed_at_the_next_heartbeat() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node("a", 1, t0), node("b", 2, t0));
        settle(&mut [&mut a, &mut b], t0);
        a.handle_local_occupancy(&occupancy(0, &[("chat", 1)]), t0);
        a.handle_timeout(t0 + FLUSH_EVERY);
        while a.poll_transmit().is_some() {}
        assert_eq!(b.remote_count("chat"), 0);
        settle(&mut [&mut a, &mut b], t0 + TIMEOUT / HEARTBEATS_PER_TIMEOUT);
        assert_eq!(b.remote_count("chat"), 1);
    }

    #[test]
    fn a_node_declared_dead_that_comes_back_brings_only_what_it_holds_now() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node("a", 1, t0), node("b", 2, t0));
        a.handle_local_occupancy(&occupancy(0, &[("old", 3), ("kept", 1)]), t0);
        settle(&mut [&mut a, &mut b], t0 + FLUSH_EVERY);
        assert_eq!(b.remote_count("old"), 3);
        // a is frozen: b declares it dead.
        let mut now = t0 + FLUSH_EVERY;
        for _ in 0..12 {
            now += Duration::from_secs(1);
            b.handle_timeout(now);
            carry(&mut b, &mut [], now);
        }
        assert_eq!(b.remote_count("old"), 0);
        // a wakes up; meanwhile its clients of "old" went away. Its first tick sees it was frozen.
        a.handle_local_occupancy(&occupancy(0, &[("old", 0)]), now);
        settle(&mut [&mut a, &mut b], now + FLUSH_EVERY);
        assert_eq!((b.remote_count("old"), b.remote_count("kept")), (0, 1));
        assert_eq!(a.nodes(now + FLUSH_EVERY).len(), 1, "a did not declare b dead for its own freeze");
    }

    #[test]
    fn a_restarted_node_starts_from_nothing() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node("a", 1, t0), node("b", 2, t0));
        a.handle_local_occupancy(&occupancy(0, &[("chat", 3)]), t0);
        settle(&mut [&mut a, &mut b], t0 + FLUSH_EVERY);
        assert_eq!(b.remote_count("chat"), 3);
        let mut a2 = node("a", 7, t0 + FLUSH_EVERY);
        settle(&mut [&mut a2, &mut b], t0 + 2 * FLUSH_EVERY);
        assert_eq!(b.remote_count("chat"), 0);
        assert!(std::iter::from_fn(|| b.poll_event()).any(|e| e == NodeEvent::Restarted("a".into())));
    }

    #[test]
    fn a_leaving_node_is_forgotten_at_once() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node("a", 1, t0), node("b", 2, t0));
        a.handle_local_occupancy(&occupancy(0, &[("chat", 3)]), t0);
        settle(&mut [&mut a, &mut b], t0 + FLUSH_EVERY);
        a.handle_stop();
        carry(&mut a, &mut [&mut b], t0 + FLUSH_EVERY);
        assert_eq!(b.remote_count("chat"), 0);
        assert!(b.nodes(t0).is_empty());
    }

    #[test]
    fn three_nodes_sum_and_one_link_drop_resyncs() {
        let t0 = Instant::now();
        let (mut a, mut b, mut c) = (node("a", 1, t0), node("b", 2, t0), node("c", 3, t0));
        a.handle_local_occupancy(&occupancy(0, &[("chat", 1)]), t0);
        b.handle_local_occupancy(&occupancy(1, &[("chat", 2)]), t0);
        settle(&mut [&mut a, &mut b, &mut c], t0 + FLUSH_EVERY);
        assert_eq!(c.remote_count("chat"), 3);
        // c's link drops: it misses a change of b's, then comes back.
        b.handle_local_occupancy(&occupancy(1, &[("chat", 5)]), t0 + FLUSH_EVERY);
        b.handle_timeout(t0 + 2 * FLUSH_EVERY);
        carry(&mut b, &mut [&mut a], t0 + 2 * FLUSH_EVERY);
        assert_eq!((a.remote_count("chat"), c.remote_count("chat")), (5, 3), "a heard it, c did not");
        c.handle_link_up(t0 + 2 * FLUSH_EVERY);
        settle(&mut [&mut a, &mut b, &mut c], t0 + 3 * FLUSH_EVERY);
        assert_eq!(c.remote_count("chat"), 6);
    }

    fn member(channel: &str, user: &str, info: Option<&str>) -> RemoteMember {
        RemoteMember { channel: chan(channel), user_id: user.into(), user_info: info.map(str::to_string) }
    }

    #[test]
    fn a_user_on_two_other_nodes_is_one_member_until_the_last_leaves() {
        let t0 = Instant::now();
        let (mut a, mut b, mut c) = (node("a", 1, t0), node("b", 2, t0), node("c", 3, t0));
        let (p, info) = ("presence-guild", r#"{"name":"Ann"}"#);
        a.handle_local_presence(chan(p), "ann".into(), Some(info.into()), t0);
        settle(&mut [&mut a, &mut b, &mut c], t0 + FLUSH_EVERY);
        assert_eq!(c.poll_remote_members(), Some(vec![member(p, "ann", Some(info))]));
        b.handle_local_presence(chan(p), "ann".into(), Some(info.into()), t0 + FLUSH_EVERY);
        settle(&mut [&mut a, &mut b, &mut c], t0 + 2 * FLUSH_EVERY);
        assert_eq!(c.poll_remote_members(), None, "a second node holding ann changes nothing for c");
        assert_eq!(a.poll_remote_members(), Some(vec![member(p, "ann", Some(info))]), "a learns ann is on b too");
        a.handle_local_presence(chan(p), "ann".into(), None, t0 + 2 * FLUSH_EVERY);
        settle(&mut [&mut a, &mut b, &mut c], t0 + 3 * FLUSH_EVERY);
        assert_eq!(c.poll_remote_members(), None, "still on b");
        b.handle_local_presence(chan(p), "ann".into(), None, t0 + 3 * FLUSH_EVERY);
        settle(&mut [&mut a, &mut b, &mut c], t0 + 4 * FLUSH_EVERY);
        assert_eq!(c.poll_remote_members(), Some(vec![member(p, "ann", None)]));
        assert_eq!(a.poll_remote_members(), Some(vec![member(p, "ann", None)]));
    }

    #[test]
    fn a_dead_nodes_members_leave_and_a_resync_does_not_flap_them() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node("a", 1, t0), node("b", 2, t0));
        a.handle_local_presence(chan("presence-x"), "u1".into(), Some("null".into()), t0);
        a.handle_local_presence(chan("presence-x"), "u2".into(), Some("null".into()), t0);
        settle(&mut [&mut a, &mut b], t0 + FLUSH_EVERY);
        assert_eq!(b.poll_remote_members().map(|m| m.len()), Some(2));
        b.handle_link_up(t0 + FLUSH_EVERY);
        settle(&mut [&mut a, &mut b], t0 + 2 * FLUSH_EVERY);
        assert_eq!(b.poll_remote_members(), None, "the snapshot holds the same members: no change");
        for second in 1..=TIMEOUT.as_secs() {
            b.handle_timeout(t0 + 2 * FLUSH_EVERY + Duration::from_secs(second));
        }
        let mut gone = b.poll_remote_members().expect("a died");
        gone.sort_by(|x, y| x.user_id.cmp(&y.user_id));
        assert_eq!(gone, vec![member("presence-x", "u1", None), member("presence-x", "u2", None)]);
        assert_eq!(b.live_nodes(), vec![NodeId::from("b")]);
    }
}
