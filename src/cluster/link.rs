//! The cluster's I/O: three threads between Redis and the workers, and no logic of their own.
//!
//! - The publisher owns one Redis connection and publishes what the workers and the state
//!   machine queue, many messages per round trip (a pipeline), heartbeats and state first.
//! - The subscriber owns another, subscribed to the cluster's channel. Events from other nodes
//!   go straight to the worker that owns their channel (so one channel's events stay in order);
//!   everything else goes to the state machine.
//! - The state thread runs [`ClusterState`] on its inputs and its timers, and hands the workers
//!   the cluster-wide counts it computes.
//! - The loader owns a third connection, used only when the subscriber has (re)subscribed: it
//!   reads every cache channel's last event back from Redis and hands them to every worker.
//!
//! A lost link is logged once when it goes and once when it comes back, never per message; both
//! connections retry with backoff (100 ms doubling to 5 s). Nothing grows meanwhile: the
//! queues to Redis are bounded and what finds them full is dropped and counted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{bounded, select, Receiver, RecvTimeoutError, Sender};
use log::{error, info, warn};

use super::state::{ClusterState, NodeEvent, RemoteMember};
use super::wire::{Body, Envelope, Kept};
use super::{
    local_channel, ClusterError, ClusterLink, ClusterSettings, Delivery, KeptEvent, RemoteBroadcast, Shared, CONTROL_QUEUE, EVENT_QUEUE,
};
use crate::apps::SharedApps;
use crate::fanout::directory::OccupancyBatch;
use crate::fanout::pool::FramePool;
use crate::fanout::WorkerId;
use crate::pusher::presence::owner_of;
use crate::pusher::protocol::{ChannelName, SocketId};
use crate::server::Peers;
use crate::ws::text_frame;

/// Messages published in one round trip at most.
const PIPELINE: usize = 512;

/// First wait before a lost Redis connection is tried again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// How long a blocking Redis read waits before the thread checks whether it must stop.
const READ_WAIT: Duration = Duration::from_millis(200);

/// How long an idle thread waits for work before it checks whether it must stop.
const IDLE_WAIT: Duration = Duration::from_millis(200);

/// Keys asked for per `SCAN` when the cache channels' events are read back, and so the most
/// events handed to the workers in one message: a worker keeps them in a few milliseconds.
const SCAN_COUNT: usize = 512;

/// What the publisher sends to Redis for the workers.
pub(super) enum Outgoing {
    /// A message for the cluster's channel (`PUBLISH`).
    Publish(Vec<u8>),
    /// A cache channel's last event (a [`Kept`]), stored under `key` for the cache TTL.
    Keep {
        /// `{prefix}:cache:{channel}`.
        key: String,
        /// The encoded [`Kept`].
        value: Vec<u8>,
    },
}

/// What the state thread is told.
pub(super) enum Input {
    /// A state message from another node (raw; decoded by the state thread).
    Remote(Vec<u8>),
    /// A worker's changed counts.
    Local(OccupancyBatch),
    /// A user's first connection to a presence channel on this node, or their last one left.
    Presence {
        /// The channel.
        channel: ChannelName,
        /// The user.
        user_id: String,
        /// `Some(user_info)` (raw JSON) for a first connection, `None` for the last one gone.
        user_info: Option<String>,
    },
    /// A Redis connection is (again) up.
    LinkUp,
    /// A state message was lost on its way out.
    LostOutput,
}

/// The running cluster threads of this node.
pub struct Cluster {
    /// Stops the state thread (which then queues its goodbye) and the subscriber.
    stop: Arc<AtomicBool>,
    /// Stops the publisher, once it has published what is queued: set after the others ended.
    stop_publisher: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    publisher: JoinHandle<()>,
}

/// The queues made before the node's workers exist (their services need the [`ClusterLink`]),
/// and the threads started after (they need the workers' [`Peers`]).
pub struct PreparedCluster {
    settings: ClusterSettings,
    link: ClusterLink,
    client: redis::Client,
    events: Receiver<Outgoing>,
    inputs: Receiver<Input>,
}

