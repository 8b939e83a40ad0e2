//! TLS on the main port, on loopback: wss and https on one port, input that is not TLS, stalled
//! handshakes, a slow TLS consumer, certificates refused at start, and a certificate swap under
//! SIGHUP. Certificates are made per test with `openssl` (see `common::tls`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::process::Process;
use common::tls::{client_config, try_connect, Https, Pki, ServerCert, WssClient};
use common::wait_until;
use flux::config::Config;

/// A test node on a free port serving TLS with `cert`.
fn tls_config(cert: &ServerCert) -> Config {
    Config { tls_cert: Some(cert.cert.clone()), tls_key: Some(cert.key.clone()), ..common::config() }
}

/// Reads until the server closes the connection; returns how long that took, or panics if it
/// is still open after `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    stream.set_read_timeout(Some(within)).expect("read timeout");
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {} // A TLS alert, which is fine to send before closing.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return started.elapsed(),
            Err(e) => panic!("still open after {:?}: {e}", started.elapsed()),
        }
    }
}

#[test]
fn a_wss_client_receives_an_event_published_over_https_on_the_same_port() {
    let Some(pki) = Pki::new("roundtrip") else { return };
    let ca = pki.authority("ca");
    let node = common::start(&tls_config(&pki.server_cert(&ca, "server")));
    let (addr, trust) = (node.local_addr(), client_config(&ca.cert));

    let mut client = WssClient::connect(addr, &trust);
    client.subscribe("news");
    let mut https = Https::connect(addr, &trust);
    assert_eq!(https.rest("GET", "/up", "").0, 200, "health checks answer over https");
    let (status, body) = https.publish("news", "headline", "{\"n\":1}");
    assert_eq!(status, 200, "{body}");
    let event = client.next_event();
    assert_eq!(
        (event["event"].as_str(), event["channel"].as_str(), event["data"].as_str()),
        (Some("headline"), Some("news"), Some("{\"n\":1}"))
    );
    assert!(node.observer().counters().tls_handshakes >= 2, "{:?}", node.observer().counters());
    node.stop();
    node.join();
}

#[test]
fn plaintext_and_garbage_sent_to_the_tls_port_are_closed_at_once_and_counted() {
    let Some(pki) = Pki::new("garbage") else { return };
    let ca = pki.authority("ca");
    // The default handshake timeout (10 s): what is closed here is closed for what it sent.
    let node = common::start(&tls_config(&pki.server_cert(&ca, "server")));
    let addr = node.local_addr();

    let mut plaintext = TcpStream::connect(addr).expect("connect");
    plaintext.write_all(b"GET /up HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("write");
    let took = closed_within(&mut plaintext, Duration::from_secs(2));
    // A handshake record whose message is four bytes of junk.
    let mut garbage = TcpStream::connect(addr).expect("connect");
    garbage.write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef]).expect("write");
    closed_within(&mut garbage, Duration::from_secs(2));
    assert!(took < Duration::from_secs(1), "plaintext closed after {took:?}");
    assert!(wait_until(Duration::from_secs(2), || node.observer().counters().tls_refused == 2), "{:?}", node.observer().counters());

    let mut healthy = WssClient::connect(addr, &client_config(&ca.cert));
    healthy.subscribe("after");
    assert_eq!(node.observer().counters().tls_timed_out, 0);
    node.stop();
    node.join();
}

#[test]
fn a_stalled_handshake_and_a_truncated_record_are_closed_after_the_handshake_timeout() {
    let Some(pki) = Pki::new("stalled") else { return };
    let ca = pki.authority("ca");
    let config = Config { handshake_timeout_ms: 500, ..tls_config(&pki.server_cert(&ca, "server")) };
    let node = common::start(&config);
    let addr = node.local_addr();

    let connected = Instant::now();
    let mut silent = TcpStream::connect(addr).expect("connect");
    // A record header announcing 512 bytes of ClientHello, and one of them.
    let mut truncated = TcpStream::connect(addr).expect("connect");
    truncated.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).expect("write");
    closed_within(&mut silent, Duration::from_secs(3));
    let silent_took = connected.elapsed();
    closed_within(&mut truncated, Duration::from_secs(3));
    let truncated_took = connected.elapsed();
    // Deadlines are swept once a second, so the close comes 0.5-1.5 s after connecting.
    for took in [silent_took, truncated_took] {
        assert!(took >= Duration::from_millis(450), "closed after {took:?}, before the timeout");
        assert!(took < Duration::from_millis(2500), "closed after {took:?}");
    }
    assert!(wait_until(Duration::from_secs(2), || node.observer().counters().tls_timed_out == 2), "{:?}", node.observer().counters());
    assert_eq!(node.observer().counters().tls_refused, 0);
    node.stop();
    node.join();
}

