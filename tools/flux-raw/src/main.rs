//! flux-raw: the raw loopback limit that BENCHMARKS.md measures Flux against.
//!
//! A minimal Pusher-speaking writer: it accepts WebSocket clients, answers
//! `pusher:connection_established` and `pusher_internal:subscription_succeeded`, and for every
//! REST publish frames each channel's event once and writes that one frame to every subscriber
//! socket, one write per socket, as fast as the kernel takes it. No rings, no pool policy,
//! no eviction, no request signatures, no metrics: what is left is the cost the kernel sets, so
//! "Flux / raw" is Flux's overhead over the physical limit of the same machine.
//!
//! That naive limit pays one write per frame, which on loopback also pays the receiver's TCP
//! work per frame. With `--frames-per-write N` a socket's broadcast frames are held until N are
//! there, [`MAX_HOLD`] at most, and go out in one `writev(2)`, as Flux's write coalescing sends
//! them: the limit for a server that batches. (With N = 1 each frame is a `writev` of one
//! buffer, which the kernel treats as the `write(2)` it was before.)
//!
//! Bytes the kernel refuses wait in an unbounded per-socket backlog (a benchmark reference, not a
//! server). With `--tls-cert` and `--tls-key` the sockets speak TLS (see [`tls`]), so the limit
//! includes encryption too. One mio loop per thread; the threads share the port with SO_REUSEPORT, and a publish
//! received by one thread reaches the others through a channel and a `Waker`.

