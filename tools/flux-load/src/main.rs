//! flux-load: the load tool behind Flux's figures. It speaks Pusher protocol 7 on its own mio
//! event loop (no async runtime), so it drives Flux, Sockudo or soketi the same way.
//!
//! One coordinator runs the publisher and the report; the clients live in shards, each a mio
//! loop: in-process when they fit in one process, otherwise in child processes (this machine
//! allows 20,000 open files per process) that take commands on stdin and report JSON lines on
//! stdout.

mod clients;
mod coordinator;
mod death;
mod plot;
mod prober;
mod publisher;
mod scenario;
mod soak;
mod stats;
mod storm;
mod tls;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command as Process, ExitCode, Stdio};

use clap::Parser;
use crossbeam_channel::{unbounded, Receiver, Sender};
use log::{error, warn};

use clients::{Command, Report, Shard};
use flux::pusher::App;
use scenario::{Args, Plan};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let plan = match Plan::with_tls(&args) {
        Ok(plan) => plan,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.shard.as_deref() {
        Some(&[index, count]) => run_child_shard(&args, &plan, index, count),
        _ => coordinator::run(&args, &plan),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// A child process: one shard, commands from stdin, reports to stdout.
fn run_child_shard(args: &Args, plan: &Plan, index: usize, count: usize) -> Result<ExitCode, String> {
    let (commands, receive) = unbounded();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if let Ok(command) = serde_json::from_str::<Command>(&line) {
                if commands.send(command).is_err() {
                    break;
                }
            }
        }
        // The coordinator went away: stop.
        let _ = commands.send(Command::Stop);
    });
    let shard = Shard::new(plan, &App::from_args(&args.app), index, count, args.connect_rate / count as u32)
        .map_err(|e| format!("shard {index}: {e}"))?;
    let mut stdout = std::io::stdout().lock();
    let mut report = |report: Report| {
        if let Ok(line) = serde_json::to_string(&report) {
            let _ = writeln!(stdout, "{line}");
            let _ = stdout.flush();
        }
    };
    shard.run(&receive, &mut report).map_err(|e| format!("shard {index}: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// The coordinator's handle on the shards, wherever they run.
pub struct Shards {
    /// Reports from every shard, tagged with its index.
    pub reports: Receiver<(usize, Report)>,
    senders: Vec<ShardLink>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

enum ShardLink {
    Thread(Sender<Command>),
    Process(Child, ChildStdin),
}

impl Shards {
    /// Starts `count` shards: one in this process, or `count` child processes.
    pub fn start(args: &Args, plan: &Plan, count: usize) -> Result<Shards, String> {
        let (report_tx, reports) = unbounded();
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        if count == 1 {
            let (tx, rx) = unbounded();
            let plan = plan.clone();
            let app = App::from_args(&args.app);
            let rate = args.connect_rate;
            threads.push(std::thread::spawn(move || {
                let mut report = |r: Report| {
                    let _ = report_tx.send((0, r));
                };
                let ran = Shard::new(&plan, &app, 0, 1, rate).and_then(|shard| shard.run(&rx, &mut report));
                if let Err(e) = ran {
                    report(Report::Failed(format!("shard: {e}")));
                }
            }));
            senders.push(ShardLink::Thread(tx));
        } else {
            let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
            for index in 0..count {
                let mut child = Process::new(&exe)
                    .args(std::env::args_os().skip(1))
                    .args(["--shard", &index.to_string(), &count.to_string()])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("cannot start shard process {index}: {e}"))?;
                let stdin = child.stdin.take().ok_or("no stdin")?;
                let stdout = child.stdout.take().ok_or("no stdout")?;
                let tx = report_tx.clone();
                threads.push(std::thread::spawn(move || {
                    let mut finished = false;
                    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                        match serde_json::from_str::<Report>(&line) {
                            Ok(report) => {
                                finished |= matches!(report, Report::Done(_) | Report::Failed(_));
                                if tx.send((index, report)).is_err() {
                                    return;
                                }
                            }
                            Err(e) => warn!("shard {index} sent an unreadable report: {e}"),
                        }
                    }
                    if !finished {
                        let lost = format!("shard process {index} ended before its last report (its error, if any, is above)");
                        let _ = tx.send((index, Report::Failed(lost)));
                    }
                }));
                senders.push(ShardLink::Process(child, stdin));
            }
        }
        Ok(Shards { reports, senders, threads })
    }

    /// Number of shards.
    pub fn count(&self) -> usize {
        self.senders.len()
    }

    /// Sends `command` to every shard.
    pub fn broadcast(&mut self, command: Command) {
        for link in &mut self.senders {
            match link {
                ShardLink::Thread(tx) => {
                    let _ = tx.send(command);
                }
                ShardLink::Process(_, stdin) => {
                    if let Ok(line) = serde_json::to_string(&command) {
                        let _ = writeln!(stdin, "{line}");
                        let _ = stdin.flush();
                    }
                }
            }
        }
    }

    /// Waits for the shards to exit.
    pub fn join(self) {
        for link in self.senders {
            if let ShardLink::Process(mut child, stdin) = link {
                drop(stdin);
                let _ = child.wait();
            }
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}
