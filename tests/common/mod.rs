//! Helpers for the loopback integration tests: an in-process gateway on a free port, Pusher
//! clients over tungstenite, and REST calls signed the way the official SDKs sign them.

#![allow(dead_code)] // Each test binary uses a different subset.

pub mod process;
pub mod redis;
pub mod tls;
pub mod webhook_receiver;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flux::config::Config;
use flux::gateway::{ConnectionSnapshot, Gateway};
use flux::pusher::signature::sign_query;
use flux::pusher::App;
use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// Settings for a test node: a free port on loopback, two workers, the default app.
pub fn config() -> Config {
    Config { port: 0, workers: Some(2), ..Config::default() }
}

/// Starts a gateway in this process.
pub fn start(config: &Config) -> Gateway {
    Gateway::start(config, false).expect("gateway starts")
}

/// The default app's credentials.
pub fn app() -> App {
    App::from_args(&Config::default().app)
}

/// A Pusher client over a blocking tungstenite WebSocket.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    pub socket_id: String,
}

/// Opens a WebSocket to `path` and returns it without reading anything.
pub fn open(addr: SocketAddr, path: &str) -> WebSocket<TcpStream> {
    open_on(TcpStream::connect(addr).expect("tcp connect"), addr, path)
}

/// A TCP connection to `addr` from the loopback address `source` (127.0.0.2, ...), as clients
/// on other hosts would come.
pub fn connect_from(source: std::net::Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect(&addr.into())?;
    Ok(socket.into())
}

/// Opens a WebSocket to `path` over `stream`, a TCP connection to `addr`.
pub fn open_on(stream: TcpStream, addr: SocketAddr, path: &str) -> WebSocket<TcpStream> {
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let (ws, _response) = tungstenite::client(format!("ws://{addr}{path}"), stream).expect("websocket handshake");
    ws
}

impl Client {
    /// Connects with the default app key and waits for `pusher:connection_established`.
    pub fn connect(addr: SocketAddr) -> Client {
        Client::connect_to(addr, "app-key")
    }

    /// Connects with app key `key` and waits for `pusher:connection_established`.
    pub fn connect_to(addr: SocketAddr, key: &str) -> Client {
        Client::connect_over(TcpStream::connect(addr).expect("tcp connect"), addr, key)
    }

    /// Connects over `stream` (a TCP connection to `addr`) with app key `key`, and waits for
    /// `pusher:connection_established`.
    pub fn connect_over(stream: TcpStream, addr: SocketAddr, key: &str) -> Client {
        let mut ws = open_on(stream, addr, &format!("/app/{key}?protocol=7&client=test&version=1"));
        let established = next_event(&mut ws);
        assert_eq!(established["event"], "pusher:connection_established", "{established}");
        let data: Value = serde_json::from_str(established["data"].as_str().expect("data is a string")).expect("data is JSON");
        let socket_id = data["socket_id"].as_str().expect("socket_id").to_string();
        Client { ws, socket_id }
    }

    /// Sends a JSON message.
    pub fn send(&mut self, message: Value) {
        self.ws.send(Message::text(message.to_string())).expect("send");
    }

    /// The next event (text message) from the server.
    pub fn next_event(&mut self) -> Value {
        next_event(&mut self.ws)
    }

    /// Subscribes and waits for the confirmation.
    pub fn subscribe(&mut self, channel: &str) {
        self.send(json!({"event": "pusher:subscribe", "data": {"channel": channel}}));
        let reply = self.next_event();
        assert_eq!(reply["event"], "pusher_internal:subscription_succeeded", "{reply}");
        assert_eq!(reply["channel"], channel);
    }
}

/// Subscribes `client` to presence `channel` as `user_id` (with `{"name": user_id}` as its
/// info), signed as an auth endpoint would, and returns the `subscription_succeeded`.
pub fn join_presence(client: &mut Client, channel: &str, user_id: &str) -> Value {
    join_presence_of(client, &app(), channel, user_id)
}

