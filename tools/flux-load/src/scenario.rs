//! The command line and the named scenarios. A scenario and its flags make a [`Plan`]: every
//! client's role, channels and source address, what the publisher sends, and the failures to
//! inject. The plan is a pure function of the arguments, so every shard process computes the
//! same one and takes its own slice.

use crate::tls::TlsClient;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use flux::config::AppArgs;

use crate::stats::Role;

/// flux-load: drives Flux, or any Pusher-protocol-7 server, with thousands of WebSocket clients
/// and a signed REST publisher, and measures delivery latency, gaps, duplicates and evictions.
#[derive(Debug, Clone, Parser)]
#[command(name = "flux-load", version)]
pub struct Args {
    /// The scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,

    /// Server address.
    #[arg(long, env = "FLUX_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Server port (WebSocket and REST API).
    #[arg(long, env = "FLUX_PORT", default_value_t = 6001)]
    pub port: u16,
    /// Several server nodes instead of `--port`, comma-separated: ports on `--host`
    /// (`6001,6002,6003`) or IP:port items. Client i connects to node i mod N and publish k goes
    /// to node k mod N, so every shard process computes the same spread.
    #[arg(long, env = "FLUX_LOAD_NODES", value_delimiter = ',')]
    pub nodes: Option<Vec<NodeArg>>,
    /// The app to connect to and publish on.
    #[command(flatten)]
    pub app: AppArgs,

    /// Healthy subscribers (presence-storm: guild members; big-channel and count-churn:
    /// subscribers;
    /// vacate-storm: the vacaters, which close all at once; node-death: the presence members on
    /// every node, the killed one's included).
    #[arg(long)]
    pub connections: Option<usize>,
    /// Slow consumers.
    #[arg(long)]
    pub slow: Option<usize>,
    /// How slow consumers misbehave.
    #[arg(long, value_enum)]
    pub slow_mode: Option<SlowMode>,
    /// `delay` mode: milliseconds between two reads of a slow consumer.
    #[arg(long, default_value_t = 5000)]
    pub slow_delay_ms: u64,
    /// `stop` mode: seconds a slow consumer stops reading before it reads again to see how it
    /// was closed. The default (8 s) outlasts the server's send buffer (FLUX_SEND_BUFFER_BYTES:
    /// under a second to fill at 1 MB/s) plus the 5 s eviction delay, and ends within the
    /// server's 5 s close linger, so the 4100 close frame is still there to read. soak: 20 s, past
    /// the linger: a close without the frame, which the server counted as an eviction, counts as
    /// one (against a server with the kernel's autotuning, eviction comes 6-15 s into a stall).
    #[arg(long)]
    pub stall_secs: Option<f64>,
    /// A slow consumer's receive buffer (`SO_RCVBUF`, bytes): small by default, so its backlog
    /// reaches the server quickly, as with a congested mobile client. 0: the kernel's default,
    /// as a client that sets nothing has (its receive queue then holds more, and on loopback
    /// that counts in the host's TCP memory too).
    #[arg(long, default_value_t = 4096)]
    pub slow_receive_buffer: usize,
    /// Clients that drop their connection and reconnect with backoff (a network partition).
    #[arg(long)]
    pub partition: Option<usize>,
    /// Seconds into publishing when the partition happens (vacate-storm: when every vacater
    /// closes). Default: a third of `--duration`.
    #[arg(long)]
    pub partition_at: Option<f64>,
    /// Leaves and rejoins per second (presence-storm, count-churn; each is two changes: of
    /// membership, of the subscription count).
    #[arg(long)]
    pub churn: Option<f64>,
    /// Milliseconds a churner stays away before it rejoins. The default is long enough for the
    /// leave to be announced, so every change reaches every member; under the server's presence
    /// coalescing window (Flux: 150 ms, announced in batches) a leave and rejoin is a flap that
    /// announces nothing.
    #[arg(long, default_value_t = 1000)]
    pub churn_away_ms: u64,
    /// Publishes per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Publisher threads, each with its own keep-alive connection, sharing the rate.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Seconds of publishing (node-death: seconds from the kill that the remaining members have
    /// to see every member_removed; default three node timeouts).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds every client stays connected and idle before publishing starts (to measure the
    /// server's memory per idle connection, or to look at the dashboard).
    #[arg(long, default_value_t = 0.0)]
    pub hold_secs: f64,
    /// Bytes of event data.
    #[arg(long)]
    pub payload: Option<usize>,
    /// big-channel: the channels the subscribers are spread over in the second phase (default
    /// 50). vacate-storm: the distinct channels each vacater subscribes to (default 1000, Flux's
    /// limit per connection).
    #[arg(long)]
    pub channels: Option<usize>,
    /// big-channel: publishes per phase.
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
    /// big-channel: milliseconds between publishes.
    #[arg(long, default_value_t = 300)]
    pub round_interval_ms: u64,

