//! soak's watch on the server and its verdict. While the shards play the soak's clients (chat
//! subscribers, presence churn, reconnects, slow consumers) and the publisher sends the chat,
//! the coordinator runs this watch once, however many shard processes there are: one thread
//! samples the server every `--sample-every` (its memory and open files from /proc/PID/status
//! and /proc/PID/fd, its CPU time from /proc/PID/stat, its queues from the dashboard's
//! /api/connections), another makes signed REST reads as an app's backend would. At the end
//! [`judge`] decides from the samples and the run's counts whether the server held up.
//!
//! Reading /proc text, finding the server from its port, and judging are plain functions,
//! tested without a server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;
use serde::Serialize;
use serde_json::{json, Value};

use flux::pusher::signature::sign_query;
use flux::pusher::App;

use crate::clients::unix_micros;
use crate::prober::STOP_CHECK;
use crate::publisher::{pace, Published};
use crate::scenario::{Args, Plan, SOAK_PRESENCE};
use crate::stats::{Latency, LatencyMs, Role, Tick};
use crate::storm::{cpu_ticks, stopped_before, USER_HZ};

/// Growth past this share, from the first sample after the warm-up to the last, fails memory
/// or open files.
pub const MAX_GROWTH: f64 = 0.05;
/// With at least twice this many samples after the warm-up, "first" and "last" are the medians
/// of this many at either end: the open files of a server whose clients come and go move by a
/// few percent from one sample to the next (a dozen of 260 in a short soak), and one sample
/// caught at a low should not pass for growth.
const ENDS: usize = 3;
/// The longest one dashboard or REST call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// REST reads that failed and are logged, at most (all are counted).
const LOGGED_FAILURES: u64 = 3;

/// One sample of the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since publishing began.
    pub t: f64,
    /// Resident memory, bytes (`VmRSS`).
    pub rss_bytes: u64,
    /// Open file descriptors.
    pub open_files: u64,
    /// CPU used since the previous sample, in percent of one core (all threads).
    pub cpu_percent: f64,
    /// Frames queued in every connection's ring (from /api/connections; None without the
    /// dashboard).
    pub frames_queued: Option<u64>,
    /// Connections backpressured now.
    pub backpressured: Option<u64>,
    /// WebSocket connections open (from the same snapshot).
    pub connections: Option<u64>,
}

/// The watch, running from the start of publishing.
pub struct SoakWatch {
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<Vec<Sample>>,
    reader: JoinHandle<RestReads>,
    dashboard: Option<Dashboard>,
    evictions_before: Option<u64>,
    pid: u32,
    every: Duration,
    warmup: Duration,
}

/// What the watch saw, for [`judge`] and the report.
#[derive(Debug)]
pub struct SoakRun {
    /// The samples, oldest first.
    pub samples: Vec<Sample>,
    /// The REST reads' results.
    pub rest: RestReads,
    /// Evictions the server counted during the run (None without the dashboard).
    pub server_evictions: Option<u64>,
    /// The server's process id.
    pub pid: u32,
    /// Time between samples.
    pub every: Duration,
    /// Samples before this (from the start of publishing) are the warm-up.
    pub warmup: Duration,
}

