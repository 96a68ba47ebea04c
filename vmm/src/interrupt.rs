//! SIGINT and SIGTERM for `superos-vmm run` (issue 15): instead of dying
//! where it stands (a 0-byte snapshot, a socket file left behind, no
//! summary), the VMM stops the guest as its watchdog would, prints the
//! summary so far, writes what was asked, removes its socket and exits with
//! 128 + the signal's number ([`crate::run::EXIT_INTERRUPTED`] for Ctrl-C).
//! A second signal while it finishes is ignored; a lingering VMM
//! (`--linger`) stops lingering.

use std::sync::atomic::{AtomicI32, Ordering};

/// The last SIGINT/SIGTERM received, 0 if none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_signal(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: one atomic store.
    RECEIVED.store(signal, Ordering::SeqCst);
}

/// Installs the handlers (once is enough; again is harmless).
pub fn install() -> Result<(), String> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(signal, note_signal)
            .map_err(|e| format!("cannot install the handler of signal {signal}: {e}"))?;
    }
    Ok(())
}

/// The signal received, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// Its name, for people.
pub fn name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_noted_not_fatal() {
        install().unwrap();
        // SAFETY: raise(3) of a signal whose handler only stores an atomic.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        assert_eq!(received(), Some(libc::SIGTERM));
        assert_eq!(name(libc::SIGINT), "SIGINT");
        RECEIVED.store(0, Ordering::SeqCst);
    }
}
