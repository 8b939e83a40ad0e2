//! A shard of Pusher clients on one mio event loop: it connects its clients (from their source
//! addresses, at a bounded rate), completes the WebSocket handshake, subscribes, then reads
//! every event and measures it, and plays its clients' roles: slow consumers stop reading or
//! read late, partitioned clients drop and reconnect with backoff, churners leave and rejoin,
//! vacaters close all at once and stay away, victims of a node's death stay away, and the members
//! that remain count its members' removals.

use std::collections::{BTreeSet, HashSet};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use log::debug;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::Frame;

use flux::pusher::signature::channel_auth;
use flux::pusher::App;
use flux::ws::{Decoder, Incoming};

use crate::death::{Pending, Victims};
use crate::scenario::{Plan, SlowMode};
use crate::stats::{Role, Tick};
use crate::tls::Stream;

/// Linux's "connection in progress" from a non-blocking connect.
const EINPROGRESS: i32 = 115;
/// What a delayed reader takes per read.
const SLOW_READ_CHUNK: usize = 4096;
/// Reconnect backoff: first delay, and the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// After a stall, how long a slow consumer reads before its connection, still open, counts as
/// having survived the stall: long enough to read the backlog and a close frame behind it.
const STALL_GRACE: Duration = Duration::from_secs(2);
/// Largest server message the decoder accepts.
const MAX_MESSAGE: usize = 1 << 20;
const TICK: Duration = Duration::from_secs(1);

/// Commands from the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Command {
    /// Publishing begins: start the failure-injection clocks and sequence checks.
    Start,
    /// The run is over: report the last counts and close.
    Stop,
}

/// What a shard reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Report {
    /// The counts of the last second.
    Tick(Tick),
    /// The counts since the last tick; the shard has stopped.
    Done(Tick),
    /// The shard could not run, or its process ended before its last report.
    Failed(String),
}

enum Conn {
    Idle,
    Connecting(Stream),
    Handshake(Stream, Vec<u8>),
    Open(Stream),
}

impl Conn {
    fn stream(&mut self) -> Option<&mut Stream> {
        match self {
            Conn::Idle => None,
            Conn::Connecting(s) | Conn::Handshake(s, _) | Conn::Open(s) => Some(s),
        }
    }
}

struct Client {
    /// Its index in the plan, which is also its presence user id.
    id: usize,
    role: Role,
    source: Ipv4Addr,
    /// Index into the plan's nodes of the one it connects to, every time.
    node: usize,
    channels: Vec<usize>,
    conn: Conn,
    decoder: Decoder,
    /// Bytes not yet written (subscribe, pong): small and rare.
    out: Vec<u8>,
    /// Per subscribed channel, the sequence numbers seen.
    seen: Vec<SeqWindow>,
    /// Subscriptions asked for on this connection, and those confirmed.
    requested: usize,
    confirmed: usize,
    established: bool,
    /// Lost its connection at least once: its next full subscription is a reconnect.
    rejoining: bool,
    attempts: u32,
    /// Whether the loop reads this client's socket when it is readable.
    reading: bool,
    /// When its next scheduled action (reconnect, slow read, end of stall) is due.
    wake_at: Option<Instant>,
    /// node-death, a member on a node that lives on: the victims it has yet to see removed.
    pending: Option<Pending>,
    /// A slow consumer's stall (`stop` mode).
    stall: Stall,
}

/// Where a slow consumer is in a stall (see [`crate::stats::Stalls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    /// Not stalled: reading as it comes.
    Off,
    /// Not reading until its `wake_at`.
    Stalled,
    /// Reading again; if the connection still works at its `wake_at`, it survived.
    Grace,
}

/// The shard: its clients and its counts.
pub struct Shard<'p> {
    plan: &'p Plan,
    app: App,
    /// node-death: the users on the killed node.
    victims: Option<Victims>,
    poll: Poll,
    clients: Vec<Client>,
    to_connect: std::collections::VecDeque<usize>,
    connect_rate: u32,
    tick: Tick,
    started: Option<Instant>,
    stopping: bool,
    /// The partition time has come: partitioned clients dropped, vacaters closed.
    partitioned: bool,
    churners: Vec<usize>,
    next_churn: usize,
    churn_due: Option<Instant>,
    read_buf: Vec<u8>,
}

