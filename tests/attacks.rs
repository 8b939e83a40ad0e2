//! Attacks Flux survives, kept as tests: a mass disconnect, the open-file limit, thousands of
//! handshakes that never finish, a flood from one address, and SIGTERM under heavy fan-out.
//! Each runs `flux` as a child process (or a gateway in this process), on loopback, bounded in
//! count and time.
//!
//! The counts are scaled for CI; `FLUX_ATTACK_FULL=1` runs the numbers of issue 15 (8,000
//! clients killed at once, 3,000 + 3,000 + 100 unfinished handshakes against the default 10 s
//! timeout, 5,000 subscribers at SIGTERM), and each test prints
//! the figures BENCHMARKS.md's "Under attack" quotes (run them with `--release --nocapture`).
//! The assertions are behavioural bounds (nothing stalls for seconds, everything is closed
//! around its deadline); the figures are what was measured.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::process::Process;
use common::{connect_from, masked_text, Client, UPGRADE};
use serde_json::{json, Value};

/// Whether to run issue 15's full numbers instead of CI's.
fn full() -> bool {
    std::env::var("FLUX_ATTACK_FULL").is_ok_and(|v| v == "1")
}

/// `ci` normally, `full` with `FLUX_ATTACK_FULL=1`.
fn scaled(ci: usize, full_count: usize) -> usize {
    if full() {
        full_count
    } else {
        ci
    }
}

/// Attackers and crowds come from 127.0.0.10 and up, 500 per address: as many hosts would, and
/// under the default cap of unfinished handshakes per address.
fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 10 + (i / 500) as u8)
}

/// The value at quantile `q` of `samples`.
fn quantile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `count` clients subscribed to `channel`, each asked for in one write with its upgrade and
/// never read; returns once the node counts them all.
fn subscribers(addr: SocketAddr, count: usize, channel: &str) -> Vec<TcpStream> {
    let mut request = UPGRADE.as_bytes().to_vec();
    request.extend(masked_text(json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string().as_bytes()));
    let clients: Vec<TcpStream> = (0..count)
        .map(|i| {
            let mut stream = connect_from(source(i), addr).expect("connect");
            stream.write_all(&request).expect("send the upgrade and the subscription");
            stream
        })
        .collect();
    let subscribed = || {
        let path = format!("/apps/app-id/channels/{channel}");
        common::rest(addr, "GET", &path, "", &[("info", "subscription_count")]).1["subscription_count"].as_u64()
    };
    assert!(
        common::wait_until(Duration::from_secs(60), || subscribed() == Some(count as u64)),
        "every client subscribed ({:?} of {count})",
        subscribed()
    );
    clients
}

/// A full Pusher connect (TCP, upgrade, `connection_established`), timed; an error instead of a
/// panic, so a prober can report every failure.
fn timed_connect(addr: SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/app/app-key?protocol=7"), stream).map_err(|e| format!("upgrade: {e}"))?;
    match ws.read() {
        Ok(tungstenite::Message::Text(text)) if text.contains("pusher:connection_established") => Ok(start.elapsed()),
        other => Err(format!("expected connection_established, got {other:?}")),
    }
}

/// A client connecting every 50 ms, timing each connect, until stopped.
struct Prober {
    running: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Instant, Result<Duration, String>)>>,
}

impl Prober {
    fn start(addr: SocketAddr) -> Prober {
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let thread = std::thread::spawn(move || {
            let mut probes = Vec::new();
            while flag.load(Ordering::Relaxed) {
                let at = Instant::now();
                probes.push((at, timed_connect(addr)));
                std::thread::sleep(Duration::from_millis(50).saturating_sub(at.elapsed()));
            }
            probes
        });
        Prober { running, thread }
    }

    /// Stops probing; every probe's start and outcome.
    fn stop(self) -> Vec<(Instant, Result<Duration, String>)> {
        self.running.store(false, Ordering::Relaxed);
        self.thread.join().expect("the prober does not panic")
    }
}