impl Cluster {
    /// Checks the settings and makes the queues; nothing connects yet.
    pub fn prepare(settings: ClusterSettings, apps: SharedApps) -> Result<PreparedCluster, ClusterError> {
        let client = redis::Client::open(settings.redis_url.as_str()).map_err(ClusterError::Url)?;
        let (events_tx, events) = bounded(EVENT_QUEUE);
        let (inputs_tx, inputs) = bounded(EVENT_QUEUE);
        let link = ClusterLink {
            node: settings.node_id.clone(),
            incarnation: fastrand::u64(..),
            apps,
            kept_prefix: settings.kept_prefix().into(),
            events: events_tx,
            inputs: inputs_tx,
            shared: Arc::new(Shared::default()),
        };
        Ok(PreparedCluster { settings, link, client, events, inputs })
    }

    /// Tells the other nodes this one is leaving, publishes what is still queued (for at most
    /// `grace`), and stops the threads. A thread still stuck on Redis then is left to end with
    /// the process.
    pub fn stop(self, grace: Duration) {
        let deadline = Instant::now() + grace;
        // The threads notice their flag within their read and idle waits.
        let join_by = |thread: JoinHandle<()>| {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        };
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().for_each(join_by);
        self.stop_publisher.store(true, Ordering::Relaxed);
        join_by(self.publisher);
    }
}

impl PreparedCluster {
    /// The link the workers use.
    pub fn link(&self) -> &ClusterLink {
        &self.link
    }

    /// Starts the threads: the node, whose clients connect at `addr` and whose frames come from
    /// `pool`, joins the cluster. `connections` reads the node's open connections for its
    /// heartbeats.
    pub fn start<M>(
        self,
        peers: Peers<M>,
        pool: FramePool,
        addr: String,
        connections: impl Fn() -> u64 + Send + 'static,
    ) -> Result<Cluster, ClusterError>
    where
        M: From<Delivery> + Send + 'static,
    {
        let PreparedCluster { settings, link, client, events, inputs } = self;
        info!("cluster: node {} joins the cluster on {} (channel {})", settings.node_id, redacted(&settings.redis_url), settings.bus());
        let stop = Arc::new(AtomicBool::new(false));
        let stop_publisher = Arc::new(AtomicBool::new(false));
        let (control_tx, control) = bounded(CONTROL_QUEUE);
        // A thread that cannot be started stops the ones already running.
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.into()).spawn(body).map_err(|e| {
                stop.store(true, Ordering::Relaxed);
                stop_publisher.store(true, Ordering::Relaxed);
                ClusterError::Thread(e)
            })
        };
        let publisher = Publisher {
            client: client.clone(),
            bus: settings.bus(),
            cache_ttl_ms: u64::try_from(settings.cache_ttl.as_millis()).unwrap_or(u64::MAX),
            control,
            events,
            shared: link.shared.clone(),
            inputs: link.inputs.clone(),
            stop: stop_publisher.clone(),
        };
        let publisher = spawn("flux-cluster-out", Box::new(move || publisher.run()))?;
        let mut threads = Vec::new();
        // Room for one request: a load asked for while one waits would read the same keys.
        let (load, load_requests) = bounded(1);
        let loader = Loader {
            client: client.clone(),
            prefix: settings.kept_prefix(),
            ttl: settings.cache_ttl,
            requests: load_requests,
            peers: peers.clone(),
            pool: pool.clone(),
            apps: link.apps.clone(),
            shared: link.shared.clone(),
            stop: stop.clone(),
        };
        threads.push(spawn("flux-cluster-load", Box::new(move || loader.run()))?);
        let subscriber = Subscriber {
            client,
            bus: settings.bus(),
            me: link.node.clone(),
            incarnation: link.incarnation,
            peers: peers.clone(),
            pool,
            inputs: link.inputs.clone(),
            load,
            apps: link.apps.clone(),
            shared: link.shared.clone(),
            stop: stop.clone(),
        };
        threads.push(spawn("flux-cluster-in", Box::new(move || subscriber.run()))?);
        let state = ClusterState::new(
            settings.node_id.clone(),
            link.incarnation,
            link.apps.clone(),
            addr,
            peers.len(),
            settings.node_timeout,
            Instant::now(),
        );
        let machine = StateThread {
            state,
            inputs,
            control: control_tx,
            peers,
            shared: link.shared.clone(),
            stop: stop.clone(),
            connections,
            apps: link.apps.clone(),
        };
        threads.push(spawn("flux-cluster", Box::new(move || machine.run()))?);
        Ok(Cluster { stop, stop_publisher, threads, publisher })
    }
}

