//! The `flux` binary: parses settings, starts a gateway node, and runs until SIGINT or SIGTERM,
//! then closes every client with 4200, flushes, and exits 0.

use std::process::ExitCode;

use clap::Parser;
use log::{error, info};

use flux::config::Config;
use flux::gateway::Gateway;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = Config::parse();
    let gateway = match Gateway::start(&config, true) {
        Ok(gateway) => gateway,
        Err(e) => {
            error!("could not start on {}: {e}", config.listen_addr());
            return ExitCode::FAILURE;
        }
    };
    let addr = gateway.local_addr();
    info!(
        "flux listening on {addr} with {} workers: WebSocket ws://{addr}/app/{}?protocol=7, REST http://{addr}/apps/{}/",
        gateway.workers(),
        config.app_key,
        config.app_id
    );
    gateway.join();
    info!("flux stopped");
    ExitCode::SUCCESS
}