impl<'p> Shard<'p> {
    /// A shard for the plan's clients whose index is `index` modulo `count`.
    pub fn new(plan: &'p Plan, app: &App, index: usize, count: usize, connect_rate: u32) -> io::Result<Self> {
        let victims = Victims::of(plan);
        let clients: Vec<Client> = plan
            .clients
            .iter()
            .enumerate()
            .filter(|(i, _)| i % count == index)
            .map(|(id, spec)| Client {
                id,
                role: spec.role,
                source: spec.source,
                node: spec.node,
                channels: spec.channels.clone(),
                conn: Conn::Idle,
                decoder: Decoder::for_client(MAX_MESSAGE),
                out: Vec::new(),
                seen: vec![SeqWindow::default(); spec.channels.len()],
                requested: 0,
                confirmed: 0,
                established: false,
                rejoining: false,
                attempts: 0,
                reading: true,
                wake_at: None,
                pending: victims.as_ref().filter(|_| spec.role != Role::Victim).map(Pending::new),
                stall: Stall::Off,
            })
            .collect();
        // soak: the partitioned clients take their turns with the churners.
        let rolling = plan.injection.rolling;
        let churners = clients
            .iter()
            .enumerate()
            .filter(|(_, c)| c.role == Role::Churn || (rolling && c.role == Role::Partitioned))
            .map(|(i, _)| i)
            .collect();
        Ok(Shard {
            plan,
            app: app.clone(),
            victims,
            poll: Poll::new()?,
            to_connect: (0..clients.len()).collect(),
            clients,
            connect_rate: connect_rate.max(1),
            tick: Tick { delivered_per_node: vec![0; plan.nodes.len()], ..Tick::default() },
            started: None,
            stopping: false,
            partitioned: false,
            churners,
            next_churn: 0,
            churn_due: None,
            read_buf: vec![0; 256 * 1024],
        })
    }