    /// Clients per loopback source address (127.0.0.1, 127.0.0.2, ...), so ports never run out.
    #[arg(long, default_value_t = 10_000)]
    pub per_source_ip: usize,
    /// Most clients in one process (the open-file limit here is 20,000); more go to children.
    #[arg(long, default_value_t = 18_000)]
    pub max_per_process: usize,
    /// Client processes to use (default: as few as `--max-per-process` allows).
    #[arg(long)]
    pub processes: Option<usize>,
    /// New connections per second while connecting.
    #[arg(long, default_value_t = 4_000)]
    pub connect_rate: u32,
    /// Speak TLS to the server (wss:// and https://), trusting the authorities in `--ca`.
    #[arg(long, requires = "ca")]
    pub tls: bool,
    /// PEM file of the certificate authorities `--tls` trusts.
    #[arg(long, requires = "tls")]
    pub ca: Option<std::path::PathBuf>,
    /// With `--tls`: the name the server's certificate must carry (default: the node's IP).
    #[arg(long, requires = "tls")]
    pub tls_name: Option<String>,
    /// Seconds allowed for every client to connect and subscribe.
    #[arg(long, default_value_t = 60)]
    pub connect_timeout: u64,
    /// Name of the server under test, recorded in the JSON summary.
    #[arg(long, default_value = "flux")]
    pub label: String,
    /// vacate-storm and soak: the server's process id, to read its CPU time (soak: also its
    /// memory and open files) from /proc. soak finds it from `--port` when it is not given.
    #[arg(long, alias = "pid")]
    pub server_pid: Option<u32>,
    /// vacate-storm: the server's dashboard port, to read `flux_inbox_overflows_total` from its
    /// /metrics before and after the storm; soak: to read its queues (frames queued in rings,
    /// backpressured connections) and evictions from /api/connections and /api/stats (Flux only).
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// soak: seconds between two samples of the server.
    #[arg(long, default_value_t = 10.0)]
    pub sample_every: f64,
    /// soak: seconds of warm-up, whose samples the flatness verdict ignores (default: a fifth of
    /// `--duration`).
    #[arg(long)]
    pub warmup: Option<f64>,
    /// soak: signed REST reads per second (channels, a channel, a presence channel's users).
    #[arg(long, default_value_t = 10.0)]
    pub rest_rate: f64,
    /// soak: writes the samples as an SVG chart to this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// node-death: the node to kill, an index into `--nodes` (0-based); its clients are the
    /// members the others must see removed.
    #[arg(long, required_if_eq("scenario", "node-death"))]
    pub kill_node: Option<usize>,
    /// node-death: the process id of that node's server, sent SIGKILL once every member has
    /// joined and `--hold-secs` has passed.
    #[arg(long, required_if_eq("scenario", "node-death"))]
    pub kill_pid: Option<u32>,
    /// node-death: the cluster's node timeout (the servers' `FLUX_NODE_TIMEOUT_MS`), for the
    /// default `--duration` and the target (the timeout plus 1 s).
    #[arg(long, env = "FLUX_NODE_TIMEOUT_MS", default_value_t = 10_000)]
    pub node_timeout_ms: u64,
    /// Writes the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No live line every second.
    #[arg(long)]
    pub quiet: bool,

    /// Internal: run as shard INDEX of COUNT, reading commands on stdin and reporting on stdout.
    #[arg(long, hide = true, num_args = 2, value_names = ["INDEX", "COUNT"])]
    pub shard: Option<Vec<usize>>,
}