/// The URL without its password, for the log.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// One Redis connection's ups and downs: keeps its up flag, logs the first failure of an
/// outage and the recovery, counts reconnects, tells the state machine of every new
/// connection, and paces the retries.
struct Outage {
    what: &'static str,
    down_since: Option<Instant>,
    backoff: Duration,
    /// Whether the connection was ever up, so the first one is no reconnect.
    connected_before: bool,
}

impl Outage {
    fn new(what: &'static str) -> Self {
        Outage { what, down_since: None, backoff: RETRY_FIRST, connected_before: false }
    }

    /// The connection failed: logs it if it is the outage's first failure, and waits before the
    /// next attempt (or until `stop`).
    fn failed(&mut self, error: &redis::RedisError, is_up: &AtomicBool, stop: &AtomicBool) {
        is_up.store(false, Ordering::Relaxed);
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            warn!("cluster: Redis link ({}) lost: {error}; retrying with backoff", self.what);
        }
        let until = Instant::now() + self.backoff;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    /// A new connection is up. Whatever was said while there was none may be lost, so the
    /// state machine hears of it.
    fn up(&mut self, is_up: &AtomicBool, shared: &Shared, inputs: &crossbeam_channel::Sender<Input>) {
        self.backoff = RETRY_FIRST;
        if let Some(since) = self.down_since.take() {
            info!("cluster: Redis link ({}) back after {} ms", self.what, since.elapsed().as_millis());
        }
        if self.connected_before {
            shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.connected_before = true;
        is_up.store(true, Ordering::Relaxed);
        let _ = inputs.try_send(Input::LinkUp);
    }
}

struct Publisher {
    client: redis::Client,
    bus: String,
    /// How long Redis keeps a cache channel's last event.
    cache_ttl_ms: u64,
    control: Receiver<Vec<u8>>,
    events: Receiver<Outgoing>,
    shared: Arc<Shared>,
    inputs: crossbeam_channel::Sender<Input>,
    stop: Arc<AtomicBool>,
}

impl Publisher {
    fn run(self) {
        let mut outage = Outage::new("publisher");
        let mut batch: Vec<Outgoing> = Vec::with_capacity(PIPELINE);
        let is_up = &self.shared.publisher_up;
        loop {
            let mut connection = match self.client.get_connection_with_timeout(RETRY_MAX) {
                Ok(connection) => connection,
                Err(e) => {
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    outage.failed(&e, is_up, &self.stop);
                    continue;
                }
            };
            outage.up(is_up, &self.shared, &self.inputs);
            loop {
                let stopping = self.stop.load(Ordering::Relaxed);
                self.next_batch(&mut batch, stopping);
                if batch.is_empty() {
                    if stopping {
                        return;
                    }
                    continue;
                }
                let mut pipe = redis::pipe();
                let mut bytes = 0;
                for outgoing in &batch {
                    match outgoing {
                        Outgoing::Publish(message) => {
                            pipe.cmd("PUBLISH").arg(&self.bus).arg(message.as_slice()).ignore();
                            bytes += message.len();
                        }
                        Outgoing::Keep { key, value } => {
                            pipe.cmd("SET").arg(key).arg(value.as_slice()).arg("PX").arg(self.cache_ttl_ms).ignore();
                            bytes += value.len();
                        }
                    }
                }
                match pipe.exec(&mut connection) {
                    Ok(()) => {
                        let stats = &self.shared.stats;
                        stats.messages_out.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        stats.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
                        batch.clear();
                    }
                    Err(e) => {
                        // Which of them Redis got is unknown: count them lost, and have the
                        // state machine send a snapshot once the link is back.
                        self.shared.stats.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        batch.clear();
                        let _ = self.inputs.try_send(Input::LostOutput);
                        if stopping {
                            return;
                        }
                        outage.failed(&e, is_up, &self.stop);
                        break;
                    }
                }
            }
        }
    }