    /// Runs until [`Command::Stop`], reporting once a second through `report`.
    pub fn run(mut self, commands: &Receiver<Command>, report: &mut dyn FnMut(Report)) -> io::Result<()> {
        let mut events = Events::with_capacity(4096);
        let mut next_tick = Instant::now() + TICK;
        let mut connect_budget = 0.0f64;
        let mut last_turn = Instant::now();
        let mut next_scan = Instant::now();
        loop {
            match commands.try_recv() {
                Ok(Command::Start) => self.start(Instant::now()),
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            connect_budget = (connect_budget + now.duration_since(last_turn).as_secs_f64() * f64::from(self.connect_rate))
                .min(f64::from(self.connect_rate) / 10.0);
            last_turn = now;
            while connect_budget >= 1.0 {
                let Some(i) = self.to_connect.pop_front() else {
                    break;
                };
                connect_budget -= 1.0;
                self.connect(i);
            }
            if now >= next_scan {
                next_scan = now + Duration::from_millis(20);
                self.scheduled(now);
            }
            if now >= next_tick {
                next_tick += TICK;
                self.gauges();
                report(Report::Tick(self.tick.take_deltas()));
            }
            match self.poll.poll(&mut events, Some(Duration::from_millis(10))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let read_at = unix_micros();
            for event in events.iter() {
                let i = event.token().0;
                if event.is_writable() {
                    self.writable(i);
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.readable(i, read_at, None);
                }
            }
        }
        self.stopping = true;
        self.gauges();
        report(Report::Done(self.tick.take_deltas()));
        Ok(())
    }

    fn start(&mut self, now: Instant) {
        self.started = Some(now);
        let plan = self.plan;
        let injection = &plan.injection;
        for i in 0..self.clients.len() {
            let client = &mut self.clients[i];
            if client.role != Role::Slow {
                continue;
            }
            if injection.slow_mode == SlowMode::Stop {
                // soak: one not subscribed yet stalls once it is.
                if !injection.rolling || client.confirmed == client.channels.len() {
                    self.begin_stall(i, now);
                }
            } else {
                client.reading = false;
                client.wake_at = Some(now + injection.read_delay);
                self.reregister(i);
            }
        }
        if injection.churn_per_sec > 0.0 && !self.churners.is_empty() {
            self.churn_due = Some(now);
        }
    }

    /// Due actions: reconnects, slow reads, the partition and the vacate storm, churn.
    fn scheduled(&mut self, now: Instant) {
        if let Some(started) = self.started {
            if !self.partitioned && !self.plan.injection.rolling && now >= started + self.plan.injection.partition_at {
                self.partitioned = true;
                for i in 0..self.clients.len() {
                    match self.clients[i].role {
                        Role::Partitioned => self.drop_connection(i, now, false),
                        Role::Vacater => self.vacate(i, now),
                        _ => {}
                    }
                }
                // Vacaters still waiting for their turn to connect stay away too.
                self.to_connect.retain(|&i| self.clients[i].role != Role::Vacater);
            }
        }
        while let Some(due) = self.churn_due.filter(|&d| d <= now) {
            // Each shard churns its share of the rate.
            let shards = (self.plan.clients.len() as f64 / self.clients.len().max(1) as f64).max(1.0);
            let interval = Duration::from_secs_f64(shards / self.plan.injection.churn_per_sec);
            self.churn_due = Some(due + interval);
            let i = self.churners[self.next_churn % self.churners.len()];
            self.next_churn += 1;
            if matches!(self.clients[i].conn, Conn::Open(_)) {
                if self.clients[i].role == Role::Churn {
                    self.leave(i);
                    self.clients[i].wake_at = Some(now + self.plan.injection.churn_away);
                } else {
                    // A reconnecting client loses its network: no close frame, back with backoff.
                    self.drop_connection(i, now, false);
                }
            }
        }
        for i in 0..self.clients.len() {
            let Some(due) = self.clients[i].wake_at.filter(|&d| d <= now) else {
                continue;
            };
            let client = &mut self.clients[i];
            client.wake_at = None;
            match (&client.conn, client.role) {
                (Conn::Idle, _) if !self.stopping => {
                    self.to_connect.push_back(i);
                }
                (Conn::Open(_), Role::Slow) if self.plan.injection.slow_mode == SlowMode::Delay => {
                    client.wake_at = Some(due + self.plan.injection.read_delay);
                    self.readable(i, unix_micros(), Some(SLOW_READ_CHUNK));
                }
                (Conn::Open(_), Role::Slow) if client.stall == Stall::Grace => {
                    client.stall = Stall::Off;
                    self.tick.stalls.survived += 1;
                    if self.plan.injection.rolling {
                        self.begin_stall(i, now);
                    }
                }
                (Conn::Open(_), Role::Slow) => {
                    client.reading = true;
                    if client.stall == Stall::Stalled {
                        client.stall = Stall::Grace;
                        client.wake_at = Some(now + STALL_GRACE);
                    }
                    self.reregister(i);
                    self.readable(i, unix_micros(), None);
                }
                _ => {}
            }
        }
    }

    /// A slow consumer stops reading for the stall time.
    fn begin_stall(&mut self, i: usize, now: Instant) {
        let client = &mut self.clients[i];
        if !matches!(client.conn, Conn::Open(_)) {
            return;
        }
        client.reading = false;
        client.stall = Stall::Stalled;
        client.wake_at = Some(now + self.plan.injection.stall);
        self.tick.stalls.begun += 1;
        self.reregister(i);
    }

    fn connect(&mut self, i: usize) {
        let client = &mut self.clients[i];
        let server = self.plan.nodes[client.node];
        let opened = open_socket(client.source, server, self.plan.injection.slow_receive_buffer.filter(|_| client.role == Role::Slow))
            .and_then(|socket| Stream::new(socket, self.plan.tls.as_ref(), server));
        match opened {
            Ok(mut stream) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if let Err(e) = self.poll.registry().register(&mut stream, Token(i), interest) {
                    debug!("register failed: {e}");
                    return self.schedule_reconnect(i, Instant::now());
                }
                client.conn = Conn::Connecting(stream);
            }
            Err(e) => {
                debug!("connect from {} failed: {e}", client.source);
                self.schedule_reconnect(i, Instant::now());
            }
        }
    }

    fn writable(&mut self, i: usize) {
        let key = self.app.key.clone();
        let Some(client) = self.clients.get_mut(i) else {
            return;
        };
        if let Conn::Connecting(stream) = &mut client.conn {
            if stream.take_error().ok().flatten().is_some() || stream.peer_addr().is_err() {
                return self.connection_lost(i, None);
            }
            client.out.extend_from_slice(upgrade_request(&key, self.plan.nodes[client.node]).as_bytes());
            let Conn::Connecting(stream) = std::mem::replace(&mut client.conn, Conn::Idle) else {
                return;
            };
            client.conn = Conn::Handshake(stream, Vec::new());
        }
        self.flush(i);
    }

    /// Writes pending bytes; keeps writable interest only while some remain.
    fn flush(&mut self, i: usize) {
        let client = &mut self.clients[i];
        let Some(stream) = client.conn.stream() else {
            return;
        };
        while !client.out.is_empty() {
            match stream.write(&client.out) {
                Ok(0) => break,
                Ok(n) => {
                    client.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.connection_lost(i, None),
            }
        }
        // TLS records of what was written (and of the handshake) that the socket did not take.
        if stream.flush().is_err() {
            return self.connection_lost(i, None);
        }
        self.reregister(i);
    }

    fn reregister(&mut self, i: usize) {
        let client = &mut self.clients[i];
        let tls_pending = client.conn.stream().is_some_and(|stream| stream.wants_write());
        let writable = !client.out.is_empty() || tls_pending || matches!(client.conn, Conn::Connecting(_));
        let interest = match (client.reading, writable) {
            (_, false) => Interest::READABLE,
            (true, true) => Interest::READABLE | Interest::WRITABLE,
            (false, true) => Interest::WRITABLE,
        };
        // A client that must not read still needs some interest; readable events are ignored.
        if let Some(stream) = client.conn.stream() {
            if self.poll.registry().reregister(stream, Token(i), interest).is_err() {
                self.connection_lost(i, None);
            }
        }
    }

    /// Reads what the socket has (at most `limit` bytes when given) and handles it.
    fn readable(&mut self, i: usize, read_at: u64, limit: Option<usize>) {
        let mut buf = std::mem::take(&mut self.read_buf);
        let len = limit.unwrap_or(buf.len()).min(buf.len());
        while let Some(client) = self.clients.get_mut(i) {
            if !client.reading && limit.is_none() {
                break;
            }
            let Some(stream) = client.conn.stream() else {
                break;
            };
            match stream.read(&mut buf[..len]) {
                Ok(0) => {
                    self.connection_lost(i, None);
                    break;
                }
                Ok(n) => {
                    if !self.received(i, &mut buf[..n], read_at) || limit.is_some() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.connection_lost(i, None);
                    break;
                }
            }
        }
        self.read_buf = buf;
    }

    /// Handles bytes from the server. Returns whether the connection is still open.
    fn received(&mut self, i: usize, bytes: &mut [u8], read_at: u64) -> bool {
        let client = &mut self.clients[i];
        let mut early;
        let bytes: &mut [u8] = match &mut client.conn {
            Conn::Handshake(_, head) => {
                head.extend_from_slice(bytes);
                match upgrade_reply(head) {
                    UpgradeReply::Incomplete => return true,
                    UpgradeReply::Refused(status) => {
                        debug!("handshake refused: {status}");
                        self.connection_lost(i, None);
                        return false;
                    }
                    UpgradeReply::Accepted { head_len } => early = head.split_off(head_len),
                }
                let Conn::Handshake(stream, _) = std::mem::replace(&mut client.conn, Conn::Idle) else {
                    return false;
                };
                client.conn = Conn::Open(stream);
                &mut early
            }
            Conn::Open(_) => bytes,
            _ => return false,
        };
        // The decoder is lent out so each message can be handled as it is decoded.
        let mut decoder = std::mem::replace(&mut client.decoder, Decoder::for_client(MAX_MESSAGE));
        let mut closed = None;
        let result = decoder.decode(bytes, &mut |message: Incoming<'_>| {
            match message {
                Incoming::Text(text) => self.message(i, text, read_at),
                Incoming::Close(close) => closed = Some(close.map_or(1005, |(code, _)| code)),
                _ => {}
            }
            flux::ws::Flow::Continue
        });
        if let Some(code) = closed {
            self.connection_lost(i, Some(code));
            return false;
        }
        if result.is_err() {
            self.connection_lost(i, None);
            return false;
        }
        let client = &mut self.clients[i];
        if matches!(client.conn, Conn::Open(_)) {
            client.decoder = decoder;
            return true;
        }
        false
    }

    fn message(&mut self, i: usize, text: &str, read_at: u64) {
        // Protocol events are told apart by name without parsing the message: in presence-storm
        // member events come by the million, and member lists are hundreds of kilobytes.
        if let Some(event) = field(text, "\"event\":\"").filter(|e| e.starts_with("pusher")) {
            return self.protocol_message(i, event, text, read_at);
        }
        let (Some(channel), Some((seq, sent_at))) = (field(text, "\"channel\":\""), sequence(text)) else {
            return;
        };
        let plan = self.plan;
        let client = &mut self.clients[i];
        let Some(slot) = client.channels.iter().position(|&c| plan.channels[c] == channel) else {
            return;
        };
        self.tick.delivered_per_node[client.node] += 1;
        let counts = &mut self.tick.roles[client.role.index()];
        counts.delivered += 1;
        self.tick.last_delivery_unix_us = read_at;
        let latency = read_at.saturating_sub(sent_at);
        counts.latency.record(latency);
        match client.seen[slot].see(seq) {
            Seen::New { skipped } => {
                counts.unique += 1;
                counts.seq_gaps += skipped;
            }
            Seen::Late => {
                counts.unique += 1;
                counts.late += 1;
            }
            Seen::Duplicate => counts.duplicates += 1,
        }
        if plan.track_completions {
            let completion = self.tick.completions.entry(sent_at).or_default();
            completion.deliveries += 1;
            completion.last_us = completion.last_us.max(latency);
        }
    }

    fn protocol_message(&mut self, i: usize, event: &str, text: &str, read_at: u64) {
        match event {
            "pusher:connection_established" => {
                let message: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
                let data: serde_json::Value = message["data"].as_str().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_default();
                let socket_id = data["socket_id"].as_str().unwrap_or("").to_string();
                let client = &mut self.clients[i];
                let user_id = client.id.to_string();
                client.established = true;
                client.attempts = 0;
                client.requested = client.channels.len();
                // One burst, as pusher-js subscribes to everything it holds once connected: a
                // frame each, written together.
                for &c in &client.channels {
                    let subscribe = subscribe_message(&self.app, &self.plan.channels[c], &socket_id, &user_id);
                    queue_text(&mut client.out, subscribe);
                }
                self.flush(i);
            }
            "pusher_internal:subscription_succeeded" if self.clients[i].confirmed == self.clients[i].channels.len() => {
                self.presence_resynced(i, text);
            }
            "pusher_internal:subscription_succeeded" => {
                let started = self.started.is_some();
                let client = &mut self.clients[i];
                client.confirmed += 1;
                if client.confirmed == client.channels.len() {
                    // Before publishing, the stream starts at 0; later, at whatever comes first.
                    let first = if started { None } else { Some(0) };
                    client.seen.iter_mut().for_each(|s| *s = SeqWindow::starting_at(first));
                    if client.rejoining {
                        client.rejoining = false;
                        self.tick.roles[client.role.index()].reconnects += 1;
                    }
                    // soak: a slow consumer back after its eviction stalls again.
                    let injection = &self.plan.injection;
                    if client.role == Role::Slow && started && injection.rolling && injection.slow_mode == SlowMode::Stop {
                        self.begin_stall(i, Instant::now());
                    }
                }
            }
            "pusher_internal:member_added" => {
                self.tick.member_events += 1;
                if let Some(joined_at) = number_after(text, JOINED_AT) {
                    self.tick.member_added_latency.record(read_at.saturating_sub(joined_at));
                }
            }
            "pusher_internal:member_removed" => {
                self.tick.member_events += 1;
                self.member_removed(i, text);
            }
            "pusher_internal:subscription_count" if self.clients[i].role == Role::Healthy => self.tick.count_events += 1,
            "pusher:ping" => self.send(i, r#"{"event":"pusher:pong","data":{}}"#.to_string()),
            "pusher:error" => debug!("pusher:error: {text}"),
            _ => {}
        }
    }

    /// A subscription_succeeded on a channel already confirmed: the server sent the whole roster
    /// again (its ring had no room for some changes). For node-death, the victims it no longer
    /// lists are removed for this member, as pusher-js would take them.
    fn presence_resynced(&mut self, i: usize, text: &str) {
        self.tick.presence_resyncs += 1;
        let (Some(victims), Some(pending), Some(_)) = (&self.victims, self.clients[i].pending.as_mut(), self.started) else {
            return;
        };
        let listed: HashSet<usize> = serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|event| serde_json::from_str::<Value>(event["data"].as_str()?).ok())
            .and_then(|data| data["presence"]["ids"].as_array().map(|ids| ids.iter().filter_map(|id| id.as_str()?.parse().ok()).collect()))
            .unwrap_or_default();
        let read_at = unix_micros();
        for removal in pending.resynced(victims, |client| listed.contains(&client)) {
            self.tick.removals.count(removal, read_at);
        }
    }

    /// node-death: counts a removal a remaining member read after the kill. It is timed when it
    /// is handled, not when the poll that found it returned: the poll after a death finds every
    /// remaining member readable with a thousand removals each, and handling them all takes this
    /// loop a second or more, which the members' completion times must include.
    fn member_removed(&mut self, i: usize, text: &str) {
        let (Some(victims), Some(pending), Some(_)) = (&self.victims, self.clients[i].pending.as_mut(), self.started) else {
            return;
        };
        // A user id that is not a plan index is nobody's: usize::MAX is no client.
        let user = number_after(text, USER_ID).and_then(|id| usize::try_from(id).ok()).unwrap_or(usize::MAX);
        self.tick.removals.count(pending.removed(victims, user), unix_micros());
    }

    /// Sends a text message as a masked client frame.
    fn send(&mut self, i: usize, text: String) {
        queue_text(&mut self.clients[i].out, text);
        self.flush(i);
    }

    /// A churner leaves politely: close frame, then the socket.
    fn leave(&mut self, i: usize) {
        let mut frame = Frame::close(None);
        frame.header_mut().mask = Some(fastrand::u32(..).to_ne_bytes());
        let client = &mut self.clients[i];
        let _ = frame.format(&mut client.out);
        if let Some(stream) = client.conn.stream() {
            let _ = stream.write(&client.out);
        }
        self.drop_connection(i, Instant::now(), false);
    }

    /// A vacater goes for good, without a close frame, as when a load balancer drops it: the
    /// server learns of it from the socket alone and must release every channel it held.
    fn vacate(&mut self, i: usize, now: Instant) {
        let client = &mut self.clients[i];
        // A reconnect it was waiting for is called off.
        client.wake_at = None;
        self.tick.subscriptions_vacated += client.requested as u64;
        self.tick.confirmed_subscriptions_vacated += client.confirmed as u64;
        self.drop_connection(i, now, true);
    }

    /// The server closed (with `code`), or the connection broke.
    fn connection_lost(&mut self, i: usize, code: Option<u16>) {
        let evicted = code == Some(flux::pusher::protocol::code::OVER_CAPACITY);
        let client = &mut self.clients[i];
        if evicted {
            self.tick.roles[client.role.index()].evicted += 1;
        } else if client.stall != Stall::Off {
            self.tick.stalls.closed += 1;
        }
        let now = Instant::now();
        // Slow consumers stay gone once evicted (but in soak, which evicts them again and again),
        // victims once their node is gone; the others come back like pusher-js does.
        let reconnect = match client.role {
            Role::Slow => self.plan.injection.rolling,
            Role::Victim => false,
            _ => true,
        };
        self.drop_connection(i, now, !reconnect);
    }

    /// Closes client `i`'s socket, counts the disconnect, and schedules its return.
    fn drop_connection(&mut self, i: usize, now: Instant, for_good: bool) {
        let client = &mut self.clients[i];
        let Some(stream) = client.conn.stream() else {
            return;
        };
        let _ = self.poll.registry().deregister(stream);
        let was_established = client.established;
        client.conn = Conn::Idle;
        client.out.clear();
        client.decoder = Decoder::for_client(MAX_MESSAGE);
        client.requested = 0;
        client.confirmed = 0;
        client.established = false;
        client.seen.iter_mut().for_each(|s| *s = SeqWindow::default());
        // A slow consumer's next connection reads its handshake; its stall is over.
        client.reading = true;
        client.stall = Stall::Off;
        if was_established {
            self.tick.roles[client.role.index()].disconnects += 1;
            client.rejoining = true;
        }
        if for_good {
            // A read it had scheduled (a delayed reader's next chunk) would find it idle and
            // connect it again.
            client.wake_at = None;
        } else if !self.stopping {
            self.schedule_reconnect(i, now);
        }
    }

    fn schedule_reconnect(&mut self, i: usize, now: Instant) {
        let client = &mut self.clients[i];
        client.conn = Conn::Idle;
        let backoff = if client.role == Role::Churn {
            self.plan.injection.churn_away
        } else {
            let exponential = BACKOFF_FIRST.saturating_mul(1 << client.attempts.min(5)).min(BACKOFF_MAX);
            // Jitter, so reconnecting clients do not arrive in lockstep.
            exponential.mul_f64(0.5 + fastrand::f64())
        };
        client.attempts += 1;
        client.wake_at = Some(now + backoff);
    }

    fn gauges(&mut self) {
        self.tick.connected = self.clients.iter().filter(|c| c.established).count() as u64;
        self.tick.subscribed = self.clients.iter().filter(|c| c.confirmed == c.channels.len()).count() as u64;
        self.tick.subscriptions = self.clients.iter().map(|c| c.confirmed as u64).sum();
    }
}

/// The sequence numbers of one channel a client has seen: all below `base`, and a window of 128
/// above it, so events that concurrent publishers deliver slightly out of order are neither
/// gaps nor duplicates. Numbers the window moves past unseen are remembered (the latest
/// [`SeqWindow::MISSING`] of them), so one that still comes is late, not a duplicate: an event
/// that reaches a client through a backlogged worker's inbox can trail those delivered directly
/// by thousands.
#[derive(Debug, Clone, Default)]
struct SeqWindow {
    /// The lowest number not yet seen (None: take the first one seen).
    base: Option<u64>,
    /// Bit i: `base + i` was seen.
    bits: u128,
    /// Numbers below `base` not seen: counted as skipped, still welcome.
    missing: BTreeSet<u64>,
}

/// What one sequence number was.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// First time; `skipped` numbers fell out of the window unseen to make room.
    New { skipped: u64 },
    /// First time, after the window had moved past it (it was counted as skipped then).
    Late,
    /// Seen before (or too old to tell).
    Duplicate,
}

