//! The Pusher gateway: the [`Service`] that gives Flux's connections their meaning, and
//! [`Gateway`], the running node.
//!
//! Each worker runs one [`PusherService`]. It owns that worker's sessions' channel registry,
//! its replica of the node's channel directory, and its end of the fan-out. Every broadcast —
//! from the REST API today, from client events, presence and a cluster adapter later — enters
//! through one seam, [`PusherService::publish`]: the event is serialized and framed once into a
//! pooled buffer, queued to this worker's subscribers, and the same bytes are handed to every
//! other worker that has subscribers of the channel.

pub mod evictions;
mod node;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_channel::Sender;
use log::{debug, warn};
use tungstenite::protocol::frame::coding::{Data, OpCode};

pub use node::{ConnectionSnapshot, Gateway, Observer};

use crate::fanout::directory::{Directory, Occupancy};
use evictions::{Eviction, EvictionLog};
use crate::fanout::pool::FramePool;
use crate::fanout::registry::Registry;
use crate::fanout::ring::Offer;
use crate::fanout::{ConnId, WorkerId};
use crate::http::{json_error, Request, Response};
use crate::metrics::{FanoutRecorder, WorkerMetrics};
use crate::pusher::protocol::{self, code, ChannelName, EventMessage, SocketId, PROTOCOL_VERSIONS};
use crate::pusher::rest::{self, Publish, RestContext};
use crate::pusher::session::{Action, Session, Timeouts};
use crate::pusher::App;
use crate::server::{Conns, Ended, Outbox, Routed, Service, WorkerContext};
use crate::webhooks::Webhooks;
use crate::ws::{data_frame, text_frame, EncodeError, Incoming};

/// What workers of a gateway send each other.
pub enum Message {
    /// A framed event for the local subscribers of a channel.
    Broadcast(Broadcast),
    /// A worker's new subscription count for a channel.
    Occupancy(Occupancy),
    /// A request for this worker's connections.
    Snapshot(Sender<Vec<ConnectionSnapshot>>),
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
}

/// Protocol settings shared by every worker.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The app.
    pub app: App,
    /// Activity and pong timeouts.
    pub timeouts: Timeouts,
    /// Largest event data.
    pub max_payload: usize,
    /// Where webhook events go: `settings.webhooks.emit(event)` from any worker, never
    /// blocking (a no-op when no webhook URL is set).
    pub webhooks: Webhooks,
}

/// One worker's Pusher service.
pub struct PusherService {
    id: WorkerId,
    settings: Arc<Settings>,
    registry: Registry,
    directory: Directory,
    outbox: Outbox<Message>,
    pool: FramePool,
    metrics: Arc<WorkerMetrics>,
    fanout_times: FanoutRecorder,
    socket_id_high: u32,
    socket_id_next: u32,
    /// Channels whose local count changed this turn; told to the other workers at turn end.
    changed_occupancy: Vec<ChannelName>,
    /// The node's eviction log, shared by every worker.
    evictions: Arc<EvictionLog>,
}

impl PusherService {
    /// The service of the worker described by `context`.
    pub fn new(context: WorkerContext<Message>, settings: Arc<Settings>, evictions: Arc<EvictionLog>) -> Self {
        let workers = context.peers.len();
        PusherService {
            id: context.id,
            settings,
            registry: Registry::new(),
            directory: Directory::new(workers),
            outbox: Outbox::new(context.peers),
            pool: context.pool,
            metrics: context.metrics,
            fanout_times: FanoutRecorder::default(),
            // Random per worker, so ids differ across workers, restarts and (later) nodes.
            socket_id_high: fastrand::u32(1..1_000_000_000),
            socket_id_next: fastrand::u32(1..1_000_000),
            changed_occupancy: Vec::new(),
            evictions,
        }
    }

    fn next_socket_id(&mut self) -> SocketId {
        self.socket_id_next = self.socket_id_next.wrapping_add(1).max(1);
        SocketId { high: self.socket_id_high, low: self.socket_id_next }
    }

