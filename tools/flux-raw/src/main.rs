//! flux-raw: the raw loopback limit that BENCHMARKS.md measures Flux against.
//!
//! A minimal Pusher-speaking writer: it accepts WebSocket clients, answers
//! `pusher:connection_established` and `pusher_internal:subscription_succeeded`, and for every
//! REST publish frames each channel's event once and writes that one frame to every subscriber
//! socket, one `write(2)` per socket, as fast as the kernel takes it. No rings, no pool policy,
//! no eviction, no request signatures, no metrics: what is left is the cost the kernel sets, so
//! "Flux / raw" is Flux's overhead over the physical limit of the same machine.
//!
//! Bytes the kernel refuses wait in an unbounded per-socket backlog (a benchmark reference, not a
//! server). One mio loop per thread; the threads share the port with SO_REUSEPORT, and a publish
//! received by one thread reaches the others through a channel and a `Waker`.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use crossbeam_channel::{Receiver, Sender};
use log::{error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use flux::fanout::pool::FramePool;
use flux::http::{json_error, Request, RequestReader, Response};
use flux::pusher::protocol::{self, EventMessage, SocketId};
use flux::ws::{text_frame, upgrade_response, Decoder, Flow, Incoming};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;
const MAX_MESSAGE: usize = 64 * 1024;
const ACTIVITY_TIMEOUT_SECS: u64 = 120;

/// flux-raw: the raw loopback limit (one pre-encoded frame written to every subscriber socket).
#[derive(Debug, Parser)]
#[command(name = "flux-raw", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port for WebSocket clients and REST publishes (0 picks one; the log says which).
    #[arg(long, default_value_t = 6001)]
    port: u16,
    /// Event-loop threads (default: one per core, like Flux's workers).
    #[arg(long)]
    threads: Option<usize>,
}

/// The frames of one publish: each channel's event, framed once.
type Broadcast = Arc<Vec<(String, Bytes)>>;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    match run(SocketAddr::new(args.host, args.port), threads) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("flux-raw: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(addr: SocketAddr, threads: usize) -> io::Result<()> {
    // The first listener picks the port when 0 was asked for; the others join it.
    let first = reuse_port_listener(addr)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(reuse_port_listener(addr)?);
    }
    let polls = (0..threads).map(|_| Poll::new()).collect::<io::Result<Vec<_>>>()?;
    let mut peers = Vec::new();
    let mut inboxes = Vec::new();
    for poll in &polls {
        let (tx, rx) = crossbeam_channel::unbounded();
        peers.push((tx, Arc::new(Waker::new(poll.registry(), WAKER)?)));
        inboxes.push(rx);
    }
    info!("flux-raw listening on {addr} with {threads} threads");
    let pool = FramePool::default();
    let handles: Vec<_> = polls
        .into_iter()
        .zip(listeners)
        .zip(inboxes)
        .enumerate()
        .map(|(index, ((poll, listener), inbox))| {
            let others = peers.iter().enumerate().filter(|&(i, _)| i != index).map(|(_, p)| p.clone()).collect();
            let mut event_loop = Loop::new(index, poll, listener, inbox, others, pool.clone())?;
            Ok(std::thread::spawn(move || event_loop.run()))
        })
        .collect::<io::Result<_>>()?;
    for handle in handles {
        if let Ok(Err(e)) = handle.join() {
            error!("flux-raw thread: {e}");
        }
    }
    Ok(())
}

fn reuse_port_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(TcpListener::from_std(socket.into()))
}

enum State {
    /// Reading HTTP requests: an upgrade or a REST publish.
    Http(RequestReader),
    /// A WebSocket client.
    WebSocket(Decoder),
}

struct Conn {
    stream: TcpStream,
    state: State,
    channels: Vec<String>,
    /// Bytes the kernel did not take yet.
    backlog: Vec<u8>,
    wants_writable: bool,
}

/// What a client's message asks for, gathered while its bytes are decoded.
enum Action {
    Subscribe(String),
    Send(String),
    Close,
}

struct Loop {
    index: usize,
    poll: Poll,
    listener: TcpListener,
    inbox: Receiver<Broadcast>,
    others: Vec<(Sender<Broadcast>, Arc<Waker>)>,
    pool: FramePool,
    conns: Slab<Conn>,
    subscribers: HashMap<String, Vec<usize>>,
    next_socket: u32,
    read_buf: Vec<u8>,
}

