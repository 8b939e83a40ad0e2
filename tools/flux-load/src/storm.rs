//! vacate-storm's watch on the server, run once by the coordinator however many shard processes
//! there are. From just before the storm to the end of the run it runs the connect prober and,
//! when asked, samples the server's CPU time from /proc and reads its inbox overflows from its
//! /metrics; at the end it waits for the server's CPU to settle before the last reading.
//!
//! The shards close the vacaters themselves, on the same clock as the partition; the watch only
//! starts a little ahead of them. What the samples mean ([`CpuTrace`]) and how /proc and
//! /metrics text read are plain functions, tested without a server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;
use serde_json::json;

use crate::prober::{self, Probes, STOP_CHECK};
use crate::publisher::pace;
use crate::scenario::{Args, Plan};
use crate::stats::{Role, Tick};

/// How far ahead of the shards' storm the watch takes its "before" readings: more than the
/// shards' own lag (their start command and 20 ms scans), so nothing of the storm precedes them.
const LEAD: Duration = Duration::from_millis(50);
/// Time between two CPU samples: 25 clock ticks, so one tick more or less is 4 % of a core.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// The server has settled when it was not busy for this long.
const SETTLE_WINDOW: Duration = Duration::from_secs(1);
/// After the run, how long to wait for the server to settle, at most.
const MAX_SETTLE_WAIT: Duration = Duration::from_secs(20);
/// CPU load above the pre-storm rate, in cores, that counts as busy with the storm.
pub const BUSY_ABOVE_BASELINE: f64 = 0.2;
/// `/proc/<pid>/stat` counts CPU time in Linux's USER_HZ ticks: 100 a second on x86 and ARM.
/// It is what `sysconf(_SC_CLK_TCK)` returns (and `getconf CLK_TCK` prints); libc is not a
/// dependency, so it is written down here.
pub const USER_HZ: f64 = 100.0;
/// The counter read from the server's /metrics.
const INBOX_OVERFLOWS: &str = "flux_inbox_overflows_total";

/// The watch, running on its own thread from the start of publishing.
pub struct StormWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Storm>,
}

/// How the storm went, as far as the watch saw.
#[derive(Debug)]
pub enum Storm {
    /// It came, and this is what followed.
    Watched(StormReport),
    /// The run ended before it (`--partition-at` past the end).
    Missed,
}

impl StormWatch {
    /// Starts watching a plan with vacaters (None for other plans), publishing having begun now.
    pub fn start(args: &Args, plan: &Plan) -> Option<StormWatch> {
        if !plan.clients.iter().any(|c| c.role == Role::Vacater) {
            return None;
        }
        let began = Instant::now();
        let storm_at = began + plan.injection.partition_at.saturating_sub(LEAD);
        let target = Target {
            // The first node: probing one is enough to see a node stall (`--metrics-port` and
            // `--server-pid` name one server too).
            server: plan.nodes[0],
            key: args.app.app_key.clone(),
            tls: plan.tls.clone(),
            pid: args.server_pid,
            metrics_url: args.metrics_port.map(|port| format!("http://{}/metrics", SocketAddr::new(args.host, port))),
            agent: ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(2))).build().into(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || target.watch(began, storm_at, &stop))
        };
        Some(StormWatch { stop, thread })
    }

    /// Ends probing, waits for the server to settle, and reports.
    pub fn finish(self) -> Storm {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| {
            warn!("the storm watch panicked");
            Storm::Missed
        })
    }
}

/// What the watch reads, and how.
struct Target {
    server: SocketAddr,
    key: String,
    tls: Option<crate::tls::TlsClient>,
    pid: Option<u32>,
    metrics_url: Option<String>,
    agent: ureq::Agent,
}

impl Target {
    fn watch(&self, began: Instant, storm_at: Instant, stop: &AtomicBool) -> Storm {
        let cpu_at_start = self.cpu_seconds();
        if stopped_before(storm_at, stop) {
            return Storm::Missed;
        }
        let overflows_before = self.inbox_overflows();
        let cpu_before = self.cpu_seconds();
        let storm = Instant::now();
        let mut trace = match (cpu_at_start, cpu_before) {
            (Some(start), Some(before)) => Some(CpuTrace::new((before - start) / storm.duration_since(began).as_secs_f64().max(1e-3))),
            _ => None,
        };
        let probes = std::thread::scope(|scope| {
            let prober = scope.spawn(|| prober::run(self.server, &self.key, self.tls.as_ref(), stop));
            let mut next = storm;
            while !stop.load(Ordering::Relaxed) {
                next += SAMPLE_EVERY;
                pace(next);
                self.sample(&mut trace, storm, cpu_before);
            }
            prober.join().unwrap_or_else(|_| {
                warn!("the connect prober panicked");
                Probes::default()
            })
        });
        let settle_by = Instant::now() + MAX_SETTLE_WAIT;
        let mut next = Instant::now();
        while trace.as_ref().is_some_and(|t| !t.settled()) && next < settle_by {
            next += SAMPLE_EVERY;
            pace(next);
            self.sample(&mut trace, storm, cpu_before);
        }
        let overflows = overflows_before.zip(self.inbox_overflows()).map(|(before, after)| after.saturating_sub(before));
        Storm::Watched(StormReport { watched: storm.elapsed(), probes, cpu: trace, inbox_overflows: overflows })
    }

