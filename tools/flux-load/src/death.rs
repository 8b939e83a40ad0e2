//! node-death: one node of a cluster is killed with SIGKILL, and the other nodes' presence
//! members must each hear `member_removed` for every member that was on it. This module owns
//! the bookkeeping, which is plain data and tested without a server: which users were on the
//! killed node ([`Victims`]), which of them one remaining member has seen removed ([`Pending`]),
//! the counts a shard reports ([`Removals`]), and the coordinator's side ([`NodeDeath`]): the
//! kill itself, when to stop waiting, and the summary. It does not read sockets; the shards feed
//! it the member_removed events they read.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::clients::unix_micros;
use crate::scenario::{Kill, Plan};
use crate::stats::{Latency, Role, Tick};

/// What the cluster is given beyond its node timeout to remove a dead node's members: the
/// figure's target is the timeout plus this.
const TARGET_SLACK: Duration = Duration::from_secs(1);

/// The users that were on the killed node: the plan's victims, numbered in index order.
#[derive(Debug, Clone)]
pub struct Victims {
    /// Per plan client, its number among the victims (None: not a victim).
    rank: Vec<Option<usize>>,
    count: usize,
}

impl Victims {
    /// The victims of a plan that kills a node (None for other plans).
    pub fn of(plan: &Plan) -> Option<Victims> {
        plan.kill?;
        let mut count = 0;
        let rank = plan
            .clients
            .iter()
            .map(|client| {
                (client.role == Role::Victim).then(|| {
                    count += 1;
                    count - 1
                })
            })
            .collect();
        Some(Victims { rank, count })
    }
}

/// What one member_removed was, to the remaining member that received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// A victim it had not seen removed, with others still to come.
    First,
    /// The last victim it was waiting for.
    Last,
    /// A victim it had already seen removed.
    Again,
    /// Not a victim: a member of a live node, or a user the plan does not know.
    Stranger,
}

/// The victims one remaining member has seen removed, one bit each.
#[derive(Debug, Clone)]
pub struct Pending {
    seen: Vec<u64>,
    left: usize,
}

impl Pending {
    /// Nothing seen yet of `victims`.
    pub fn new(victims: &Victims) -> Self {
        Pending { seen: vec![0; victims.count.div_ceil(64)], left: victims.count }
    }

    /// Takes note that the member of plan client `client` was removed.
    pub fn removed(&mut self, victims: &Victims, client: usize) -> Removal {
        let Some(rank) = victims.rank.get(client).copied().flatten() else {
            return Removal::Stranger;
        };
        let bit = 1u64 << (rank % 64);
        // Ranks are below the count the bits were made for.
        let Some(word) = self.seen.get_mut(rank / 64) else {
            return Removal::Stranger;
        };
        if *word & bit != 0 {
            return Removal::Again;
        }
        *word |= bit;
        self.left -= 1;
        if self.left == 0 {
            Removal::Last
        } else {
            Removal::First
        }
    }

    /// The server sent this member the whole roster again (it had no room for some changes):
    /// each victim not `listed` there, and not seen removed yet, is seen removed now.
    pub fn resynced(&mut self, victims: &Victims, listed: impl Fn(usize) -> bool) -> Vec<Removal> {
        let unseen: Vec<usize> = victims
            .rank
            .iter()
            .enumerate()
            .filter_map(|(client, rank)| {
                let rank = (*rank)?;
                let seen = self.seen.get(rank / 64).is_some_and(|word| word & (1u64 << (rank % 64)) != 0);
                (!seen && !listed(client)).then_some(client)
            })
            .collect();
        unseen.into_iter().map(|client| self.removed(victims, client)).collect()
    }
}

/// The member_removed events remaining members received after the kill, as a shard counts them
/// between two reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Removals {
    /// Victims seen removed for the first time, every remaining member.
    pub seen: u64,
    /// Victims seen removed again by a member that had seen them go.
    pub repeated: u64,
    /// Removals of users that were not on the killed node.
    pub strangers: u64,
    /// When the first victim's removal was read by anyone (Unix microseconds).
    pub first_unix_us: Option<u64>,
    /// When each member that has now seen every victim removed read the last of them (Unix
    /// microseconds).
    pub completed_unix_us: Vec<u64>,
}