/// As [`join_presence`], signed for `app`.
pub fn join_presence_of(client: &mut Client, app: &App, channel: &str, user_id: &str) -> Value {
    let channel_data = json!({"user_id": user_id, "user_info": {"name": user_id}}).to_string();
    let auth = flux::pusher::signature::channel_auth(app, &client.socket_id, channel, Some(&channel_data));
    client.send(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": channel_data}}));
    let reply = client.next_event();
    assert_eq!(reply["event"], "pusher_internal:subscription_succeeded", "{reply}");
    reply
}

/// The next text message if one arrives within `within`.
pub fn poll_event(client: &mut Client, within: Duration) -> Option<Value> {
    client.ws.get_mut().set_read_timeout(Some(within)).expect("read timeout");
    let read = client.ws.read();
    client.ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    match read {
        Ok(Message::Text(text)) => Some(serde_json::from_str(&text).expect("server sends JSON")),
        Ok(other) => panic!("unexpected message {other:?}"),
        Err(tungstenite::Error::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
        Err(e) => panic!("read failed: {e}"),
    }
}

/// Reads until a text message arrives; panics on a close or a timeout.
pub fn next_event(ws: &mut WebSocket<TcpStream>) -> Value {
    loop {
        match ws.read().expect("read a message") {
            Message::Text(text) => return serde_json::from_str(&text).expect("server sends JSON"),
            Message::Close(frame) => panic!("closed by the server: {frame:?}"),
            _ => {}
        }
    }
}

/// Reads until the server's close frame and returns its code (messages before it are skipped).
pub fn close_code(ws: &mut WebSocket<TcpStream>) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => return None,
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    }
}

/// Close codes as numbers, for comparisons.
pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

/// A signed REST call; returns the status and the body.
pub fn rest(addr: SocketAddr, method: &str, path: &str, body: &str, params: &[(&str, &str)]) -> (u16, Value) {
    rest_as(&app(), addr, method, path, body, params)
}

/// A REST call signed with `app`'s key and secret; returns the status and the body.
pub fn rest_as(app: &App, addr: SocketAddr, method: &str, path: &str, body: &str, params: &[(&str, &str)]) -> (u16, Value) {
    let query = sign_query(app, method, path, body.as_bytes(), params, unix_now());
    let url = format!("http://{addr}{path}?{query}");
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let response = match method {
        "GET" => agent.get(&url).call(),
        "POST" => agent.post(&url).header("Content-Type", "application/json").send(body),
        other => panic!("unsupported method {other}"),
    }
    .expect("HTTP request");
    status_and_body(response)
}

/// An unsigned GET of `url` (health checks, or a REST call signed by hand); returns the status
/// and the body, as JSON when it is.
pub fn get(url: &str) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    status_and_body(agent.get(url).call().expect("HTTP request"))
}