    /// The one entry point of every broadcast: frames `publish` once and hands it to each
    /// worker with subscribers of its channel, this one included.
    pub fn publish(&mut self, conns: &mut Conns<Session>, publish: &Publish) -> Result<(), EncodeError> {
        let published_at = Instant::now();
        let message = EventMessage { event: &publish.event, channel: Some(&publish.channel), data: &publish.data, user_id: None };
        let frame = data_frame(&self.pool, OpCode::Data(Data::Text), |buf| Ok(serde_json::to_writer(buf, &message)?))?;
        WorkerMetrics::add(&self.metrics.counters.broadcasts, 1);
        let broadcast = Broadcast { channel: publish.channel.clone(), frame, except: publish.except, published_at };
        for worker in self.directory.workers_with(&publish.channel).iter() {
            if worker == self.id {
                self.deliver(conns, &broadcast);
            } else if !self.outbox.send(worker, Message::Broadcast(broadcast.clone())) {
                WorkerMetrics::add(&self.metrics.counters.inbox_overflows, 1);
                warn!("worker {} inbox full: broadcast on {} dropped for its subscribers", worker.0, publish.channel);
            }
        }
        Ok(())
    }

    /// Queues a broadcast to this worker's subscribers of its channel: per recipient, one
    /// reference-count increment and one ring slot.
    fn deliver(&mut self, conns: &mut Conns<Session>, broadcast: &Broadcast) {
        let Some(subscribers) = self.registry.subscribers(&broadcast.channel) else { return };
        let (mut queued, mut dropped) = (0u64, 0u64);
        for &id in subscribers {
            match conns.offer(id, &broadcast.frame, |s| Some(s.socket_id()) != broadcast.except) {
                Offer::Queued => queued += 1,
                Offer::Dropped => dropped += 1,
                Offer::Closed => {}
            }
        }
        let counters = &self.metrics.counters;
        WorkerMetrics::add(&counters.deliveries, queued);
        WorkerMetrics::add(&counters.drops, dropped);
        self.fanout_times.record(broadcast.published_at.elapsed());
    }

    fn subscribe(&mut self, conns: &mut Conns<Session>, id: ConnId, channel: String) {
        let name: ChannelName = self.registry.name(&channel).cloned().unwrap_or_else(|| channel.into());
        if let Some(count) = self.registry.subscribe(&name, id) {
            self.occupancy_changed(&name, count);
        }
        if let Some(session) = conns.session_mut(id) {
            session.subscribed(name.clone());
        }
        self.send_text(conns, id, &protocol::subscription_succeeded(&name));
    }

    fn unsubscribe(&mut self, id: ConnId, channel: &ChannelName) {
        if let Some(count) = self.registry.unsubscribe(channel, id) {
            self.occupancy_changed(channel, count);
        }
    }

    /// Applies a local count change to this worker's directory and marks it for the others.
    fn occupancy_changed(&mut self, channel: &ChannelName, count: u32) {
        self.directory.apply(&Occupancy { worker: self.id, channel: channel.clone(), count });
        if !self.changed_occupancy.contains(channel) {
            self.changed_occupancy.push(channel.clone());
        }
    }

    fn send_text(&self, conns: &mut Conns<Session>, id: ConnId, text: &str) {
        conns.send(id, &text_frame(&self.pool, text));
    }

    fn carry_out(&mut self, conns: &mut Conns<Session>, id: ConnId, action: Action, now: Instant) {
        match action {
            Action::None => {}
            Action::Reply(text) => self.send_text(conns, id, &text),
            Action::Subscribe(channel) => self.subscribe(conns, id, channel),
            Action::Unsubscribe(channel) => self.unsubscribe(id, &channel),
            Action::Close(code, reason) => {
                if let Some(session) = conns.close(id, code, reason, now) {
                    self.forget(id, session);
                }
            }
        }
    }

    fn forget(&mut self, id: ConnId, mut session: Session) {
        for channel in session.take_subscriptions() {
            self.unsubscribe(id, &channel);
        }
    }

    fn handle_rest(&mut self, conns: &mut Conns<Session>, request: &Request) -> Response {
        let unix_now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let context = RestContext {
            app: &self.settings.app,
            directory: &self.directory,
            unix_now,
            max_payload: self.settings.max_payload,
        };
        let outcome = rest::handle(request, &context);
        for publish in &outcome.publishes {
            if let Err(e) = self.publish(conns, publish) {
                warn!("could not frame an event for {}: {e}", publish.channel);
                return json_error(500, "could not encode the event");
            }
        }
        outcome.response
    }

