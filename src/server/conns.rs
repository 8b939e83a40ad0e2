//! A worker's connections: each one a socket (with its TLS session on a TLS port), the phase it
//! is in (HTTP, open WebSocket, closing), and its outbound ring.
//!
//! [`Conns`] is the only way a [`Service`](super::Service) touches connections: it can queue
//! frames, offer a broadcast frame, read and change sessions, and close. It never performs I/O;
//! queued connections are marked dirty and the worker flushes them at the end of its loop turn,
//! so everything queued to one socket in a turn leaves in one vectored write. A frame that can
//! wait ([`Flush::By`]) does not make its connection dirty: it leaves with the next write that
//! goes out anyway, or when its deadline comes, whichever is first.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::net::TcpStream;
use rustls::ServerConnection;
use slab::Slab;
use socket2::SockRef;

use crate::fanout::pool::FramePool;
use crate::fanout::ring::{Offer, Outbound};
use crate::fanout::ConnId;
use crate::http::RequestReader;
use crate::metrics::WorkerMetrics;
use crate::ws::{close_frame, Decoder};

/// What happens once a closing connection's ring is flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFlush {
    /// Close the socket (the peer closed first, or broke the protocol).
    Drop,
    /// An HTTP response that ends the connection: once written, shut down our side and discard
    /// input until the peer closes or the deadline passes, so a client still sending its body
    /// reads the response instead of a connection reset.
    Linger,
    /// We sent the first close frame: wait for the peer's, until the deadline.
    AwaitPeerClose,
}

/// Where a connection is in its life.
pub(crate) enum Phase<S> {
    /// Reading HTTP requests.
    Http(RequestReader),
    /// An open WebSocket.
    Open { decoder: Decoder, session: S },
    /// A close is queued; the session is gone. The decoder, if kept, watches for the peer's close.
    Closing { decoder: Option<Decoder>, then: AfterFlush },
}

/// One connection.
pub(crate) struct Connection<S> {
    pub(crate) socket: TcpStream,
    /// The TLS session on a TLS port; `None` on a plain one, so a plain connection pays one
    /// branch for TLS and nothing else. Boxed: a session is a few hundred bytes that plain
    /// connections should not carry in every slab entry.
    pub(crate) tls: Option<Box<ServerConnection>>,
    pub(crate) peer: SocketAddr,
    pub(crate) phase: Phase<S>,
    pub(crate) outbound: Outbound,
    /// When the current phase times out (an HTTP request, or the close handshake).
    pub(crate) deadline: Option<Instant>,
    /// Queued since the last flush; in `Conns::dirty`.
    pub(crate) dirty: bool,
    /// Holds frames that may wait until this deadline; queued in `Conns::deferred` with it. A
    /// write takes the frames along and clears it.
    pub(crate) deferred_until: Option<Instant>,
    /// Writable interest is registered.
    pub(crate) writable_interest: bool,
    /// Not yet an open WebSocket: counted against the caps on unfinished handshakes until it
    /// opens or goes (see [`super::pending`]).
    pub(crate) pending: bool,
    /// Input is not read: its replies have no room (see [`Outbound::may_read`]). The worker
    /// resumes it when a flush makes room.
    pub(crate) reading_paused: bool,
}

/// What a service may know about a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Frames queued.
    pub ring_len: usize,
    /// The ring's bound.
    pub ring_slots: usize,
    /// Frames dropped on a full ring.
    pub dropped: u64,
    /// How long it has been backpressured, if it is.
    pub backpressured_for: Option<Duration>,
}

/// Limits that shape every connection of a worker.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Outbound ring bound, in frames.
    pub ring_slots: usize,
    /// Largest HTTP request head.
    pub max_head: usize,
    /// Largest HTTP request body.
    pub max_body: usize,
    /// Largest WebSocket message.
    pub max_message: usize,
    /// How long a closing connection waits for the peer's close frame.
    pub close_linger: Duration,
    /// The kernel send buffer (`SO_SNDBUF`) of every accepted socket; `None`: the kernel's
    /// autotuning. Only what the socket cannot take waits in the ring, where backpressure is
    /// seen, so this bounds both the kernel memory a slow consumer pins and how far behind it
    /// falls before its eviction clock starts.
    pub send_buffer: Option<usize>,
}

