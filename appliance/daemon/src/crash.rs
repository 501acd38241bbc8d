//! The daemon's panic policy: a panic on any thread (the store's group-commit leader, the
//! upkeep thread, a serving or control task) prints its message and aborts the process with
//! SIGABRT, whatever profile the binary was built with; systemd's `Restart=on-failure` then
//! restarts it and recovery starts from what is durable. It must not try to carry on: an
//! unwound panic leaves shared state (a commit queue's leader flag, a half-applied mutation)
//! that later callers would wait on or trust.

/// Installs the hook; call first thing in `main`, before any thread is spawned.
pub fn abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // The standard message ("thread 'x' panicked at file:line:\nmessage") and, with
        // RUST_BACKTRACE, the backtrace; under systemd, standard error goes to the journal.
        default_hook(info);
        // Only standard error, not `tracing`: the panic may have happened inside the logging
        // layer with its lock held, and the hook must never block before the abort.
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        eprintln!("applianced: panic on thread {thread:?}: aborting (systemd restarts the daemon)");
        std::process::abort();
    }));
}
