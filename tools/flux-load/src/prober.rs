//! The connect prober: while the server deals with a storm, it opens a fresh WebSocket
//! connection every [`PROBE_INTERVAL`], one at a time, and times it from `connect()` to
//! `pusher:connection_established`, which is what a user arriving during the storm waits. Each
//! probe is then closed. Reading the server's reply is [`Reply`], which holds no socket; the
//! blocking socket work around it runs on the coordinator's prober thread.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use log::warn;
use serde::Serialize;

use flux::ws::{Decoder, Flow, Incoming};

use crate::clients::{field, upgrade_reply, upgrade_request, UpgradeReply};
use crate::publisher::pace;
use crate::stats::{Latency, LatencyMs};
use crate::tls::TlsClient;

/// A probe's connection, plain or TLS.
trait Duplex: Read + Write {}
impl<T: Read + Write> Duplex for T {}

/// Time between the starts of two probes (a probe that takes longer delays the next).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// A probe not established by then counts as timed out.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many probes in one run: 100 s of probing.
const MAX_PROBES: u32 = 2_000;
/// How often a wait, here or in the storm watch, looks whether the run has ended.
pub const STOP_CHECK: Duration = Duration::from_millis(100);
/// Largest message the prober decodes; `connection_established` is about 100 bytes.
const MAX_MESSAGE: usize = 64 * 1024;

/// What the probes found.
#[derive(Debug, Default)]
pub struct Probes {
    /// Established within [`PROBE_TIMEOUT`].
    pub established: u64,
    /// Refused, reset or closed before they were established.
    pub refused: u64,
    /// Not established within [`PROBE_TIMEOUT`].
    pub timed_out: u64,
    /// From `connect()` to `pusher:connection_established`, for those established.
    pub connect: Latency,
}

/// [`Probes`] as the JSON summary carries them.
#[derive(Debug, Serialize)]
pub struct ProbeSummary {
    /// Probes made.
    pub probes: u64,
    /// Established within the timeout.
    pub established: u64,
    /// Refused, reset, or closed before they were established.
    pub refused: u64,
    /// Not established within the timeout.
    pub timed_out: u64,
    /// Time to `connection_established`, in milliseconds.
    pub connect_ms: LatencyMs,
}

impl Probes {
    /// Probes that were not established.
    pub fn failed(&self) -> u64 {
        self.refused + self.timed_out
    }

    /// The figures for the summary.
    pub fn summary(&self) -> ProbeSummary {
        ProbeSummary {
            probes: self.established + self.failed(),
            established: self.established,
            refused: self.refused,
            timed_out: self.timed_out,
            connect_ms: self.connect.summary(),
        }
    }
}

/// Probes `server` until `stop` is set (or [`MAX_PROBES`] are done). A probe under way when
/// `stop` is set is not counted.
pub fn run(server: SocketAddr, key: &str, tls: Option<&TlsClient>, stop: &AtomicBool) -> Probes {
    let mut probes = Probes::default();
    let mut next = Instant::now();
    for _ in 0..MAX_PROBES {
        pace(next);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let began = Instant::now();
        next = began + PROBE_INTERVAL;
        match probe(server, key, tls, began + PROBE_TIMEOUT, stop) {
            Outcome::Established => {
                probes.established += 1;
                probes.connect.record(began.elapsed().as_micros() as u64);
            }
            Outcome::Refused(why) => {
                probes.refused += 1;
                if probes.refused <= 3 {
                    warn!("connect probe refused: {why}");
                }
            }
            Outcome::TimedOut => probes.timed_out += 1,
            Outcome::Stopped => break,
        }
    }
    probes
}

/// How one probe ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Established,
    Refused(String),
    TimedOut,
    /// The run ended while it waited.
    Stopped,
}

