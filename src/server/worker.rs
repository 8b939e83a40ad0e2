//! A worker: one mio `Poll` loop on its own thread, owning its connections.
//!
//! The loop only dispatches. Each turn it (1) drains its inbox — adopted sockets, shutdown, and
//! service messages such as broadcasts — before it reads any socket, so a publish never
//! overtakes a subscription another worker already confirmed; (2) reads ready sockets, at most
//! a fixed budget per socket, and feeds the bytes to the HTTP or WebSocket decoder and the
//! service; (3) runs its timers (eviction checks, deadlines); (4) flushes every connection that
//! had frames queued, each with vectored writes until WouldBlock.
//!
//! Large fan-outs (many connections with frames queued) are flushed at most once per write-
//! coalescing interval: a broadcast after a quiet spell is written at once, but under a steady
//! stream of broadcasts the next ones wait for the interval to end and join the same flush, so
//! each socket gets one write for several frames instead of one write per frame. On loopback a
//! write costs microseconds of kernel time whatever its size, so this is what lets a worker
//! sustain a million deliveries a second, for at most one interval of added latency. HTTP
//! responses are written at once.
//!
//! Writable interest is registered only while a ring is non-empty after a WouldBlock, which is
//! exactly when a connection is backpressured; it is removed when the ring drains.
//!
//! A connection's requests are read only while their replies have room in its ring (see
//! [`Outbound::may_read`](crate::fanout::ring::Outbound::may_read)): a client that sends more
//! than its ring holds in one go (pusher-js subscribing a thousand channels on connect) has its
//! reading paused, the rest of its input held by its decoder and its socket left unread, and
//! resumed by the flush that makes room. So no reply is ever dropped, and a client that asks
//! without reading the answers is a slow consumer like any other, evicted on the same clock.
//!
//! A TLS connection goes through the same steps: its socket is read into its session, whose
//! plaintext goes to the decoders as a plain socket's bytes do, and its ring is flushed through
//! the session (see [`super::tls`]). A peer that does not speak TLS is closed at its first record
//! and a handshake that does not finish within the request timeout at the next sweep, both
//! counted.
//!
//! Shutdown is a drain: the worker closes every WebSocket with 4200 and goes on answering HTTP
//! (each answer closing its connection, and new connections too) until the acceptor says no
//! more will come and it holds none, or until the shutdown grace is over.

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use indexmap::IndexSet;
use log::{debug, error, info, warn};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::conns::{AfterFlush, Connection, Conns, Phase};
use super::pending::Releaser;
use super::service::{Ended, Routed, Service};
use super::tls::{self, Flushed, Received, TlsConfig};
use crate::fanout::ConnId;
use crate::http::{json_error, Request, Response};
use crate::metrics::WorkerMetrics;
use crate::ws::{close_frame, control_frame, upgrade_response, Decoder, Flow, Incoming};

/// The loop's own token; every other token is a slab key.
pub(crate) const WAKER: Token = Token(usize::MAX);

/// Bytes read per `read` call into the worker's shared buffer.
const READ_CHUNK: usize = 64 * 1024;

/// Reads per socket per loop turn, so one flooding client cannot starve the others.
const READ_BUDGET: usize = 16;

/// Frames written per vectored write.
pub(crate) const MAX_IOVECS: usize = 64;

/// Record reads per TLS socket per loop turn. rustls reads at most 4 KiB at a time, so this
/// lets a TLS client send as much per turn as [`READ_BUDGET`] reads of [`READ_CHUNK`] do.
const TLS_READ_BUDGET: usize = READ_BUDGET * READ_CHUNK / 4096;

/// Inbox messages handled per turn before the loop re-wakes itself to serve sockets.
const INBOX_BUDGET: usize = 65_536;

/// Fewer connections with queued frames than this are flushed at the end of the turn without
/// waiting to coalesce: holding them would add latency and save few writes.
const COALESCE_MIN_DIRTY: usize = 32;

/// How often backpressured connections are checked for eviction.
const EVICTION_CHECK: Duration = Duration::from_millis(100);

/// How often deadlines and service timers are swept.
const SWEEP: Duration = Duration::from_secs(1);

/// What other threads send a worker.
pub(crate) enum Envelope<M> {
    /// A freshly accepted connection to own, with the TLS settings to serve it with on a TLS
    /// port (the listener's current ones: a reload changes them for later connections only).
    Adopt(TcpStream, SocketAddr, Option<TlsConfig>),
    /// Close every WebSocket and drain: answer HTTP only, until told to finish.
    Shutdown,
    /// No more connections will come (sent after every one that was handed over): stop once
    /// the ones held are gone. Begins the shutdown too, if it has not begun.
    Finish,
    /// A message for the service.
    Service(M),
}