    /// Fills `batch` with up to [`PIPELINE`] messages, control messages first, waiting a little
    /// for the first one (not at all once stopping: then only what is already queued).
    fn next_batch(&self, batch: &mut Vec<Outgoing>, stopping: bool) {
        if !stopping {
            select! {
                recv(self.control) -> message => batch.extend(message.ok().map(Outgoing::Publish)),
                recv(self.events) -> outgoing => batch.extend(outgoing.ok()),
                default(IDLE_WAIT) => {}
            }
        }
        while batch.len() < PIPELINE {
            match self.control.try_recv().map(Outgoing::Publish).or_else(|_| self.events.try_recv()) {
                Ok(outgoing) => batch.push(outgoing),
                Err(_) => break,
            }
        }
    }
}

struct Subscriber<M> {
    client: redis::Client,
    bus: String,
    me: Arc<str>,
    incarnation: u64,
    peers: Peers<M>,
    /// The node's frame pool: an event is framed here, once, for the whole node.
    pool: FramePool,
    inputs: crossbeam_channel::Sender<Input>,
    /// Asks the loader to read the cache channels' events back.
    load: Sender<()>,
    /// The node's apps, to find a channel's app by its id.
    apps: SharedApps,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

impl<M: From<Delivery>> Subscriber<M> {
    fn run(self) {
        let mut outage = Outage::new("subscriber");
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(e) = self.subscribed(&mut outage) {
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                outage.failed(&e, &self.shared.subscriber_up, &self.stop);
            }
        }
    }