/// One probe: connect, upgrade, wait for `connection_established`; the socket closes on return.
fn probe(server: SocketAddr, key: &str, tls: Option<&TlsClient>, deadline: Instant, stop: &AtomicBool) -> Outcome {
    let socket = match TcpStream::connect_timeout(&server, PROBE_TIMEOUT) {
        Ok(socket) => socket,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => return Outcome::TimedOut,
        Err(e) => return Outcome::Refused(format!("connect: {e}")),
    };
    // A handle on the socket's options, whatever is layered over it. The TLS handshake runs
    // inside the first write, so the probe's timeout bounds it from the start.
    let control = match socket.try_clone().and_then(|control| control.set_read_timeout(Some(PROBE_TIMEOUT)).map(|()| control)) {
        Ok(control) => control,
        Err(e) => return Outcome::Refused(format!("socket: {e}")),
    };
    let mut stream: Box<dyn Duplex> = match tls {
        Some(tls) => match tls.blocking(socket, server) {
            Ok(tls) => Box::new(tls),
            Err(e) => return Outcome::Refused(format!("TLS: {e}")),
        },
        None => Box::new(socket),
    };
    match stream.write_all(upgrade_request(key, server).as_bytes()) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Outcome::TimedOut,
        Err(e) => return Outcome::Refused(format!("sending the upgrade: {e}")),
    }
    let mut reply = Reply::default();
    let mut buf = vec![0; 16 * 1024];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Outcome::Stopped;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Outcome::TimedOut;
        }
        // Short reads, so the stop flag is seen; a zero timeout would mean none at all.
        if let Err(e) = control.set_read_timeout(Some(left.min(STOP_CHECK))) {
            return Outcome::Refused(format!("socket: {e}"));
        }
        match stream.read(&mut buf) {
            Ok(0) => return Outcome::Refused("closed before connection_established".into()),
            Ok(n) => match reply.received(&mut buf[..n]) {
                Progress::Waiting => {}
                Progress::Established => return Outcome::Established,
                Progress::Refused(why) => return Outcome::Refused(why),
            },
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
            Err(e) => return Outcome::Refused(format!("read: {e}")),
        }
    }
}

/// Where a probe's reply stands.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Nothing decisive yet.
    Waiting,
    /// `pusher:connection_established` arrived.
    Established,
    /// The upgrade was refused, or the server closed or sent something unreadable first.
    Refused(String),
}

/// The server's reply to one probe, read as it arrives: the response head, then frames.
#[derive(Debug, Default)]
struct Reply {
    head: Vec<u8>,
    /// Set once the upgrade was accepted.
    frames: Option<Decoder>,
}

impl Reply {
    /// Takes the next bytes from the server.
    fn received(&mut self, bytes: &mut [u8]) -> Progress {
        let Some(decoder) = &mut self.frames else {
            self.head.extend_from_slice(bytes);
            return match upgrade_reply(&self.head) {
                UpgradeReply::Incomplete => Progress::Waiting,
                UpgradeReply::Refused(status) => Progress::Refused(format!("upgrade answered {status}")),
                UpgradeReply::Accepted { head_len } => {
                    let mut early = self.head.split_off(head_len);
                    self.frames = Some(Decoder::for_client(MAX_MESSAGE));
                    self.received(&mut early)
                }
            };
        };
        let mut progress = Progress::Waiting;
        let decoded = decoder.decode(bytes, &mut |message: Incoming<'_>| {
            progress = match message {
                Incoming::Text(text) if field(text, "\"event\":\"") == Some("pusher:connection_established") => Progress::Established,
                Incoming::Close(close) => Progress::Refused(format!("closed with {}", close.map_or(1005, |(code, _)| code))),
                _ => return Flow::Continue,
            };
            Flow::Stop
        });
        match decoded {
            Err(e) => Progress::Refused(format!("unreadable frames: {e}")),
            Ok(()) => progress,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked) carrying `payload` with `opcode`.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126, "a one-byte length only");
        let mut frame = vec![0x80 | opcode, payload.len() as u8];
        frame.extend_from_slice(payload);
        frame
    }

    const ESTABLISHED: &str = r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":120}"}"#;

    #[test]
    fn a_reply_is_established_however_it_is_split() {
        let mut whole = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
        whole.extend(server_frame(0x1, ESTABLISHED.as_bytes()));
        for split in [1, 20, 58, 60, whole.len() - 1] {
            let mut reply = Reply::default();
            let (first, second) = whole.split_at(split);
            assert_eq!(reply.received(&mut first.to_vec()), Progress::Waiting, "split at {split}");
            assert_eq!(reply.received(&mut second.to_vec()), Progress::Established, "split at {split}");
        }
    }

    #[test]
    fn a_refused_upgrade_or_an_early_close_is_a_refusal() {
        let mut reply = Reply::default();
        let refused = reply.received(&mut b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec());
        assert_eq!(refused, Progress::Refused("upgrade answered HTTP/1.1 503 Service Unavailable".into()));

        let mut closed = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec();
        closed.extend(server_frame(0x8, &4100u16.to_be_bytes()));
        assert_eq!(Reply::default().received(&mut closed), Progress::Refused("closed with 4100".into()));
    }

    #[test]
    fn other_messages_before_the_established_one_are_waited_through() {
        let mut reply = Reply::default();
        let mut head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec();
        head.extend(server_frame(0x9, b""));
        assert_eq!(reply.received(&mut head), Progress::Waiting);
        assert_eq!(reply.received(&mut server_frame(0x1, ESTABLISHED.as_bytes())), Progress::Established);
    }
}
