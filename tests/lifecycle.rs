//! The `flux` binary as a process: it stops cleanly on SIGTERM and SIGINT (close 4200 to every
//! client, exit 0) and answers health checks "not ready" while it drains. The open-file limit,
//! and SIGTERM under load, are among the attacks in tests/attacks.rs.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::process::Process;
use common::{close_code, next_event, open, Client};
use serde_json::json;

fn stops_cleanly_on(signal: &str) {
    let mut flux = Process::start("");
    let mut clients: Vec<Client> = (0..6).map(|_| Client::connect(flux.addr)).collect();
    for client in &mut clients {
        client.subscribe("room");
    }
    flux.signal(signal);
    for client in &mut clients {
        assert_eq!(close_code(&mut client.ws), Some(4200), "{}", flux.log());
    }
    assert_eq!(flux.wait(Duration::from_secs(10)), Some(0), "{}", flux.log());
    assert!(TcpStream::connect(flux.addr).is_err(), "the listener is closed");
    assert!(!flux.log().contains("panicked"), "{}", flux.log());
}

#[test]
fn sigterm_closes_every_client_with_4200_and_exits_0() {
    stops_cleanly_on("TERM");
}

#[test]
fn sigint_closes_every_client_with_4200_and_exits_0() {
    stops_cleanly_on("INT");
}

#[test]
fn while_it_drains_after_sigterm_ready_is_503_up_is_200_and_new_clients_get_4100() {
    let mut flux = Process::start("");
    let health = |path: &str| common::get(&format!("http://{}{path}", flux.addr));
    assert_eq!(health("/ready"), (200, json!({"ready": true})));
    // A client that reads its 4200 but does not answer it holds the drain open.
    let mut lingering = common::raw_websocket(flux.addr);
    flux.signal("TERM");
    assert_eq!(common::read_close_code(&mut lingering), 4200, "{}", flux.log());

    // The listener is still open: a load balancer hears "not ready", and "up".
    let (status, body) = health("/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.starts_with("shutting down")), "{body}");
    assert_eq!(health("/up"), (200, json!({"health": "OK"})));
    // A client that arrives now is told to back off and reconnect, elsewhere.
    let mut late = open(flux.addr, "/app/app-key?protocol=7");
    let error = next_event(&mut late);
    assert_eq!((error["event"].as_str(), error["data"]["code"].as_u64()), (Some("pusher:error"), Some(4100)), "{error}");
    assert_eq!(close_code(&mut late), Some(4100));

    // Once its last clients are gone the node finishes, and only then closes its listener.
    drop((lingering, late));
    assert_eq!(flux.wait(Duration::from_secs(10)), Some(0), "{}", flux.log());
    assert!(TcpStream::connect(flux.addr).is_err(), "the listener is closed");
    assert!(!flux.log().contains("panicked"), "{}", flux.log());
}