impl SoakWatch {
    /// Starts watching a soak plan (None for other plans), publishing beginning now. Fails when
    /// the server's process cannot be found.
    pub fn start(args: &Args, plan: &Plan) -> Result<Option<SoakWatch>, String> {
        if plan.scenario != crate::scenario::Scenario::Soak {
            return Ok(None);
        }
        let server = plan.nodes[0];
        let pid = match args.server_pid {
            Some(pid) => pid,
            None => listener_pid(server.port()).ok_or_else(|| {
                format!("soak: no process of this machine listens on port {} that I can see; give its id with --pid", server.port())
            })?,
        };
        if Proc::read(pid).is_none() {
            return Err(format!("soak: cannot read /proc/{pid} (status, fd, stat) of the server"));
        }
        let every = Duration::from_secs_f64(args.sample_every.max(0.1));
        let duration = match plan.publishing {
            crate::scenario::Publishing::Steady { duration, .. } => duration,
            crate::scenario::Publishing::Rounds { .. } => Duration::ZERO,
        };
        let warmup = Duration::from_secs_f64(args.warmup.unwrap_or(duration.as_secs_f64() / 5.0).max(0.0));
        let dashboard = args.metrics_port.map(|port| Dashboard::new(SocketAddr::new(args.host, port)));
        if dashboard.is_none() {
            eprintln!("soak: no --metrics-port: queue depths and the server's evictions are not sampled");
        }
        let evictions_before = dashboard.as_ref().and_then(Dashboard::evictions);
        let stop = Arc::new(AtomicBool::new(false));
        let began = Instant::now();
        let sampler = {
            let (stop, dashboard) = (stop.clone(), dashboard.clone());
            std::thread::spawn(move || sample(pid, dashboard.as_ref(), began, every, &stop))
        };
        let reader = {
            let stop = stop.clone();
            let reads = RestTarget::new(args, plan);
            let rate = args.rest_rate;
            std::thread::spawn(move || reads.map_or_else(RestReads::default, |target| target.run(rate, &stop)))
        };
        Ok(Some(SoakWatch { stop, sampler, reader, dashboard, evictions_before, pid, every, warmup }))
    }

    /// Stops sampling and reading; what was seen.
    pub fn finish(self) -> SoakRun {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.sampler.join().unwrap_or_else(|_| {
            warn!("the soak sampler panicked");
            Vec::new()
        });
        let rest = self.reader.join().unwrap_or_else(|_| {
            warn!("the soak's REST reader panicked");
            RestReads::default()
        });
        let after = self.dashboard.as_ref().and_then(Dashboard::evictions);
        let server_evictions = self.evictions_before.zip(after).map(|(before, after)| after.saturating_sub(before));
        SoakRun { samples, rest, server_evictions, pid: self.pid, every: self.every, warmup: self.warmup }
    }
}

/// Samples until `stop`: one every `every` from `began`.
fn sample(pid: u32, dashboard: Option<&Dashboard>, began: Instant, every: Duration, stop: &AtomicBool) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut previous = Proc::read(pid).map(|p| (Instant::now(), p.cpu_ticks));
    let mut next = began;
    loop {
        next += every;
        if stopped_before(next, stop) {
            return samples;
        }
        let Some(now) = Proc::read(pid) else {
            warn!("soak: the server (pid {pid}) is gone");
            return samples;
        };
        let at = Instant::now();
        let cpu_percent = previous.map_or(0.0, |(then, ticks)| {
            100.0 * now.cpu_ticks.saturating_sub(ticks) as f64 / USER_HZ / at.duration_since(then).as_secs_f64().max(1e-3)
        });
        previous = Some((at, now.cpu_ticks));
        let queues = dashboard.and_then(Dashboard::queues);
        samples.push(Sample {
            t: at.duration_since(began).as_secs_f64(),
            rss_bytes: now.rss_bytes,
            open_files: now.open_files,
            cpu_percent,
            frames_queued: queues.map(|q| q.frames),
            backpressured: queues.map(|q| q.backpressured),
            connections: queues.map(|q| q.connections),
        });
    }
}

/// What /proc tells of a process.
#[derive(Debug, Clone, Copy)]
struct Proc {
    rss_bytes: u64,
    open_files: u64,
    cpu_ticks: u64,
}

impl Proc {
    fn read(pid: u32) -> Option<Proc> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let open_files = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
        Some(Proc { rss_bytes: rss_bytes(&status)?, open_files, cpu_ticks: cpu_ticks(&stat)? })
    }
}

/// `VmRSS` from the text of /proc/PID/status, in bytes.
fn rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The process with a listening TCP socket on `port`: its socket's inode from /proc/net/tcp
/// (or tcp6), then the process holding that inode among /proc/*/fd.
fn listener_pid(port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .find_map(|table| listening_inode(&table, port))?;
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
        fds.filter_map(Result::ok)
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str()))
            .then_some(pid)
    })
}

/// The inode of the socket listening on `port` in the text of /proc/net/tcp or tcp6.
fn listening_inode(table: &str, port: u16) -> Option<u64> {
    const LISTEN: &str = "0A";
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
        (local_port == port && *fields.get(3)? == LISTEN).then(|| fields.get(9)?.parse().ok()).flatten()
    })
}