/// One `--nodes` item: a port on `--host`, or a whole address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeArg {
    /// A port on `--host`.
    Port(u16),
    /// An IP address and port.
    Addr(SocketAddr),
}

impl FromStr for NodeArg {
    type Err = String;

    fn from_str(item: &str) -> Result<Self, Self::Err> {
        let item = item.trim();
        item.parse()
            .map(NodeArg::Port)
            .or_else(|_| item.parse().map(NodeArg::Addr))
            .map_err(|_| format!("{item:?} is neither a port nor an IP:port address"))
    }
}

impl NodeArg {
    fn address(self, host: IpAddr) -> SocketAddr {
        match self {
            NodeArg::Port(port) => SocketAddr::new(host, port),
            NodeArg::Addr(address) => address,
        }
    }
}

/// The default leaves and rejoins per second of the scenarios that churn: presence-storm's make
/// 100 membership changes a second; count-churn's 1,000 subscription-count changes.
fn default_churn(scenario: Scenario) -> f64 {
    match scenario {
        Scenario::CountChurn => 500.0,
        // A leave or a dropped connection every half second, each churner and reconnecting
        // client in turn: each of the 40 goes about every 20 s.
        Scenario::Soak => 2.0,
        _ => 50.0,
    }
}

/// vacate-storm's healthy subscribers: enough to see lost events, few enough that the storm is
/// the vacaters' alone.
const VACATE_STORM_WITNESSES: usize = 10;

/// soak's presence channel (its chat channel is the plan's first).
pub const SOAK_PRESENCE: &str = "presence-soak";

/// soak: the healthy subscribers that are also members of its presence channel, and the
/// churners that leave and rejoin it: 60 members, within Flux's default of 100 per channel.
const SOAK_WITNESSES: usize = 40;
const SOAK_CHURNERS: usize = 20;
const _: () = assert!(SOAK_WITNESSES + SOAK_CHURNERS <= 100, "within Flux's default presence limit");

/// The named scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Fast and slow subscribers on one channel under a steady publisher.
    SlowConsumer,
    /// 1,000 guild members, 1,000 messages/s, 10 slow consumers, 100 partitioned clients.
    ChatStorm,
    /// S subscribers on one channel, then the same S over 50 channels: time to last delivery.
    BigChannel,
    /// A 5,000-10,000 member guild on a presence channel: joins and leaves (each announced to
    /// every member) while 10 events/s are published to it.
    PresenceStorm,
    /// 200 vacaters, each on 1,000 channels of its own, close at once while 10 healthy
    /// subscribers take 200 events/s and a prober times new connections.
    VacateStorm,
    /// 3,000 presence members over the `--nodes`; one node is killed with SIGKILL, and the time
    /// until each member on the others has seen member_removed for all of its members is
    /// measured. Nothing is published.
    NodeDeath,
    /// 20,000 subscribers of one public channel; a tenth take turns leaving and rejoining (500 a
    /// second: 1,000 subscription changes a second) while the others count the
    /// subscription-count events they get (a Flux server needs FLUX_SUBSCRIPTION_COUNT_EVENTS).
    /// One event a second is published as the latency probe.
    CountChurn,
    /// Everything at once for `--duration` (default 60 s; 30 minutes for the figure): 200 chat
    /// subscribers at 100 events/s of 4 KB, 40 of them also on a presence channel that 20
    /// churners leave and rejoin, 20 clients that drop their connection and reconnect, 5 slow
    /// consumers that stall, are evicted and come back to stall again, and signed REST reads.
    /// Samples the server's memory, open files, CPU and queues every `--sample-every` and judges
    /// them (see soak.rs); exits non-zero when the verdict fails.
    Soak,
}

impl Scenario {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::SlowConsumer => "slow-consumer",
            Scenario::ChatStorm => "chat-storm",
            Scenario::BigChannel => "big-channel",
            Scenario::PresenceStorm => "presence-storm",
            Scenario::VacateStorm => "vacate-storm",
            Scenario::NodeDeath => "node-death",
            Scenario::CountChurn => "count-churn",
            Scenario::Soak => "soak",
        }
    }
}

