//! Asking the OS for real-time treatment of an audio thread (SCHED_FIFO, locked memory).
//!
//! Never fails: what was granted and what was not is returned as one plain sentence (and
//! logged), with what to change to get more.

/// Priority requested for render threads (JACK's own RT threads default to about 70–80).
pub const RT_PRIORITY: i32 = 60;

/// Requests SCHED_FIFO for the calling thread and locks the process's memory; returns a
/// description of what the OS granted.
pub fn request_realtime(thread: &str) -> String {
    let mut parts = Vec::new();
    let param = libc::sched_param {
        sched_priority: RT_PRIORITY,
    };
    // SAFETY: pthread_self() is the calling thread; `param` is a valid sched_param.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    let fifo = rc == 0;
    if fifo {
        parts.push(format!("SCHED_FIFO priority {RT_PRIORITY} granted"));
    } else {
        parts.push(format!(
            "SCHED_FIFO refused ({}): runs at normal priority; raise the rtprio limit \
             (e.g. add the user to the `audio` group with `@audio - rtprio 95` in \
             /etc/security/limits.d) or run with CAP_SYS_NICE",
            std::io::Error::from_raw_os_error(rc)
        ));
    }

    // MCL_FUTURE only when the memlock limit is unlimited: with a finite limit, later
    // allocations beyond it would fail instead of just being unlocked.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    let unlimited = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0
        && lim.rlim_cur == libc::RLIM_INFINITY;
    let flags = if unlimited {
        libc::MCL_CURRENT | libc::MCL_FUTURE
    } else {
        libc::MCL_CURRENT
    };
    // SAFETY: mlockall has no memory-safety preconditions.
    if unsafe { libc::mlockall(flags) } == 0 {
        parts.push(if unlimited {
            "memory locked (current and future)".to_string()
        } else {
            "current memory locked (memlock limit is finite, so not future allocations; \
             set `memlock unlimited` for the audio group)"
                .to_string()
        });
    } else {
        parts.push(format!(
            "mlockall refused ({}): pages may be swapped out under memory pressure; set \
             `@audio - memlock unlimited` in /etc/security/limits.d",
            std::io::Error::last_os_error()
        ));
    }
    let text = format!("{thread}: {}", parts.join("; "));
    if fifo {
        tracing::info!("{text}");
    } else {
        tracing::warn!("{text}");
    }
    text
}