/// Timing settings of a worker.
#[derive(Debug, Clone)]
pub(crate) struct Timing {
    pub(crate) evict_after: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) write_coalesce: Duration,
}

pub(crate) struct Worker<Svc: Service> {
    poll: Poll,
    waker: Arc<mio::Waker>,
    conns: Conns<Svc::Session>,
    service: Svc,
    inbox: Receiver<Envelope<Svc::Message>>,
    metrics: Arc<WorkerMetrics>,
    timing: Timing,
    read_buf: Vec<u8>,
    /// The request being handled (see [`Self::handle_requests`]).
    request: Request,
    /// Connections that are backpressured now: the only ones the eviction check looks at.
    backpressured: IndexSet<ConnId>,
    next_eviction_check: Instant,
    next_sweep: Instant,
    shutdown_deadline: Option<Instant>,
    /// Told to finish: stop as soon as no connection is left.
    finishing: bool,
    /// When the last large fan-out was flushed: the next may not start before an interval ends.
    last_large_flush: Option<Instant>,
    /// A large fan-out is waiting for the interval to end.
    holding: bool,
    /// Connections whose reading was paused and whose replies have room again.
    resuming: Vec<ConnId>,
    scratch: Vec<ConnId>,
    /// Tells the acceptor when a connection has finished its handshake or gone before.
    releaser: Releaser,
}