/// The server's dashboard.
#[derive(Clone)]
struct Dashboard {
    base: String,
    agent: ureq::Agent,
}

/// The queues one connection snapshot shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Queues {
    frames: u64,
    backpressured: u64,
    connections: u64,
}

impl Dashboard {
    fn new(address: SocketAddr) -> Self {
        let agent = ureq::Agent::config_builder().timeout_global(Some(CALL_TIMEOUT)).build().into();
        Dashboard { base: format!("http://{address}"), agent }
    }

    fn get(&self, path: &str) -> Option<Value> {
        let url = format!("{}{path}", self.base);
        let text = self.agent.get(&url).call().and_then(|response| response.into_body().read_to_string());
        match text.map(|text| serde_json::from_str(&text)) {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                warn!("{url}: not JSON: {e}");
                None
            }
            Err(e) => {
                warn!("cannot read {url}: {e}");
                None
            }
        }
    }

    /// Evictions since the server started.
    fn evictions(&self) -> Option<u64> {
        self.get("/api/stats")?["totals"]["evictions"].as_u64()
    }

    fn queues(&self) -> Option<Queues> {
        queues(&self.get("/api/connections?limit=100000")?)
    }
}

/// The queues in an /api/connections document.
fn queues(doc: &Value) -> Option<Queues> {
    let connections = doc["connections"].as_array()?;
    Some(Queues {
        frames: connections.iter().filter_map(|c| c["ring_len"].as_u64()).sum(),
        backpressured: connections.iter().filter(|c| c["backpressured_ms"].is_u64()).count() as u64,
        connections: doc["total"].as_u64()?,
    })
}

/// What the REST reads got.
#[derive(Debug, Default)]
pub struct RestReads {
    /// Reads made.
    pub calls: u64,
    /// Reads not answered 200 with a JSON document.
    pub failed: u64,
    /// Time each read took.
    pub latency: Latency,
}

/// Where and how the REST reads go.
struct RestTarget {
    server: SocketAddr,
    app: App,
    chat: String,
    agent: ureq::Agent,
}

impl RestTarget {
    /// None over TLS: the reads speak plain HTTP (the publisher has the TLS client).
    fn new(args: &Args, plan: &Plan) -> Option<RestTarget> {
        if plan.tls.is_some() {
            eprintln!("soak: no REST reads over --tls");
            return None;
        }
        let agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(CALL_TIMEOUT)).build().into();
        Some(RestTarget { server: plan.nodes[0], app: App::from_args(&args.app), chat: plan.channels[0].clone(), agent })
    }

    /// Reads `rate` times a second until `stop`, each of [`RestTarget::reads`] in turn.
    fn run(&self, rate: f64, stop: &AtomicBool) -> RestReads {
        let mut reads = RestReads::default();
        if rate <= 0.0 {
            return reads;
        }
        let started = Instant::now();
        let all = self.reads();
        while !stop.load(Ordering::Relaxed) {
            let due = started + Duration::from_secs_f64(reads.calls as f64 / rate);
            if due > Instant::now() + STOP_CHECK {
                std::thread::sleep(STOP_CHECK);
                continue;
            }
            pace(due);
            let (path, params) = &all[reads.calls as usize % all.len()];
            self.read(path, params, &mut reads);
        }
        reads
    }

    /// The reads an app's backend makes: every channel, the chat channel's count, the presence
    /// channel's user count, and its users.
    fn reads(&self) -> Vec<(String, Vec<(&'static str, &'static str)>)> {
        let base = format!("/apps/{}/channels", self.app.id);
        vec![
            (base.clone(), vec![]),
            (format!("{base}/{}", self.chat), vec![("info", "subscription_count")]),
            (format!("{base}/{SOAK_PRESENCE}"), vec![("info", "user_count")]),
            (format!("{base}/{SOAK_PRESENCE}/users"), vec![]),
        ]
    }

    fn read(&self, path: &str, params: &[(&str, &str)], reads: &mut RestReads) {
        // Signed as the official server SDKs sign a GET: over the method, path and query.
        let query = sign_query(&self.app, "GET", path, b"", params, unix_micros() / 1_000_000);
        let url = format!("http://{}{path}?{query}", self.server);
        let began = Instant::now();
        let answer = self.agent.get(&url).call().and_then(|mut response| {
            let body = response.body_mut().read_to_string()?;
            Ok((response.status().as_u16(), body))
        });
        reads.latency.record(began.elapsed().as_micros() as u64);
        reads.calls += 1;
        let failure = match answer {
            Ok((200, body)) if serde_json::from_str::<Value>(&body).is_ok() => return,
            Ok((status, body)) => format!("{path} answered {status}: {body:.200}"),
            Err(e) => format!("{path} failed: {e}"),
        };
        reads.failed += 1;
        if reads.failed <= LOGGED_FAILURES {
            warn!("soak REST read: {failure}");
        }
    }
}