/// How a slow consumer misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlowMode {
    /// Stops reading for `--stall-secs`, then reads again (to see how it was closed).
    Stop,
    /// Reads one small chunk every `--slow-delay-ms`.
    Delay,
}

/// One client.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Its role.
    pub role: Role,
    /// Indices into [`Plan::channels`].
    pub channels: Vec<usize>,
    /// Source address to connect from.
    pub source: Ipv4Addr,
    /// Index into [`Plan::nodes`] of the node it connects to (and reconnects to).
    pub node: usize,
}

/// What the publisher sends.
#[derive(Debug, Clone)]
pub enum Publishing {
    /// `rate` events per second to `channel` for `duration`.
    Steady { channel: usize, rate: f64, duration: Duration },
    /// Phases of `rounds` publishes `interval` apart; each publish goes to all the phase's channels.
    Rounds { phases: Vec<Phase>, rounds: usize, interval: Duration },
}

/// One phase of a rounds publisher.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Its name in the report.
    pub name: &'static str,
    /// Channels each publish goes to (one REST call).
    pub channels: Vec<usize>,
}

/// Failures to inject, timed from the start of publishing.
#[derive(Debug, Clone)]
pub struct Injection {
    /// How slow consumers behave.
    pub slow_mode: SlowMode,
    /// Stop mode: how long they stop reading.
    pub stall: Duration,
    /// Delay mode: time between reads.
    pub read_delay: Duration,
    /// Their `SO_RCVBUF`; `None`: the kernel's default.
    pub slow_receive_buffer: Option<usize>,
    /// When partitioned clients drop and vacaters close.
    pub partition_at: Duration,
    /// Leaves and rejoins per second.
    pub churn_per_sec: f64,
    /// How long a churner stays away.
    pub churn_away: Duration,
    /// soak: partitioned clients drop their connection in turns with the churners' leaves, all
    /// run long, instead of all at `partition_at`; slow consumers stall again after each
    /// eviction (they reconnect) or stall that did not end in one.
    pub rolling: bool,
}

/// Everything a run does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The scenario.
    pub scenario: Scenario,
    /// The server nodes: clients are spread over them and publishes go to each in turn.
    pub nodes: Vec<SocketAddr>,
    /// Channel names.
    pub channels: Vec<String>,
    /// Every client, in index order.
    pub clients: Vec<ClientSpec>,
    /// The publisher's schedule.
    pub publishing: Publishing,
    /// Bytes of event data.
    pub payload: usize,
    /// Failure injection.
    pub injection: Injection,
    /// Whether shards track each publish's completion (time to its last delivery).
    pub track_completions: bool,
    /// node-death's kill.
    pub kill: Option<Kill>,
    /// How to speak TLS (`--tls`); `None`: plain TCP.
    pub tls: Option<TlsClient>,
}

/// A node killed once every member has joined (node-death).
#[derive(Debug, Clone, Copy)]
pub struct Kill {
    /// Index into [`Plan::nodes`]; its clients are [`Role::Victim`]s.
    pub node: usize,
    /// The server's process id.
    pub pid: u32,
    /// The cluster's node timeout.
    pub node_timeout: Duration,
    /// From the kill, how long the remaining members have to see every removal.
    pub within: Duration,
}

/// How many clients of each role a plan has, in the order they are numbered.
#[derive(Debug, Clone, Copy, Default)]
struct Population {
    healthy: usize,
    slow: usize,
    partitioned: usize,
    churners: usize,
    vacaters: usize,
}

