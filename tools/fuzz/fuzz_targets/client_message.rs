//! A Pusher session on any text a client may send: every message is answered (or closes the
//! connection), never a panic. Several messages per input, split at newlines, so subscribing
//! and then sending on a channel is reachable.
#![no_main]

use std::time::Instant;

use flux::apps::{AppConfig, Connected};
use flux::config::Config;
use flux::pusher::protocol::SocketId;
use flux::pusher::session::{Policy, Session};
use flux::pusher::AppIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let app = AppConfig::from_settings(&Config::default());
    let policy = Policy::from_config(&Config::default());
    let cells = Default::default();
    let now = Instant::now();
    let mut session = Session::new(SocketId { high: 1, low: 1 }, AppIndex(0), Connected::new(&cells), now);
    for text in String::from_utf8_lossy(data).split('\n') {
        session.handle_text(text, now, &policy, &app);
    }
});