impl SeqWindow {
    const SIZE: u64 = 128;
    /// Skipped numbers remembered, at most: a few hundred kilobytes for a client that loses
    /// everything, nothing for one that loses nothing.
    const MISSING: usize = 4096;

    fn starting_at(base: Option<u64>) -> Self {
        SeqWindow { base, ..SeqWindow::default() }
    }

    fn see(&mut self, seq: u64) -> Seen {
        let mut base = *self.base.get_or_insert(seq);
        if seq < base {
            return if self.missing.remove(&seq) { Seen::Late } else { Seen::Duplicate };
        }
        let mut skipped = 0;
        if seq - base >= Self::SIZE {
            let shift = seq - base - Self::SIZE + 1;
            let in_window = shift.min(Self::SIZE);
            let mask = if in_window == Self::SIZE { u128::MAX } else { (1u128 << in_window) - 1 };
            skipped = in_window - u64::from((self.bits & mask).count_ones()) + (shift - in_window);
            // The numbers leaving unseen, latest first: those beyond the window (none could be
            // seen), then the window's own gaps.
            let beyond = (base + in_window..base + shift).rev();
            let gaps = (0..in_window).rev().filter(|&j| self.bits & (1u128 << j) == 0).map(|j| base + j);
            self.missing.extend(beyond.chain(gaps).take(Self::MISSING));
            while self.missing.len() > Self::MISSING {
                self.missing.pop_first();
            }
            self.bits = if shift >= Self::SIZE { 0 } else { self.bits >> shift };
            base += shift;
        }
        let bit = 1u128 << (seq - base);
        if self.bits & bit != 0 {
            return Seen::Duplicate;
        }
        self.bits |= bit;
        let complete = u64::from(self.bits.trailing_ones());
        self.bits = if complete >= Self::SIZE { 0 } else { self.bits >> complete };
        self.base = Some(base + complete);
        Seen::New { skipped }
    }
}

