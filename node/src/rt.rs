//! Asking the OS for real-time treatment of an audio thread (SCHED_FIFO, locked memory), and
//! saying plainly what was granted.
//!
//! Never fails: what was granted and what was not becomes one line ([`RtReport`]'s `Display`)
//! that the node prints on stdout at start, with what to change to get more. The backends
//! differ in who owns the audio thread: the paced and ALSA backends ask for SCHED_FIFO on
//! their own thread ([`request_realtime`]); JACK creates its thread itself, so the node reads
//! what that thread got from inside its first callback ([`current_sched`], a single syscall,
//! no allocation) and locks the process's memory itself ([`lock_memory`]).

use std::fmt;

/// Priority requested for render threads (JACK's own RT threads default to about 70–80).
pub const RT_PRIORITY: i32 = 60;

/// The scheduling class and priority of a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadSched {
    /// The policy (`libc::SCHED_FIFO`, `SCHED_RR`, `SCHED_OTHER`, …).
    pub policy: i32,
    /// The real-time priority (0 for non-RT policies).
    pub priority: i32,
}

impl ThreadSched {
    /// Whether the policy is a real-time one (FIFO or RR).
    pub fn is_realtime(&self) -> bool {
        self.policy == libc::SCHED_FIFO || self.policy == libc::SCHED_RR
    }

    fn policy_name(&self) -> &'static str {
        match self.policy {
            libc::SCHED_FIFO => "SCHED_FIFO",
            libc::SCHED_RR => "SCHED_RR",
            libc::SCHED_OTHER => "SCHED_OTHER",
            libc::SCHED_BATCH => "SCHED_BATCH",
            libc::SCHED_IDLE => "SCHED_IDLE",
            _ => "an unknown policy",
        }
    }
}

impl fmt::Display for ThreadSched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_realtime() {
            write!(f, "{} priority {}", self.policy_name(), self.priority)
        } else {
            write!(f, "{} (not real-time)", self.policy_name())
        }
    }
}

/// The calling thread's scheduling. One syscall, no allocation: safe on the audio thread.
pub fn current_sched() -> ThreadSched {
    let mut policy = 0;
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pthread_self() is the calling thread; both out-pointers are valid and writable.
    let rc = unsafe { libc::pthread_getschedparam(libc::pthread_self(), &mut policy, &mut param) };
    if rc == 0 {
        ThreadSched {
            policy,
            priority: param.sched_priority,
        }
    } else {
        ThreadSched {
            policy: libc::SCHED_OTHER,
            priority: 0,
        }
    }
}

/// What locking the process's memory gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemLock {
    /// Current and future pages are locked (memlock limit unlimited).
    All,
    /// Current pages only: the memlock limit is finite (bytes), so future allocations could
    /// fail if they were locked too.
    CurrentOnly(u64),
    /// mlockall failed with this OS error.
    Refused(String),
}

/// Locks the process's memory: current and future pages when the memlock limit is unlimited,
/// current pages only otherwise (with a finite limit, locking future pages would make later
/// allocations beyond it fail instead of merely being unlocked).
pub fn lock_memory() -> MemLock {
    let lim = memlock_limit();
    let flags = if lim.is_none() {
        libc::MCL_CURRENT | libc::MCL_FUTURE
    } else {
        libc::MCL_CURRENT
    };
    // SAFETY: mlockall has no memory-safety preconditions.
    if unsafe { libc::mlockall(flags) } == 0 {
        match lim {
            None => MemLock::All,
            Some(n) => MemLock::CurrentOnly(n),
        }
    } else {
        MemLock::Refused(std::io::Error::last_os_error().to_string())
    }
}

/// RLIMIT_MEMLOCK soft limit in bytes; `None` when unlimited.
fn memlock_limit() -> Option<u64> {
    rlimit(libc::RLIMIT_MEMLOCK)
}

/// RLIMIT_RTPRIO soft limit; `None` when unlimited.
pub fn rtprio_limit() -> Option<u64> {
    rlimit(libc::RLIMIT_RTPRIO)
}

fn rlimit(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(lim.rlim_cur)
    }
}

/// Whether the process is in the `audio` group (real or supplementary).
pub fn in_audio_group() -> bool {
    // SAFETY: the name is a valid C string; getgrnam returns null or a pointer to static data
    // that we read before any other call that could overwrite it.
    let gid = unsafe {
        let g = libc::getgrnam(c"audio".as_ptr());
        if g.is_null() {
            return false;
        }
        (*g).gr_gid
    };
    // SAFETY: a null list with size 0 asks for the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let mut groups = vec![0 as libc::gid_t; n.max(0) as usize];
    // SAFETY: `groups` has room for `n` entries.
    let n = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    groups.truncate(n.max(0) as usize);
    // SAFETY: getegid has no preconditions.
    groups.contains(&gid) || unsafe { libc::getegid() } == gid
}

/// What the audio thread and the process got, as one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RtReport {
    /// Which thread, e.g. `audio thread vm-audio-a` or `JACK process thread`.
    pub thread: String,
    /// Its scheduling, or why it is unknown (e.g. no callback yet).
    pub sched: Result<ThreadSched, String>,
    /// Why SCHED_FIFO was refused, when it was asked for and refused.
    pub refused: Option<String>,
    /// The memory lock.
    pub memory: MemLock,
}