impl Loop {
    fn new(
        index: usize,
        poll: Poll,
        mut listener: TcpListener,
        inbox: Receiver<Broadcast>,
        others: Vec<(Sender<Broadcast>, Arc<Waker>)>,
        pool: FramePool,
    ) -> io::Result<Loop> {
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Loop {
            index,
            poll,
            listener,
            inbox,
            others,
            pool,
            conns: Slab::new(),
            subscribers: HashMap::new(),
            next_socket: 0,
            read_buf: vec![0; 64 * 1024],
        })
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {
                        while let Ok(broadcast) = self.inbox.try_recv() {
                            self.deliver(&broadcast);
                        }
                    }
                    Token(key) => {
                        if event.is_writable() {
                            self.flush(key);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.readable(key);
                        }
                    }
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    if self.poll.registry().register(&mut stream, Token(entry.key()), Interest::READABLE).is_ok() {
                        entry.insert(Conn {
                            stream,
                            state: State::Http(RequestReader::new(MAX_HEAD, MAX_BODY)),
                            channels: Vec::new(),
                            backlog: Vec::new(),
                            wants_writable: false,
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of file descriptors, say: the next readiness event retries.
                    warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn readable(&mut self, key: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(key) else { return };
            match conn.stream.read(&mut self.read_buf) {
                Ok(0) => return self.close(key),
                Ok(n) => {
                    let mut input = std::mem::take(&mut self.read_buf);
                    let open = self.received(key, &mut input[..n]);
                    self.read_buf = input;
                    if !open {
                        return self.close(key);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.close(key),
            }
        }
    }

    /// Handles bytes from connection `key`; false when it must close.
    fn received(&mut self, key: usize, input: &mut [u8]) -> bool {
        let Some(conn) = self.conns.get_mut(key) else { return false };
        let mut actions = Vec::new();
        match &mut conn.state {
            State::Http(reader) => {
                reader.push(input);
                loop {
                    let Some(conn) = self.conns.get_mut(key) else { return false };
                    let State::Http(reader) = &mut conn.state else { break };
                    match reader.next_request() {
                        Ok(Some(request)) if request.header_has_token("upgrade", "websocket") => {
                            let rest = reader.take_rest();
                            if !self.upgrade(key, &request) {
                                return false;
                            }
                            let mut rest = rest;
                            return rest.is_empty() || self.received(key, &mut rest);
                        }
                        Ok(Some(request)) => {
                            let response = self.rest(&request);
                            self.send(key, &response);
                        }
                        Ok(None) => break,
                        Err(_) => return false,
                    }
                }
            }
            State::WebSocket(decoder) => {
                let decoded = decoder.decode(input, &mut |incoming| match incoming {
                    Incoming::Text(text) => {
                        client_message(text, &mut actions);
                        Flow::Continue
                    }
                    Incoming::Close(_) => {
                        actions.push(Action::Close);
                        Flow::Stop
                    }
                    _ => Flow::Continue,
                });
                if decoded.is_err() {
                    return false;
                }
            }
        }
        for action in actions {
            match action {
                Action::Subscribe(channel) => {
                    let reply = text_frame(&self.pool, &protocol::subscription_succeeded(&channel));
                    self.subscribers.entry(channel.clone()).or_default().push(key);
                    if let Some(conn) = self.conns.get_mut(key) {
                        conn.channels.push(channel);
                    }
                    self.send(key, &reply);
                }
                Action::Send(text) => {
                    let frame = text_frame(&self.pool, &text);
                    self.send(key, &frame);
                }
                Action::Close => return false,
            }
        }
        true
    }

    /// Answers a WebSocket upgrade and greets the client; false when it was refused.
    fn upgrade(&mut self, key: usize, request: &Request) -> bool {
        let Ok(response) = upgrade_response(request) else { return false };
        self.send(key, &response);
        self.next_socket += 1;
        let socket_id = SocketId { high: self.index as u32 + 1, low: self.next_socket };
        let hello = text_frame(&self.pool, &protocol::connection_established(socket_id, ACTIVITY_TIMEOUT_SECS));
        self.send(key, &hello);
        if let Some(conn) = self.conns.get_mut(key) {
            conn.state = State::WebSocket(Decoder::new(MAX_MESSAGE));
        }
        true
    }

    /// A REST call: `POST .../events` publishes; anything else gets `{}`, so probes succeed.
    fn rest(&mut self, request: &Request) -> Vec<u8> {
        if request.method == "POST" && request.path.ends_with("/events") {
            match self.frames_of(&request.body) {
                Some(broadcast) => {
                    for (tx, waker) in &self.others {
                        if tx.send(broadcast.clone()).is_ok() {
                            let _ = waker.wake();
                        }
                    }
                    self.deliver(&broadcast);
                }
                None => return json_error(400, "expected {name, data, channels}").to_bytes(false),
            }
        }
        Response::json(200, "{}").to_bytes(false)
    }

    /// Frames a publish body's event once per channel.
    fn frames_of(&self, body: &[u8]) -> Option<Broadcast> {
        let body: serde_json::Value = serde_json::from_slice(body).ok()?;
        let name = body["name"].as_str()?;
        let data = body["data"].as_str()?;
        let channels: Vec<&str> = match body["channels"].as_array() {
            Some(list) => list.iter().filter_map(|c| c.as_str()).collect(),
            None => vec![body["channel"].as_str()?],
        };
        let frames = channels
            .into_iter()
            .map(|channel| {
                let message = EventMessage { event: name, channel: Some(channel), data, user_id: None };
                let text = serde_json::to_string(&message).unwrap_or_default();
                (channel.to_string(), text_frame(&self.pool, &text))
            })
            .collect();
        Some(Arc::new(frames))
    }

    /// Writes each frame to every local subscriber of its channel.
    fn deliver(&mut self, broadcast: &Broadcast) {
        let mut broken = Vec::new();
        for (channel, frame) in broadcast.iter() {
            let Some(keys) = self.subscribers.get(channel) else { continue };
            for &key in keys {
                if let Some(conn) = self.conns.get_mut(key) {
                    if !write_or_queue(&self.poll, key, conn, frame) {
                        broken.push(key);
                    }
                }
            }
        }
        for key in broken {
            self.close(key);
        }
    }

    fn send(&mut self, key: usize, bytes: &[u8]) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if !write_or_queue(&self.poll, key, conn, bytes) {
            self.close(key);
        }
    }

    /// Writes the backlog of a socket that became writable.
    fn flush(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        while !conn.backlog.is_empty() {
            match conn.stream.write(&conn.backlog) {
                Ok(n) => {
                    conn.backlog.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.close(key),
            }
        }
        conn.wants_writable = false;
        let _ = self.poll.registry().reregister(&mut conn.stream, Token(key), Interest::READABLE);
    }

    fn close(&mut self, key: usize) {
        let Some(mut conn) = self.conns.try_remove(key) else { return };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        for channel in conn.channels {
            if let Some(keys) = self.subscribers.get_mut(&channel) {
                keys.retain(|&k| k != key);
            }
        }
    }
}

/// Writes `bytes` now if nothing is queued before them, else queues them; false when the
/// socket is broken.
fn write_or_queue(poll: &Poll, key: usize, conn: &mut Conn, bytes: &[u8]) -> bool {
    let mut written = 0;
    if conn.backlog.is_empty() {
        while written < bytes.len() {
            match conn.stream.write(&bytes[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }
    if written < bytes.len() {
        conn.backlog.extend_from_slice(&bytes[written..]);
        if !conn.wants_writable {
            conn.wants_writable = true;
            let interest = Interest::READABLE | Interest::WRITABLE;
            return poll.registry().reregister(&mut conn.stream, Token(key), interest).is_ok();
        }
    }
    true
}

/// Reads what a client's text message asks for: subscriptions and pings.
fn client_message(text: &str, actions: &mut Vec<Action>) {
    let Ok(message) = serde_json::from_str::<serde_json::Value>(text) else { return };
    match message["event"].as_str() {
        Some("pusher:subscribe") => {
            if let Some(channel) = message["data"]["channel"].as_str() {
                actions.push(Action::Subscribe(channel.to_string()));
            }
        }
        Some("pusher:ping") => actions.push(Action::Send(protocol::pong())),
        _ => {}
    }
}