/// Appends `text` to `out` as a masked client frame.
fn queue_text(out: &mut Vec<u8>, text: String) {
    let mut frame = Frame::message(text.into_bytes(), OpCode::Data(Data::Text), true);
    frame.header_mut().mask = Some(fastrand::u32(..).to_ne_bytes());
    // Writing into a Vec does not fail; were a frame ever refused, the missing reply would show
    // in the counts.
    let _ = frame.format(out);
}

/// The request that opens a Pusher WebSocket connection to the app with `key`.
pub fn upgrade_request(key: &str, server: SocketAddr) -> String {
    format!(
        "GET /app/{key}?protocol=7&client=flux-load&version=1 HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// The server's answer to an upgrade request, as far as it has arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum UpgradeReply {
    /// The response head is not complete yet.
    Incomplete,
    /// The server answered something other than 101; its status line.
    Refused(String),
    /// Switched to WebSocket; frames start `head_len` bytes in.
    Accepted { head_len: usize },
}

/// Reads the response head at the start of `received`.
pub fn upgrade_reply(received: &[u8]) -> UpgradeReply {
    let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
        return UpgradeReply::Incomplete;
    };
    if received.starts_with(b"HTTP/1.1 101") {
        return UpgradeReply::Accepted { head_len: end + 4 };
    }
    let status_line = received[..end].split(|&b| b == b'\r').next().unwrap_or_default();
    UpgradeReply::Refused(String::from_utf8_lossy(status_line).into_owned())
}