impl Population {
    fn of(args: &Args) -> Population {
        let slow = args.slow.unwrap_or(0);
        let partitioned = args.partition.unwrap_or(0);
        match args.scenario {
            Scenario::SlowConsumer => {
                Population { healthy: args.connections.unwrap_or(200), slow: args.slow.unwrap_or(5), partitioned, ..Population::default() }
            }
            Scenario::ChatStorm => Population {
                healthy: args.connections.unwrap_or(890),
                slow: args.slow.unwrap_or(10),
                partitioned: args.partition.unwrap_or(100),
                ..Population::default()
            },
            Scenario::BigChannel => Population { healthy: args.connections.unwrap_or(10_000), slow, partitioned, ..Population::default() },
            Scenario::PresenceStorm | Scenario::CountChurn => {
                let members = args.connections.unwrap_or(if args.scenario == Scenario::CountChurn { 20_000 } else { 5_000 });
                // A tenth of them take turns leaving and rejoining.
                let churners = if args.churn.unwrap_or(default_churn(args.scenario)) > 0.0 { (members / 10).max(1) } else { 0 };
                Population { healthy: members - churners.min(members), slow, partitioned, churners, vacaters: 0 }
            }
            Scenario::VacateStorm => {
                Population { healthy: VACATE_STORM_WITNESSES, slow, partitioned, churners: 0, vacaters: args.connections.unwrap_or(200) }
            }
            // The killed node's share of them become victims once they are given their nodes.
            Scenario::NodeDeath => Population { healthy: args.connections.unwrap_or(3_000), ..Population::default() },
            Scenario::Soak => Population {
                healthy: args.connections.unwrap_or(200),
                slow: args.slow.unwrap_or(5),
                partitioned: args.partition.unwrap_or(20),
                churners: if args.churn.unwrap_or(default_churn(Scenario::Soak)) > 0.0 { SOAK_CHURNERS } else { 0 },
                vacaters: 0,
            },
        }
    }

    /// Every client's role, in index order.
    fn roles(self) -> impl Iterator<Item = Role> {
        std::iter::repeat_n(Role::Healthy, self.healthy)
            .chain(std::iter::repeat_n(Role::Slow, self.slow))
            .chain(std::iter::repeat_n(Role::Partitioned, self.partitioned))
            .chain(std::iter::repeat_n(Role::Churn, self.churners))
            .chain(std::iter::repeat_n(Role::Vacater, self.vacaters))
    }
}