/// What the verdict rests on, besides the samples.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// Events published.
    pub published: u64,
    /// Healthy deliveries owed: each event to each healthy subscriber.
    pub expected: u64,
    /// Publish calls that failed.
    pub publish_errors: u64,
    /// The clients' counts, every role.
    pub totals: Tick,
}

impl Counts {
    /// The counts of a finished run.
    pub fn of(published: &Published, expected: u64, totals: &Tick) -> Counts {
        Counts { published: published.per_channel.iter().sum(), expected, publish_errors: published.errors, totals: totals.clone() }
    }
}

/// Growth of one series from the first samples after the warm-up to the last.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Growth {
    /// The first sample after the warm-up (the median of the first [`ENDS`], given enough).
    pub first: f64,
    /// The last sample (the median of the last [`ENDS`], given enough).
    pub last: f64,
    /// The largest sample after the warm-up.
    pub peak: f64,
    /// (last - first) / first.
    pub growth: f64,
}

impl Growth {
    fn of(samples: &[Sample], value: fn(&Sample) -> f64) -> Option<Growth> {
        let ends = if samples.len() >= 2 * ENDS { ENDS } else { 1 };
        let median = |end: &[Sample]| {
            let mut values: Vec<f64> = end.iter().map(value).collect();
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied()
        };
        let (first, last) = (median(samples.get(..ends)?)?, median(samples.get(samples.len() - ends..)?)?);
        let peak = samples.iter().map(value).fold(f64::MIN, f64::max);
        Some(Growth { first, last, peak, growth: if first > 0.0 { (last - first) / first } else { 0.0 } })
    }
}

/// The soak's verdict and the figures it rests on.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Whether every check passed.
    pub passed: bool,
    /// Why not.
    pub failures: Vec<String>,
    /// Samples after the warm-up.
    pub judged_samples: usize,
    /// Resident memory after the warm-up.
    pub rss: Option<Growth>,
    /// Open files after the warm-up.
    pub open_files: Option<Growth>,
    /// Mean CPU after the warm-up, percent of a core.
    pub cpu_percent_mean: f64,
    /// Most frames queued in rings in any sample.
    pub frames_queued_peak: Option<u64>,
    /// Most connections backpressured at once in any sample.
    pub backpressured_peak: Option<u64>,
}