impl<Svc: Service> Worker<Svc> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        poll: Poll,
        waker: Arc<mio::Waker>,
        conns: Conns<Svc::Session>,
        service: Svc,
        inbox: Receiver<Envelope<Svc::Message>>,
        metrics: Arc<WorkerMetrics>,
        timing: Timing,
        releaser: Releaser,
    ) -> Self {
        let now = Instant::now();
        Worker {
            poll,
            waker,
            conns,
            service,
            inbox,
            metrics,
            timing,
            read_buf: vec![0; READ_CHUNK],
            request: Request::default(),
            backpressured: IndexSet::new(),
            next_eviction_check: now + EVICTION_CHECK,
            next_sweep: now + SWEEP,
            shutdown_deadline: None,
            finishing: false,
            last_large_flush: None,
            holding: false,
            resuming: Vec::new(),
            scratch: Vec::new(),
            releaser,
        }
    }

    /// Runs until shutdown completes.
    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if let Some(deadline) = self.shutdown_deadline {
                if (self.finishing && self.conns.is_empty()) || now >= deadline {
                    break;
                }
            }
            let timeout = self.next_timer().saturating_duration_since(now).max(Duration::from_millis(1));
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("worker poll failed, stopping this worker: {e}");
                break;
            }
            let now = Instant::now();
            self.drain_inbox(now);
            self.resume_reading(now);
            for event in events.iter() {
                if event.token() == WAKER {
                    continue; // The inbox was drained above.
                }
                let id = ConnId(event.token().0);
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.readable(id, now);
                }
                if event.is_writable() {
                    self.flush(id, now);
                }
            }
            self.timers(now);
            self.service.on_turn_end(&mut self.conns, now);
            self.conns.release_deferred(now);
            self.flush_dirty_when_due(now);
        }
        let open = self.conns.len();
        if open > 0 {
            info!("worker stopping with {open} connections still flushing; closing them");
        }
    }

    fn next_timer(&self) -> Instant {
        let mut next = self.next_sweep;
        if !self.backpressured.is_empty() {
            next = next.min(self.next_eviction_check);
        }
        if let Some(deadline) = self.shutdown_deadline {
            next = next.min(deadline);
        }
        if let (true, Some(last)) = (self.holding, self.last_large_flush) {
            next = next.min(last + self.timing.write_coalesce);
        }
        if let Some(due) = self.service.poll_timeout() {
            next = next.min(due);
        }
        if let Some(due) = self.conns.deferred_due() {
            next = next.min(due);
        }
        next
    }

    fn drain_inbox(&mut self, now: Instant) {
        for _ in 0..INBOX_BUDGET {
            let Ok(envelope) = self.inbox.try_recv() else {
                return;
            };
            match envelope {
                Envelope::Adopt(socket, peer, tls) => self.adopt(socket, peer, tls, now),
                Envelope::Shutdown => self.begin_shutdown(now),
                Envelope::Finish => {
                    self.begin_shutdown(now);
                    self.finishing = true;
                }
                Envelope::Service(message) => self.service.on_inbox(&mut self.conns, message, now),
            }
        }
        // More is waiting: come straight back after serving this turn's sockets.
        if let Err(e) = self.waker.wake() {
            warn!("could not re-wake worker: {e}");
        }
    }

    /// Takes a connection in, during a drain too: its requests (a load balancer's health check)
    /// are still answered until the worker finishes.
    fn adopt(&mut self, mut socket: TcpStream, peer: SocketAddr, tls: Option<TlsConfig>, now: Instant) {
        if let Err(e) = self.conns.limits.tune(&socket) {
            debug!("could not set the socket options of {peer}: {e}");
        }
        let session = match tls.as_ref().map(tls::session).transpose() {
            Ok(session) => session,
            Err(e) => {
                warn!("could not start a TLS session for {peer}: {e}");
                return self.releaser.release(peer.ip());
            }
        };
        let token = Token(self.conns.slab.vacant_key());
        if let Err(e) = self.poll.registry().register(&mut socket, token, Interest::READABLE) {
            warn!("could not register connection from {peer}: {e}");
            return self.releaser.release(peer.ip());
        }
        self.conns.insert(socket, session, peer, now + self.timing.request_timeout);
        let counters = &self.metrics.counters;
        WorkerMetrics::add(&counters.connections, 1);
        WorkerMetrics::add(&counters.connections_total, 1);
        WorkerMetrics::add(&counters.handshakes_pending, 1);
    }

    /// Reads what the socket has, up to the budget, and processes it. A connection whose
    /// reading is paused is left alone: the socket keeps its bytes, so TCP slows the client.
    fn readable(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.slab.get(id.0).filter(|conn| !conn.reading_paused) else {
            return;
        };
        let tls = conn.tls.is_some();
        let mut buf = std::mem::take(&mut self.read_buf);
        if tls {
            self.read_tls_into(id, &mut buf, now);
        } else {
            self.read_into(id, &mut buf, now);
        }
        self.read_buf = buf;
    }

    fn read_into(&mut self, id: ConnId, buf: &mut [u8], now: Instant) {
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.conns.slab.get_mut(id.0) else {
                return;
            };
            match conn.socket.read(buf) {
                Ok(0) => return self.remove(id, Ended::ByClient),
                Ok(n) => {
                    WorkerMetrics::add(&self.metrics.counters.bytes_in, n as u64);
                    if !self.process(id, &mut buf[..n], now) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("read from conn {} failed: {e}", id.0);
                    return self.remove(id, Ended::ByClient);
                }
            }
        }
        self.read_budget_spent(id);
    }

    /// Reads a TLS connection: the plaintext its session already holds first (after a pause it
    /// is what the decoder wants next), then more records, up to the budget.
    fn read_tls_into(&mut self, id: ConnId, buf: &mut [u8], now: Instant) {
        for _ in 0..TLS_READ_BUDGET {
            if !self.take_plaintext(id, buf, now) {
                return;
            }
            let Some(conn) = self.conns.slab.get_mut(id.0) else {
                return;
            };
            let Some(session) = conn.tls.as_deref_mut() else {
                return;
            };
            match tls::receive(&mut conn.socket, session) {
                Received::Records { bytes, handshake_done } => {
                    WorkerMetrics::add(&self.metrics.counters.bytes_in, bytes as u64);
                    if handshake_done {
                        WorkerMetrics::add(&self.metrics.counters.tls_handshakes, 1);
                    }
                    // Handshake messages, alerts and session tickets to send.
                    if session.wants_write() {
                        self.conns.mark_dirty(id);
                    }
                }
                Received::WouldBlock => return,
                Received::Closed => return self.remove(id, Ended::ByClient),
                Received::Failed(e) => {
                    debug!("read from conn {} failed: {e}", id.0);
                    return self.remove(id, Ended::ByClient);
                }
                Received::Refused(e) => {
                    debug!("conn {} from {} is not speaking TLS properly, closing it: {e}", id.0, conn.peer);
                    WorkerMetrics::add(&self.metrics.counters.tls_refused, 1);
                    // One attempt to tell it why (the alert rustls queued), then it goes.
                    let _ = session.write_tls(&mut conn.socket);
                    return self.remove(id, Ended::ByClient);
                }
            }
        }
        // The records of the last read are decrypted: hand them on before the socket is
        // re-armed, since nothing would report them again.
        if self.take_plaintext(id, buf, now) {
            self.read_budget_spent(id);
        }
    }

    /// Passes the plaintext a TLS session holds to the decoders. Returns whether to keep
    /// reading the connection. Bounded: a session holds at most 16 KiB of plaintext.
    fn take_plaintext(&mut self, id: ConnId, buf: &mut [u8], now: Instant) -> bool {
        loop {
            let Some(session) = self.conns.slab.get_mut(id.0).and_then(|conn| conn.tls.as_deref_mut()) else {
                return false;
            };
            match session.reader().read(buf) {
                // The peer's close_notify: it sends nothing more.
                Ok(0) => {
                    self.remove(id, Ended::ByClient);
                    return false;
                }
                Ok(n) => {
                    if !self.process(id, &mut buf[..n], now) {
                        return false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    debug!("TLS read from conn {} failed: {e}", id.0);
                    self.remove(id, Ended::ByClient);
                    return false;
                }
            }
        }
    }

    /// Budget spent with data left. Re-registering re-arms the edge-triggered readiness, so the
    /// next poll reports the socket again after the other connections had their turn.
    fn read_budget_spent(&mut self, id: ConnId) {
        WorkerMetrics::add(&self.metrics.counters.read_budget_exhausted, 1);
        if let Some(conn) = self.conns.slab.get_mut(id.0) {
            let interest = interest(conn.writable_interest);
            if let Err(e) = self.poll.registry().reregister(&mut conn.socket, Token(id.0), interest) {
                warn!("could not re-arm conn {}: {e}", id.0);
                self.remove(id, Ended::ByClient);
            }
        }
    }

    /// Handles bytes read from connection `id`. Returns whether to keep reading it.
    fn process(&mut self, id: ConnId, bytes: &mut [u8], now: Instant) -> bool {
        let Some(conn) = self.conns.slab.get_mut(id.0) else {
            return false;
        };
        match &mut conn.phase {
            Phase::Http(reader) => {
                reader.push(bytes);
                self.handle_requests(id, now)
            }
            Phase::Open { .. } => self.decode_open(id, bytes, now),
            Phase::Closing { decoder: Some(_), .. } => self.decode_closing(id, bytes),
            Phase::Closing { decoder: None, .. } => true, // Discarded: we are only flushing.
        }
    }

    fn handle_requests(&mut self, id: ConnId, now: Instant) -> bool {
        // Every request is read into the worker's one `Request`, whose strings keep their
        // capacity, so a publisher's steady REST calls cost no allocation to read.
        let mut request = std::mem::take(&mut self.request);
        let keep_reading = self.handle_requests_into(id, &mut request, now);
        self.request = request;
        keep_reading
    }

    fn handle_requests_into(&mut self, id: ConnId, request: &mut Request, now: Instant) -> bool {
        loop {
            let Some(conn) = self.conns.slab.get_mut(id.0) else {
                return false;
            };
            let Phase::Http(reader) = &mut conn.phase else {
                return true;
            };
            let request = match reader.next_request_into(request) {
                Ok(Some(request)) => request,
                Ok(None) => return true,
                Err(e) => {
                    debug!("bad request from {}: {e}", conn.peer);
                    self.respond(id, &json_error(e.status(), &e.to_string()), true, now);
                    return false;
                }
            };
            WorkerMetrics::add(&self.metrics.counters.http_requests, 1);
            match self.service.on_request(&mut self.conns, id, request, now) {
                Routed::Respond(response) => {
                    // While draining, each answer is the connection's last, so an idle
                    // keep-alive connection does not hold the worker until its deadline.
                    let close = request.close || self.shutdown_deadline.is_some();
                    self.respond(id, &response, close, now);
                    if close {
                        return false;
                    }
                }
                Routed::Upgrade(session) => {
                    return match upgrade_response(request) {
                        Ok(accept) => self.open(id, accept, session, now),
                        Err(e) => {
                            self.refuse_upgrade(id, request, e.status(), &e.to_string(), now);
                            false
                        }
                    };
                }
                Routed::Refuse { frame, code, reason } => {
                    match upgrade_response(request) {
                        Ok(accept) => self.open_and_refuse(id, accept, frame, code, reason, now),
                        Err(e) => self.refuse_upgrade(id, request, e.status(), &e.to_string(), now),
                    }
                    return false;
                }
            }
        }
    }

    fn refuse_upgrade(&mut self, id: ConnId, _request: &Request, status: u16, message: &str, now: Instant) {
        let mut response = json_error(status, message);
        if status == 426 {
            response.headers.push(("Sec-WebSocket-Version", "13".into()));
        }
        self.respond(id, &response, true, now);
    }

    /// Queues an HTTP response; with `close`, it is the connection's last.
    fn respond(&mut self, id: ConnId, response: &Response, close: bool, now: Instant) {
        // Written into a pooled buffer, which goes back to the pool once the socket took it.
        let mut buf = self.conns.pool().checkout();
        response.write_to(buf.as_mut_vec(), close);
        let Some(conn) = self.conns.slab.get_mut(id.0) else {
            return;
        };
        let bytes = buf.freeze();
        if close {
            conn.outbound.finish_with(bytes);
            conn.phase = Phase::Closing { decoder: None, then: AfterFlush::Linger };
            conn.deadline = Some(now + self.conns.limits.close_linger);
        } else if conn.outbound.offer(&bytes) != crate::fanout::ring::Offer::Queued {
            // A client pipelining more requests than its ring holds: stop serving it.
            conn.outbound.finish_with(Bytes::from(json_error(503, "too many pipelined requests").to_bytes(true)));
            conn.phase = Phase::Closing { decoder: None, then: AfterFlush::Linger };
        } else {
            conn.deadline = Some(now + self.timing.request_timeout);
        }
        // Responses are not held for coalescing: a publisher waits for each one.
        self.flush(id, now);
    }

    /// Completes the WebSocket handshake and hands the connection to the service.
    fn open(&mut self, id: ConnId, accept: Vec<u8>, session: Svc::Session, now: Instant) -> bool {
        let max_message = self.conns.limits.max_message;
        let Some(conn) = self.conns.slab.get_mut(id.0) else {
            return false;
        };
        let Phase::Http(reader) = &mut conn.phase else {
            return false;
        };
        let mut early = reader.take_rest();
        end_pending(conn, &self.releaser, &self.metrics);
        conn.outbound.offer(&Bytes::from(accept));
        conn.phase = Phase::Open { decoder: Decoder::new(max_message), session };
        conn.deadline = None;
        WorkerMetrics::add(&self.metrics.counters.websockets, 1);
        self.conns.mark_dirty(id);
        self.service.on_open(&mut self.conns, id, now);
        // Frames sent before our 101 arrived were read together with the request.
        early.is_empty() || self.decode_open(id, &mut early, now)
    }

    /// Completes the handshake only to send an error frame and a close: Pusher's way of
    /// refusing a connection (unknown app key, unsupported protocol).
    fn open_and_refuse(&mut self, id: ConnId, accept: Vec<u8>, frame: Bytes, code: u16, reason: &str, now: Instant) {
        let close = close_frame(self.conns.pool(), code, reason);
        let max_message = self.conns.limits.max_message;
        let linger = self.conns.limits.close_linger;
        let Some(conn) = self.conns.slab.get_mut(id.0) else {
            return;
        };
        conn.outbound.offer(&Bytes::from(accept));
        conn.outbound.offer(&frame);
        conn.outbound.finish_with(close);
        conn.phase = Phase::Closing { decoder: Some(Decoder::new(max_message)), then: AfterFlush::AwaitPeerClose };
        conn.deadline = Some(now + linger);
        self.conns.mark_dirty(id);
    }

    /// Goes on reading the connections whose replies have room again: first the requests held
    /// in their decoders, then their sockets (whose readiness was not drained when they paused).
    fn resume_reading(&mut self, now: Instant) {
        let mut resuming = std::mem::take(&mut self.resuming);
        for &id in &resuming {
            let Some(conn) = self.conns.slab.get_mut(id.0) else {
                continue;
            };
            if conn.reading_paused || !matches!(conn.phase, Phase::Open { .. }) {
                continue; // Paused again meanwhile, or no longer open.
            }
            if self.decode_open(id, &mut [], now) {
                self.readable(id, now);
            }
        }
        resuming.clear();
        self.resuming = resuming;
    }

    /// Decodes WebSocket bytes of an open connection and passes messages to the service. Stops
    /// (and pauses reading) when the connection's replies have no room for another request's.
    /// Returns whether to keep reading it.
    fn decode_open(&mut self, id: ConnId, bytes: &mut [u8], now: Instant) -> bool {
        let Some(conn) = self.conns.slab.get_mut(id.0) else {
            return false;
        };
        let Phase::Open { decoder, .. } = &mut conn.phase else {
            return true;
        };
        // The decoder is lent out so the service can use the connection table meanwhile.
        let mut decoder = std::mem::replace(decoder, Decoder::new(0));
        let mut peer_close: Option<u16> = None;
        let Worker { conns, service, metrics, .. } = self;
        let result = decoder.decode(bytes, &mut |message: Incoming<'_>| {
            match message {
                Incoming::Close(close) => {
                    peer_close = Some(close.map_or(1000, |(code, _)| code));
                    return Flow::Stop;
                }
                Incoming::Ping(payload) => {
                    let pong = control_frame(conns.pool(), tungstenite::protocol::frame::coding::Control::Pong, payload);
                    conns.send(id, &pong);
                }
                Incoming::Text(_) | Incoming::Binary(_) => WorkerMetrics::add(&metrics.counters.messages_in, 1),
                Incoming::Pong(_) => {}
            }
            service.on_message(conns, id, message, now);
            // The service may have closed the connection.
            if conns.session(id).is_none() {
                Flow::Stop
            } else if conns.may_read(id) {
                Flow::Continue
            } else {
                Flow::Pause
            }
        });
        if let Some(Phase::Open { decoder: lent, .. }) = self.conns.slab.get_mut(id.0).map(|c| &mut c.phase) {
            *lent = decoder;
        }
        let ended = match (result, peer_close) {
            (Err(e), _) => {
                debug!("conn {} broke the WebSocket protocol: {e}", id.0);
                let code = e.close_code();
                self.conns.begin_close(id, code, &e.to_string(), AfterFlush::Linger, now).map(|s| (s, Ended::ProtocolError(code)))
            }
            // Echo the peer's close; it closed first, so we drop the socket once it is sent.
            (Ok(()), Some(code)) => self.conns.begin_close(id, code, "", AfterFlush::Drop, now).map(|s| (s, Ended::ByClient)),
            (Ok(()), None) => None,
        };
        if let Some((session, why)) = ended {
            self.service.on_close(&mut self.conns, id, session, why);
            return false;
        }
        if self.conns.session(id).is_none() {
            return false;
        }
        let may_read = self.conns.may_read(id);
        if let Some(conn) = self.conns.slab.get_mut(id.0) {
            conn.reading_paused = !may_read;
        }
        may_read
    }

    /// Watches a closing connection's input for the peer's close frame.
    fn decode_closing(&mut self, id: ConnId, bytes: &mut [u8]) -> bool {
        let Some(conn) = self.conns.slab.get_mut(id.0) else {
            return false;
        };
        let Phase::Closing { decoder: Some(decoder), then } = &mut conn.phase else {
            return true;
        };
        let mut closed = false;
        let result = decoder.decode(bytes, &mut |message: Incoming<'_>| {
            if matches!(message, Incoming::Close(_)) {
                closed = true;
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        if result.is_err() || closed {
            *then = AfterFlush::Drop;
            if conn.outbound.is_empty() {
                self.remove(id, Ended::ByClient);
            }
            return false;
        }
        true
    }

    fn timers(&mut self, now: Instant) {
        if now >= self.next_eviction_check {
            self.next_eviction_check = now + EVICTION_CHECK;
            self.check_evictions(now);
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP;
            self.sweep_deadlines(now);
            self.service.on_tick(&mut self.conns, now);
        }
    }

    /// Evicts connections backpressured for longer than the threshold. Runs on its own timer,
    /// so a slow consumer is evicted on time even when nothing new is sent to it.
    fn check_evictions(&mut self, now: Instant) {
        self.scratch.clear();
        self.scratch.extend(self.backpressured.iter().copied());
        for i in 0..self.scratch.len() {
            let id = self.scratch[i];
            let Some(conn) = self.conns.slab.get(id.0) else {
                self.backpressured.swap_remove(&id);
                continue;
            };
            if !conn.outbound.eviction_due(now, self.timing.evict_after) {
                continue;
            }
            match conn.phase {
                Phase::Open { .. } => self.evict(id, now),
                // Closing connections have their own deadline; a stuck HTTP client just goes.
                Phase::Closing { .. } => {}
                Phase::Http(_) => self.remove(id, Ended::ByClient),
            }
        }
    }

    fn evict(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.slab.get(id.0) else {
            return;
        };
        let backpressured_for = conn.outbound.backpressured_for(now).unwrap_or_default();
        let (dropped, queued) = (conn.outbound.dropped(), conn.outbound.len());
        warn!(
            "evicting slow consumer {} (conn {}): backpressured for {} ms, {queued} frames queued, {dropped} dropped",
            conn.peer,
            id.0,
            backpressured_for.as_millis(),
        );
        let code = crate::pusher::protocol::code::OVER_CAPACITY;
        if let Some(session) = self.conns.begin_close(id, code, "Slow consumer evicted", AfterFlush::AwaitPeerClose, now) {
            self.service.on_close(&mut self.conns, id, session, Ended::Evicted { backpressured_for, dropped, queued });
        }
        // Counted after the service has logged it, so whoever sees the count also finds the entry.
        WorkerMetrics::add(&self.metrics.counters.evictions, 1);
    }

    /// Times out unfinished requests, idle keep-alive connections and close handshakes.
    fn sweep_deadlines(&mut self, now: Instant) {
        self.scratch.clear();
        self.scratch.extend(self.conns.slab.iter().filter(|(_, c)| c.deadline.is_some_and(|d| d <= now)).map(|(key, _)| ConnId(key)));
        for i in 0..self.scratch.len() {
            let id = self.scratch[i];
            let Some(conn) = self.conns.slab.get_mut(id.0) else {
                continue;
            };
            match &conn.phase {
                Phase::Http(reader) if !reader.is_empty() => {
                    debug!("request from {} timed out", conn.peer);
                    self.respond(id, &json_error(408, "request timed out"), true, now);
                    // Give the 408 one flush, then go regardless.
                    if let Some(conn) = self.conns.slab.get_mut(id.0) {
                        conn.deadline = Some(now + SWEEP);
                    }
                }
                _ => {
                    if conn.tls.as_ref().is_some_and(|session| session.is_handshaking()) {
                        debug!("TLS handshake from {} timed out", conn.peer);
                        WorkerMetrics::add(&self.metrics.counters.tls_timed_out, 1);
                    }
                    self.remove(id, Ended::ByClient);
                }
            }
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.shutdown_deadline = Some(now + self.timing.shutdown_grace);
        let code = crate::pusher::protocol::code::RECONNECT_NOW;
        let ids: Vec<ConnId> = self.conns.slab.iter().map(|(key, _)| ConnId(key)).collect();
        for id in ids {
            let Some(conn) = self.conns.slab.get(id.0) else {
                continue;
            };
            match conn.phase {
                Phase::Open { .. } => {
                    if let Some(session) = self.conns.begin_close(id, code, "Server shutting down", AfterFlush::AwaitPeerClose, now) {
                        self.service.on_close(&mut self.conns, id, session, Ended::Shutdown);
                    }
                }
                Phase::Http(_) if conn.outbound.is_empty() => self.remove(id, Ended::Shutdown),
                _ => {}
            }
        }
    }

    /// Flushes the connections with queued frames, unless it is a large fan-out and the last
    /// one was flushed less than a coalescing interval ago.
    fn flush_dirty_when_due(&mut self, now: Instant) {
        let large = self.conns.dirty.len() >= COALESCE_MIN_DIRTY;
        if large {
            let due = self.last_large_flush.map_or(now, |last| last + self.timing.write_coalesce);
            self.holding = now < due && self.shutdown_deadline.is_none();
            if self.holding {
                return;
            }
            self.last_large_flush = Some(now);
        }
        self.flush_dirty(now);
    }

    fn flush_dirty(&mut self, now: Instant) {
        // Flushing can close a connection, and closing can queue frames for others (the
        // service reacts to the close), so go round until nothing new was queued.
        while !self.conns.dirty.is_empty() {
            let mut batch = std::mem::take(&mut self.conns.dirty);
            for &id in &batch {
                if let Some(conn) = self.conns.slab.get_mut(id.0) {
                    conn.dirty = false;
                    self.flush(id, now);
                }
            }
            batch.clear();
            let queued_meanwhile = std::mem::replace(&mut self.conns.dirty, batch);
            self.conns.dirty.extend(queued_meanwhile);
        }
    }

    /// Writes connection `id`'s ring until it is empty or the socket would block.
    fn flush(&mut self, id: ConnId, now: Instant) {
        let counters = &self.metrics.counters;
        let Some(conn) = self.conns.slab.get_mut(id.0) else {
            return;
        };
        if conn.outbound.is_empty() && conn.tls.as_ref().is_none_or(|session| !session.wants_write()) {
            return;
        }
        conn.deferred_until = None; // Deferred frames leave with this write.
        let mut blocked = false;
        if let Some(session) = conn.tls.as_deref_mut() {
            // The last frame of a connection that ends is followed by TLS's own close; one that
            // awaits the peer's WebSocket close keeps its session open to read it.
            let close_notify = matches!(conn.phase, Phase::Closing { then: AfterFlush::Drop | AfterFlush::Linger, .. });
            let (bytes, frames) = match tls::send(&mut conn.socket, session, &mut conn.outbound, close_notify) {
                Flushed::Done { bytes, frames } => (bytes, frames),
                Flushed::Blocked { bytes, frames } => {
                    blocked = true;
                    (bytes, frames)
                }
                Flushed::Failed(e) => {
                    debug!("TLS write to conn {} failed: {e}", id.0);
                    return self.remove(id, Ended::ByClient);
                }
            };
            WorkerMetrics::add(&counters.bytes_out, bytes as u64);
            WorkerMetrics::add(&counters.messages_out, frames as u64);
        } else {
            loop {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let filled = conn.outbound.write_slices(&mut slices);
                if filled == 0 {
                    break;
                }
                match conn.socket.write_vectored(&slices[..filled]) {
                    Ok(0) => return self.remove(id, Ended::ByClient),
                    Ok(written) => {
                        WorkerMetrics::add(&counters.bytes_out, written as u64);
                        let frames = conn.outbound.advance(written);
                        WorkerMetrics::add(&counters.messages_out, frames as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        blocked = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        debug!("write to conn {} failed: {e}", id.0);
                        return self.remove(id, Ended::ByClient);
                    }
                }
            }
        }
        if conn.reading_paused && conn.outbound.may_read() {
            conn.reading_paused = false;
            // Come straight back to read it, whatever else the next poll would wait for: one
            // wake-up serves every connection resumed before that poll.
            if self.resuming.is_empty() {
                if let Err(e) = self.waker.wake() {
                    warn!("could not wake worker to resume reading: {e}");
                }
            }
            self.resuming.push(id);
        }
        if blocked {
            WorkerMetrics::add(&counters.writes_would_block, 1);
            if conn.outbound.handle_would_block(now) {
                WorkerMetrics::add(&counters.backpressure_events, 1);
                self.backpressured.insert(id);
            }
        } else {
            WorkerMetrics::add(&counters.writes_immediate, 1);
            self.backpressured.swap_remove(&id);
            match conn.phase {
                Phase::Closing { then: AfterFlush::Drop, .. } => return self.remove(id, Ended::ByClient),
                Phase::Closing { then: AfterFlush::Linger, .. } => {
                    if let Err(e) = conn.socket.shutdown(std::net::Shutdown::Write) {
                        debug!("shutdown of conn {} failed: {e}", id.0);
                        return self.remove(id, Ended::ByClient);
                    }
                }
                _ => {}
            }
        }
        if conn.writable_interest != blocked {
            match self.poll.registry().reregister(&mut conn.socket, Token(id.0), interest(blocked)) {
                Ok(()) => conn.writable_interest = blocked,
                Err(e) => {
                    warn!("could not change interest of conn {}: {e}", id.0);
                    self.remove(id, Ended::ByClient);
                }
            }
        }
    }

    /// Drops connection `id` now, telling the service if its WebSocket was open.
    fn remove(&mut self, id: ConnId, why: Ended) {
        let Some(mut conn) = self.conns.slab.try_remove(id.0) else {
            return;
        };
        self.backpressured.swap_remove(&id);
        end_pending(&mut conn, &self.releaser, &self.metrics);
        let counters = &self.metrics.counters;
        WorkerMetrics::sub(&counters.connections, 1);
        if let Err(e) = self.poll.registry().deregister(&mut conn.socket) {
            debug!("deregister of conn {} failed: {e}", id.0);
        }
        if let Phase::Open { session, .. } = conn.phase {
            WorkerMetrics::sub(&counters.websockets, 1);
            self.service.on_close(&mut self.conns, id, session, why);
        }
    }
}

/// Connection `conn` has opened its WebSocket or is going: it no longer counts against the caps
/// on unfinished handshakes. Only the first call for a connection counts.
fn end_pending<S>(conn: &mut Connection<S>, releaser: &Releaser, metrics: &WorkerMetrics) {
    if std::mem::take(&mut conn.pending) {
        releaser.release(conn.peer.ip());
        WorkerMetrics::sub(&metrics.counters.handshakes_pending, 1);
    }
}

fn interest(writable: bool) -> Interest {
    if writable {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    }
}
