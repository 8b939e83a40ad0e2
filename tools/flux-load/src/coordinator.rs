//! The coordinator: starts the shards, waits for every client to subscribe, runs the publisher
//! (and, in vacate-storm, the storm watch; in node-death, kills the node and waits for the
//! removals), prints a live line every second, drains, stops the shards, and reports: a table on
//! the terminal and, with `--json`, the summary as JSON.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use serde_json::json;

use flux::pusher::App;

use crate::clients::{unix_micros, Command, Report};
use crate::death::NodeDeath;
use crate::publisher::{self, Published};
use crate::scenario::{Args, Plan, Publishing, Scenario};
use crate::soak::{self, SoakWatch};
use crate::stats::{Latency, Role, Tick};
use crate::storm::{Storm, StormWatch, BUSY_ABOVE_BASELINE};
use crate::Shards;

/// After publishing ends, how long deliveries may keep arriving, at most.
const MAX_DRAIN: Duration = Duration::from_secs(15);

/// Runs the plan; returns success unless the run could not be carried out or, in vacate-storm,
/// failed its check (see [`verdict`]).
pub fn run(args: &Args, plan: &Plan) -> Result<ExitCode, String> {
    let processes = plan.processes(args);
    let mut shards = Shards::start(args, plan, processes)?;
    let mut live = Live::new(shards.count(), plan.nodes.iter().map(ToString::to_string).collect(), args.quiet);

    // Connect and subscribe everyone before the first publish.
    let total = plan.clients.len() as u64;
    let planned_subscriptions = plan.clients.iter().map(|c| c.channels.len() as u64).sum();
    let connect_deadline = Instant::now() + Duration::from_secs(args.connect_timeout);
    eprintln!(
        "flux-load {}: {} clients in {} process(es) against {} ({})",
        plan.scenario.name(),
        total,
        processes,
        live.nodes.join(", "),
        args.label
    );
    while live.subscribed() < total && Instant::now() < connect_deadline {
        live.receive(&shards, Duration::from_millis(200))?;
        live.print_connecting(total, planned_subscriptions);
    }
    if live.subscribed() < total {
        eprintln!(
            "warning: only {} of {total} clients subscribed within {} s ({} of {planned_subscriptions} subscriptions confirmed)",
            live.subscribed(),
            args.connect_timeout,
            live.subscriptions()
        );
    }
    let hold_until = Instant::now() + Duration::from_secs_f64(args.hold_secs.max(0.0));
    while Instant::now() < hold_until {
        live.receive(&shards, Duration::from_millis(200))?;
        live.print_connecting(total, planned_subscriptions);
    }
    live.totals = Tick::default();

    // Publish, or kill.
    shards.broadcast(Command::Start);
    let death = NodeDeath::start(plan, live.subscribed())?;
    live.remaining_members = death.as_ref().map(NodeDeath::remaining);
    let app = App::from_args(&args.app);
    let calls = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let publisher = {
        let (plan, calls, stop, publishers) = (plan.clone(), calls.clone(), stop.clone(), args.publishers);
        std::thread::spawn(move || publisher::run(&plan, &app, publishers, &calls, &stop))
    };
    let storm = StormWatch::start(args, plan);
    let soak = SoakWatch::start(args, plan)?;
    live.start(started);
    while !publisher.is_finished() {
        live.receive(&shards, Duration::from_millis(100))?;
        live.print_running(calls.load(Ordering::Relaxed));
    }
    let published = publisher.join().map_err(|_| "the publisher panicked")?;
    let publish_time = started.elapsed();
    if let Some(death) = &death {
        while !death.over(&live.totals) {
            live.receive(&shards, Duration::from_millis(100))?;
            live.print_running(calls.load(Ordering::Relaxed));
        }
    }

    // Drain: until every expected healthy delivery arrived, or deliveries stop, or the cap.
    let expected = expected_healthy(plan, &published);
    let drain_deadline = Instant::now() + MAX_DRAIN;
    let mut quiet_since = Instant::now();
    let mut last_delivered = live.totals.delivered();
    while Instant::now() < drain_deadline {
        live.receive(&shards, Duration::from_millis(100))?;
        live.print_running(calls.load(Ordering::Relaxed));
        if live.totals.delivered() != last_delivered {
            last_delivered = live.totals.delivered();
            quiet_since = Instant::now();
        }
        let healthy_done = live.totals.roles[Role::Healthy.index()].unique >= expected;
        let slow_settled =
            !plan.clients.iter().any(|c| c.role == Role::Slow) || started.elapsed() > plan.injection.stall + Duration::from_secs(2);
        if (healthy_done && slow_settled && quiet_since.elapsed() > Duration::from_millis(500))
            || quiet_since.elapsed() > Duration::from_secs(3)
        {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let storm = storm.map(StormWatch::finish);
    let soak = soak.map(SoakWatch::finish);

    // Stop the shards and collect their last counts.
    shards.broadcast(Command::Stop);
    let mut done = 0;
    let stop_deadline = Instant::now() + Duration::from_secs(20);
    while done < shards.count() && Instant::now() < stop_deadline {
        match shards.reports.recv_timeout(Duration::from_millis(200)) {
            Ok((shard, report)) => done += usize::from(live.take(shard, report)?),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    shards.join();

    let mut summary = summarize(args, plan, &published, &live, publish_time, expected, processes);
    if let Some(storm) = &storm {
        summary["vacate"] = storm.summary(plan, &live.totals);
    }
    if let Some(death) = &death {
        summary["node_death"] = death.summary(&live.totals);
    }
    print_summary(plan, &summary, &live.totals);
    let soak_verdict = soak.map(|run| {
        let verdict = soak::judge(&run, &soak::Counts::of(&published, expected, &live.totals));
        soak::print(&run, &verdict, &live.totals);
        summary["soak"] = run.summary(&verdict, &live.totals);
        if let Some(path) = &args.svg {
            let title = format!(
                "flux-load soak against {} ({}): {}",
                live.nodes.join(", "),
                args.label,
                if verdict.passed { "passed" } else { "FAILED" }
            );
            match crate::plot::write_svg(path, &title, &run.samples, run.warmup.as_secs_f64()) {
                Ok(()) => eprintln!("samples drawn in {}", path.display()),
                Err(e) => eprintln!("{e}"),
            }
        }
        verdict
    });
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("summary written to {}", path.display());
    }
    if let Some(verdict) = soak_verdict {
        return Ok(if verdict.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    Ok(verdict(&summary, storm.as_ref()))
}

/// Healthy deliveries the run owes: every event of a channel, to each healthy subscriber of it.
fn expected_healthy(plan: &Plan, published: &Published) -> u64 {
    // Only the channels published to: vacate-storm has 200,000 others.
    let published_channels = published.per_channel.iter().enumerate().filter(|(_, &n)| n > 0);
    published_channels.map(|(c, &n)| n * plan.members(Role::Healthy, c)).sum()
}

/// The exit code. The scenarios measure and pass whatever they measured, except soak (see
/// [`soak::judge`]) and vacate-storm, which reproduces a defect and so is also a check: it fails
/// when events were lost (never delivered to the healthy subscribers, or refused by the REST
/// API), a new connection failed during the storm, or the storm never came.
fn verdict(summary: &serde_json::Value, storm: Option<&Storm>) -> ExitCode {
    let Some(storm) = storm else {
        return ExitCode::SUCCESS;
    };
    let mut failures = Vec::new();
    // Publishes that timed out may still have gone out, and so make up for losses in `gaps`; the
    // sequence numbers that never arrived catch those.
    let lost = summary["gaps"].as_u64().unwrap_or(0);
    let never_arrived = summary["roles"]["healthy"]["seq_gaps"].as_u64().unwrap_or(0);
    if lost > 0 || never_arrived > 0 {
        failures.push(format!(
            "the healthy subscribers lost events ({lost} fewer than published reached them; {never_arrived} sequence numbers never arrived)"
        ));
    }
    let refused = summary["publish_errors"].as_u64().unwrap_or(0);
    if refused > 0 {
        failures.push(format!("{refused} publishes failed"));
    }
    match storm {
        Storm::Watched(report) if report.probes.failed() > 0 => {
            failures.push(format!("{} of the connect probes failed", report.probes.failed()));
        }
        Storm::Watched(_) => {}
        Storm::Missed => failures.push("the run ended before the storm (--partition-at is past its end)".to_string()),
    }
    if failures.is_empty() {
        println!("vacate-storm: passed");
        return ExitCode::SUCCESS;
    }
    println!("vacate-storm: FAILED: {}", failures.join("; "));
    ExitCode::FAILURE
}

/// A shard's latest gauges.
#[derive(Debug, Clone, Copy, Default)]
struct Gauges {
    connected: u64,
    subscribed: u64,
    subscriptions: u64,
}

/// Running totals and the live line.
struct Live {
    totals: Tick,
    /// Each shard's latest gauges.
    gauges: Vec<Gauges>,
    /// Counts since the last live line.
    second: Tick,
    started: Option<Instant>,
    began: Instant,
    next_print: Instant,
    peak_per_sec: u64,
    /// When publishing started, in Unix microseconds (deliveries are stamped the same way).
    started_unix_us: u64,
    /// The server nodes, `host:port`.
    nodes: Vec<String>,
    /// node-death, once the node is killed: the members on the others.
    remaining_members: Option<u64>,
    quiet: bool,
}

impl Live {
    fn new(shards: usize, nodes: Vec<String>, quiet: bool) -> Self {
        Live {
            totals: Tick::default(),
            gauges: vec![Gauges::default(); shards],
            second: Tick::default(),
            started: None,
            began: Instant::now(),
            next_print: Instant::now() + Duration::from_secs(1),
            peak_per_sec: 0,
            started_unix_us: 0,
            nodes,
            remaining_members: None,
            quiet,
        }
    }

    fn start(&mut self, at: Instant) {
        self.started = Some(at);
        self.started_unix_us = unix_micros();
        self.second = Tick::default();
        self.next_print = at + Duration::from_secs(1);
    }

    /// Takes the shards' reports for up to `wait`; a shard that failed ends the run.
    fn receive(&mut self, shards: &Shards, wait: Duration) -> Result<(), String> {
        let first = shards.reports.recv_timeout(wait).ok();
        for (shard, report) in first.into_iter().chain(shards.reports.try_iter()) {
            self.take(shard, report)?;
        }
        Ok(())
    }

    /// Adds one report's counts; whether it was the shard's last, or why the shard failed.
    fn take(&mut self, shard: usize, report: Report) -> Result<bool, String> {
        match report {
            Report::Tick(tick) => self.add(shard, &tick),
            Report::Done(tick) => {
                self.add(shard, &tick);
                return Ok(true);
            }
            Report::Failed(why) => return Err(why),
        }
        Ok(false)
    }

    fn add(&mut self, shard: usize, tick: &Tick) {
        self.gauges[shard] = Gauges { connected: tick.connected, subscribed: tick.subscribed, subscriptions: tick.subscriptions };
        let deltas = Tick { connected: 0, subscribed: 0, subscriptions: 0, ..tick.clone() };
        self.totals.add(&deltas);
        self.second.add(&deltas);
    }

    fn connected(&self) -> u64 {
        self.gauges.iter().map(|g| g.connected).sum()
    }

    fn subscribed(&self) -> u64 {
        self.gauges.iter().map(|g| g.subscribed).sum()
    }

    fn subscriptions(&self) -> u64 {
        self.gauges.iter().map(|g| g.subscriptions).sum()
    }

    /// While connecting: clients connected and subscribed, and the subscriptions when clients
    /// hold more than one.
    fn print_connecting(&mut self, total: u64, planned_subscriptions: u64) {
        if Instant::now() < self.next_print {
            return;
        }
        self.next_print += Duration::from_secs(1);
        if !self.quiet {
            let phase = if self.subscribed() >= total { "holding" } else { "connecting" };
            let subscriptions = if planned_subscriptions > total {
                format!(" ({} / {planned_subscriptions} subscriptions)", self.subscriptions())
            } else {
                String::new()
            };
            eprintln!(
                "[{:>4.0}s] {phase}: {} connected, {} / {total} subscribed{subscriptions}",
                self.began.elapsed().as_secs_f64(),
                self.connected(),
                self.subscribed()
            );
        }
    }

    fn print_running(&mut self, calls: u64) {
        if Instant::now() < self.next_print {
            return;
        }
        self.next_print += Duration::from_secs(1);
        let second = std::mem::take(&mut self.second);
        let delivered = second.delivered();
        self.peak_per_sec = self.peak_per_sec.max(delivered);
        if self.quiet {
            return;
        }
        let mut latency = Latency::default();
        for role in &second.roles {
            latency.add(&role.latency);
        }
        let healthy = &self.totals.roles[Role::Healthy.index()];
        // With several nodes, each one's deliveries this second, to its clients.
        let per_node = if self.nodes.len() > 1 {
            let counts =
                self.nodes.iter().enumerate().map(|(j, node)| format!("{node} {}", second.delivered_per_node.get(j).unwrap_or(&0)));
            format!("  per node {}", counts.collect::<Vec<_>>().join(", "))
        } else {
            String::new()
        };
        let removals = self.remaining_members.map_or(String::new(), |remaining| {
            let removals = &self.totals.removals;
            format!("  member_removed {}, members that saw all {} / {remaining}", removals.seen, removals.completed_unix_us.len())
        });
        eprintln!(
            "[{:>4.0}s] conns {:>6}  published {:>8}  deliv/s {:>10}  p50 {:>7.2}ms  p99 {:>8.2}ms  gaps {:>6}  dup {:>4}  disconnects {:>5}  evicted {:>4}{per_node}{removals}",
            self.started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
            self.connected(),
            calls,
            delivered,
            latency.quantile_ms(0.5),
            latency.quantile_ms(0.99),
            healthy.gaps(),
            self.totals.roles.iter().map(|r| r.duplicates).sum::<u64>(),
            self.totals.roles.iter().map(|r| r.disconnects).sum::<u64>(),
            self.totals.evicted(),
        );
    }
}

fn summarize(
    args: &Args,
    plan: &Plan,
    published: &Published,
    live: &Live,
    publish_time: Duration,
    expected: u64,
    processes: usize,
) -> serde_json::Value {
    let totals = &live.totals;
    let healthy = &totals.roles[Role::Healthy.index()];
    let delivered = totals.delivered();
    let last_delivery = Duration::from_micros(totals.last_delivery_unix_us.saturating_sub(live.started_unix_us));
    let window = last_delivery.max(publish_time).as_secs_f64().max(1e-3);
    let roles: serde_json::Map<String, serde_json::Value> = Role::ALL
        .iter()
        .filter(|role| plan.clients.iter().any(|c| c.role == **role))
        .map(|role| {
            let counts = &totals.roles[role.index()];
            let clients = plan.clients.iter().filter(|c| c.role == *role).count();
            (
                role.name().to_string(),
                json!({
                    "clients": clients,
                    "delivered": counts.delivered,
                    "unique": counts.unique,
                    "seq_gaps": counts.gaps(),
                    "late": counts.late,
                    "duplicates": counts.duplicates,
                    "disconnects": counts.disconnects,
                    "reconnects": counts.reconnects,
                    "evicted": counts.evicted,
                    "latency_ms": counts.latency.summary(),
                }),
            )
        })
        .collect();
    let mut summary = json!({
        "scenario": plan.scenario.name(),
        "server": args.label,
        "connections": plan.clients.len(),
        "processes": processes,
        "payload_bytes": plan.payload,
        "publish_seconds": publish_time.as_secs_f64(),
        "published": published.per_channel.iter().sum::<u64>(),
        "publish_calls": published.calls,
        "publish_errors": published.errors,
        "publish_call_ms": published.call_latency.summary(),
        "delivered": delivered,
        "expected": expected,
        "gaps": expected.saturating_sub(healthy.unique),
        "duplicates": totals.roles.iter().map(|r| r.duplicates).sum::<u64>(),
        "deliveries_per_sec": (delivered as f64 / window).round(),
        "peak_deliveries_per_sec": live.peak_per_sec,
        "latency_ms": healthy.latency.summary(),
        "evicted": totals.evicted(),
        "disconnects": totals.roles.iter().map(|r| r.disconnects).sum::<u64>(),
        "reconnects": totals.roles.iter().map(|r| r.reconnects).sum::<u64>(),
        "roles": roles,
        "nodes": live.nodes.iter().enumerate().map(|(j, node)| json!({
            "address": node,
            "clients": plan.clients.iter().filter(|c| c.node == j).count(),
            "publish_calls": published.per_node[j],
            "delivered": totals.delivered_per_node.get(j).copied().unwrap_or(0),
        })).collect::<Vec<_>>(),
    });
    // node-death's member events come after publishing (of nothing) ends: its own section has them.
    if plan.channels.iter().any(|c| c.starts_with("presence-")) && plan.kill.is_none() {
        // Membership changes are announced after the server's coalescing window, so their
        // latency is the window plus the fan-out.
        summary["presence"] = json!({
            "member_events": totals.member_events,
            "member_events_per_sec": (totals.member_events as f64 / window).round(),
            "member_added_latency_ms": totals.member_added_latency.summary(),
            "presence_resyncs": totals.presence_resyncs,
        });
    }
    if plan.scenario == Scenario::CountChurn {
        let subscribers = plan.members(Role::Healthy, 0).max(1) as f64;
        summary["subscription_counts"] = json!({
            "events": totals.count_events,
            "per_subscriber_per_sec": (totals.count_events as f64 / subscribers / window * 100.0).round() / 100.0,
            "deliveries_per_sec": (totals.count_events as f64 / window).round(),
            "changes_per_sec": 2.0 * plan.injection.churn_per_sec,
        });
    }
    if let Publishing::Rounds { phases, .. } = &plan.publishing {
        let phases: Vec<serde_json::Value> = phases
            .iter()
            .map(|phase| {
                let mut completion = Latency::default();
                let mut deliveries = Vec::new();
                for (ts, name) in &published.rounds {
                    if *name != phase.name {
                        continue;
                    }
                    if let Some(c) = totals.completions.get(ts) {
                        completion.record(c.last_us);
                        deliveries.push(c.deliveries);
                    }
                }
                let per_round = if deliveries.is_empty() { 0 } else { deliveries.iter().sum::<u64>() / deliveries.len() as u64 };
                let median_ms = completion.quantile_ms(0.5);
                json!({
                    "name": phase.name,
                    "channels": phase.channels.len(),
                    "rounds": deliveries.len(),
                    "deliveries_per_round": per_round,
                    "completion_ms": completion.summary(),
                    "ns_per_delivery": if per_round > 0 { (median_ms * 1e6 / per_round as f64).round() } else { 0.0 },
                })
            })
            .collect();
        summary["phases"] = json!(phases);
    }
    summary
}

/// The summary's `vacate` section, on the terminal.
fn print_storm(vacate: &serde_json::Value) {
    println!(
        "storm at {:.1} s: {} vacaters closed at once, vacating the {} subscriptions they had asked for (of {} planned; {} confirmed)",
        vacate["storm_at_seconds"].as_f64().unwrap_or(0.0),
        vacate["vacaters"],
        vacate["subscriptions_vacated"],
        vacate["subscriptions_planned"],
        vacate["confirmed_subscriptions_vacated"]
    );
    let probes = &vacate["probes"];
    println!(
        "connect probes over the {:.1} s from the storm: {} made, {} established, {} refused, {} timed out; connect p50 {} ms, p99 {} ms, max {} ms",
        vacate["watched_seconds"].as_f64().unwrap_or(0.0),
        probes["probes"], probes["established"], probes["refused"], probes["timed_out"],
        probes["connect_ms"]["p50"], probes["connect_ms"]["p99"], probes["connect_ms"]["max"]
    );
    let cpu = &vacate["server_cpu"];
    if !cpu.is_null() {
        println!(
            "server CPU from the storm: {} s, {} s above the pre-storm rate of {} cores; per 100,000 subscriptions vacated {} s, {} s above it",
            cpu["seconds"], cpu["seconds_above_baseline"], cpu["before_storm_cores"],
            cpu["per_100k_subscriptions"], cpu["per_100k_subscriptions_above_baseline"]
        );
        println!(
            "server busy (over {BUSY_ABOVE_BASELINE} cores above that rate) for {} s after the storm, peak {} cores over a second{}",
            cpu["busy_seconds"],
            cpu["peak_cores"],
            if cpu["settled"].as_bool() == Some(true) { "" } else { "; still busy at the last reading" }
        );
    }
    if let Some(overflows) = vacate["inbox_overflows"].as_u64() {
        println!("server inbox overflows from the storm: {overflows}");
    }
}

/// The summary's `node_death` section, on the terminal.
fn print_node_death(death: &serde_json::Value) {
    println!(
        "node death: SIGKILL to pid {} (node {}, index {}), which held {} members; {} members on the other nodes",
        death["pid"],
        death["node"].as_str().unwrap_or(""),
        death["node_index"],
        death["members_to_remove"],
        death["remaining_members"]
    );
    let first = death["first_removal_ms"].as_f64().map_or("none".to_string(), |ms| format!("{ms:.1} ms"));
    println!(
        "first member_removed {first} after the kill; {} of {} members saw all {} removed, from the kill p50 {} ms, p95 {} ms, p99 {} ms, max {} ms (target {} ms: {})",
        death["complete"],
        death["remaining_members"],
        death["members_to_remove"],
        death["completion_ms"]["p50"],
        death["completion_ms"]["p95"],
        death["completion_ms"]["p99"],
        death["completion_ms"]["max"],
        death["target_ms"],
        if death["within_target"].as_bool() == Some(true) { "met" } else { "missed" }
    );
    println!(
        "incomplete within {} ms of the kill: {} members, {} of {} removals missing; {} removals repeated, {} removals of members on live nodes",
        death["waited_up_to_ms"],
        death["incomplete"],
        death["removals_missing"],
        death["removals_owed"],
        death["repeated_removals"],
        death["strangers_removed"]
    );
    if death["victims_disconnected"].as_u64() < death["members_to_remove"].as_u64() {
        println!(
            "warning: only {} of the killed node's {} members lost their connection: was pid {} that node's server?",
            death["victims_disconnected"], death["members_to_remove"], death["pid"]
        );
    }
}

fn print_summary(plan: &Plan, summary: &serde_json::Value, totals: &Tick) {
    println!();
    println!(
        "{} against {}: {} clients",
        summary["scenario"].as_str().unwrap_or(""),
        summary["server"].as_str().unwrap_or(""),
        summary["connections"]
    );
    println!(
        "published {} events ({} calls, {} errors) in {:.1} s; delivered {} ({} deliveries/s, peak {}/s)",
        summary["published"],
        summary["publish_calls"],
        summary["publish_errors"],
        summary["publish_seconds"].as_f64().unwrap_or(0.0),
        summary["delivered"],
        summary["deliveries_per_sec"],
        summary["peak_deliveries_per_sec"]
    );
    println!(
        "healthy clients: expected {}, gaps {}; latency p50 {} ms, p95 {} ms, p99 {} ms, max {} ms",
        summary["expected"],
        summary["gaps"],
        summary["latency_ms"]["p50"],
        summary["latency_ms"]["p95"],
        summary["latency_ms"]["p99"],
        summary["latency_ms"]["max"]
    );
    if let Some(presence) = summary.get("presence") {
        println!(
            "presence: {} member_added/member_removed received ({} /s); member_added latency from the join p50 {} ms, p99 {} ms; {} rosters resent",
            presence["member_events"],
            presence["member_events_per_sec"],
            presence["member_added_latency_ms"]["p50"],
            presence["member_added_latency_ms"]["p99"],
            presence["presence_resyncs"]
        );
    }
    if let Some(counts) = summary.get("subscription_counts") {
        println!(
            "subscription counts: {} events to the healthy subscribers, {} per subscriber per second ({} deliveries/s), while {} subscriptions/s changed",
            counts["events"], counts["per_subscriber_per_sec"], counts["deliveries_per_sec"], counts["changes_per_sec"]
        );
    }
    if let Some(vacate) = summary.get("vacate").filter(|v| !v.is_null()) {
        print_storm(vacate);
    }
    if let Some(death) = summary.get("node_death") {
        print_node_death(death);
    }
    if let Some(nodes) = summary["nodes"].as_array().filter(|nodes| nodes.len() > 1) {
        for node in nodes {
            println!(
                "node {}: {} clients, {} publish calls accepted, {} delivered to its clients",
                node["address"].as_str().unwrap_or(""),
                node["clients"],
                node["publish_calls"],
                node["delivered"]
            );
        }
    }
    println!();
    println!(
        "{:<12} {:>7} {:>11} {:>9} {:>7} {:>9} {:>6} {:>11} {:>10} {:>8} {:>9} {:>9} {:>9}",
        "role",
        "clients",
        "delivered",
        "seq gaps",
        "late",
        "dups",
        "evict",
        "disconnects",
        "reconnects",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms"
    );
    for role in Role::ALL {
        let clients = plan.clients.iter().filter(|c| c.role == role).count();
        if clients == 0 {
            continue;
        }
        let c = &totals.roles[role.index()];
        println!(
            "{:<12} {:>7} {:>11} {:>9} {:>7} {:>9} {:>6} {:>11} {:>10} {:>8.2} {:>9.2} {:>9.2} {:>9.2}",
            role.name(),
            clients,
            c.delivered,
            c.gaps(),
            c.late,
            c.duplicates,
            c.evicted,
            c.disconnects,
            c.reconnects,
            c.latency.quantile_ms(0.5),
            c.latency.quantile_ms(0.95),
            c.latency.quantile_ms(0.99),
            c.latency.max_ms()
        );
    }
    if let Some(phases) = summary["phases"].as_array() {
        println!();
        println!(
            "{:<16} {:>9} {:>7} {:>12} {:>14} {:>14} {:>16}",
            "phase", "channels", "rounds", "deliveries", "to last p50 ms", "to last p99 ms", "ns per delivery"
        );
        for p in phases {
            println!(
                "{:<16} {:>9} {:>7} {:>12} {:>14} {:>14} {:>16}",
                p["name"].as_str().unwrap_or(""),
                p["channels"],
                p["rounds"],
                p["deliveries_per_round"],
                p["completion_ms"]["p50"],
                p["completion_ms"]["p99"],
                p["ns_per_delivery"]
            );
        }
    }
}