/// Judges a soak: after the warm-up, memory and open files grew less than [`MAX_GROWTH`]; the
/// healthy subscribers got every event, in order, once; every stall of a slow consumer ended in
/// an eviction the server counted, and nobody else was evicted; publishes and REST reads all
/// succeeded.
pub fn judge(run: &SoakRun, counts: &Counts) -> Verdict {
    let warm = run.warmup.as_secs_f64();
    let judged: Vec<Sample> = run.samples.iter().copied().filter(|s| s.t >= warm).collect();
    let mut failures = Vec::new();
    let rss = Growth::of(&judged, |s| s.rss_bytes as f64);
    let open_files = Growth::of(&judged, |s| s.open_files as f64);
    if judged.len() < 2 {
        failures
            .push(format!("{} samples after the {warm:.0} s warm-up, at least 2 needed: run longer or sample more often", judged.len()));
    }
    for (name, growth) in [("memory (RSS)", rss), ("open files", open_files)] {
        if let Some(g) = growth.filter(|g| judged.len() >= 2 && g.growth >= MAX_GROWTH) {
            failures.push(format!(
                "{name} grew {:.1}% after the warm-up ({} to {}), over {:.0}%",
                g.growth * 100.0,
                g.first,
                g.last,
                MAX_GROWTH * 100.0
            ));
        }
    }

    let totals = &counts.totals;
    let healthy = &totals.roles[Role::Healthy.index()];
    if counts.published == 0 {
        failures.push("nothing was published".to_string());
    }
    let missed = counts.expected.saturating_sub(healthy.unique);
    if missed > 0 || healthy.gaps() > 0 || healthy.late > 0 || healthy.duplicates > 0 {
        failures.push(format!(
            "the healthy subscribers missed {missed} of {} events ({} sequence gaps, {} out of order, {} duplicates)",
            counts.expected,
            healthy.gaps(),
            healthy.late,
            healthy.duplicates
        ));
    }
    let wrongly_evicted: u64 = Role::ALL.iter().filter(|r| **r != Role::Slow).map(|r| totals.roles[r.index()].evicted).sum();
    if wrongly_evicted > 0 {
        failures.push(format!("{wrongly_evicted} clients that were not slow consumers were evicted"));
    }
    let stalls = totals.stalls;
    let evicted = totals.roles[Role::Slow.index()].evicted;
    let ended = evicted + stalls.closed + stalls.survived;
    if stalls.survived > 0 {
        failures.push(format!("{} of {ended} slow consumers' stalls ended without an eviction", stalls.survived));
    }
    if evicted + stalls.closed == 0 {
        failures.push(format!("no slow consumer's stall ended in an eviction ({} begun): run longer", stalls.begun));
    }
    // A close the client saw without the 4100 frame must be an eviction the server counted; the
    // server may also have evicted some whose stalls were still under way at the end.
    if let Some(server) = run.server_evictions {
        let under_way = stalls.begun.saturating_sub(ended);
        if server < evicted + stalls.closed || server > evicted + stalls.closed + under_way {
            failures.push(format!(
                "the server counted {server} evictions; the slow consumers saw {} ({evicted} with 4100, {} closed after it), {under_way} stalls under way",
                evicted + stalls.closed,
                stalls.closed
            ));
        }
    }
    if counts.publish_errors > 0 {
        failures.push(format!("{} publishes failed", counts.publish_errors));
    }
    if run.rest.failed > 0 {
        failures.push(format!("{} of {} REST reads failed", run.rest.failed, run.rest.calls));
    }
    let cpu_percent_mean = if judged.is_empty() { 0.0 } else { judged.iter().map(|s| s.cpu_percent).sum::<f64>() / judged.len() as f64 };
    Verdict {
        passed: failures.is_empty(),
        failures,
        judged_samples: judged.len(),
        rss,
        open_files,
        cpu_percent_mean,
        frames_queued_peak: run.samples.iter().filter_map(|s| s.frames_queued).max(),
        backpressured_peak: run.samples.iter().filter_map(|s| s.backpressured).max(),
    }
}

impl SoakRun {
    /// The JSON summary's `soak` section.
    pub fn summary(&self, verdict: &Verdict, totals: &Tick) -> Value {
        let rest_latency: LatencyMs = self.rest.latency.summary();
        json!({
            "server_pid": self.pid,
            "sample_every_seconds": self.every.as_secs_f64(),
            "warmup_seconds": self.warmup.as_secs_f64(),
            "max_growth": MAX_GROWTH,
            "verdict": verdict,
            "slow_stalls": {
                "begun": totals.stalls.begun,
                "evicted_4100": totals.roles[Role::Slow.index()].evicted,
                "closed_after_linger": totals.stalls.closed,
                "survived": totals.stalls.survived,
                "server_evictions": self.server_evictions,
            },
            "rest_reads": {
                "calls": self.rest.calls,
                "failed": self.rest.failed,
                "latency_ms": rest_latency,
            },
            "samples": self.samples,
        })
    }
}