#[test]
fn a_tls_client_that_stops_reading_is_evicted_with_4100_and_a_healthy_one_loses_nothing() {
    const CHANNEL: &str = "flood";
    let Some(pki) = Pki::new("slow") else { return };
    let ca = pki.authority("ca");
    const RING: usize = 256;
    let config = Config { evict_after_ms: 1000, ..tls_config(&pki.server_cert(&ca, "server")) };
    let node = common::start(&config);
    let (addr, trust) = (node.local_addr(), client_config(&ca.cert));

    let mut fast = WssClient::connect(addr, &trust);
    fast.subscribe(CHANNEL);
    let reader = thread::spawn(move || common::flood_until_done(|| fast.next_event()));
    let mut slow = WssClient::connect(addr, &trust);
    slow.subscribe(CHANNEL); // And never reads again until the end.

    let mut https = Https::connect(addr, &trust);
    let filler = "x".repeat(4000);
    let started = Instant::now();
    let mut published = 0u64;
    while node.observer().counters().evictions == 0 {
        assert!(started.elapsed() < Duration::from_secs(40), "no eviction after {published} events");
        let (status, body) = https.publish(CHANNEL, "flood", &format!("{published:08}{filler}"));
        assert_eq!(status, 200, "{body}");
        published += 1;
        // Hard for a second to fill the slow client's buffers, then steadily.
        if started.elapsed() > Duration::from_secs(1) {
            thread::sleep(Duration::from_millis(5));
        }
    }
    let counters = node.observer().counters();
    assert_eq!(counters.evictions, 1, "only the slow consumer: {counters:?}");
    let logged = node.observer().evictions();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!((1001..2000).contains(&logged[0].backpressured_ms), "evicted on the socket's clock: {:?}", logged[0]);
    // Its broadcasts, its two replies and the close at most.
    assert!(logged[0].frames_queued <= RING + 3, "the ring bounds what it holds: {:?}", logged[0]);

    assert_eq!(https.publish(CHANNEL, "done", "{}").0, 200);
    let seen = reader.join().expect("fast reader");
    assert_eq!(seen.len() as u64, published, "the healthy client missed events");
    assert!(seen.iter().enumerate().all(|(i, &n)| i as u64 == n), "events out of order");
    assert_eq!(slow.close_code(), Some(4100), "the slow client reads what was in flight, then 4100");
    node.stop();
    node.join();
}

#[test]
fn a_stalled_tls_reader_hides_kilobytes_in_the_kernel_not_megabytes() {
    let Some(pki) = Pki::new("sndbuf") else { return };
    let ca = pki.authority("ca");
    let config = Config { send_buffer_bytes: 16 * 1024, ..tls_config(&pki.server_cert(&ca, "server")) };
    let node = common::start(&config);
    let (addr, trust) = (node.local_addr(), client_config(&ca.cert));
    let mut stalled = WssClient::connect(addr, &trust);
    stalled.subscribe("flood"); // And never reads again.

    let mut https = Https::connect(addr, &trust);
    let peer = stalled.ws.get_ref().sock.local_addr().expect("address");
    // 1.2 MB, more than its ring holds (256 frames) and the kernel would take with the cap.
    let (hidden, seen) = common::bytes_the_kernel_took(&node, peer, 300, 4096, |data| {
        let (status, body) = https.publish("flood", "flood", data);
        assert_eq!(status, 200, "{body}");
    });
    // The socket's 32 KiB and the client's receive queue (rustls's own 64 KiB of records count
    // here too), with room to spare; the kernel's autotuning takes megabytes.
    assert!(hidden < 1 << 20, "the kernel took {hidden} bytes for a TLS reader that reads nothing: {seen:?}");
    assert!(seen.backpressured_ms.is_some(), "the rest waits in its ring, backpressured: {seen:?}");
    node.stop();
    node.join();
}

