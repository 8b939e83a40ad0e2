//! An echo server on Flux's own event loop and WebSocket codec, for the Autobahn|Testsuite
//! fuzzing client: every text or binary message comes back unchanged. Only the service differs
//! from the gateway; the worker loop, rings, decoder, encoder and close handshake are the same.
//!
//! Run: `cargo run --release --example echo_server -- 127.0.0.1:9001`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use flux::fanout::pool::FramePool;
use flux::fanout::ConnId;
use flux::http::{Request, Response};
use flux::server::{self, ConnLimits, Conns, Ended, PendingCaps, Routed, ServerSettings, Service};
use flux::ws::{binary_frame, text_frame, Incoming};

struct Echo {
    pool: FramePool,
}

impl Service for Echo {
    type Session = ();
    type Message = ();

    fn on_request(&mut self, _: &mut Conns<()>, _: ConnId, request: &Request, _: Instant) -> Routed<()> {
        if request.header("upgrade").is_some() {
            Routed::Upgrade(())
        } else {
            Routed::Respond(Response::text(200, "flux echo server\n"))
        }
    }

    fn on_open(&mut self, _: &mut Conns<()>, _: ConnId, _: Instant) {}

    fn on_message(&mut self, conns: &mut Conns<()>, id: ConnId, message: Incoming<'_>, _: Instant) {
        let frame = match message {
            Incoming::Text(text) => text_frame(&self.pool, text),
            Incoming::Binary(bytes) => binary_frame(&self.pool, bytes),
            Incoming::Ping(_) | Incoming::Pong(_) | Incoming::Close(_) => return,
        };
        conns.send(id, &frame);
    }

    fn on_close(&mut self, _: &mut Conns<()>, _: ConnId, _: (), _: Ended) {}
    fn on_tick(&mut self, _: &mut Conns<()>, _: Instant) {}
    fn on_inbox(&mut self, _: &mut Conns<()>, _: (), _: Instant) {}
    fn on_turn_end(&mut self, _: &mut Conns<()>, _: Instant) {}
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let listen: SocketAddr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9001".into()).parse().unwrap_or_else(|e| {
        eprintln!("usage: echo_server [ADDR:PORT] ({e})");
        std::process::exit(2);
    });
    let settings = ServerSettings {
        listen,
        workers: 2,
        limits: ConnLimits {
            // The suite sends up to 1,000 messages without reading and messages up to 16 MiB.
            ring_slots: 4096,
            max_head: 16 * 1024,
            max_body: 0,
            max_message: 64 * 1024 * 1024,
            close_linger: Duration::from_secs(2),
            // The kernel's autotuning: the suite measures conformance, not slow consumers.
            send_buffer: None,
        },
        evict_after: Duration::from_secs(60),
        request_timeout: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(1),
        write_coalesce: Duration::ZERO,
        handle_signals: true,
        tls: None,
        pending_caps: PendingCaps { per_node: 10_000, per_source: 10_000 },
    };
    let pool = FramePool::default();
    match server::start(settings, pool.clone(), |_| Echo { pool: pool.clone() }) {
        Ok(server) => {
            eprintln!("echo server on ws://{}", server.local_addr());
            server.join();
        }
        Err(e) => {
            eprintln!("could not start: {e}");
            std::process::exit(1);
        }
    }
}
