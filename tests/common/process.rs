//! The `flux` binary as a child process, for tests that signal it, limit its open files, count
//! its descriptors and CPU time, or put more connections on it than one process may hold
//! beside its clients.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `flux` process started by a test, killed if the test fails before it stops.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Process {
    /// Starts `flux` on a free loopback port through `sh -c "<prefix> exec flux"`, and waits
    /// for the line that says where it listens.
    pub fn start(shell_prefix: &str) -> Process {
        Process::start_with(shell_prefix, &[])
    }

    /// As [`start`](Self::start), with `FLUX_*` settings of its own in `env`.
    pub fn start_with(shell_prefix: &str, env: &[(&str, &str)]) -> Process {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("{shell_prefix} exec \"$FLUX_BIN\""))
            .env("FLUX_BIN", env!("CARGO_BIN_EXE_flux"))
            .env("FLUX_PORT", "0")
            .env("FLUX_DASHBOARD_PORT", "0")
            .env("FLUX_WORKERS", "2")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
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

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().expect("kill");
        assert!(status.success());
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("flux did not exit within {timeout:?}:\n{}", self.log());
    }

    /// CPU time the process has used so far (user + system), from /proc.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("/proc/pid/stat");
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat.rsplit_once(')').expect("stat format").1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux.
    }

    /// Descriptors the process holds open now, from /proc.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).expect("/proc/pid/fd").count()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to 10 s until `count` lines of the log contain `text`; returns whether they do.
    pub fn wait_for_lines(&self, text: &str, count: usize) -> bool {
        super::wait_until(Duration::from_secs(10), || self.log().lines().filter(|line| line.contains(text)).count() >= count)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