    /// Subscribes and reads until the connection fails (an error) or the node stops (`Ok`).
    fn subscribed(&self, outage: &mut Outage) -> redis::RedisResult<()> {
        let mut connection = self.client.get_connection_with_timeout(RETRY_MAX)?;
        connection.set_read_timeout(Some(READ_WAIT))?;
        let mut pubsub = connection.as_pubsub();
        pubsub.subscribe(&self.bus)?;
        outage.up(&self.shared.subscriber_up, &self.shared, &self.inputs);
        // Subscribed first, read back second: a cache channel's event published in between is
        // seen both ways (the later one wins), never neither.
        let _ = self.load.try_send(());
        while !self.stop.load(Ordering::Relaxed) {
            match pubsub.get_message() {
                Ok(message) => self.received(message.get_payload_bytes()),
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn received(&self, bytes: &[u8]) {
        let envelope = match Envelope::decode(bytes) {
            Ok(envelope) => envelope,
            Err(e) => {
                // Something else publishes on our channel (a shared Redis and prefix?).
                warn!("cluster: {e}");
                return;
            }
        };
        if *envelope.node == *self.me && envelope.incarnation == self.incarnation {
            return; // Our own, back from Redis.
        }
        let stats = &self.shared.stats;
        stats.messages_in.fetch_add(1, Ordering::Relaxed);
        stats.bytes_in.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        match envelope.body {
            Body::Broadcast { channel, except, published_at_us, message } => {
                let Some(channel) = local_channel(&self.apps.load(), channel) else { return };
                let owner = owner_of(&channel, self.peers.len());
                let broadcast = RemoteBroadcast {
                    channel,
                    except: except.map(|(high, low)| SocketId { high, low }),
                    frame: text_frame(&self.pool, message),
                    published_at_us,
                };
                self.hand_to(owner, Delivery::Broadcast(broadcast));
            }
            Body::CacheMiss { channel } => {
                let Some(channel) = local_channel(&self.apps.load(), channel) else { return };
                self.hand_to(owner_of(&channel, self.peers.len()), Delivery::CacheMiss(channel));
            }
            Body::Terminate { app, user_id } => {
                let Some((app, _)) = self.apps.load().by_id(app).map(|(index, config)| (index, config.clone())) else { return };
                let user: Arc<str> = user_id.into();
                for worker in 0..self.peers.len() {
                    self.hand_to(WorkerId(worker), Delivery::Terminate(app, user.clone()));
                }
            }
            _ => {
                if self.inputs.send_timeout(Input::Remote(bytes.to_vec()), RETRY_MAX).is_err() {
                    error!("cluster: the state thread is not taking messages");
                }
            }
        }
    }

    /// Puts `delivery` in `worker`'s inbox, waiting for room if it is full (Redis buffers what
    /// arrives meanwhile; past its limit it drops this connection, and the resync repairs it).
    fn hand_to(&self, worker: WorkerId, delivery: Delivery) {
        hand_to(&self.peers, worker, delivery, &self.shared, &self.stop);
    }
}

/// Puts `delivery` in `worker`'s inbox, retrying with backoff while it is full, until it fits
/// or the node stops.
fn hand_to<M: From<Delivery>>(peers: &Peers<M>, worker: WorkerId, delivery: Delivery, shared: &Shared, stop: &AtomicBool) {
    let mut wait = Duration::from_millis(1);
    while !peers.send_now(worker, M::from(delivery.clone())) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        shared.stats.inbox_waits.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(64));
    }
}

/// Reads every cache channel's last event back from Redis when asked, and hands them to every
/// worker in slices of at most [`SCAN_COUNT`].
struct Loader<M> {
    client: redis::Client,
    /// `{prefix}:cache:`.
    prefix: String,
    /// The longest an event read back is kept (a key without an expiry was not set by Flux).
    ttl: Duration,
    requests: Receiver<()>,
    peers: Peers<M>,
    /// Frames the events (then copied exact-size, as the workers keep them).
    pool: FramePool,
    /// The node's apps, to find a channel's app by its id.
    apps: SharedApps,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

impl<M: From<Delivery>> Loader<M> {
    fn run(self) {
        while !self.stop.load(Ordering::Relaxed) {
            match self.requests.recv_timeout(IDLE_WAIT) {
                Ok(()) => {
                    if let Err(e) = self.load() {
                        // The subscriber's connection fails too, and asks again once it is back.
                        warn!("cluster: could not read the cache channels' events back from Redis: {e}");
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn load(&self) -> redis::RedisResult<()> {
        let mut connection = self.client.get_connection_with_timeout(RETRY_MAX)?;
        let pattern = format!("{}*", self.prefix);
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) =
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(SCAN_COUNT).query(&mut connection)?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
                }
                let replies: Vec<redis::Value> = pipe.query(&mut connection)?;
                let events: Vec<KeptEvent> = keys.iter().zip(replies.chunks(2)).filter_map(|(key, reply)| self.kept(key, reply)).collect();
                if !events.is_empty() {
                    self.shared.stats.last_events_loaded.fetch_add(events.len() as u64, Ordering::Relaxed);
                    let events: Arc<[KeptEvent]> = events.into();
                    for worker in 0..self.peers.len() {
                        hand_to(&self.peers, WorkerId(worker), Delivery::LastEvents(events.clone()), &self.shared, &self.stop);
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                self.shared.stats.last_event_loads.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
    }

    /// The event under `key`, from its `GET` and `PTTL` replies; `None` if it expired meanwhile
    /// or is not one of ours.
    fn kept(&self, key: &str, reply: &[redis::Value]) -> Option<KeptEvent> {
        let [redis::Value::BulkString(bytes), redis::Value::Int(ttl_ms)] = reply else { return None };
        let kept = match Kept::decode(bytes) {
            Ok(kept) => kept,
            Err(e) => {
                warn!("cluster: {key} in Redis is not a cache channel's event: {e}");
                return None;
            }
        };
        let remaining = match u64::try_from(*ttl_ms) {
            Ok(ms) => Duration::from_millis(ms).min(self.ttl),
            // -1: no expiry, so not set by a node; keep it as if just published.
            Err(_) if *ttl_ms == -1 => self.ttl,
            Err(_) => return None,
        };
        // `{prefix}{app id}:{channel}`: channel names hold no colon, app ids may.
        let channel = local_channel(&self.apps.load(), key.strip_prefix(&self.prefix)?.rsplit_once(':')?)?;
        Some(KeptEvent {
            channel,
            frame: Bytes::copy_from_slice(&text_frame(&self.pool, kept.message)),
            published_at_us: kept.published_at_us,
            remaining,
        })
    }
}

struct StateThread<M, F> {
    state: ClusterState,
    inputs: Receiver<Input>,
    control: crossbeam_channel::Sender<Vec<u8>>,
    peers: Peers<M>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    connections: F,
    /// The node's apps: their connections go out in heartbeats, and theirs elsewhere come in.
    apps: SharedApps,
}

impl<M: From<Delivery>, F: Fn() -> u64> StateThread<M, F> {
    fn run(mut self) {
        self.tell_nodes();
        while !self.stop.load(Ordering::Relaxed) {
            let wait = self.state.poll_timeout().saturating_duration_since(Instant::now()).min(IDLE_WAIT);
            match self.inputs.recv_timeout(wait) {
                Ok(input) => {
                    self.handle(input);
                    // Take what else is waiting before answering, so a burst is one answer.
                    while let Ok(input) = self.inputs.try_recv() {
                        self.handle(input);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if self.state.poll_timeout() <= now {
                let apps = self.apps.load();
                let per_app = apps.status().into_iter().map(|app| (app.id, app.counters.connections)).collect();
                self.state.set_connections((self.connections)(), per_app);
                self.state.handle_timeout(now);
                // Each app's connections on the other nodes, for its cluster-wide max_connections.
                let elsewhere = self.state.remote_app_connections();
                for (index, app) in apps.iter() {
                    if let Some(cells) = apps.cells(index) {
                        let count = elsewhere.get(app.app.id.as_str()).copied().unwrap_or(0);
                        cells.connections_elsewhere.store(count, Ordering::Relaxed);
                    }
                }
            }
            self.transmit(now);
            self.hand_out();
            self.publish_nodes(now);
        }
        // Stopping: say so, and let the publisher send it with what is queued.
        self.state.handle_stop();
        self.transmit(Instant::now());
    }

    fn handle(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Remote(bytes) => match Envelope::decode(&bytes) {
                Ok(envelope) => self.state.handle_message(&envelope, now),
                Err(e) => warn!("cluster: {e}"),
            },
            Input::Local(batch) => self.state.handle_local_occupancy(&batch, now),
            Input::Presence { channel, user_id, user_info } => self.state.handle_local_presence(channel, user_id, user_info, now),
            Input::LinkUp => self.state.handle_link_up(now),
            Input::LostOutput => self.state.handle_lost_output(now),
        }
    }

    /// Gives the workers what changed: the live nodes first (they decide who reports which
    /// webhook), then every worker the counts, and each owner worker its channels' members.
    fn hand_out(&mut self) {
        // The live nodes change only when one joins, leaves or dies.
        let mut nodes_changed = false;
        while let Some(event) = self.state.poll_event() {
            nodes_changed |= !matches!(event, NodeEvent::Restarted(_));
            match event {
                NodeEvent::Joined(node) => info!("cluster: node {node} joined"),
                NodeEvent::Restarted(node) => info!("cluster: node {node} restarted"),
                NodeEvent::Left(node) => info!("cluster: node {node} left"),
                NodeEvent::Died(node) => warn!("cluster: node {node} silent for the node timeout: declared dead"),
            }
        }
        if nodes_changed {
            self.tell_nodes();
        }
        if let Some(counts) = self.state.poll_remote_counts() {
            self.to_every_worker(Delivery::Occupancy(counts.into()));
        }
        if let Some(members) = self.state.poll_remote_members() {
            let workers = self.peers.len();
            let mut by_owner: Vec<Vec<RemoteMember>> = vec![Vec::new(); workers];
            for member in members {
                by_owner[owner_of(&member.channel, workers).0].push(member);
            }
            for (worker, members) in by_owner.into_iter().enumerate().filter(|(_, m)| !m.is_empty()) {
                hand_to(&self.peers, WorkerId(worker), Delivery::Presence(members.into()), &self.shared, &self.stop);
            }
        }
    }

    /// Tells every worker the live nodes, this one included.
    fn tell_nodes(&self) {
        self.to_every_worker(Delivery::Nodes(self.state.live_nodes().into()));
    }

    fn to_every_worker(&self, delivery: Delivery) {
        for worker in 0..self.peers.len() {
            hand_to(&self.peers, WorkerId(worker), delivery.clone(), &self.shared, &self.stop);
        }
    }

    fn transmit(&mut self, now: Instant) {
        while let Some(bytes) = self.state.poll_transmit() {
            if self.control.try_send(bytes).is_err() {
                self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.state.handle_lost_output(now);
                break;
            }
        }
    }

    fn publish_nodes(&self, now: Instant) {
        let nodes = self.state.nodes(now);
        if let Ok(mut shared) = self.shared.nodes.lock() {
            *shared = nodes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn passwords_stay_out_of_the_log() {
        assert_eq!(redacted("redis://user:secret@127.0.0.1:6379/0"), "redis://***@127.0.0.1:6379/0");
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