    /// Decides whether `/app/{key}?protocol=N` may connect, Pusher's way.
    fn admit(&mut self, key: &str, request: &Request, now: Instant) -> Routed<Session> {
        let refuse = |pool: &FramePool, code: u16, message: &str, reason: &'static str| Routed::Refuse {
            frame: text_frame(pool, &protocol::error(Some(code), message)),
            code,
            reason,
        };
        if key != self.settings.app.key {
            let message = format!("App key {} does not exist", truncated(key));
            return refuse(&self.pool, code::APP_NOT_FOUND, &message, "App not found");
        }
        match request.query_param("protocol") {
            None => refuse(&self.pool, code::NO_PROTOCOL_VERSION, "No protocol version supplied", "No protocol version"),
            Some(version) => match version.parse::<u32>() {
                Err(_) => refuse(&self.pool, code::INVALID_VERSION_FORMAT, "Invalid version string format", "Invalid version"),
                Ok(v) if !PROTOCOL_VERSIONS.contains(&v) => {
                    let message = format!("Unsupported protocol version {v}; this server speaks 7");
                    refuse(&self.pool, code::UNSUPPORTED_PROTOCOL, &message, "Unsupported protocol version")
                }
                Ok(_) => Routed::Upgrade(Session::new(self.next_socket_id(), now)),
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

fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
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
            "/" | "/up" => Routed::Respond(Response::json(200, r#"{"ok":true}"#)),
            _ => Routed::Respond(json_error(404, "not found: WebSocket clients connect to /app/{key}, the REST API is under /apps/{id}")),
        }
    }

    fn on_open(&mut self, conns: &mut Conns<Session>, id: ConnId, _now: Instant) {
        let Some(session) = conns.session(id) else { return };
        let established = protocol::connection_established(session.socket_id(), self.settings.timeouts.activity.as_secs());
        self.send_text(conns, id, &established);
    }

    fn on_message(&mut self, conns: &mut Conns<Session>, id: ConnId, message: Incoming<'_>, now: Instant) {
        let Some(session) = conns.session_mut(id) else { return };
        let action = match message {
            Incoming::Text(text) => session.handle_text(text, now),
            Incoming::Binary(_) => {
                session.heard(now);
                Action::Reply(protocol::error(None, "Binary messages are not supported; send JSON text"))
            }
            Incoming::Ping(_) | Incoming::Pong(_) | Incoming::Close(_) => {
                session.heard(now);
                Action::None
            }
        };
        self.carry_out(conns, id, action, now);
    }

    fn on_close(&mut self, conns: &mut Conns<Session>, id: ConnId, session: Session, why: Ended) {
        debug!("socket {} closed: {why:?}", session.socket_id());
        if let Ended::Evicted { backpressured_for, dropped, queued } = why {
            self.evictions.record(Eviction {
                at_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
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
        let timeouts = self.settings.timeouts;
        let due: Vec<ConnId> =
            conns.sessions().filter(|(_, s)| s.poll_timeout(&timeouts) <= now).map(|(id, _)| id).collect();
        for id in due {
            if let Some(session) = conns.session_mut(id) {
                let action = session.handle_timeout(now, &timeouts);
                self.carry_out(conns, id, action, now);
            }
        }
        self.metrics.publish_fanout(&mut self.fanout_times);
    }

    fn on_inbox(&mut self, conns: &mut Conns<Session>, message: Message, now: Instant) {
        match message {
            Message::Broadcast(broadcast) => self.deliver(conns, &broadcast),
            Message::Occupancy(update) => self.directory.apply(&update),
            Message::Snapshot(reply) => {
                // The asker may have given up waiting; that is fine.
                let _ = reply.send(self.snapshot(conns, now));
            }
        }
    }

    fn on_turn_end(&mut self, _conns: &mut Conns<Session>, _now: Instant) {
        // Occupancy goes out before this turn's frames are flushed, so another worker learns of
        // a subscription before the client hears it succeeded. Updates carry absolute counts,
        // so one that finds an inbox full is simply sent again next turn.
        let mut unsent = Vec::new();
        for channel in std::mem::take(&mut self.changed_occupancy) {
            let count = self.registry.subscribers(&channel).map_or(0, |s| s.len() as u32);
            let mut all_sent = true;
            for worker in (0..self.outbox.workers()).map(WorkerId).filter(|&w| w != self.id) {
                let update = Occupancy { worker: self.id, channel: channel.clone(), count };
                all_sent &= self.outbox.send(worker, Message::Occupancy(update));
            }
            if !all_sent {
                WorkerMetrics::add(&self.metrics.counters.inbox_overflows, 1);
                unsent.push(channel);
            }
        }
        self.changed_occupancy = unsent;
        self.outbox.wake_all();
    }
}