/// The connect times of `probes` begun at or after `since`; panics on any failed probe.
fn connect_times(probes: &[(Instant, Result<Duration, String>)], since: Instant) -> Vec<Duration> {
    let failed: Vec<&String> = probes.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of {} probes failed: {failed:?}", failed.len(), probes.len());
    probes.iter().filter(|(at, _)| *at >= since).filter_map(|(_, r)| r.as_ref().ok().copied()).collect()
}

/// A keep-alive REST connection: publishes without a new connection each time, so it works at
/// the open-file limit too.
struct Rest {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Rest {
    fn connect(addr: SocketAddr) -> Rest {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        Rest { stream, buf: Vec::new() }
    }

    /// A signed POST; the response's status.
    fn post(&mut self, path: &str, body: &str) -> std::io::Result<u16> {
        let query = flux::pusher::signature::sign_query(&common::app(), "POST", path, body.as_bytes(), &[], common::unix_now());
        let request = format!(
            "POST {path}?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(request.as_bytes())?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + length {
                    self.buf.drain(..end + 4 + length);
                    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                    return Ok(status);
                }
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn publish(&mut self, channel: &str, seq: usize) -> std::io::Result<u16> {
        self.post("/apps/app-id/events", &json!({"name": "tick", "channels": [channel], "data": seq.to_string()}).to_string())
    }
}

#[test]
fn a_mass_disconnect_frees_every_descriptor_and_never_stalls_new_connects() {
    let count = scaled(2_000, 8_000);
    let flux = Process::start("");
    let idle = flux.open_files();
    let clients = subscribers(flux.addr, count, "room");
    assert!(flux.open_files() >= idle + count, "the node holds a descriptor per client");

    let prober = Prober::start(flux.addr);
    std::thread::sleep(Duration::from_millis(500));
    // Every client goes at once, with unread bytes: the kernel resets each connection, as when
    // a load balancer or a client host dies.
    let killed = Instant::now();
    drop(clients);
    // A probe may hold one descriptor, and one more may be closing.
    let back_to_idle = common::wait_until(Duration::from_secs(10), || flux.open_files() <= idle + 2);
    let idle_after = killed.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let probes = prober.stop();
    assert!(back_to_idle, "descriptors back to idle ({idle}) within 10 s of the kill: {} open", flux.open_files());

    let after_kill = connect_times(&probes, killed);
    assert!(after_kill.len() >= 10, "probes ran through the kill: {}", after_kill.len());
    let worst = quantile(&after_kill, 1.0);
    assert!(worst < Duration::from_secs(2), "a connect stalled for {worst:?} after the mass disconnect");
    assert!(!flux.log().contains("panicked"), "{}", flux.log());
    println!(
        "figure: mass disconnect of {count} subscribed clients: descriptors back to idle ({idle}) {} after the kill; \
         {} connects since: max {}, p95 {}",
        ms(idle_after),
        after_kill.len(),
        ms(worst),
        ms(quantile(&after_kill, 0.95))
    );
}

#[test]
fn at_the_open_file_limit_accepts_back_off_the_loop_idles_and_a_subscriber_loses_nothing() {
    // The numbers are cheap enough for CI: 700 clients against 600 descriptors.
    let flux = Process::start("ulimit -n 600 &&");
    let mut subscriber = Client::connect(flux.addr);
    subscriber.subscribe("room");
    // Opened before the limit is reached: new connections will not get in.
    let mut publisher = Rest::connect(flux.addr);

    // More clients than the process may hold: the kernel completes the rest into the listen
    // backlog, and the gateway's accept() fails with EMFILE.
    let flood: Vec<TcpStream> = (0..700)
        .filter_map(|_| {
            let mut stream = TcpStream::connect(flux.addr).ok()?;
            stream.write_all(UPGRADE.as_bytes()).ok()?;
            Some(stream)
        })
        .collect();
    assert_eq!(flood.len(), 700, "the kernel took every connection");
    assert!(common::wait_until(Duration::from_secs(10), || flux.log().contains("accept failed")), "{}", flux.log());

    // Over two seconds at the limit the process must be nearly idle: a loop retrying accept()
    // would burn a whole core.
    let window = Duration::from_secs(2);
    let before = flux.cpu_time();
    std::thread::sleep(window);
    let used = flux.cpu_time() - before;
    assert!(used < Duration::from_millis(400), "{used:?} of CPU in {window:?} at the file limit: spinning");
    // About 20 retries in those 2 s, and one line in the log for all of them.
    assert_eq!(flux.log().matches("accept failed").count(), 1, "{}", flux.log());

    // The subscriber that was in before the limit gets every event published meanwhile.
    for seq in 0..200 {
        assert_eq!(publisher.publish("room", seq).expect("publish over the open connection"), 200);
    }
    for seq in 0..200 {
        let event = subscriber.next_event();
        assert_eq!((event["event"].as_str(), event["data"].as_str()), (Some("tick"), Some(seq.to_string().as_str())), "event {seq}");
    }
    subscriber.send(json!({"event": "pusher:ping", "data": {}}));
    assert_eq!(subscriber.next_event()["event"], "pusher:pong");

    // Once clients leave, accepting resumes by itself: new clients get in.
    drop(flood);
    assert!(common::wait_until(Duration::from_secs(10), || timed_connect(flux.addr).is_ok()), "{}", flux.log());
    let mut newcomer = Client::connect(flux.addr);
    newcomer.subscribe("room");
    // The log is read by a thread of this test: wait for the line, it may lag a loaded machine.
    assert!(
        common::wait_until(Duration::from_secs(5), || flux.log().contains("accepting again after")),
        "the episode's end is logged: {}",
        flux.log()
    );
    assert!(!flux.log().contains("panicked"), "{}", flux.log());
    println!(
        "figure: at the file limit (600 descriptors, 700 clients): {} of CPU over {window:?} ({:.1}% of a core); \
         200 events published meanwhile, 200 received in order",
        ms(used),
        100.0 * used.as_secs_f64() / window.as_secs_f64()
    );
}

#[test]
fn a_burst_of_connects_waits_in_the_listen_backlog_instead_of_being_dropped() {
    // At a file limit of 64 the node accepts a few dozen connections, then none: every other
    // connect of the burst must be completed by the kernel into the listen backlog. Were the
    // backlog 128 (mio's and std's), the rest would have their SYNs dropped and wait a second
    // for a retry, as in any burst the acceptor cannot keep up with for a moment.
    let flux = Process::start("ulimit -n 64 &&");
    let burst: Vec<TcpStream> = (0..1_000)
        .map(|i| {
            TcpStream::connect_timeout(&flux.addr, Duration::from_millis(500))
                .unwrap_or_else(|e| panic!("connect {i} of the burst was not completed: {e}"))
        })
        .collect();
    assert!(common::wait_until(Duration::from_secs(5), || flux.log().contains("accept failed")), "{}", flux.log());
    drop(burst);
    // Once they are gone, the node takes new clients again.
    assert!(common::wait_until(Duration::from_secs(10), || timed_connect(flux.addr).is_ok()), "{}", flux.log());
}

/// How an attacker's socket behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unfinished {
    /// Sends the first half of an upgrade request, then nothing.
    HalfSent,
    /// Connects and sends nothing.
    Silent,
    /// Sends its upgrade request one byte at a time, a fifth of the handshake timeout apart.
    Trickle,
}

struct Attacker {
    stream: TcpStream,
    kind: Unfinished,
    opened: Instant,
    sent: usize,
    next_byte: Instant,
    received: Vec<u8>,
    closed_after: Option<Duration>,
}

#[test]
fn unfinished_handshakes_are_closed_at_the_timeout_while_healthy_clients_connect() {
    // The default timeout (10 s) for the figure, a short one in CI. Trickling senders send a byte
    // every fifth of it: every 2 s at the default.
    let timeout = Duration::from_millis(scaled(2_000, 10_000) as u64);
    let (half_sent, silent, trickle) = (scaled(300, 3_000), scaled(300, 3_000), scaled(20, 100));
    let flux = Process::start_with("", &[("FLUX_HANDSHAKE_TIMEOUT_MS", &timeout.as_millis().to_string())]);
    let prober = Prober::start(flux.addr);
    std::thread::sleep(Duration::from_millis(200));

    let kinds = [(Unfinished::HalfSent, half_sent), (Unfinished::Silent, silent), (Unfinished::Trickle, trickle)];
    let half = &UPGRADE.as_bytes()[..UPGRADE.len() / 2];
    let attack_began = Instant::now();
    let mut attackers: Vec<Attacker> = kinds
        .iter()
        .flat_map(|&(kind, count)| std::iter::repeat_n(kind, count))
        .enumerate()
        .map(|(i, kind)| {
            let mut stream = connect_from(source(i), flux.addr).expect("connect");
            let opened = Instant::now();
            if kind == Unfinished::HalfSent {
                stream.write_all(half).expect("send half a request");
            }
            stream.set_nonblocking(true).expect("non-blocking");
            Attacker { stream, kind, opened, sent: 0, next_byte: opened, received: Vec::new(), closed_after: None }
        })
        .collect();

    // Watch every socket until the server closes it, trickling bytes meanwhile.
    let give_up = Instant::now() + timeout + Duration::from_secs(10);
    let mut chunk = [0u8; 1024];
    while attackers.iter().any(|a| a.closed_after.is_none()) && Instant::now() < give_up {
        let now = Instant::now();
        for a in attackers.iter_mut().filter(|a| a.closed_after.is_none()) {
            if a.kind == Unfinished::Trickle && now >= a.next_byte && a.sent < UPGRADE.len() {
                if a.stream.write(&UPGRADE.as_bytes()[a.sent..a.sent + 1]).is_ok() {
                    a.sent += 1;
                }
                a.next_byte = now + timeout / 5;
            }
            loop {
                match a.stream.read(&mut chunk) {
                    Ok(0) => a.closed_after = Some(a.opened.elapsed()),
                    Ok(n) => {
                        a.received.extend_from_slice(&chunk[..n]);
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => a.closed_after = Some(a.opened.elapsed()),
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let probes = prober.stop();

    // Each is closed at the first sweep (every second) after its deadline, which starts when
    // the node accepts it, a little after the attacker's connect.
    let (sweep, slack) = (Duration::from_secs(1), Duration::from_secs(1));
    let mut figures = Vec::new();
    for (kind, count) in kinds {
        let closes: Vec<Duration> = attackers.iter().filter(|a| a.kind == kind).filter_map(|a| a.closed_after).collect();
        assert_eq!(closes.len(), count, "every {kind:?} socket is closed: {} of {count}", closes.len());
        let (first, last) = (quantile(&closes, 0.0), quantile(&closes, 1.0));
        assert!(first >= timeout && last <= timeout + sweep + slack, "{kind:?} closed after {first:?} to {last:?}, timeout {timeout:?}");
        for a in attackers.iter().filter(|a| a.kind == kind) {
            let reply = String::from_utf8_lossy(&a.received);
            match kind {
                Unfinished::Silent => assert!(reply.is_empty(), "a silent socket is closed without a word: {reply}"),
                _ => assert!(reply.starts_with("HTTP/1.1 408"), "{kind:?}, a request had begun: {reply}"),
            }
        }
        figures.push(format!("{count} {kind:?} closed at {:.2}-{:.2} s", first.as_secs_f64(), last.as_secs_f64()));
    }
    let meanwhile = connect_times(&probes, attack_began);
    let worst = quantile(&meanwhile, 1.0);
    assert!(worst < Duration::from_secs(2), "a healthy connect stalled for {worst:?} during the attack");
    assert!(!flux.log().contains("panicked"), "{}", flux.log());
    println!(
        "figure: handshake timeout {timeout:?}: {}; {} healthy connects meanwhile: p95 {}, max {}",
        figures.join(", "),
        meanwhile.len(),
        ms(quantile(&meanwhile, 0.95)),
        ms(worst)
    );
}

#[test]
fn a_flood_from_one_address_over_its_cap_is_refused_while_other_addresses_connect() {
    // In CI a small cap; for the figure the default cap (1,000) and a flood five times over it.
    let (cap, flood_size) = (scaled(50, 1_000), scaled(200, 5_000));
    let config = flux::config::Config { max_pending_handshakes_per_ip: cap as u32, ..common::config() };
    let node = common::start(&config);
    let addr = node.local_addr();
    let attacker = Ipv4Addr::new(127, 0, 0, 2);

    // Silent sockets from one address: the first `cap` are taken in (and would wait for the
    // handshake timeout), the rest are closed as soon as they are accepted.
    let mut flood: Vec<TcpStream> = (0..flood_size).map(|_| connect_from(attacker, addr).expect("connect")).collect();
    let counters = || node.observer().counters();
    assert!(
        common::wait_until(Duration::from_secs(10), || counters().handshakes_refused_per_ip == (flood_size - cap) as u64),
        "refused: {:?}",
        counters()
    );
    let refused = counters().handshakes_refused_per_ip;
    assert_eq!((counters().handshakes_pending, counters().handshakes_refused_node), (cap as u64, 0));
    // Every refusal is counted, so its end of stream is here already: look without waiting (the
    // admitted ones would each cost the wait, and meet their handshake timeout meanwhile).
    let closed = flood.iter_mut().map(closed_already).filter(|&closed| closed).count();
    assert_eq!(closed, flood_size - cap, "the refused connections are closed, the admitted ones wait");

    // Another address connects and is served as usual, and so is one more from the attacker's
    // address as soon as its unfinished handshakes are gone.
    let started = Instant::now();
    let mut other = Client::connect_over(connect_from(Ipv4Addr::new(127, 0, 0, 3), addr).expect("connect"), addr, "app-key");
    other.subscribe("room");
    let other_took = started.elapsed();
    assert!(closed_by_server(&mut connect_from(attacker, addr).expect("connect"), Duration::from_secs(1)), "still over the cap");
    drop(flood);
    assert!(common::wait_until(Duration::from_secs(5), || counters().handshakes_pending == 0), "{:?}", counters());
    let mut again = Client::connect_over(connect_from(attacker, addr).expect("connect"), addr, "app-key");
    again.subscribe("room");
    assert_eq!(counters().handshakes_pending, 0, "an open WebSocket no longer counts");
    println!(
        "figure: {flood_size} silent connections from one address with FLUX_MAX_PENDING_HANDSHAKES_PER_IP={cap}: {} refused \
         at accept, {cap} held; a client from another address connected and subscribed meanwhile in {}",
        refused,
        ms(other_took)
    );
}

/// Whether the server closes `stream` (end of stream or reset) within `within`, sending nothing.
fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("read timeout");
    closed(stream.read(&mut [0u8; 64]))
}

/// Whether the server has closed `stream` already, sending nothing.
fn closed_already(stream: &mut TcpStream) -> bool {
    stream.set_nonblocking(true).expect("non-blocking");
    closed(stream.read(&mut [0u8; 64]))
}

fn closed(read: std::io::Result<usize>) -> bool {
    match read {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn sigterm_under_heavy_fan_out_closes_every_client_with_4200_and_exits_0_promptly() {
    let count = scaled(1_000, 5_000);
    let mut flux = Process::start("");
    let mut clients = subscribers(flux.addr, count, "room");
    for client in &mut clients {
        client.set_nonblocking(true).expect("non-blocking");
    }

    // A publisher sends batches of 10 events to the channel as fast as the node answers, and
    // the clients read everything, until the shutdown.
    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = std::thread::spawn({
        let (addr, publishing) = (flux.addr, publishing.clone());
        move || {
            let mut rest = Rest::connect(addr);
            let batch: Vec<Value> = (0..10).map(|i| json!({"name": "tick", "channel": "room", "data": i.to_string()})).collect();
            let body = json!({"batch": batch}).to_string();
            let mut batches = 0u64;
            while publishing.load(Ordering::Relaxed) && rest.post("/apps/app-id/batch_events", &body).is_ok_and(|s| s == 200) {
                batches += 1;
            }
            batches
        }
    });
    let mut buffers: Vec<Vec<u8>> = vec![Vec::new(); count];
    let mut codes: Vec<Option<u16>> = vec![None; count];
    let mut upgraded = vec![false; count];
    let mut chunk = vec![0u8; 64 * 1024];
    // Reads what each client has; returns whether every client has its close frame.
    let mut read_all = |clients: &mut [TcpStream], codes: &mut [Option<u16>]| {
        for (i, ((client, buf), code)) in clients.iter_mut().zip(&mut buffers).zip(codes.iter_mut()).enumerate() {
            if code.is_some() {
                continue;
            }
            while let Ok(n) = client.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if !upgraded[i] {
                    // The 101 response comes first; frames follow it.
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    buf.drain(..end + 4);
                    upgraded[i] = true;
                }
                if let Some(close) = common::take_close_code(buf) {
                    *code = Some(close);
                    // Answer it, as a client does, so the node need not wait for us.
                    let _ = client.write_all(&[0x88, 0x82, 0, 0, 0, 0, (close >> 8) as u8, close as u8]);
                    break;
                }
            }
        }
        codes.iter().all(Option::is_some)
    };
    let load_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < load_until {
        read_all(&mut clients, &mut codes);
    }
    let messages_before = flux_messages_out(&flux);
    let window_start = Instant::now();
    let window_end = window_start + Duration::from_secs(1);
    while Instant::now() < window_end {
        read_all(&mut clients, &mut codes);
    }
    let rate = (flux_messages_out(&flux) - messages_before) as f64 / window_start.elapsed().as_secs_f64();

    let signalled = Instant::now();
    flux.signal("TERM");
    let deadline = signalled + Duration::from_secs(10);
    while !read_all(&mut clients, &mut codes) && Instant::now() < deadline {}
    let all_closed_after = signalled.elapsed();
    let exit = flux.wait(Duration::from_secs(10));
    let exited_after = signalled.elapsed();
    publishing.store(false, Ordering::Relaxed);
    let batches = publisher.join().expect("the publisher does not panic");

    assert!(batches > 0, "the load ran");
    let wrong: Vec<(usize, Option<u16>)> = codes.iter().copied().enumerate().filter(|(_, c)| *c != Some(4200)).collect();
    assert!(wrong.is_empty(), "{} of {count} clients did not get 4200: {:?}", wrong.len(), &wrong[..wrong.len().min(10)]);
    assert_eq!(exit, Some(0), "{}", flux.log());
    // Within the shutdown grace (2 s by default) and some slack: the clients answered at once.
    assert!(exited_after < Duration::from_secs(4), "exit took {exited_after:?}");
    assert!(!flux.log().contains("panicked"), "{}", flux.log());
    println!(
        "figure: SIGTERM to a node delivering {:.0} frames/s to {count} subscribers: every client got 4200 within {}, \
         the process exited 0 after {}",
        rate,
        ms(all_closed_after),
        ms(exited_after)
    );
}

/// Frames the node has written to clients so far, from its dashboard's `/api/stats`.
fn flux_messages_out(flux: &Process) -> u64 {
    let log = flux.log();
    let dashboard =
        log.split("flux dashboard on ").nth(1).and_then(|rest| rest.split_whitespace().next()).expect("the dashboard's address");
    let (status, stats) = common::get(&format!("{}api/stats", dashboard));
    assert_eq!(status, 200, "{stats}");
    stats["totals"]["messages_out"].as_u64().expect("messages_out")
}