/// The verdict on the terminal.
pub fn print(run: &SoakRun, verdict: &Verdict, totals: &Tick) {
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    println!(
        "soak: {} samples every {:.1} s, {} after the {:.0} s warm-up",
        run.samples.len(),
        run.every.as_secs_f64(),
        verdict.judged_samples,
        run.warmup.as_secs_f64()
    );
    if let Some(g) = verdict.rss {
        println!(
            "  memory (RSS): {:.1} MiB after warm-up, {:.1} MiB at the end ({:+.2}%), peak {:.1} MiB",
            mib(g.first),
            mib(g.last),
            g.growth * 100.0,
            mib(g.peak)
        );
    }
    if let Some(g) = verdict.open_files {
        println!("  open files: {} after warm-up, {} at the end ({:+.2}%), peak {}", g.first, g.last, g.growth * 100.0, g.peak);
    }
    println!("  CPU: {:.1}% of a core on average after warm-up", verdict.cpu_percent_mean);
    if let (Some(frames), Some(backpressured)) = (verdict.frames_queued_peak, verdict.backpressured_peak) {
        println!("  queues: at most {frames} frames queued in rings, {backpressured} connections backpressured at once");
    }
    let stalls = totals.stalls;
    println!(
        "  slow consumers: {} stalls, {} evicted with 4100 read, {} closed after the linger, {} survived; server evictions {}",
        stalls.begun,
        totals.roles[Role::Slow.index()].evicted,
        stalls.closed,
        stalls.survived,
        run.server_evictions.map_or("not read".to_string(), |n| n.to_string())
    );
    println!(
        "  REST reads: {} made, {} failed, p50 {:.2} ms, p99 {:.2} ms",
        run.rest.calls,
        run.rest.failed,
        run.rest.latency.quantile_ms(0.5),
        run.rest.latency.quantile_ms(0.99)
    );
    if verdict.passed {
        println!("soak: passed");
    } else {
        println!("soak: FAILED: {}", verdict.failures.join("; "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_text_is_read() {
        let status = "Name:\tflux\nVmHWM:\t  30000 kB\nVmRSS:\t   25600 kB\nThreads:\t5\n";
        assert_eq!(rss_bytes(status), Some(25_600 * 1024));
        assert_eq!(rss_bytes("Name:\tflux\n"), None);
        // Port 6001 (0x1771) listening on 127.0.0.1; a connection from it is not the listener.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1771 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 111 1 0 20 4 30 10 -1\n\
           1: 0100007F:1771 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 20 4 30 10 -1\n";
        assert_eq!(listening_inode(table, 6001), Some(4242));
        assert_eq!(listening_inode(table, 6002), None);
    }

    #[test]
    fn this_process_is_found_from_its_listening_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(std::process::id()));
        drop(listener);
        assert_eq!(listener_pid(port), None);
        let me = Proc::read(std::process::id()).unwrap();
        assert!(me.rss_bytes > 0 && me.open_files >= 3);
    }

    #[test]
    fn queues_are_summed_over_the_snapshot() {
        let doc = json!({"total": 3, "shown": 3, "connections": [
            {"ring_len": 256, "backpressured_ms": 4000},
            {"ring_len": 3, "backpressured_ms": null},
            {"ring_len": 0, "backpressured_ms": null},
        ]});
        assert_eq!(queues(&doc), Some(Queues { frames: 259, backpressured: 1, connections: 3 }));
        assert_eq!(queues(&json!({"error": "x"})), None);
    }

    /// A run of 10 samples 10 s apart (the first two in the 25 s warm-up) whose memory and open files
    /// are given by `series(k)` for sample k, and a healthy set of counts.
    fn run(series: impl Fn(u64) -> (u64, u64)) -> (SoakRun, Counts) {
        let samples = (1..=10)
            .map(|k| {
                let (rss_bytes, open_files) = series(k);
                Sample { t: 10.0 * k as f64, rss_bytes, open_files, cpu_percent: 20.0, ..Sample::default() }
            })
            .collect();
        let run = SoakRun {
            samples,
            rest: RestReads { calls: 100, ..RestReads::default() },
            server_evictions: Some(4),
            pid: 1,
            every: Duration::from_secs(10),
            warmup: Duration::from_secs(25),
        };
        let mut totals = Tick::default();
        totals.roles[Role::Healthy.index()].unique = 1000;
        totals.roles[Role::Slow.index()].evicted = 3;
        totals.stalls = crate::stats::Stalls { begun: 5, closed: 1, survived: 0 };
        (run, Counts { published: 100, expected: 1000, publish_errors: 0, totals })
    }

    #[test]
    fn a_flat_run_passes_and_warm_up_growth_is_forgiven() {
        // Memory doubles during the warm-up (samples 1 and 2), then stays within 4%.
        let (soak, counts) = run(|k| if k <= 2 { (50 << 20, 200) } else { ((100 << 20) + k * (400 << 10), 300 + k % 2) });
        let verdict = judge(&soak, &counts);
        assert!(verdict.passed, "{:?}", verdict.failures);
        assert_eq!(verdict.judged_samples, 8);
        // The medians of samples 3-5 and 8-10.
        let rss = verdict.rss.unwrap();
        assert_eq!((rss.first, rss.last), (((100 << 20) + 4 * (400 << 10)) as f64, ((100 << 20) + 9 * (400 << 10)) as f64));
        assert!((verdict.cpu_percent_mean - 20.0).abs() < 1e-9);
    }

    #[test]
    fn one_sample_caught_low_is_not_growth() {
        // Clients away at the first sample after the warm-up: 20 fewer files, once.
        let dip = |k| (100 << 20, if k == 3 { 240 } else { 260 });
        let (soak, counts) = run(dip);
        assert!(judge(&soak, &counts).passed);
        // With too few samples for medians (5), the single ends are compared.
        let (mut soak, counts) = run(dip);
        soak.samples.truncate(7);
        assert!(judge(&soak, &counts).failures[0].starts_with("open files grew 8.3%"));
    }

    #[test]
    fn growth_after_the_warm_up_fails() {
        // 2 MiB more per sample from 100 MiB: from 108 (the median of samples 3-5) to 118.
        let (soak, counts) = run(|k| ((100 + 2 * k) << 20, 300));
        let verdict = judge(&soak, &counts);
        assert!(!verdict.passed);
        assert_eq!(verdict.failures.len(), 1, "{:?}", verdict.failures);
        assert!(verdict.failures[0].starts_with("memory (RSS) grew 9.3%"), "{:?}", verdict.failures);
        // 5 more files per sample: 320 to 345.
        let (soak, counts) = run(|k| (100 << 20, 300 + 5 * k));
        assert!(judge(&soak, &counts).failures[0].starts_with("open files grew 7.8%"));
    }

    #[test]
    fn lost_events_and_unevicted_slow_consumers_fail() {
        let flat = |_| (100 << 20, 300);
        let (soak, mut counts) = run(flat);
        counts.totals.roles[Role::Healthy.index()].unique = 999;
        assert!(judge(&soak, &counts).failures[0].contains("missed 1 of 1000"));

        let (soak, mut counts) = run(flat);
        counts.totals.roles[Role::Healthy.index()].late = 1;
        assert!(judge(&soak, &counts).failures[0].contains("1 out of order"));

        let (soak, mut counts) = run(flat);
        counts.totals.stalls.survived = 1;
        assert!(judge(&soak, &counts).failures[0].contains("1 of 5 slow consumers' stalls ended without an eviction"));

        let (soak, mut counts) = run(flat);
        counts.totals.roles[Role::Partitioned.index()].evicted = 1;
        assert!(judge(&soak, &counts).failures[0].contains("not slow consumers were evicted"));

        // A close without 4100 the server did not count as an eviction.
        let (mut soak, counts) = run(flat);
        soak.server_evictions = Some(3);
        assert!(judge(&soak, &counts).failures[0].contains("server counted 3 evictions"));
        // ... while one more than seen is a stall still under way (5 begun, 4 ended).
        soak.server_evictions = Some(5);
        assert!(judge(&soak, &counts).passed);
        soak.server_evictions = Some(6);
        assert!(!judge(&soak, &counts).passed);

        let (soak, mut counts) = run(flat);
        counts.totals.roles[Role::Slow.index()].evicted = 0;
        counts.totals.stalls.closed = 0;
        let failures = judge(&soak, &counts).failures;
        assert!(failures.iter().any(|f| f.starts_with("no slow consumer's stall ended in an eviction")), "{failures:?}");

        let (mut soak, counts) = run(flat);
        soak.rest.failed = 2;
        assert!(judge(&soak, &counts).failures[0].contains("2 of 100 REST reads failed"));
        soak.samples.truncate(2);
        assert!(judge(&soak, &counts).failures[0].contains("0 samples after the 25 s warm-up"));
    }
}