    fn sample(&self, trace: &mut Option<CpuTrace>, storm: Instant, cpu_before: Option<f64>) {
        if let (Some(trace), Some(before), Some(now)) = (trace.as_mut(), cpu_before, self.cpu_seconds()) {
            trace.record(storm.elapsed(), now - before);
        }
    }

    /// The server's CPU time so far, all threads (None without `--server-pid`).
    fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.pid?;
        let path = format!("/proc/{pid}/stat");
        match std::fs::read_to_string(&path).map(|stat| cpu_ticks(&stat)) {
            Ok(Some(ticks)) => Some(ticks as f64 / USER_HZ),
            Ok(None) => {
                warn!("{path}: no CPU times in it");
                None
            }
            Err(e) => {
                warn!("cannot read {path}: {e}");
                None
            }
        }
    }

    /// The server's `flux_inbox_overflows_total` (None without `--metrics-port`).
    fn inbox_overflows(&self) -> Option<u64> {
        let url = self.metrics_url.as_deref()?;
        let text = self.agent.get(url).call().and_then(|response| response.into_body().read_to_string());
        match text.map(|text| counter_value(&text, INBOX_OVERFLOWS)) {
            Ok(Some(value)) => Some(value),
            Ok(None) => {
                warn!("{url} has no {INBOX_OVERFLOWS}");
                None
            }
            Err(e) => {
                warn!("cannot read {url}: {e}");
                None
            }
        }
    }
}

/// What the watch saw from the storm on.
#[derive(Debug)]
pub struct StormReport {
    /// From the storm to the last reading.
    pub watched: Duration,
    /// The connect prober's results.
    pub probes: Probes,
    /// The server's CPU time, with `--server-pid`.
    pub cpu: Option<CpuTrace>,
    /// Inbox overflows from the storm on, with `--metrics-port`.
    pub inbox_overflows: Option<u64>,
}

impl Storm {
    /// The JSON summary's `vacate` section (null if the storm was missed); `totals` has what the
    /// vacaters held when they closed.
    pub fn summary(&self, plan: &Plan, totals: &Tick) -> serde_json::Value {
        match self {
            Storm::Watched(report) => report.summary(plan, totals),
            Storm::Missed => serde_json::Value::Null,
        }
    }
}

impl StormReport {
    fn summary(&self, plan: &Plan, totals: &Tick) -> serde_json::Value {
        let vacaters: Vec<_> = plan.clients.iter().filter(|c| c.role == Role::Vacater).collect();
        let subscriptions = totals.subscriptions_vacated;
        let per_100k = |seconds: f64| {
            if subscriptions > 0 {
                seconds * 100_000.0 / subscriptions as f64
            } else {
                0.0
            }
        };
        json!({
            "vacaters": vacaters.len(),
            "subscriptions_planned": vacaters.iter().map(|c| c.channels.len()).sum::<usize>(),
            "subscriptions_vacated": subscriptions,
            "confirmed_subscriptions_vacated": totals.confirmed_subscriptions_vacated,
            "storm_at_seconds": plan.injection.partition_at.as_secs_f64(),
            "watched_seconds": self.watched.as_secs_f64(),
            "probes": self.probes.summary(),
            "server_cpu": self.cpu.as_ref().map(|cpu| json!({
                "before_storm_cores": round3(cpu.baseline),
                "seconds": round3(cpu.seconds()),
                "seconds_above_baseline": round3(cpu.above_baseline()),
                "per_100k_subscriptions": round3(per_100k(cpu.seconds())),
                "per_100k_subscriptions_above_baseline": round3(per_100k(cpu.above_baseline())),
                "peak_cores": round3(cpu.peak_cores()),
                "busy_seconds": round3(cpu.busy_for().as_secs_f64()),
                "settled": cpu.settled(),
            })),
            "inbox_overflows": self.inbox_overflows,
        })
    }
}

/// Sleeps until `at`, unless `stop` is set first; returns whether it was.
pub fn stopped_before(at: Instant, stop: &AtomicBool) -> bool {
    while !stop.load(Ordering::Relaxed) {
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(STOP_CHECK));
    }
    true
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The server's CPU time from the storm on, sampled every [`SAMPLE_EVERY`].
#[derive(Debug)]
pub struct CpuTrace {
    /// Cores in use before the storm: publishing alone.
    baseline: f64,
    /// Time since the storm, and CPU seconds spent since the storm.
    samples: Vec<(Duration, f64)>,
}

