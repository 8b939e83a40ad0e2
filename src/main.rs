//! The `flux` binary: parses settings, starts a gateway node and its dashboard, and runs until
//! SIGINT or SIGTERM, then closes every client with 4200, flushes, stops the dashboard, and
//! exits 0. A panic on any thread aborts the process (see [`flux::panics`]).

use std::process::ExitCode;

use clap::Parser;
use log::{error, info};

use flux::config::Config;
use flux::dashboard::Dashboard;
use flux::gateway::Gateway;
use flux::heap::CountingAllocator;

/// Every allocation is counted, for `flux_heap_allocations_total` and the dashboard (issue 16).
#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    flux::panics::end_the_process_on_panic();
    let config = Config::parse();
    let gateway = match Gateway::start(&config, true) {
        Ok(gateway) => gateway,
        // A refused apps file or settings say what is wrong themselves; other failures are about
        // the address (in use, not ours).
        Err(e) if matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput) => {
            error!("could not start: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            error!("could not start on {}: {e}", config.listen_addr());
            return ExitCode::FAILURE;
        }
    };
    let dashboard = match Dashboard::start(config.dashboard_addr(), gateway.observer().clone()) {
        Ok(dashboard) => dashboard,
        Err(e) => {
            // A dashboard port in use is a setup mistake worth stopping for, not hiding.
            error!("could not start the dashboard ({e}); set FLUX_DASHBOARD_PORT to a free port");
            gateway.stop();
            gateway.join();
            return ExitCode::FAILURE;
        }
    };
    let addr = gateway.local_addr();
    let (ws, http) = if config.tls_files().is_some() { ("wss", "https") } else { ("ws", "http") };
    info!("flux listening on {addr} with {} workers", gateway.workers());
    for (_, app) in gateway.observer().apps().iter() {
        let state = if app.enabled { "" } else { " (disabled)" };
        info!(
            "  app {}{state}: WebSocket {ws}://{addr}/app/{}?protocol=7, REST {http}://{addr}/apps/{}/",
            app.app.id, app.app.key, app.app.id
        );
    }
    if let Some(path) = &config.apps_file {
        info!("apps from {}; SIGHUP reads it again", path.display());
    }
    info!("flux dashboard on http://{}/", dashboard.local_addr());
    if let Some(url) = &config.webhook_url {
        info!("flux webhooks to {url}");
    }
    gateway.join();
    dashboard.stop();
    info!("flux stopped");
    ExitCode::SUCCESS
}
