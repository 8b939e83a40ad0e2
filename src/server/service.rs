//! The seam between the I/O shell and what the connections are for.
//!
//! A worker moves bytes: it reads requests and frames, writes rings, and enforces backpressure,
//! eviction and the close handshake. Everything the bytes *mean* is a [`Service`]: the Pusher
//! gateway, or the echo server the WebSocket conformance suite runs against. Services never see
//! a socket; they act on connections through [`Conns`].

use std::time::{Duration, Instant};

use crate::fanout::ConnId;
use crate::http::{Request, Response};
use crate::ws::Incoming;

use super::conns::Conns;

/// What to do with an HTTP request.
#[derive(Debug)]
pub enum Routed<S> {
    /// Answer it; the connection stays open for more requests unless the client asked to close.
    Respond(Response),
    /// Upgrade the connection to WebSocket with this session.
    Upgrade(S),
    /// Upgrade, send `frame` (a `pusher:error`, say), then close with `code`: how Pusher refuses
    /// a connection, so that clients see the reason instead of a failed handshake.
    Refuse {
        /// The frame to send before the close.
        frame: bytes::Bytes,
        /// The close code.
        code: u16,
        /// The close reason.
        reason: &'static str,
    },
}

/// Why a WebSocket connection ended, as told to [`Service::on_close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client closed it (close frame, EOF, or a socket error).
    ByClient,
    /// The client broke the WebSocket protocol; it was closed with this code.
    ProtocolError(u16),
    /// It was a slow consumer, backpressured for this long, and was evicted with 4100.
    Evicted {
        /// How long it had been backpressured.
        backpressured_for: Duration,
        /// Frames dropped on its full ring over its life.
        dropped: u64,
        /// Frames still queued in its ring when it was evicted (discarded by the close).
        queued: usize,
    },
    /// The server is shutting down.
    Shutdown,
}

/// The application on top of a worker's connections.
pub trait Service: 'static {
    /// Per-connection state, from the WebSocket upgrade to the close.
    type Session;
    /// Messages other threads send this worker's service (broadcasts, queries, ...).
    type Message: Send + 'static;

    /// A complete HTTP request arrived on connection `id`.
    fn on_request(&mut self, conns: &mut Conns<Self::Session>, id: ConnId, request: &Request, now: Instant) -> Routed<Self::Session>;

    /// The WebSocket of connection `id` is open (its session is in `conns`).
    fn on_open(&mut self, conns: &mut Conns<Self::Session>, id: ConnId, now: Instant);

    /// A message or control frame arrived. Pings are answered by the worker before this call;
    /// close frames never reach it (see [`on_close`](Self::on_close)).
    fn on_message(&mut self, conns: &mut Conns<Self::Session>, id: ConnId, message: Incoming<'_>, now: Instant);

    /// The connection's WebSocket is over. Not called for connections the service itself
    /// closed with [`Conns::close`], which hands the session back directly.
    fn on_close(&mut self, conns: &mut Conns<Self::Session>, id: ConnId, session: Self::Session, why: Ended);

    /// Called about once a second (activity timers, periodic publishing of metrics).
    fn on_tick(&mut self, conns: &mut Conns<Self::Session>, now: Instant);

    /// A message from another thread.
    fn on_inbox(&mut self, conns: &mut Conns<Self::Session>, message: Self::Message, now: Instant);

    /// The end of a loop turn, before queued frames are flushed: send what was batched, and
    /// run the service's own timers that are due.
    fn on_turn_end(&mut self, conns: &mut Conns<Self::Session>, now: Instant);

    /// When the service's own next timer is due, so the loop wakes for it (and calls
    /// [`on_turn_end`](Self::on_turn_end)).
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}
