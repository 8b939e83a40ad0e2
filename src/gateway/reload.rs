//! Reloading the apps file: SIGHUP (or [`AppsSource::reload`]) reads it again, checks it whole,
//! and swaps the node's apps at once. Workers then use the new settings for new work and close
//! the connections of apps that were removed or disabled (4003) at their next sweep. A file that
//! cannot be read or is refused changes nothing: it is logged, and the running apps stay.

use std::io;
use std::path::PathBuf;
use std::thread::JoinHandle;

use log::{error, info};
use signal_hook::consts::SIGHUP;
use signal_hook::iterator::{Handle, Signals};

use crate::apps::{Apps, AppsError, SharedApps};
use crate::webhooks::Webhooks;

/// Where the node's apps come from when they come from a file, and the apps in use.
#[derive(Clone)]
pub struct AppsSource {
    /// The apps file.
    pub path: PathBuf,
    /// The node's largest event, which no app may exceed.
    pub max_payload: usize,
    /// The apps the workers read.
    pub apps: SharedApps,
    /// Where their webhooks go.
    pub webhooks: Webhooks,
}

impl AppsSource {
    /// Reads the file again and, if it is good, swaps it in: apps keep their indices (and
    /// counters) by id, and webhooks follow. Returns how many apps it holds.
    pub fn reload(&self) -> Result<usize, AppsError> {
        let current = self.apps.load();
        let apps = Apps::load(&self.path, self.max_payload, Some(&current))?;
        let count = apps.iter().count();
        // The file is good: a thread that cannot be started for a new endpoint is logged, and
        // the apps are served all the same.
        if let Err(e) = self.webhooks.configure(&apps) {
            error!("could not start a webhook delivery thread: {e}; some webhooks of {} are not posted", self.path.display());
        }
        self.apps.store(std::sync::Arc::new(apps));
        Ok(count)
    }
}

/// The thread that turns SIGHUP into a reload.
pub struct ReloadOnHangup {
    handle: Handle,
    thread: JoinHandle<()>,
}

impl ReloadOnHangup {
    /// Reloads `source` on every SIGHUP until stopped.
    pub fn start(source: AppsSource) -> io::Result<ReloadOnHangup> {
        let mut signals = Signals::new([SIGHUP])?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new().name("flux-reload".into()).spawn(move || {
            for _ in signals.forever() {
                match source.reload() {
                    Ok(count) => info!("SIGHUP: reloaded {} ({count} apps)", source.path.display()),
                    Err(e) => error!("SIGHUP: {e}; the running apps are kept"),
                }
            }
        })?;
        Ok(ReloadOnHangup { handle, thread })
    }

    /// Stops listening for SIGHUP and joins the thread.
    pub fn stop(self) {
        self.handle.close();
        if self.thread.join().is_err() {
            error!("the reload thread panicked");
        }
    }
}
