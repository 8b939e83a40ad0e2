//! What a panic does: it ends the whole process.
//!
//! A worker owns its connections and its part of every channel's state (registry, rosters,
//! directory replica). One that panicked would leave a half-alive node: its clients unserved
//! while the acceptor goes on handing it new ones and the other workers go on routing to its
//! inbox. Catching the unwind per connection (and closing that one with 1011) would not help,
//! since the panic may have left the worker's shared structures half-updated for every other
//! connection. So a panic on any thread is logged, with the thread's name, and the process
//! aborts: a supervisor (systemd `Restart=on-failure`, Kubernetes) restarts a whole node, and
//! its clients reconnect, through the load balancer, as they do after any node's loss.

/// Makes a panic on any thread end the process (see the module doc). The binary calls it
/// first thing; a library user (tests that run nodes in process) decides for itself.
pub fn end_the_process_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        let thread = std::thread::current();
        log::error!(
            "thread {} panicked: the process ends here, so that its supervisor restarts a whole node",
            thread.name().unwrap_or("unnamed")
        );
        std::process::abort();
    }));
}