impl CpuTrace {
    fn new(baseline: f64) -> Self {
        CpuTrace { baseline, samples: vec![(Duration::ZERO, 0.0)] }
    }

    fn record(&mut self, since_storm: Duration, cpu_seconds: f64) {
        self.samples.push((since_storm, cpu_seconds));
    }

    /// CPU seconds from the storm to the last sample.
    fn seconds(&self) -> f64 {
        self.samples.last().map_or(0.0, |s| s.1)
    }

    /// CPU seconds from the storm beyond what the pre-storm rate (publishing alone) would have
    /// used: the storm's own cost.
    fn above_baseline(&self) -> f64 {
        let watched = self.samples.last().map_or(0.0, |s| s.0.as_secs_f64());
        (self.seconds() - self.baseline * watched).max(0.0)
    }

    /// Cores in use between consecutive samples, with the end of each interval.
    fn loads(&self) -> impl Iterator<Item = (Duration, f64)> + '_ {
        self.samples.windows(2).map(|w| (w[1].0, (w[1].1 - w[0].1) / (w[1].0 - w[0].0).as_secs_f64().max(1e-3)))
    }

    fn busy(&self, cores: f64) -> bool {
        cores > self.baseline + BUSY_ABOVE_BASELINE
    }

    /// From the storm to the end of the last interval the server was busy in.
    fn busy_for(&self) -> Duration {
        self.loads().filter(|&(_, cores)| self.busy(cores)).map(|(end, _)| end).last().unwrap_or_default()
    }

    /// Whether the server has not been busy for [`SETTLE_WINDOW`].
    fn settled(&self) -> bool {
        let last = self.samples.last().map_or(Duration::ZERO, |s| s.0);
        last >= self.busy_for() + SETTLE_WINDOW
    }

    /// The most cores in use over any interval of at least a second.
    fn peak_cores(&self) -> f64 {
        let mut peak = 0.0f64;
        let mut from = 0;
        for &(at, cpu) in &self.samples {
            while from + 1 < self.samples.len() && at.saturating_sub(self.samples[from + 1].0) >= Duration::from_secs(1) {
                from += 1;
            }
            let (start, start_cpu) = self.samples[from];
            if at.saturating_sub(start) >= Duration::from_secs(1) {
                peak = peak.max((cpu - start_cpu) / (at - start).as_secs_f64());
            }
        }
        peak
    }
}

/// A process's user plus system CPU time in clock ticks, from the text of `/proc/<pid>/stat`.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces; fields 14 and 15 (utime,
    // stime) are the 12th and 13th after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The value of the unlabelled counter `name` in Prometheus or OpenMetrics text.
fn counter_value(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse::<f64>().ok().map(|v| v as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_are_read_past_a_command_name_with_spaces() {
        let stat = "4242 (flux worker (1)) S 1 4242 4242 0 -1 4194304 99 0 0 0 1234 567 0 0 20 0 9 0 53705 3133440";
        assert_eq!(cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(cpu_ticks("4242 (flux) S 1"), None);
    }

    #[test]
    fn a_counter_is_found_by_its_whole_name() {
        let text = "# TYPE flux_inbox_overflows counter\nflux_inbox_overflows_total_x 9\nflux_inbox_overflows_total 17\n# EOF\n";
        assert_eq!(counter_value(text, INBOX_OVERFLOWS), Some(17));
        assert_eq!(counter_value("flux_evictions_total 3\n", INBOX_OVERFLOWS), None);
    }

    /// A trace sampled every 250 ms at these loads (cores), after a baseline of 0.05 cores.
    fn trace(loads: &[f64]) -> CpuTrace {
        let mut trace = CpuTrace::new(0.05);
        let mut cpu = 0.0;
        for (i, cores) in loads.iter().enumerate() {
            cpu += cores * SAMPLE_EVERY.as_secs_f64();
            trace.record(SAMPLE_EVERY * (i as u32 + 1), cpu);
        }
        trace
    }

    #[test]
    fn the_storm_is_busy_until_the_load_falls_back() {
        // 1.5 s at two cores, then quiet.
        let storm = trace(&[2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.05, 0.05, 0.05, 0.05, 0.05]);
        assert_eq!(storm.busy_for(), Duration::from_millis(1500));
        assert!((storm.seconds() - 3.0 - 5.0 * 0.0125).abs() < 1e-9);
        assert!((storm.above_baseline() - (storm.seconds() - 0.05 * 2.75)).abs() < 1e-9);
        assert!((storm.peak_cores() - 2.0).abs() < 1e-9);
        assert!(storm.settled());
        // Still busy at the last sample: not settled.
        let busy = trace(&[0.05, 0.05, 0.05, 0.05, 0.05, 1.0]);
        assert!(!busy.settled());
        assert_eq!(busy.busy_for(), Duration::from_millis(1500));
        // A quiet server was never busy.
        let quiet = trace(&[0.05; 8]);
        assert_eq!(quiet.busy_for(), Duration::ZERO);
        assert!(quiet.settled());
    }
}
