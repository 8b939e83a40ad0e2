//! A panic on any of a node's threads ends the process (see `flux::panics`): no half-alive node
//! keeps its clients connected and unserved. The test runs itself again as a child process that
//! installs the policy, serves a node, and panics on a thread when told; the parent holds a
//! client of that node and sees the process abort and the client's connection end with it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Client;

/// Set in the child's environment.
const CHILD: &str = "FLUX_PANIC_POLICY_CHILD";

#[test]
fn a_panic_on_any_thread_aborts_the_node_and_its_clients_see_it_go() {
    if std::env::var_os(CHILD).is_some() {
        return serve_then_panic();
    }
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "a_panic_on_any_thread_aborts_the_node_and_its_clients_see_it_go", "--nocapture"])
        .env(CHILD, "1")
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the child starts");
    let mut lines = BufReader::new(child.stdout.take().expect("its stdout"));
    let addr = loop {
        let mut line = String::new();
        assert!(lines.read_line(&mut line).expect("read the child") > 0, "the child ended before serving");
        if let Some(addr) = line.trim().strip_prefix("serving on ") {
            break addr.parse().expect("an address");
        }
    };
    let mut client = Client::connect(addr);
    client.subscribe("news");

    let told = Instant::now();
    writeln!(child.stdin.take().expect("its stdin"), "panic").expect("tell the child");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        assert!(told.elapsed() < Duration::from_secs(10), "the child outlived its panic");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(6), "aborted (SIGABRT), not exited: {status:?}");
    let mut stderr = String::new();
    child.stderr.take().expect("its stderr").read_to_string(&mut stderr).expect("read its stderr");
    assert!(stderr.contains("panicked") && stderr.contains("flux-worker-test"), "{stderr}");
    assert!(stderr.contains("the process ends here"), "the policy's own line: {stderr}");
    // The node is gone, and its client knows: its connection is ended, not left hanging.
    client.ws.get_mut().set_read_timeout(Some(Duration::from_secs(5))).expect("a read timeout");
    match client.ws.read() {
        Err(tungstenite::Error::Io(e)) => {
            assert!(!matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{e}")
        }
        Err(_) => {}
        Ok(message) => panic!("the dead node sent {message:?}"),
    }
}

/// The child: a node on a free port with the policy installed; on a line from stdin, a thread
/// named as a worker panics.
fn serve_then_panic() {
    // As the binary does: a logger on stderr, then the policy.
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).try_init();
    flux::panics::end_the_process_on_panic();
    let node = common::start(&common::config());
    println!("serving on {}", node.local_addr());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("read the parent");
    let worker = std::thread::Builder::new().name("flux-worker-test".into()).spawn(|| panic!("a bug in a worker"));
    let _ = worker.expect("a thread").join();
    // Only reached if the panic did not end the process: the parent sees a normal exit and fails.
    std::process::exit(0);
}