impl Removals {
    /// Counts `removal`, read at `read_at` (Unix microseconds).
    pub fn count(&mut self, removal: Removal, read_at: u64) {
        match removal {
            Removal::First | Removal::Last => {
                self.seen += 1;
                self.first_unix_us = Some(self.first_unix_us.map_or(read_at, |first| first.min(read_at)));
                if removal == Removal::Last {
                    self.completed_unix_us.push(read_at);
                }
            }
            Removal::Again => self.repeated += 1,
            Removal::Stranger => self.strangers += 1,
        }
    }

    /// Adds another shard's or another second's counts.
    pub fn add(&mut self, other: &Removals) {
        self.seen += other.seen;
        self.repeated += other.repeated;
        self.strangers += other.strangers;
        self.first_unix_us = match (self.first_unix_us, other.first_unix_us) {
            (Some(mine), Some(theirs)) => Some(mine.min(theirs)),
            (mine, theirs) => mine.or(theirs),
        };
        self.completed_unix_us.extend_from_slice(&other.completed_unix_us);
    }
}

/// The coordinator's side: the node has been killed, and the remaining members are watched.
#[derive(Debug)]
pub struct NodeDeath {
    kill: Kill,
    address: SocketAddr,
    victims: u64,
    remaining: u64,
    /// When SIGKILL was sent.
    at: Instant,
    at_unix_us: u64,
}

impl NodeDeath {
    /// Kills the node of a plan that has one to kill (None for other plans), once sure the run
    /// can measure its death: the node is one of the plan's, it has members and so do others,
    /// and all `joined` members of the plan are there.
    pub fn start(plan: &Plan, joined: u64) -> Result<Option<NodeDeath>, String> {
        let Some(kill) = plan.kill else {
            return Ok(None);
        };
        let address = *plan
            .nodes
            .get(kill.node)
            .ok_or_else(|| format!("--kill-node {} is not one of the {} nodes (0-based)", kill.node, plan.nodes.len()))?;
        let victims = plan.clients.iter().filter(|c| c.role == Role::Victim).count() as u64;
        let remaining = plan.clients.len() as u64 - victims;
        if victims == 0 || remaining == 0 {
            return Err(format!(
                "node-death needs members on the killed node and on others: {victims} on {address}, {remaining} elsewhere (see --nodes and --connections)"
            ));
        }
        if joined < plan.clients.len() as u64 {
            return Err(format!(
                "only {joined} of {} members joined, so the removals owed are unknown: node {address} (pid {}) was not killed",
                plan.clients.len(),
                kill.pid
            ));
        }
        let at_unix_us = unix_micros();
        let at = Instant::now();
        sigkill(kill.pid)?;
        eprintln!(
            "sent SIGKILL to pid {} (node {address}); {remaining} remaining members wait for {victims} member_removed each",
            kill.pid
        );
        Ok(Some(NodeDeath { kill, address, victims, remaining, at, at_unix_us }))
    }

    /// Members on the nodes that live on.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Whether to stop waiting: every remaining member saw every removal, or the time is up.
    pub fn over(&self, totals: &Tick) -> bool {
        totals.removals.completed_unix_us.len() as u64 >= self.remaining || self.at.elapsed() >= self.kill.within
    }

    /// The JSON summary's `node_death` section, from the run's totals.
    pub fn summary(&self, totals: &Tick) -> serde_json::Value {
        let removals = &totals.removals;
        let since_kill_us = |unix_us: u64| unix_us.saturating_sub(self.at_unix_us);
        let mut completion = Latency::default();
        for &at in &removals.completed_unix_us {
            completion.record(since_kill_us(at));
        }
        let complete = removals.completed_unix_us.len() as u64;
        let owed = self.victims * self.remaining;
        let completion_ms = completion.summary();
        let target = self.kill.node_timeout + TARGET_SLACK;
        json!({
            "node": self.address.to_string(),
            "node_index": self.kill.node,
            "pid": self.kill.pid,
            "members_to_remove": self.victims,
            "remaining_members": self.remaining,
            "complete": complete,
            "incomplete": self.remaining.saturating_sub(complete),
            "removals_owed": owed,
            "removals_seen": removals.seen,
            "removals_missing": owed.saturating_sub(removals.seen),
            "repeated_removals": removals.repeated,
            "presence_resyncs": totals.presence_resyncs,
            "strangers_removed": removals.strangers,
            "victims_disconnected": totals.roles[Role::Victim.index()].disconnects,
            "first_removal_ms": removals.first_unix_us.map(|at| since_kill_us(at) as f64 / 1000.0),
            "completion_ms": completion_ms,
            "waited_up_to_ms": self.kill.within.as_millis() as u64,
            "node_timeout_ms": self.kill.node_timeout.as_millis() as u64,
            "target_ms": target.as_millis() as u64,
            "within_target": complete == self.remaining && completion_ms.max <= target.as_secs_f64() * 1000.0,
        })
    }
}

