//! The `flux` binary as a process: it stops cleanly on SIGTERM and SIGINT (close 4200 to every
//! client, exit 0), answers health checks "not ready" while it drains, and at its open-file
//! limit it neither spins nor stops serving.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{close_code, next_event, open, Client};
use serde_json::json;

/// A `flux` process started by a test, killed if the test fails before it stops.
struct Process {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Process {
    /// Starts `flux` on a free loopback port through `sh -c "<prefix> exec flux"`, and waits
    /// for the line that says where it listens.
    fn start(shell_prefix: &str) -> Process {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("{shell_prefix} exec \"$FLUX_BIN\""))
            .env("FLUX_BIN", env!("CARGO_BIN_EXE_flux"))
            .env("FLUX_PORT", "0")
            .env("FLUX_DASHBOARD_PORT", "0")
            .env("FLUX_WORKERS", "2")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn flux");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.expect("log line");
            log.lock().unwrap().push_str(&line);
            log.lock().unwrap().push('\n');
            if let Some(rest) = line.split("flux listening on ").nth(1) {
                addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
                break;
            }
        }
        let addr = addr.unwrap_or_else(|| panic!("flux did not start:\n{}", log.lock().unwrap()));
        // Keep draining the log so the process never blocks on a full pipe.
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Process { child, addr, log }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().expect("kill");
        assert!(status.success());
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code.
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("flux did not exit within {timeout:?}:\n{}", self.log());
    }

    /// CPU time the process has used so far (user + system), from /proc.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("/proc/pid/stat");
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat.rsplit_once(')').expect("stat format").1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux.
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

#[test]
fn at_the_open_file_limit_accepts_back_off_and_the_loop_stays_responsive() {
    let flux = Process::start("ulimit -n 64 &&");
    let mut client = Client::connect(flux.addr);
    client.subscribe("room");

    // Far more connections than the process may hold: the kernel completes them into the
    // listen backlog, and the gateway's accept() fails with EMFILE.
    let flood: Vec<TcpStream> = (0..150).filter_map(|_| TcpStream::connect(flux.addr).ok()).collect();
    assert!(common::wait_until(Duration::from_secs(5), || flux.log().contains("accept failed")), "{}", flux.log());

    // Over two seconds at the limit the process must be nearly idle: a loop retrying accept()
    // would burn a whole core.
    let before = flux.cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    let used = flux.cpu_time() - before;
    assert!(used < Duration::from_millis(500), "{used:?} of CPU in 2 s at the file limit: spinning");
    // About 20 retries in those 2 s, and one line in the log for all of them.
    assert_eq!(flux.log().matches("accept failed").count(), 1, "{}", flux.log());

    // An established client is still served while the limit holds.
    client.send(json!({"event": "pusher:ping", "data": {}}));
    assert_eq!(client.next_event()["event"], "pusher:pong");

    // Once descriptors are free again, new clients get in.
    drop(flood);
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            let mut probe = match TcpStream::connect(flux.addr) {
                Ok(s) => s,
                Err(_) => return false,
            };
            probe.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            std::io::Write::write_all(&mut probe, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            let mut reply = String::new();
            probe.read_to_string(&mut reply).is_ok() && reply.starts_with("HTTP/1.1 200")
        }),
        "{}",
        flux.log()
    );
    let mut newcomer = Client::connect(flux.addr);
    newcomer.subscribe("room");
    // The log is read by a thread of this test: wait for the line, it may lag a loaded machine.
    assert!(
        common::wait_until(Duration::from_secs(5), || flux.log().contains("accepting again after")),
        "the episode's end is logged: {}",
        flux.log()
    );
    assert!(!flux.log().contains("panicked"), "{}", flux.log());
}