/// The SIGHUP test's node serves its app from an apps file, so the certificate's reload is seen
/// beside the apps file's, each on its own.
#[test]
fn sighup_swaps_the_certificate_for_new_clients_while_earlier_ones_keep_theirs() {
    let Some(pki) = Pki::new("sighup") else { return };
    let (old_ca, new_ca) = (pki.authority("old-ca"), pki.authority("new-ca"));
    let (old, new) = (pki.server_cert(&old_ca, "old"), pki.server_cert(&new_ca, "new"));
    let (live_cert, live_key) = (pki.dir.join("live.pem"), pki.dir.join("live.key"));
    let install = |cert: &Path, key: &Path| {
        std::fs::copy(cert, &live_cert).expect("copy certificate");
        std::fs::copy(key, &live_key).expect("copy key");
    };
    install(&old.cert, &old.key);
    let apps = pki.dir.join("apps.toml");
    std::fs::write(&apps, "[[apps]]\nid = \"app-id\"\nkey = \"app-key\"\nsecret = \"app-secret\"\n").expect("apps file");
    let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_string();
    let (cert, key, apps) = (path(&live_cert), path(&live_key), path(&apps));
    let mut flux = Process::start_with("", &[("FLUX_TLS_CERT", &cert), ("FLUX_TLS_KEY", &key), ("FLUX_APPS_FILE", &apps)]);
    let (trust_old, trust_new) = (client_config(&old_ca.cert), client_config(&new_ca.cert));

    let mut before = WssClient::connect(flux.addr, &trust_old);
    before.subscribe("swap");
    assert!(try_connect(flux.addr, &trust_new).is_err(), "the old certificate is served until the reload");

    install(&new.cert, &new.key);
    flux.signal("HUP");
    assert!(flux.wait_for_lines("TLS certificate reloaded", 1), "{}", flux.log());
    assert!(flux.wait_for_lines("SIGHUP: reloaded", 1), "the apps file is reloaded too: {}", flux.log());
    assert!(try_connect(flux.addr, &trust_old).is_err(), "new clients no longer get the old certificate");
    let mut after = WssClient::connect(flux.addr, &trust_new);
    after.subscribe("swap");
    let (status, body) = Https::connect(flux.addr, &trust_new).publish("swap", "renewed", "{}");
    assert_eq!(status, 200, "{body}");
    assert_eq!(before.next_event()["event"], "renewed", "a client from before the swap keeps its session");
    assert_eq!(after.next_event()["event"], "renewed");

    // A renewal gone wrong (the old certificate with the new key) is refused and changes nothing.
    install(&old.cert, &new.key);
    flux.signal("HUP");
    assert!(flux.wait_for_lines("TLS reload refused", 1), "{}", flux.log());
    assert!(flux.wait_for_lines("SIGHUP: reloaded", 2), "a refused certificate does not stop the apps file's reload: {}", flux.log());
    assert!(flux.log().lines().any(|l| l.contains("does not match")), "{}", flux.log());
    WssClient::connect(flux.addr, &trust_new).subscribe("swap");

    flux.signal("TERM");
    assert!(flux.child.wait().expect("flux exits").success());
}

/// Runs `flux` with `cert` and `key` and returns its exit status' success and its last line.
fn refused(cert: &Path, key: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flux"))
        .args(["--port", "0", "--dashboard-port", "0"])
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .env("RUST_LOG", "info")
        .output()
        .expect("flux runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    (output.status.success(), stderr.lines().last().unwrap_or_default().to_string())
}

#[test]
fn a_certificate_that_cannot_serve_is_refused_at_start_with_the_file_and_the_reason() {
    let Some(pki) = Pki::new("refused") else { return };
    let ca = pki.authority("ca");
    let (good, other) = (pki.server_cert(&ca, "good"), pki.server_cert(&ca, "other"));
    let expired = pki.expired_cert(&ca, "expired");
    let missing = pki.dir.join("missing.pem");
    let path = |p: &Path| p.display().to_string();

    let cases = [
        (&missing, &good.key, vec![path(&missing), "No such file".into()]),
        (&good.cert, &other.key, vec![path(&other.key), path(&good.cert), "does not match".into()]),
        (&expired.cert, &expired.key, vec![path(&expired.cert), "expired on Jan  1 00:00:00 2021".into()]),
        (&good.key, &good.key, vec![path(&good.key), "no CERTIFICATE block".into()]),
    ];
    for (cert, key, expected) in cases {
        let (started, line) = refused(cert, key);
        assert!(!started, "flux started with {cert:?} and {key:?}");
        for text in expected {
            assert!(line.contains(&text), "{line:?} does not say {text:?}");
        }
    }
}