/// Sends SIGKILL to `pid` with the system's `kill` (libc is not a dependency). Process 0 and 1
/// and this process are refused: `kill` reads 0 as the caller's whole process group.
fn sigkill(pid: u32) -> Result<(), String> {
    if pid <= 1 || pid == std::process::id() {
        return Err(format!("will not kill pid {pid}"));
    }
    let status =
        Command::new("kill").args(["-KILL", &pid.to_string()]).status().map_err(|e| format!("cannot run kill -KILL {pid}: {e}"))?;
    if !status.success() {
        return Err(format!("kill -KILL {pid} failed ({status}): is it the pid of the node's server?"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::scenario::Args;

    fn plan(argv: &[&str]) -> Plan {
        Plan::new(&Args::parse_from(["flux-load", "node-death", "--kill-pid", "4242"].iter().chain(argv)))
    }

    #[test]
    fn the_victims_are_the_killed_nodes_clients() {
        let plan = plan(&["--nodes", "6691,6692,6693", "--kill-node", "2"]);
        assert_eq!(plan.clients.len(), 3_000);
        let victims = Victims::of(&plan).unwrap();
        assert_eq!(victims.count, 1_000);
        for (i, client) in plan.clients.iter().enumerate() {
            assert_eq!(client.role == Role::Victim, i % 3 == 2, "client {i}");
            assert_eq!(victims.rank[i], (i % 3 == 2).then_some(i / 3));
        }
        let kill = plan.kill.unwrap();
        assert_eq!((kill.node, kill.pid), (2, 4242));
        // Three node timeouts to see the removals, by default.
        assert_eq!((kill.node_timeout, kill.within), (Duration::from_secs(10), Duration::from_secs(30)));
        assert!(matches!(plan.publishing, crate::scenario::Publishing::Steady { rate, .. } if rate == 0.0));
        assert_eq!(plan.channels, ["presence-guild"]);
        // Other scenarios kill nothing and have no victims.
        let storm = Plan::new(&Args::parse_from(["flux-load", "presence-storm", "--nodes", "1,2", "--kill-node", "1"]));
        assert!(storm.kill.is_none() && Victims::of(&storm).is_none());
        assert!(storm.clients.iter().all(|c| c.role != Role::Victim));
    }

    #[test]
    fn node_death_needs_its_node_and_pid() {
        assert!(Args::try_parse_from(["flux-load", "node-death", "--kill-pid", "7"]).is_err());
        assert!(Args::try_parse_from(["flux-load", "node-death", "--kill-node", "0"]).is_err());
        let args = Args::parse_from(["flux-load", "node-death", "--kill-node", "0", "--kill-pid", "7", "--node-timeout-ms", "2000"]);
        assert_eq!(Plan::new(&args).kill.unwrap().within, Duration::from_secs(6));
    }

    #[test]
    fn a_kill_that_cannot_be_measured_is_not_made() {
        // Out of range, alone, or with a member missing: refused before any signal is sent
        // (pid 4242 is never signalled).
        let beyond = plan(&["--nodes", "6691,6692", "--kill-node", "2"]);
        assert!(NodeDeath::start(&beyond, 3_000).unwrap_err().contains("not one of the 2 nodes"));
        let alone = plan(&["--kill-node", "0"]);
        assert!(NodeDeath::start(&alone, 3_000).unwrap_err().contains("0 elsewhere"));
        let short = plan(&["--nodes", "6691,6692", "--kill-node", "1"]);
        assert!(NodeDeath::start(&short, 2_999).unwrap_err().contains("was not killed"));
        assert!(NodeDeath::start(&Plan::new(&Args::parse_from(["flux-load", "chat-storm"])), 0).unwrap().is_none());
        assert!(sigkill(0).is_err() && sigkill(std::process::id()).is_err());
    }

    #[test]
    fn a_member_is_complete_when_every_victim_was_removed_once() {
        // Nodes 0 and 1; node 1 is killed: clients 1, 3, ..., 139 are the 70 victims.
        let plan = plan(&["--nodes", "6691,6692", "--kill-node", "1", "--connections", "140"]);
        let victims = Victims::of(&plan).unwrap();
        let mut pending = Pending::new(&victims);
        let mut counts = Removals::default();
        assert_eq!(pending.removed(&victims, 0), Removal::Stranger);
        assert_eq!(pending.removed(&victims, 140), Removal::Stranger);
        for (n, client) in (1..140).step_by(2).rev().enumerate() {
            let removal = pending.removed(&victims, client);
            assert_eq!(removal, if n == 69 { Removal::Last } else { Removal::First });
            counts.count(removal, 1_000 + n as u64);
        }
        assert_eq!(pending.removed(&victims, 139), Removal::Again);
        counts.count(Removal::Again, 5);
        counts.count(Removal::Stranger, 6);
        assert_eq!((counts.seen, counts.repeated, counts.strangers), (70, 1, 1));
        assert_eq!(counts.first_unix_us, Some(1_000));
        assert_eq!(counts.completed_unix_us, [1_069]);
    }

    #[test]
    fn a_resync_removes_the_victims_it_no_longer_lists_once() {
        // Node 1 of 2 is killed: clients 1, 3, 5, 7 are the victims.
        let plan = plan(&["--nodes", "6691,6692", "--kill-node", "1", "--connections", "8"]);
        let victims = Victims::of(&plan).unwrap();
        let mut pending = Pending::new(&victims);
        assert_eq!(pending.removed(&victims, 1), Removal::First);
        // The roster sent again still lists victim 7 (its removal is still to come).
        let removals = pending.resynced(&victims, |client| client % 2 == 0 || client == 7);
        assert_eq!(removals, [Removal::First, Removal::First], "3 and 5; 1 was seen already");
        assert_eq!(pending.removed(&victims, 7), Removal::Last);
        assert!(pending.resynced(&victims, |_| false).is_empty(), "nothing left to see");
    }

    #[test]
    fn shard_counts_add_up_with_the_earliest_first_removal() {
        let mut one = Removals::default();
        one.count(Removal::First, 900);
        one.count(Removal::Last, 950);
        let mut other = Removals::default();
        other.count(Removal::Last, 800);
        let mut sum = Removals::default();
        sum.add(&one);
        sum.add(&Removals::default());
        sum.add(&other);
        assert_eq!((sum.seen, sum.first_unix_us), (3, Some(800)));
        assert_eq!(sum.completed_unix_us, [950, 800]);
    }

    #[test]
    fn the_summary_measures_from_the_kill() {
        let plan = plan(&["--nodes", "6691,6692", "--kill-node", "1", "--connections", "4"]);
        let death = NodeDeath {
            kill: plan.kill.unwrap(),
            address: plan.nodes[1],
            victims: 2,
            remaining: 2,
            at: Instant::now(),
            at_unix_us: 1_000_000,
        };
        let mut totals = Tick::default();
        assert!(!death.over(&totals));
        totals.removals.count(Removal::First, 11_000_000);
        totals.removals.count(Removal::Last, 11_500_000);
        totals.removals.count(Removal::First, 11_200_000);
        totals.roles[Role::Victim.index()].disconnects = 2;
        let summary = death.summary(&totals);
        assert_eq!((summary["complete"].as_u64(), summary["incomplete"].as_u64()), (Some(1), Some(1)));
        assert_eq!((summary["removals_owed"].as_u64(), summary["removals_missing"].as_u64()), (Some(4), Some(1)));
        assert_eq!(summary["first_removal_ms"].as_f64(), Some(10_000.0));
        assert!((summary["completion_ms"]["max"].as_f64().unwrap() - 10_500.0).abs() < 20.0);
        assert_eq!((summary["target_ms"].as_u64(), summary["within_target"].as_bool()), (Some(11_000), Some(false)));
        totals.removals.count(Removal::Last, 11_900_000);
        assert!(death.over(&totals));
        assert_eq!(death.summary(&totals)["within_target"].as_bool(), Some(true));
    }
}