impl RtReport {
    /// Whether everything a real-time node wants was granted.
    pub fn complete(&self) -> bool {
        matches!(&self.sched, Ok(s) if s.is_realtime()) && self.memory == MemLock::All
    }
}

impl fmt::Display for RtReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "realtime: {} ", self.thread)?;
        match &self.sched {
            Ok(s) => write!(f, "runs {s}")?,
            Err(why) => write!(f, "scheduling unknown ({why})")?,
        }
        if let Some(why) = &self.refused {
            write!(f, " (SCHED_FIFO refused: {why})")?;
        }
        match &self.memory {
            MemLock::All => write!(f, "; memory locked (current and future)")?,
            MemLock::CurrentOnly(n) => write!(
                f,
                "; current memory locked, not future allocations (memlock limit {} KiB)",
                n / 1024
            )?,
            MemLock::Refused(why) => write!(f, "; memory not locked (mlockall: {why})")?,
        }
        if self.complete() {
            return write!(f, ". Nothing more to get.");
        }
        let rt_ok = matches!(&self.sched, Ok(s) if s.is_realtime());
        let group = if in_audio_group() {
            "the user is in the `audio` group"
        } else {
            "the user is not in the `audio` group"
        };
        write!(f, ". To get more: ")?;
        if !rt_ok {
            let rtprio = match rtprio_limit() {
                None => "unlimited".to_string(),
                Some(n) => n.to_string(),
            };
            write!(
                f,
                "the rtprio limit is {rtprio} and {group}; add the user to `audio` (`usermod \
                 -aG audio $USER`), put `@audio - rtprio 95` and `@audio - memlock unlimited` \
                 in /etc/security/limits.d/audio.conf and log in again (or run with \
                 CAP_SYS_NICE and CAP_IPC_LOCK)"
            )?;
        } else {
            write!(
                f,
                "{group}; put `@audio - memlock unlimited` in /etc/security/limits.d/audio.conf \
                 for the user's group and log in again (or run with CAP_IPC_LOCK)"
            )?;
        }
        if self.thread.starts_with("JACK") {
            write!(
                f,
                "; JACK's thread priority is the server's: start jackd with -R -P 70"
            )?;
        }
        Ok(())
    }
}

/// Requests SCHED_FIFO at [`RT_PRIORITY`] for the calling thread and locks the process's
/// memory; returns what the OS granted.
pub fn request_realtime(thread: &str) -> RtReport {
    let param = libc::sched_param {
        sched_priority: RT_PRIORITY,
    };
    // SAFETY: pthread_self() is the calling thread; `param` is a valid sched_param.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    let refused = (rc != 0).then(|| std::io::Error::from_raw_os_error(rc).to_string());
    let report = RtReport {
        thread: thread.to_string(),
        sched: Ok(current_sched()),
        refused,
        memory: lock_memory(),
    };
    if report.complete() {
        tracing::info!("{report}");
    } else {
        tracing::warn!("{report}");
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_report_says_how_to_get_more() {
        let r = RtReport {
            thread: "render thread vm-audio-x".into(),
            sched: Ok(ThreadSched {
                policy: libc::SCHED_OTHER,
                priority: 0,
            }),
            refused: Some("Operation not permitted (os error 1)".into()),
            memory: MemLock::Refused("Cannot allocate memory".into()),
        };
        let line = r.to_string();
        assert!(!line.contains('\n'), "{line}");
        for needle in [
            "render thread vm-audio-x runs SCHED_OTHER (not real-time)",
            "SCHED_FIFO refused: Operation not permitted",
            "memory not locked",
            "the rtprio limit is",
            "`audio` group",
            "/etc/security/limits.d",
            "rtprio 95",
            "memlock unlimited",
        ] {
            assert!(line.contains(needle), "{needle:?} missing from {line}");
        }
    }

    #[test]
    fn fifo_without_memlock_only_asks_for_memlock() {
        let r = RtReport {
            thread: "render thread t".into(),
            sched: Ok(ThreadSched {
                policy: libc::SCHED_FIFO,
                priority: 60,
            }),
            refused: None,
            memory: MemLock::CurrentOnly(8 << 20),
        };
        let line = r.to_string();
        assert!(line.contains("runs SCHED_FIFO priority 60"), "{line}");
        assert!(line.contains("memlock limit 8192 KiB"), "{line}");
        assert!(line.contains("memlock unlimited"), "{line}");
        assert!(!line.contains("rtprio"), "{line}");
    }

    #[test]
    fn granted_report_is_short() {
        let r = RtReport {
            thread: "JACK process thread".into(),
            sched: Ok(ThreadSched {
                policy: libc::SCHED_FIFO,
                priority: 70,
            }),
            refused: None,
            memory: MemLock::All,
        };
        assert_eq!(
            r.to_string(),
            "realtime: JACK process thread runs SCHED_FIFO priority 70; memory locked \
             (current and future). Nothing more to get."
        );
    }

    #[test]
    fn current_sched_of_a_plain_thread_is_not_realtime() {
        let s = std::thread::spawn(current_sched).join().unwrap();
        assert!(!s.is_realtime(), "{s}");
    }
}