impl Plan {
    /// The plan for `args`.
    pub fn new(args: &Args) -> Plan {
        let scenario = args.scenario;
        let population = Population::of(args);
        let default_rate = match scenario {
            Scenario::SlowConsumer => 1_000.0,
            Scenario::ChatStorm => 1_000.0,
            Scenario::BigChannel => 0.0,
            // A light chat in the guild: the latency probe while membership churns.
            Scenario::PresenceStorm => 10.0,
            // Steady enough that a stall of a few hundred milliseconds shows as late or lost events.
            Scenario::VacateStorm => 200.0,
            // Only membership is measured; publishes would go to the dead node too.
            Scenario::NodeDeath => 0.0,
            // The latency probe, and what makes the run last: the counts are what is measured.
            Scenario::CountChurn => 1.0,
            // A chat stream of 400 KB/s to each subscriber (with 4 KB events): enough to fill a
            // stalled reader's socket buffers in seconds, light enough to run for hours.
            Scenario::Soak => 100.0,
        };
        let node_timeout = Duration::from_millis(args.node_timeout_ms);
        let duration = Duration::from_secs_f64(args.duration.unwrap_or(match scenario {
            Scenario::SlowConsumer => 20.0,
            Scenario::VacateStorm => 10.0,
            Scenario::NodeDeath => 3.0 * node_timeout.as_secs_f64(),
            Scenario::Soak => 60.0,
            _ => 30.0,
        }));
        let payload = args.payload.unwrap_or(match scenario {
            Scenario::SlowConsumer => 1024,
            Scenario::Soak => 4096,
            _ => 100,
        });

        let mut channels = vec![match scenario {
            Scenario::BigChannel => "big".to_string(),
            // A real presence channel: every join and leave is announced to every member.
            Scenario::PresenceStorm | Scenario::NodeDeath => "presence-guild".to_string(),
            Scenario::VacateStorm => "healthy".to_string(),
            Scenario::CountChurn => "counted".to_string(),
            Scenario::Soak => "soak-chat".to_string(),
            _ => "guild-chat".to_string(),
        }];
        let spread = args.channels.unwrap_or(50).max(1);
        let per_vacater = args.channels.unwrap_or(1000).max(1);
        match scenario {
            Scenario::BigChannel => channels.extend((0..spread).map(|i| format!("small-{i}"))),
            Scenario::VacateStorm => {
                channels.extend((0..population.vacaters).flat_map(|v| (0..per_vacater).map(move |k| format!("vacate-{v}-{k}"))))
            }
            Scenario::Soak => channels.push(SOAK_PRESENCE.to_string()),
            _ => {}
        }

        let nodes: Vec<SocketAddr> = match args.nodes.as_deref() {
            Some(list) if !list.is_empty() => list.iter().map(|node| node.address(args.host)).collect(),
            _ => vec![SocketAddr::new(args.host, args.port)],
        };
        let kill = match (scenario, args.kill_node, args.kill_pid) {
            (Scenario::NodeDeath, Some(node), Some(pid)) => Some(Kill { node, pid, node_timeout, within: duration }),
            _ => None,
        };
        let per_ip = args.per_source_ip.max(1);
        let first_vacater = population.roles().position(|role| role == Role::Vacater).unwrap_or(0);
        let clients = population
            .roles()
            .enumerate()
            .map(|(i, role)| ClientSpec {
                role: if kill.is_some_and(|kill| kill.node == i % nodes.len()) { Role::Victim } else { role },
                channels: match (scenario, role) {
                    // Every client is on the big channel and on one of the small ones.
                    (Scenario::BigChannel, _) => vec![0, 1 + i % spread],
                    // Each vacater holds its own run of channels, after the healthy one.
                    (Scenario::VacateStorm, Role::Vacater) => {
                        let first = 1 + (i - first_vacater) * per_vacater;
                        (first..first + per_vacater).collect()
                    }
                    // The first healthy subscribers are presence members too; churners are only that.
                    (Scenario::Soak, Role::Healthy) if i < SOAK_WITNESSES => vec![0, 1],
                    (Scenario::Soak, Role::Churn) => vec![1],
                    _ => vec![0],
                },
                source: Ipv4Addr::new(127, 0, 0, 1 + (i / per_ip).min(253) as u8),
                // By index over every role, so each role is spread as evenly as the whole.
                node: i % nodes.len(),
            })
            .collect();

        let publishing = match scenario {
            Scenario::BigChannel => Publishing::Rounds {
                phases: vec![
                    Phase { name: "one channel", channels: vec![0] },
                    Phase { name: "spread channels", channels: (1..=spread).collect() },
                ],
                rounds: args.rounds.max(1),
                interval: Duration::from_millis(args.round_interval_ms),
            },
            _ => Publishing::Steady { channel: 0, rate: args.rate.unwrap_or(default_rate), duration },
        };
        let slow_mode = args.slow_mode.unwrap_or(match scenario {
            Scenario::ChatStorm => SlowMode::Delay,
            _ => SlowMode::Stop,
        });
        Plan {
            scenario,
            nodes,
            channels,
            clients,
            publishing,
            payload,
            injection: Injection {
                slow_mode,
                stall: Duration::from_secs_f64(args.stall_secs.unwrap_or(if scenario == Scenario::Soak { 20.0 } else { 8.0 })),
                read_delay: Duration::from_millis(args.slow_delay_ms),
                slow_receive_buffer: Some(args.slow_receive_buffer).filter(|&bytes| bytes > 0),
                partition_at: Duration::from_secs_f64(args.partition_at.unwrap_or(duration.as_secs_f64() / 3.0)),
                churn_per_sec: if population.churners > 0 { args.churn.unwrap_or(default_churn(scenario)) } else { 0.0 },
                churn_away: Duration::from_millis(args.churn_away_ms),
                rolling: scenario == Scenario::Soak,
            },
            track_completions: scenario == Scenario::BigChannel,
            kill,
            tls: None,
        }
    }

    /// The plan of `args`, speaking TLS with `--tls`; refused when the CA file is not usable.
    pub fn with_tls(args: &Args) -> Result<Plan, String> {
        let mut plan = Plan::new(args);
        if let (true, Some(ca)) = (args.tls, &args.ca) {
            plan.tls = Some(TlsClient::new(ca, args.tls_name.as_deref())?);
        }
        Ok(plan)
    }