impl ConnLimits {
    /// Sets up a freshly accepted socket: no Nagle delay (frames are written whole, and small
    /// ones must not wait), and the send buffer.
    pub(crate) fn tune(&self, socket: &TcpStream) -> std::io::Result<()> {
        socket.set_nodelay(true)?;
        if let Some(bytes) = self.send_buffer {
            // Setting it also turns the kernel's autotuning off for this socket.
            SockRef::from(socket).set_send_buffer_size(bytes)?;
        }
        Ok(())
    }
}

/// When a queued frame must be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// At the end of this loop turn.
    Now,
    /// With the connection's next write, and no later than this instant: for frames whose
    /// receivers tolerate delay (presence changes), so they do not cost a write of their own.
    By(Instant),
}

/// A worker's connection table.
pub struct Conns<S> {
    pub(crate) slab: Slab<Connection<S>>,
    pub(crate) dirty: Vec<ConnId>,
    /// Connections holding frames that may wait, with their deadlines, earliest first: every
    /// deferral waits the same window, so deadlines arrive in order. An entry whose connection
    /// was written meanwhile (its `deferred_until` no longer matches) is skipped.
    pub(crate) deferred: VecDeque<(ConnId, Instant)>,
    pub(crate) limits: ConnLimits,
    pool: FramePool,
    metrics: Arc<WorkerMetrics>,
}

impl<S> Conns<S> {
    pub(crate) fn new(limits: ConnLimits, pool: FramePool, metrics: Arc<WorkerMetrics>) -> Self {
        Conns { slab: Slab::with_capacity(1024), dirty: Vec::with_capacity(1024), deferred: VecDeque::new(), limits, pool, metrics }
    }

    pub(crate) fn insert(&mut self, socket: TcpStream, tls: Option<Box<ServerConnection>>, peer: SocketAddr, deadline: Instant) -> ConnId {
        let reader = RequestReader::new(self.limits.max_head, self.limits.max_body);
        ConnId(self.slab.insert(Connection {
            socket,
            tls,
            peer,
            phase: Phase::Http(reader),
            outbound: Outbound::new(self.limits.ring_slots),
            deadline: Some(deadline),
            dirty: false,
            deferred_until: None,
            writable_interest: false,
            pending: true,
            reading_paused: false,
        }))
    }

    /// The frame pool, for encoding frames.
    pub fn pool(&self) -> &FramePool {
        &self.pool
    }

    /// This worker's metrics.
    pub fn metrics(&self) -> &WorkerMetrics {
        &self.metrics
    }

    /// Queues `frame`, a reply or any other frame for connection `id` alone. Replies are never
    /// dropped: the worker reads a connection's requests only while their replies have room.
    pub fn send(&mut self, id: ConnId, frame: &Bytes) -> Offer {
        self.queue_reply(id, |outbound| outbound.push_reply(frame))
    }

    /// Reserves room on connection `id` for a reply that another worker will supply, so the
    /// connection's requests stop being read before that reply could lack room.
    pub fn promise_reply(&mut self, id: ConnId) {
        if let Some(conn) = self.slab.get_mut(id.0) {
            conn.outbound.promise_reply();
        }
    }

    /// Queues the reply that [`promise_reply`](Self::promise_reply) reserved room for.
    pub fn send_promised(&mut self, id: ConnId, frame: &Bytes) -> Offer {
        self.queue_reply(id, |outbound| outbound.push_promised(frame))
    }

