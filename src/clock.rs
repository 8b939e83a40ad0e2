//! Wall-clock time, for what leaves the process with a date on it: webhook `time_ms`, eviction
//! log entries, chart points, request timestamps checked against a window. Everything that
//! measures an interval uses `Instant` instead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch, now (zero if the system clock is set before it).
pub fn since_unix_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}
