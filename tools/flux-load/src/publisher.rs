//! The publisher: signed REST calls (`POST /apps/{id}/events`) on keep-alive connections, one
//! per node, paced to the plan; publish number `n` goes to node `n mod N`. Every event's data
//! starts with its channel's sequence number and the send time in microseconds:
//! `"<seq> <unix_us> xxxx..."`, padded to the payload size.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::warn;

use flux::pusher::signature::sign_query;
use flux::pusher::App;

use crate::clients::unix_micros;
use crate::scenario::{Plan, Publishing};
use crate::stats::Latency;
use crate::tls::HttpsConnection;

/// The longest one REST call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What was published.
#[derive(Debug, Default)]
pub struct Published {
    /// Events published per channel (each channel's last sequence number + 1).
    pub per_channel: Vec<u64>,
    /// Calls each node accepted, by index into [`Plan::nodes`].
    pub per_node: Vec<u64>,
    /// REST calls made, and those that did not answer 200.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Time each REST call took.
    pub call_latency: Latency,
    /// For rounds: each publish's timestamp and its phase.
    pub rounds: Vec<(u64, &'static str)>,
}

/// Publishes `plan`'s schedule; counts calls in `calls` as it goes, stops early on `stop`.
///
/// A steady schedule is shared by `threads` publishers, each with its own keep-alive connection
/// to every node, so the rate does not depend on one call's round trip. Publish number `n`
/// carries sequence number `n` and goes to node `n mod N`, whichever thread sends it, so the
/// nodes get equal shares in a fixed order. With several connections (and several nodes, whose
/// paths to a client differ) events may reach a client out of order; the clients' sequence
/// windows count which numbers came, not their order (`SeqWindow` in clients.rs has the bounds).
pub fn run(plan: &Plan, app: &App, threads: usize, calls: &AtomicU64, stop: &AtomicBool) -> Published {
    let start = Instant::now();
    match &plan.publishing {
        Publishing::Steady { channel, rate, duration } => {
            let total = (rate * duration.as_secs_f64()).round() as u64;
            // Threads take the next number from one counter, so the events in flight are always
            // within `threads` of each other, however far behind schedule the server falls.
            let next = AtomicU64::new(0);
            let parts: Vec<Published> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads.clamp(1, 64))
                    .map(|_| {
                        scope.spawn(|| {
                            let mut publisher = Publisher::new(plan, app);
                            loop {
                                let n = next.fetch_add(1, Ordering::Relaxed);
                                if n >= total || stop.load(Ordering::Relaxed) {
                                    break;
                                }
                                pace(start + Duration::from_secs_f64(n as f64 / rate));
                                publisher.publish(&[*channel], n, plan.node_of_publish(n), None);
                                calls.fetch_add(1, Ordering::Relaxed);
                            }
                            publisher.published
                        })
                    })
                    .collect();
                handles.into_iter().filter_map(|h| h.join().ok()).collect()
            });
            let mut published = Published::new(plan);
            for part in parts {
                published.merge(part);
            }
            published
        }
        Publishing::Rounds { phases, rounds, interval } => {
            let mut publisher = Publisher::new(plan, app);
            let mut n = 0u32;
            for phase in phases {
                for round in 0..*rounds {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    pace(start + *interval * n);
                    publisher.publish(&phase.channels, round as u64, plan.node_of_publish(n.into()), Some(phase.name));
                    n += 1;
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            }
            publisher.published
        }
    }
}

impl Published {
    fn new(plan: &Plan) -> Self {
        Published { per_channel: vec![0; plan.channels.len()], per_node: vec![0; plan.nodes.len()], ..Published::default() }
    }

    fn merge(&mut self, other: Published) {
        for (mine, theirs) in self.per_channel.iter_mut().zip(&other.per_channel) {
            *mine += theirs;
        }
        for (mine, theirs) in self.per_node.iter_mut().zip(&other.per_node) {
            *mine += theirs;
        }
        self.calls += other.calls;
        self.errors += other.errors;
        self.call_latency.add(&other.call_latency);
        self.rounds.extend(other.rounds);
    }
}

/// Sleeps until `at`, if it is still to come.
pub fn pace(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

struct Publisher<'a> {
    plan: &'a Plan,
    app: &'a App,
    agent: ureq::Agent,
    /// With `--tls`, one connection per node (ureq here speaks plain HTTP only).
    https: Vec<HttpsConnection>,
    published: Published,
    padding: String,
    last_ts: u64,
}

impl<'a> Publisher<'a> {
    fn new(plan: &'a Plan, app: &'a App) -> Self {
        Publisher {
            plan,
            app,
            // Calls are sequential, so one idle connection per node is all the pool ever keeps.
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(CALL_TIMEOUT))
                .max_idle_connections(plan.nodes.len())
                .max_idle_connections_per_host(1)
                .build()
                .into(),
            https: plan
                .tls
                .iter()
                .flat_map(|tls| plan.nodes.iter().map(|&node| HttpsConnection::new(node, tls.clone(), CALL_TIMEOUT)))
                .collect(),
            published: Published::new(plan),
            padding: "x".repeat(plan.payload),
            last_ts: 0,
        }
    }

    /// Publishes event number `seq` to `channels` in one call to node `node`.
    fn publish(&mut self, channels: &[usize], seq: u64, node: usize, phase: Option<&'static str>) {
        // Timestamps identify rounds, so one publisher never repeats one.
        let ts = unix_micros().max(self.last_ts + 1);
        self.last_ts = ts;
        let head = format!("{seq} {ts} ");
        let data = format!("{head}{}", &self.padding[..self.plan.payload.saturating_sub(head.len())]);
        let names: Vec<&str> = channels.iter().map(|&c| self.plan.channels[c].as_str()).collect();
        let body = serde_json::json!({"name": "load", "channels": names, "data": data}).to_string();
        let path = format!("/apps/{}/events", self.app.id);
        let query = sign_query(self.app, "POST", &path, body.as_bytes(), &[], ts / 1_000_000);
        let began = Instant::now();
        let result = match self.https.get_mut(node) {
            Some(https) => https.post(&format!("{path}?{query}"), &body),
            None => {
                let url = format!("http://{}{path}?{query}", self.plan.nodes[node]);
                // The answer is read to its end, which is what puts the connection back in the
                // agent's pool: left unread, it is closed, and every publish pays for a new one.
                let sent = self.agent.post(&url).header("Content-Type", "application/json").send(body.as_str());
                sent.and_then(|mut response| {
                    let answer = response.body_mut().read_to_string()?;
                    Ok((response.status().as_u16(), answer))
                })
                .map_err(|e| e.to_string())
            }
        };
        self.published.call_latency.record(began.elapsed().as_micros() as u64);
        self.published.calls += 1;
        match result {
            Ok((200, _)) => {
                self.published.per_node[node] += 1;
                for &c in channels {
                    self.published.per_channel[c] += 1;
                }
                if let Some(phase) = phase {
                    self.published.rounds.push((ts, phase));
                }
            }
            Ok((status, answer)) => {
                self.published.errors += 1;
                if self.published.errors <= 3 {
                    warn!("publish answered {status}: {answer:?}");
                }
            }
            Err(e) => {
                self.published.errors += 1;
                if self.published.errors <= 3 {
                    warn!("publish failed: {e}");
                }
            }
        }
    }
}
