//! Rate limiting of OSC senders (sans-IO): one token bucket per source address.
//!
//! Each source (UDP `ip:port`, or one TCP connection) may send [`RATE_PER_S`] packets per second
//! on average and [`BURST`] at once; the rest are dropped before they are parsed and counted as
//! `rate_limited`. Per source, so one flooding sender does not silence the others. The table is
//! bounded: when it holds [`MAX_SOURCES`] sources, those idle long enough to have a full bucket
//! again are forgotten (they lose nothing by it); if none is, a new source shares one overflow
//! bucket with every other newcomer until room frees up.

use std::collections::HashMap;
use std::net::SocketAddr;

/// Packets per second a source may send on average.
pub const RATE_PER_S: u64 = 5_000;
/// Packets a source may send at once.
pub const BURST: u64 = 2_000;
/// Sources tracked at once.
pub const MAX_SOURCES: usize = 1024;

const NS: u64 = 1_000_000_000;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Tokens, in units of 1/RATE_PER_S·NS (i.e. nanoseconds of budget): a packet costs NS.
    budget_ns: u64,
    last_ns: u64,
}

impl Bucket {
    const FULL: u64 = BURST * NS;

    fn new(now_ns: u64) -> Self {
        Bucket {
            budget_ns: Self::FULL,
            last_ns: now_ns,
        }
    }

    fn refill(&mut self, now_ns: u64) {
        let dt = now_ns.saturating_sub(self.last_ns);
        self.budget_ns = self
            .budget_ns
            .saturating_add(dt.saturating_mul(RATE_PER_S))
            .min(Self::FULL);
        self.last_ns = now_ns;
    }

    fn take(&mut self, now_ns: u64) -> bool {
        self.refill(now_ns);
        if self.budget_ns >= NS {
            self.budget_ns -= NS;
            true
        } else {
            false
        }
    }
}

/// The per-source buckets. Time is nanoseconds on any monotonic base, passed in.
#[derive(Debug, Default)]
pub struct RateLimiter {
    sources: HashMap<SocketAddr, Bucket>,
    overflow: Option<Bucket>,
}

impl RateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a packet from `from` at `now_ns` may be handled (and takes its token).
    pub fn allow(&mut self, now_ns: u64, from: SocketAddr) -> bool {
        if let Some(b) = self.sources.get_mut(&from) {
            return b.take(now_ns);
        }
        if self.sources.len() >= MAX_SOURCES {
            self.sources.retain(|_, b| {
                b.refill(now_ns);
                b.budget_ns < Bucket::FULL
            });
        }
        if self.sources.len() >= MAX_SOURCES {
            return self
                .overflow
                .get_or_insert_with(|| Bucket::new(now_ns))
                .take(now_ns);
        }
        self.sources
            .entry(from)
            .or_insert_with(|| Bucket::new(now_ns))
            .take(now_ns)
    }

    /// Sources tracked now.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_burst_then_the_rate() {
        let mut l = RateLimiter::new();
        let t0 = 1_000 * NS;
        let passed = (0..BURST + 100).filter(|_| l.allow(t0, addr(1))).count() as u64;
        assert_eq!(passed, BURST);
        // One second later, RATE_PER_S more.
        let passed = (0..RATE_PER_S + 100)
            .filter(|_| l.allow(t0 + NS, addr(1)))
            .count() as u64;
        assert_eq!(passed, RATE_PER_S.min(BURST));
        // Another source is not affected by the first one's flood.
        assert!(l.allow(t0 + NS, addr(2)));
    }

    #[test]
    fn steady_senders_within_the_rate_are_never_limited() {
        let mut l = RateLimiter::new();
        let gap = NS / RATE_PER_S;
        assert!((0..3 * RATE_PER_S).all(|i| l.allow(i * gap, addr(7))));
    }

    #[test]
    fn the_table_is_bounded_and_idle_sources_are_forgotten() {
        let mut l = RateLimiter::new();
        for p in 0..MAX_SOURCES as u16 {
            assert!(l.allow(0, addr(p)));
        }
        assert_eq!(l.sources(), MAX_SOURCES);
        // Every bucket is one packet short of full: a newcomer goes to the overflow bucket.
        assert!(l.allow(0, addr(60_000)));
        assert_eq!(l.sources(), MAX_SOURCES);
        // Later the old sources have refilled and are forgotten.
        assert!(l.allow(NS, addr(60_001)));
        assert_eq!(l.sources(), 1);
    }
}