    /// Queues a reply with `push` and marks the connection for this turn's flush.
    fn queue_reply(&mut self, id: ConnId, push: impl FnOnce(&mut Outbound) -> Offer) -> Offer {
        let Some(conn) = self.slab.get_mut(id.0) else { return Offer::Closed };
        let offer = push(&mut conn.outbound);
        if offer == Offer::Queued {
            mark_dirty(&mut self.dirty, conn, id);
        }
        offer
    }

    /// Frames queued for connection `id` (None if there is no such connection).
    pub fn queued(&self, id: ConnId) -> Option<usize> {
        self.slab.get(id.0).map(|conn| conn.outbound.len())
    }

    /// The bound of every connection's ring, in frames.
    pub fn ring_slots(&self) -> usize {
        self.limits.ring_slots
    }

    /// Whether one more request of connection `id` may be read: its reply would have room.
    pub fn may_read(&self, id: ConnId) -> bool {
        self.slab.get(id.0).is_some_and(|conn| conn.outbound.may_read())
    }

    /// Offers a broadcast `frame` to connection `id` if it is an open WebSocket whose session
    /// passes `wanted`. This is the per-recipient step of every fan-out: a reference-count
    /// increment and a ring slot, no allocation. Drops are counted by the caller, per broadcast.
    #[inline]
    pub fn offer(&mut self, id: ConnId, frame: &Bytes, flush: Flush, wanted: impl FnOnce(&S) -> bool) -> Offer {
        let Some(conn) = self.slab.get_mut(id.0) else {
            return Offer::Closed;
        };
        let Phase::Open { session, .. } = &conn.phase else {
            return Offer::Closed;
        };
        if !wanted(session) {
            return Offer::Closed;
        }
        let offer = conn.outbound.offer(frame);
        if offer == Offer::Queued {
            match flush {
                // Deferring is for a few frames: a half-full ring is written at once, so frames
                // that can wait never crowd out the ones that cannot.
                Flush::By(due) if conn.outbound.len() < self.limits.ring_slots / 2 => {
                    if !conn.dirty && conn.deferred_until.is_none() {
                        debug_assert!(self.deferred.back().is_none_or(|&(_, last)| last <= due));
                        conn.deferred_until = Some(due);
                        self.deferred.push_back((id, due));
                    }
                }
                _ => mark_dirty(&mut self.dirty, conn, id),
            }
        }
        offer
    }