/// A response's status, and its body as JSON when it is.
fn status_and_body(response: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.into_body().read_to_string().expect("response body");
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

/// Publishes `data` as `event` on `channels` through the REST API.
pub fn publish(addr: SocketAddr, channels: &[&str], event: &str, data: &str, except: Option<&str>) -> (u16, Value) {
    let mut body = json!({"name": event, "channels": channels, "data": data});
    if let Some(socket_id) = except {
        body["socket_id"] = json!(socket_id);
    }
    rest(addr, "POST", "/apps/app-id/events", &body.to_string(), &[])
}

/// An apps file of its own under the system's temp dir, removed when dropped.
pub struct AppsFile(pub std::path::PathBuf);

impl AppsFile {
    pub fn new(text: &str) -> AppsFile {
        let path = std::env::temp_dir().join(format!("flux-apps-{}-{}.toml", std::process::id(), fastrand::u64(..)));
        std::fs::write(&path, text).expect("write the apps file");
        AppsFile(path)
    }

    pub fn write(&self, text: &str) {
        std::fs::write(&self.0, text).expect("rewrite the apps file");
    }
}

impl Drop for AppsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads whatever each subscriber (a non-blocking raw socket) has, without blocking and without
/// allocating.
pub fn drain(subscribers: &mut [TcpStream], buf: &mut [u8]) {
    for socket in subscribers {
        while let Ok(n) = socket.read(buf) {
            if n == 0 {
                break;
            }
        }
    }
}

/// Publishes `events` numbered events of `size` bytes through `publish` (given each event's
/// data) to a channel that `peer`, a subscriber that reads nothing, is on; lets the writes
/// settle; and returns how many of those bytes the kernel took for it (neither queued in its
/// ring nor dropped from it), with its connection as the node sees it then. What the kernel
/// takes is hidden from the server: only what waits in the ring shows as backpressure.
pub fn bytes_the_kernel_took(
    node: &Gateway,
    peer: SocketAddr,
    events: u64,
    size: usize,
    mut publish: impl FnMut(&str),
) -> (u64, ConnectionSnapshot) {
    let filler = "x".repeat(size.saturating_sub(8));
    let started = Instant::now();
    for n in 0..events {
        publish(&format!("{n:08}{filler}"));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (peer, all) = (peer.to_string(), node.observer().connections(Duration::from_secs(2)));
    let connection = all.iter().find(|c| c.peer == peer).cloned();
    let connection = connection.unwrap_or_else(|| panic!("{peer} is gone after {:?}: {all:?}", started.elapsed()));
    let kept = connection.ring_len as u64 + connection.dropped;
    (events.saturating_sub(kept) * size as u64, connection)
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    condition()
}

/// A WebSocket upgrade request for the default app, as a client sends it.
pub const UPGRADE: &str = "GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                           Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Opens a raw TCP connection that has completed the WebSocket handshake.
pub fn raw_websocket(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(UPGRADE.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    stream
}

/// Reads server frames until a close frame; returns its code (frames before it are skipped).
pub fn read_close_code(stream: &mut TcpStream) -> u16 {
    read_close_code_after(stream, Vec::new())
}

/// Like [`read_close_code`], for a stream whose frames began in `buf` (bytes already read).
pub fn read_close_code_after(stream: &mut TcpStream, mut buf: Vec<u8>) -> u16 {
    let mut chunk = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(code) = take_close_code(&mut buf) {
            return code;
        }
        assert!(Instant::now() < deadline, "no close frame");
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "closed without a close frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Takes the whole server frames off the front of `buf` and returns the code of a close frame
/// among them; an incomplete frame stays for the next bytes.
pub fn take_close_code(buf: &mut Vec<u8>) -> Option<u16> {
    // Server frames are unmasked: opcode, length (7, 16 or 64 bits), payload.
    let mut pos = 0;
    while buf.len() >= pos + 2 {
        let (opcode, len7) = (buf[pos] & 0x0f, (buf[pos + 1] & 0x7f) as usize);
        let (header, len) = match len7 {
            126 if buf.len() >= pos + 4 => (4, u16::from_be_bytes([buf[pos + 2], buf[pos + 3]]) as usize),
            127 if buf.len() >= pos + 10 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&buf[pos + 2..pos + 10]);
                (10, u64::from_be_bytes(be) as usize)
            }
            126 | 127 => break,
            n => (2, n),
        };
        if buf.len() < pos + header + len {
            break;
        }
        if opcode == 0x8 {
            return Some(u16::from_be_bytes([buf[pos + header], buf[pos + header + 1]]));
        }
        pos += header + len;
    }
    buf.drain(..pos);
    None
}

/// A masked client text frame (the mask is fixed: tests need no secrecy).
pub fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The numbers of the "flood" events (data starting with an 8-digit number) that `next_event`
/// yields, until a "done" event; any other event fails the test.
pub fn flood_until_done(mut next_event: impl FnMut() -> Value) -> Vec<u64> {
    let mut seen = Vec::new();
    loop {
        let event = next_event();
        match event["event"].as_str() {
            Some("done") => return seen,
            Some("flood") => seen.push(event["data"].as_str().and_then(|d| d.get(..8)?.parse::<u64>().ok()).expect("numbered")),
            other => panic!("unexpected event {other:?}: {event}"),
        }
    }
}