    /// Clients of `role` subscribed to channel `channel`.
    pub fn members(&self, role: Role, channel: usize) -> u64 {
        self.clients.iter().filter(|c| c.role == role && c.channels.contains(&channel)).count() as u64
    }

    /// The node publish number `n` goes to: each in turn, whichever publisher thread sends it.
    pub fn node_of_publish(&self, n: u64) -> usize {
        (n % self.nodes.len() as u64) as usize
    }

    /// How many processes the clients are spread over.
    pub fn processes(&self, args: &Args) -> usize {
        let needed = self.clients.len().div_ceil(args.max_per_process.max(1));
        args.processes.unwrap_or(needed).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(argv: &[&str]) -> Plan {
        Plan::new(&Args::parse_from(std::iter::once("flux-load").chain(argv.iter().copied())))
    }

    #[test]
    fn chat_storm_has_the_seeds_population() {
        let plan = plan(&["chat-storm"]);
        assert_eq!(plan.clients.len(), 1_000);
        let count = |role| plan.clients.iter().filter(|c| c.role == role).count();
        assert_eq!((count(Role::Healthy), count(Role::Slow), count(Role::Partitioned)), (890, 10, 100));
        assert!(matches!(plan.publishing, Publishing::Steady { rate, .. } if rate == 1_000.0));
    }

    #[test]
    fn vacate_storm_gives_each_vacater_channels_of_its_own() {
        let plan = plan(&["vacate-storm", "--connections", "3", "--channels", "4", "--duration", "6"]);
        let vacaters: Vec<&ClientSpec> = plan.clients.iter().filter(|c| c.role == Role::Vacater).collect();
        assert_eq!((plan.clients.len(), vacaters.len()), (VACATE_STORM_WITNESSES + 3, 3));
        assert_eq!(plan.members(Role::Healthy, 0), VACATE_STORM_WITNESSES as u64);
        assert_eq!(plan.channels[0], "healthy");
        let held: Vec<usize> = vacaters.iter().flat_map(|c| c.channels.iter().copied()).collect();
        let distinct: std::collections::HashSet<&str> = held.iter().map(|&c| plan.channels[c].as_str()).collect();
        assert_eq!((held.len(), distinct.len()), (12, 12));
        assert!(!held.contains(&0));
        assert_eq!(plan.channels.len(), 1 + 12);
        assert_eq!(plan.channels[vacaters[2].channels[3]], "vacate-2-3");
        assert!(
            matches!(plan.publishing, Publishing::Steady { channel: 0, rate, duration } if rate == 200.0 && duration == Duration::from_secs(6))
        );
        assert_eq!(plan.injection.partition_at, Duration::from_secs(2));
    }

    #[test]
    fn the_channels_flag_defaults_by_scenario() {
        let storm = plan(&["vacate-storm"]);
        assert_eq!(storm.clients.iter().filter(|c| c.role == Role::Vacater).count(), 200);
        assert_eq!(storm.channels.len(), 1 + 200 * 1000);
        assert!(storm.clients.iter().filter(|c| c.role == Role::Vacater).all(|c| c.channels.len() == 1000));
        assert_eq!(plan(&["big-channel", "--connections", "100"]).channels.len(), 1 + 50);
    }

    #[test]
    fn count_churn_is_20000_subscribers_of_one_public_channel_a_tenth_churning() {
        let plan = plan(&["count-churn"]);
        assert_eq!(plan.clients.len(), 20_000);
        assert_eq!((plan.members(Role::Healthy, 0), plan.members(Role::Churn, 0)), (18_000, 2_000));
        assert_eq!((plan.channels[0].as_str(), plan.injection.churn_per_sec), ("counted", 500.0));
        assert!(matches!(plan.publishing, Publishing::Steady { rate, .. } if rate == 1.0));
        assert_eq!(plan.clients[19_999].source, Ipv4Addr::new(127, 0, 0, 2), "spread over source addresses");
    }

    #[test]
    fn slow_consumers_keep_a_small_receive_buffer_unless_zero_leaves_the_kernels() {
        assert_eq!(plan(&["slow-consumer"]).injection.slow_receive_buffer, Some(4096));
        assert_eq!(plan(&["slow-consumer", "--slow-receive-buffer", "0"]).injection.slow_receive_buffer, None);
    }

    #[test]
    fn soak_mixes_chat_presence_churn_reconnects_and_slow_consumers() {
        let plan = plan(&["soak"]);
        let count = |role| plan.clients.iter().filter(|c| c.role == role).count();
        assert_eq!((count(Role::Healthy), count(Role::Slow), count(Role::Partitioned), count(Role::Churn)), (200, 5, 20, SOAK_CHURNERS));
        assert_eq!(plan.channels, ["soak-chat", SOAK_PRESENCE]);
        assert_eq!((plan.members(Role::Healthy, 0), plan.members(Role::Healthy, 1)), (200, SOAK_WITNESSES as u64));
        assert_eq!((plan.members(Role::Churn, 0), plan.members(Role::Churn, 1)), (0, SOAK_CHURNERS as u64));
        assert!(plan.injection.rolling && plan.injection.slow_mode == SlowMode::Stop);
        assert_eq!((plan.injection.stall, plan.payload), (Duration::from_secs(20), 4096));
        assert!(
            matches!(plan.publishing, Publishing::Steady { channel: 0, rate, duration } if rate == 100.0 && duration == Duration::from_secs(60))
        );
        assert!(!Plan::new(&Args::parse_from(["flux-load", "chat-storm"])).injection.rolling);
    }

    #[test]
    fn without_nodes_everything_goes_to_host_and_port() {
        let plan = plan(&["chat-storm", "--host", "127.0.0.2", "--port", "6100"]);
        assert_eq!(plan.nodes, [SocketAddr::from(([127, 0, 0, 2], 6100))]);
        assert!(plan.clients.iter().all(|c| c.node == 0));
        assert!((0..10).all(|n| plan.node_of_publish(n) == 0));
    }

    #[test]
    fn nodes_are_ports_on_the_host_or_whole_addresses() {
        let plan = plan(&["chat-storm", "--host", "127.0.0.2", "--port", "6100", "--nodes", "6101, 6102,127.0.0.3:6103"]);
        let expected: [SocketAddr; 3] = [([127, 0, 0, 2], 6101).into(), ([127, 0, 0, 2], 6102).into(), ([127, 0, 0, 3], 6103).into()];
        assert_eq!(plan.nodes, expected);
        assert!(Args::try_parse_from(["flux-load", "chat-storm", "--nodes", "6101,localhost:6102"]).is_err());
        assert!(Args::try_parse_from(["flux-load", "chat-storm", "--nodes", "6101,70000"]).is_err());
    }

    #[test]
    fn every_role_is_spread_evenly_over_the_nodes_and_publishes_take_turns() {
        // 890 healthy, 10 slow, 100 partitioned over 3 nodes.
        let plan = plan(&["chat-storm", "--nodes", "6101,6102,6103"]);
        for (i, client) in plan.clients.iter().enumerate() {
            assert_eq!(client.node, i % 3);
        }
        for role in [Role::Healthy, Role::Slow, Role::Partitioned] {
            let per_node: Vec<usize> = (0..3).map(|j| plan.clients.iter().filter(|c| c.role == role && c.node == j).count()).collect();
            let (least, most) = (per_node.iter().min().unwrap(), per_node.iter().max().unwrap());
            assert!(most - least <= 1, "{role:?} spread {per_node:?}");
        }
        let turns: Vec<usize> = (0..7).map(|n| plan.node_of_publish(n)).collect();
        assert_eq!(turns, [0, 1, 2, 0, 1, 2, 0]);
        let mut per_node = [0; 3];
        (0..3_000).for_each(|n| per_node[plan.node_of_publish(n)] += 1);
        assert_eq!(per_node, [1_000; 3]);
    }

    #[test]
    fn clients_spread_over_source_addresses_and_processes() {
        let args = Args::parse_from(["flux-load", "big-channel", "--connections", "25000"]);
        let plan = Plan::new(&args);
        assert_eq!(plan.clients[0].source, Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(plan.clients[24_999].source, Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(plan.processes(&args), 2);
        assert_eq!(plan.members(Role::Healthy, 0), 25_000);
        assert_eq!(plan.members(Role::Healthy, 1), 500);
    }
}