    /// Queues connection `id` for a write at the end of this loop turn.
    pub(crate) fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = self.slab.get_mut(id.0) {
            mark_dirty(&mut self.dirty, conn, id);
        }
    }

    /// The earliest deadline of a deferred frame.
    pub(crate) fn deferred_due(&self) -> Option<Instant> {
        self.deferred.front().map(|&(_, due)| due)
    }

    /// Marks the connections whose deferred frames are due dirty. Most were written meanwhile
    /// with other traffic and are skipped.
    pub(crate) fn release_deferred(&mut self, now: Instant) {
        while let Some(&(id, due)) = self.deferred.front() {
            if due > now {
                break;
            }
            self.deferred.pop_front();
            let Some(conn) = self.slab.get_mut(id.0).filter(|conn| conn.deferred_until == Some(due)) else {
                continue;
            };
            conn.deferred_until = None;
            if !conn.outbound.is_empty() {
                mark_dirty(&mut self.dirty, conn, id);
            }
        }
    }

    /// The session of an open WebSocket.
    pub fn session(&self, id: ConnId) -> Option<&S> {
        match &self.slab.get(id.0)?.phase {
            Phase::Open { session, .. } => Some(session),
            _ => None,
        }
    }

    /// The session of an open WebSocket, to change it.
    pub fn session_mut(&mut self, id: ConnId) -> Option<&mut S> {
        match &mut self.slab.get_mut(id.0)?.phase {
            Phase::Open { session, .. } => Some(session),
            _ => None,
        }
    }

    /// Open WebSocket connections, with their sessions.
    pub fn sessions(&self) -> impl Iterator<Item = (ConnId, &S)> + '_ {
        self.slab.iter().filter_map(|(key, conn)| match &conn.phase {
            Phase::Open { session, .. } => Some((ConnId(key), session)),
            _ => None,
        })
    }

    /// The client's address, in any phase (a closing connection's too).
    pub fn peer(&self, id: ConnId) -> Option<SocketAddr> {
        self.slab.get(id.0).map(|conn| conn.peer)
    }

    /// Ring and backpressure state of a connection.
    pub fn info(&self, id: ConnId, now: Instant) -> Option<ConnInfo> {
        let conn = self.slab.get(id.0)?;
        Some(ConnInfo {
            peer: conn.peer,
            ring_len: conn.outbound.len(),
            ring_slots: conn.outbound.slots(),
            dropped: conn.outbound.dropped(),
            backpressured_for: conn.outbound.backpressured_for(now),
        })
    }

    /// Closes an open WebSocket with `code`: its queued frames that have not begun are
    /// discarded, the close frame is queued, and the session is handed back.
    pub fn close(&mut self, id: ConnId, code: u16, reason: &str, now: Instant) -> Option<S> {
        self.begin_close(id, code, reason, AfterFlush::AwaitPeerClose, now)
    }

    /// Moves an open WebSocket to closing with a close frame; returns its session.
    pub(crate) fn begin_close(&mut self, id: ConnId, code: u16, reason: &str, then: AfterFlush, now: Instant) -> Option<S> {
        let frame = close_frame(&self.pool, code, reason);
        let conn = self.slab.get_mut(id.0)?;
        if !matches!(conn.phase, Phase::Open { .. }) {
            return None;
        }
        let keep_decoder = then == AfterFlush::AwaitPeerClose;
        let phase = std::mem::replace(&mut conn.phase, Phase::Closing { decoder: None, then });
        let Phase::Open { decoder, session } = phase else {
            return None;
        };
        if keep_decoder {
            conn.phase = Phase::Closing { decoder: Some(decoder), then };
        }
        conn.outbound.close_with(frame);
        // Its requests no longer matter, but the peer's close frame must still be read.
        conn.reading_paused = false;
        conn.deadline = Some(now + self.limits.close_linger);
        mark_dirty(&mut self.dirty, conn, id);
        WorkerMetrics::sub(&self.metrics.counters.websockets, 1);
        Some(session)
    }

    /// Number of connections (any phase).
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// No connections.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }
}

fn mark_dirty<S>(dirty: &mut Vec<ConnId>, conn: &mut Connection<S>, id: ConnId) {
    if !conn.dirty {
        conn.dirty = true;
        dirty.push(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's end of a fresh loopback connection, and the client's.
    fn accepted() -> (TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (TcpStream::from_std(server), client)
    }

    fn limits(send_buffer: Option<usize>) -> ConnLimits {
        ConnLimits { ring_slots: 8, max_head: 1024, max_body: 1024, max_message: 1024, close_linger: Duration::ZERO, send_buffer }
    }

    fn send_buffer(socket: &TcpStream) -> usize {
        SockRef::from(socket).send_buffer_size().expect("SO_SNDBUF")
    }

    #[test]
    fn tuning_caps_the_send_buffer_which_linux_doubles_for_its_bookkeeping() {
        let (server, _client) = accepted();
        limits(Some(16 * 1024)).tune(&server).expect("tune");
        assert_eq!(send_buffer(&server), 2 * 16 * 1024, "read back as the kernel holds it");
        assert!(server.nodelay().expect("TCP_NODELAY"));
    }

    #[test]
    fn without_a_cap_the_kernel_keeps_tuning_the_send_buffer() {
        let (server, _client) = accepted();
        let before = send_buffer(&server);
        limits(None).tune(&server).expect("tune");
        assert_eq!(send_buffer(&server), before, "untouched");
        assert!(server.nodelay().expect("TCP_NODELAY"));
    }
}