/// A non-blocking TCP connection from `source` to `server`, under way, with `receive_buffer` as
/// its `SO_RCVBUF` if given.
fn open_socket(source: Ipv4Addr, server: SocketAddr, receive_buffer: Option<usize>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes)?;
    }
    socket.bind(&SocketAddr::new(source.into(), 0).into())?;
    match socket.connect(&server.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// The string value of the JSON field starting with `prefix` (`"channel":"`), unescaped text only.
pub fn field<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    let start = text.find(prefix)? + prefix.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

/// The sequence number and send time (µs) at the start of an event's data: `"<seq> <ts> ..."`.
fn sequence(text: &str) -> Option<(u64, u64)> {
    let data = field(text, "\"data\":\"")?;
    let mut parts = data.split(' ');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Microseconds since the epoch: the clock publisher and clients share on one machine.
pub fn unix_micros() -> u64 {
    flux::clock::since_unix_epoch().as_micros() as u64
}

/// The key of a member's join time (µs since the epoch) in the user_info it subscribes with.
const JOINED_AT: &str = "joined_at_us";
/// The key of a member's user id, which is its client's index in the plan, so any shard can tell
/// whose a member_removed is.
const USER_ID: &str = "user_id";

/// The number that follows `key` in `text`, whatever quoting, escaping or spacing lies between:
/// member events carry the joiner's user_info inside their JSON-encoded data string.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits = rest.trim_start_matches(['\\', '"', ':', ' ']);
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// `pusher:subscribe` for `channel`: presence channels are signed with the app secret, as an
/// app's auth endpoint would, for a member whose `user_info` holds the join time.
fn subscribe_message(app: &App, channel: &str, socket_id: &str, user_id: &str) -> String {
    if !channel.starts_with("presence-") {
        return serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string();
    }
    let channel_data = serde_json::json!({"user_id": user_id, "user_info": {JOINED_AT: unix_micros()}}).to_string();
    let auth = channel_auth(app, socket_id, channel, Some(&channel_data));
    serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": channel_data}}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_window_tolerates_reordering_and_counts_what_is_lost() {
        let mut window = SeqWindow::starting_at(Some(0));
        let seen: Vec<Seen> = [0, 2, 1, 1, 3].into_iter().map(|n| window.see(n)).collect();
        assert_eq!(
            seen,
            [Seen::New { skipped: 0 }, Seen::New { skipped: 0 }, Seen::New { skipped: 0 }, Seen::Duplicate, Seen::New { skipped: 0 }]
        );
        // 4 and 5 never come: they are skipped once the window moves past them.
        assert_eq!(window.see(6), Seen::New { skipped: 0 });
        assert_eq!(window.see(6 + 128), Seen::New { skipped: 2 });
        // The window now covers 873..=1000: 7..=872 went by, all unseen but 134.
        assert_eq!(window.see(1_000), Seen::New { skipped: 866 - 1 });
        assert_eq!(window.see(3), Seen::Duplicate);
        // A skipped number that comes after all is late, once.
        assert_eq!(window.see(700), Seen::Late);
        assert_eq!(window.see(700), Seen::Duplicate);
        // Only the latest skipped numbers are remembered.
        let mut jumped = SeqWindow::starting_at(Some(0));
        assert_eq!(jumped.see(1_000_000), Seen::New { skipped: 1_000_000 - 127 });
        assert_eq!(jumped.missing.len(), SeqWindow::MISSING);
        assert_eq!(jumped.see(999_000), Seen::Late);
        assert_eq!(jumped.see(10), Seen::Duplicate);
        let mut fresh = SeqWindow::default();
        assert_eq!(fresh.see(42), Seen::New { skipped: 0 });
        assert_eq!(fresh.see(41), Seen::Duplicate);
    }

    /// Feeds `arrivals` to a fresh window; (unique, skipped, late, duplicates).
    fn tally(arrivals: impl Iterator<Item = u64>) -> (u64, u64, u64, u64) {
        let mut window = SeqWindow::starting_at(Some(0));
        let (mut unique, mut skipped, mut late, mut duplicates) = (0, 0, 0, 0);
        for n in arrivals {
            match window.see(n) {
                Seen::New { skipped: s } => (unique, skipped) = (unique + 1, skipped + s),
                Seen::Late => (unique, late) = (unique + 1, late + 1),
                Seen::Duplicate => duplicates += 1,
            }
        }
        (unique, skipped, late, duplicates)
    }

    #[test]
    fn publishes_through_other_nodes_may_trail_by_thousands_and_count_once() {
        // Publishes go to two nodes in turn; a client on the first gets the odd ones, published
        // to the other node, 2,000 numbers late: far beyond the window, so they are skipped, then
        // late, and none of them is a gap or a duplicate.
        const PUBLISHED: u64 = 20_000;
        const LAG: u64 = 2_000;
        let arrivals = (0..PUBLISHED + LAG).flat_map(|t| {
            let direct = (t < PUBLISHED && t % 2 == 0).then_some(t);
            let relayed = t.checked_sub(LAG).filter(|n| n % 2 == 1);
            direct.into_iter().chain(relayed)
        });
        let (unique, skipped, late, duplicates) = tally(arrivals);
        assert_eq!((unique, duplicates), (PUBLISHED, 0));
        assert_eq!(skipped, late);
        assert!(late > 0);
        // Nodes without a cluster: the client gets its own node's half and nothing else, and
        // counts the other half as skipped, but for the 65 odd numbers of the last window
        // (19,871..=19,998), which could still come.
        let (unique, skipped, late, duplicates) = tally((0..PUBLISHED).filter(|n| n % 2 == 0));
        assert_eq!((unique, late, duplicates), (PUBLISHED / 2, 0, 0));
        assert_eq!(skipped, PUBLISHED / 2 - 65);
    }

    #[test]
    fn events_are_read_whatever_the_key_order() {
        let flux = r#"{"event":"m","channel":"guild","data":"12 1700000000000000 xxxx"}"#;
        let other = r#"{"channel":"guild","data":"12 1700000000000000 xxxx","event":"m"}"#;
        for text in [flux, other] {
            assert_eq!(field(text, "\"channel\":\""), Some("guild"));
            assert_eq!(sequence(text), Some((12, 1_700_000_000_000_000)));
        }
        assert_eq!(sequence(r#"{"event":"m","channel":"c","data":"{\"x\":1}"}"#), None);
    }

    #[test]
    fn join_times_and_user_ids_are_found_inside_the_encoded_data() {
        let flux = r#"{"event":"pusher_internal:member_added","channel":"presence-g","data":"{\"user_id\":\"u\",\"user_info\":{\"joined_at_us\":1700000000000123}}"}"#;
        let spaced = r#"{"data": "{\"user_info\": {\"joined_at_us\": 42}}", "event": "pusher_internal:member_added"}"#;
        assert_eq!(number_after(flux, JOINED_AT), Some(1_700_000_000_000_123));
        assert_eq!(number_after(spaced, JOINED_AT), Some(42));
        assert_eq!(number_after(r#"{"data":"{}"}"#, JOINED_AT), None);
        let removed = r#"{"event":"pusher_internal:member_removed","channel":"presence-g","data":"{\"user_id\":\"2047\"}"}"#;
        assert_eq!(number_after(removed, USER_ID), Some(2047));
    }

    #[test]
    fn presence_subscriptions_are_signed_over_their_channel_data() {
        let app = App { id: "a".into(), key: "k".into(), secret: "s".into(), subscription_count_events: false };
        let message: serde_json::Value = serde_json::from_str(&subscribe_message(&app, "presence-g", "1.2", "u7")).unwrap();
        let data = &message["data"];
        let channel_data = data["channel_data"].as_str().unwrap();
        let member: serde_json::Value = serde_json::from_str(channel_data).unwrap();
        assert_eq!(member["user_id"], "u7");
        assert!(member["user_info"][JOINED_AT].as_u64().unwrap() > 0);
        let auth = data["auth"].as_str().unwrap();
        assert!(flux::pusher::signature::channel_auth_matches(&app, "1.2", "presence-g", Some(channel_data), auth));
        let public: serde_json::Value = serde_json::from_str(&subscribe_message(&app, "chat", "1.2", "u7")).unwrap();
        assert!(public["data"].get("auth").is_none());
    }
}