use std::collections::HashMap;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use crossbeam_channel::{Receiver, Sender};
use log::{error, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use flux::fanout::pool::FramePool;
use flux::http::{json_error, Request, RequestReader, Response};
use flux::pusher::protocol::{self, EventMessage, SocketId};
use flux::server::{TlsConfig, TlsFiles};
use flux::ws::{text_frame, upgrade_response, Decoder, Flow, Incoming};

mod tls;
use tls::Stream;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;
const MAX_MESSAGE: usize = 64 * 1024;
const ACTIVITY_TIMEOUT_SECS: u64 = 120;
/// The most frames one write may carry: the size of the `writev` array on the stack.
const MAX_FRAMES_PER_WRITE: usize = 64;
/// Longest a held frame waits for others to share its write: Flux's default
/// `FLUX_WRITE_COALESCE_US`, so the batched limit is measured at Flux's latency budget.
const MAX_HOLD: Duration = Duration::from_millis(10);

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
    /// Broadcast frames a socket collects before they go out in one `writev(2)` (a frame held
    /// for 10 ms goes out with what there is). 1: one write per frame, the naive limit.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=MAX_FRAMES_PER_WRITE as i64))]
    frames_per_write: u16,
    /// TLS certificate chain (PEM): with --tls-key, clients speak TLS (checked as Flux checks it).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

/// The frames of one publish: each channel's event, framed once.
type Broadcast = Arc<Vec<(String, Bytes)>>;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => match (TlsFiles { cert, key }).load(std::time::SystemTime::now()) {
            Ok(config) => Some(config),
            Err(e) => {
                error!("flux-raw: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    match run(SocketAddr::new(args.host, args.port), threads, usize::from(args.frames_per_write), tls) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("flux-raw: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(addr: SocketAddr, threads: usize, frames_per_write: usize, tls: Option<TlsConfig>) -> io::Result<()> {
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
    let over = if tls.is_some() { "TLS" } else { "plain TCP" };
    info!("flux-raw listening on {addr} with {threads} threads, {frames_per_write} frame(s) per write, over {over}");
    let pool = FramePool::default();
    let handles: Vec<_> = polls
        .into_iter()
        .zip(listeners)
        .zip(inboxes)
        .enumerate()
        .map(|(index, ((poll, listener), inbox))| {
            let others = peers.iter().enumerate().filter(|&(i, _)| i != index).map(|(_, p)| p.clone()).collect();
            let mut event_loop = Loop::new(index, poll, listener, inbox, others, pool.clone(), frames_per_write, tls.clone())?;
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
    stream: Stream,
    state: State,
    channels: Vec<String>,
    /// Frames waiting for the next write: fewer than `frames_per_write`.
    held: Vec<Bytes>,
    /// Whether the connection is in its loop's list of those holding frames.
    listed: bool,
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
    frames_per_write: usize,
    /// Connections that held frames since the last timed write, each once.
    holding: Vec<usize>,
    /// When the held frames go out, whatever their number.
    write_held_at: Option<Instant>,
    /// The TLS settings of a TLS port.
    tls: Option<TlsConfig>,
}

impl Loop {
    #[allow(clippy::too_many_arguments)]
    fn new(
        index: usize,
        poll: Poll,
        mut listener: TcpListener,
        inbox: Receiver<Broadcast>,
        others: Vec<(Sender<Broadcast>, Arc<Waker>)>,
        pool: FramePool,
        frames_per_write: usize,
        tls: Option<TlsConfig>,
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
            frames_per_write,
            holding: Vec::new(),
            write_held_at: None,
            tls,
        })
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.write_held_at.map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
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
            if self.write_held_at.is_some_and(|at| at <= Instant::now()) {
                self.write_all_held();
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((socket, _)) => {
                    let Ok(mut stream) = Stream::new(socket, self.tls.as_ref()) else {
                        warn!("could not start a TLS session");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    if self.poll.registry().register(&mut stream, Token(entry.key()), Interest::READABLE).is_ok() {
                        entry.insert(Conn {
                            stream,
                            state: State::Http(RequestReader::new(MAX_HEAD, MAX_BODY)),
                            channels: Vec::new(),
                            held: Vec::new(),
                            listed: false,
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
                            self.send(key, response);
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
                    self.send(key, reply);
                }
                Action::Send(text) => {
                    let frame = text_frame(&self.pool, &text);
                    self.send(key, frame);
                }
                Action::Close => return false,
            }
        }
        true
    }

    /// Answers a WebSocket upgrade and greets the client; false when it was refused.
    fn upgrade(&mut self, key: usize, request: &Request) -> bool {
        let Ok(response) = upgrade_response(request) else { return false };
        self.send(key, response);
        self.next_socket += 1;
        let socket_id = SocketId { high: self.index as u32 + 1, low: self.next_socket };
        let hello = text_frame(&self.pool, &protocol::connection_established(socket_id, ACTIVITY_TIMEOUT_SECS));
        self.send(key, hello);
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

    /// Gives each frame to every local subscriber of its channel: written at once, or held
    /// until the subscriber has `frames_per_write` of them.
    fn deliver(&mut self, broadcast: &Broadcast) {
        let mut broken = Vec::new();
        for (channel, frame) in broadcast.iter() {
            let Some(keys) = self.subscribers.get(channel) else { continue };
            for &key in keys {
                let Some(conn) = self.conns.get_mut(key) else { continue };
                conn.held.push(frame.clone());
                if conn.held.len() >= self.frames_per_write {
                    if !write_held(&self.poll, key, conn) {
                        broken.push(key);
                    }
                } else if !conn.listed {
                    conn.listed = true;
                    self.holding.push(key);
                }
            }
        }
        if !self.holding.is_empty() && self.write_held_at.is_none() {
            self.write_held_at = Some(Instant::now() + MAX_HOLD);
        }
        for key in broken {
            self.close(key);
        }
    }

    /// Writes every held frame: their time is up.
    fn write_all_held(&mut self) {
        self.write_held_at = None;
        for key in std::mem::take(&mut self.holding) {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            conn.listed = false;
            if !write_held(&self.poll, key, conn) {
                self.close(key);
            }
        }
    }

    /// Sends a reply now, after the frames held before it.
    fn send(&mut self, key: usize, bytes: impl Into<Bytes>) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        conn.held.push(bytes.into());
        if !write_held(&self.poll, key, conn) {
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
        match conn.stream.flush() {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return, // TLS records still waiting.
            Err(_) => return self.close(key),
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

/// Writes a connection's held frames in one `writev` if nothing is queued before them, and
/// queues what the kernel does not take; false when the socket is broken.
fn write_held(poll: &Poll, key: usize, conn: &mut Conn) -> bool {
    if conn.held.is_empty() {
        return true;
    }
    let mut slices = [IoSlice::new(&[]); MAX_FRAMES_PER_WRITE];
    for (slice, frame) in slices.iter_mut().zip(&conn.held) {
        *slice = IoSlice::new(frame);
    }
    // Never more than `frames_per_write`: a broadcast writes when it makes that many, and a
    // reply is written as soon as it is held.
    let mut unwritten = &mut slices[..conn.held.len()];
    if conn.backlog.is_empty() {
        while !unwritten.is_empty() {
            match conn.stream.write_vectored(unwritten) {
                Ok(n) => IoSlice::advance_slices(&mut unwritten, n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }
    let queued = !unwritten.is_empty() || conn.stream.wants_write();
    for slice in unwritten.iter() {
        conn.backlog.extend_from_slice(slice);
    }
    conn.held.clear();
    if queued && !conn.wants_writable {
        conn.wants_writable = true;
        let interest = Interest::READABLE | Interest::WRITABLE;
        return poll.registry().reregister(&mut conn.stream, Token(key), interest).is_ok();
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

#[cfg(test)]
mod tests {
    use super::*;
    use mio::net::TcpStream;

    /// A connection to a blocking loopback peer, registered with `poll`.
    fn connection(poll: &Poll) -> (Conn, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut stream = Stream::new(TcpStream::connect(listener.local_addr().unwrap()).unwrap(), None).unwrap();
        let (peer, _) = listener.accept().unwrap();
        poll.registry().register(&mut stream, Token(0), Interest::READABLE).unwrap();
        let conn = Conn {
            stream,
            state: State::WebSocket(Decoder::new(MAX_MESSAGE)),
            channels: Vec::new(),
            held: Vec::new(),
            listed: false,
            backlog: Vec::new(),
            wants_writable: false,
        };
        (conn, peer)
    }

    #[test]
    fn held_frames_go_out_together_in_order_and_what_is_refused_waits_in_the_backlog() {
        let poll = Poll::new().unwrap();
        let (mut conn, mut peer) = connection(&poll);
        conn.held.extend([Bytes::from_static(b"one "), Bytes::from_static(b"two "), Bytes::from_static(b"three")]);
        assert!(write_held(&poll, 0, &mut conn));
        assert!(conn.held.is_empty() && conn.backlog.is_empty());
        let mut received = [0; 13];
        peer.read_exact(&mut received).unwrap();
        assert_eq!(&received, b"one two three");

        // With bytes already waiting, held frames queue behind them instead of overtaking.
        conn.backlog.extend_from_slice(b"first ");
        conn.held.push(Bytes::from_static(b"second"));
        assert!(write_held(&poll, 0, &mut conn));
        assert_eq!(conn.backlog, b"first second");
        assert!(conn.wants_writable);
    }
}
