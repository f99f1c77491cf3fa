//! The frequency probe a slave runs before its servo starts.
//!
//! statime's Kalman filter starts knowing nothing of the frequency (±100 ppm a priori) and
//! treats its first measurements as near-worthless (their variance is its steer time
//! squared until it has a few), so from a clock 50 ppm off it steps the offset at once and then
//! drifts away while it learns the rate: ~11 s to come within a sample. The frequency,
//! though, is in the Syncs the grandmaster multicasts from the start, before the BMCA has even
//! chosen it. [`RateProbe`] fits the line `origin(rx)` through the first second of Sync
//! exchanges (receive stamp on the local clock, precise origin timestamp + correction from the
//! Sync or its Follow_Up) by least squares; its slope is the rate the cluster clock model must
//! run at. [`super::port::PtpCore`] holds the timing messages back from statime while the probe
//! runs, sets the model's rate from it, and only then lets the filter start — from a frequency
//! error of a few ppm instead of tens.

/// How long a probe collects Sync exchanges (from its first) at least, ns: ~3 ppm at 8 Syncs
/// per second with 3 µs of jitter.
pub const PROBE_SPAN_NS: u64 = 1_000_000_000;
/// How long a probe collects while statime is not yet ready to measure (the BMCA has not made
/// the port a slave): waiting costs nothing then, and a longer line is a better estimate.
pub const PROBE_MAX_SPAN_NS: u64 = 4_000_000_000;
/// Fewer exchanges than this in the span give no estimate.
pub const PROBE_MIN_SAMPLES: usize = 5;
/// After this long (from the first exchange) without enough exchanges the probe gives up and
/// the filter starts alone.
pub const PROBE_GIVE_UP_NS: u64 = 5_000_000_000;
/// Estimates beyond this (ppm, relative) are not believed: the filter starts alone.
pub const PROBE_MAX_PPM: f64 = 500.0;
const MAX_SAMPLES: usize = 64;

/// The outcome of a probe.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ProbeResult {
    /// Still collecting.
    Running,
    /// Done: the grandmaster's clock advances `ratio` ns per local ns.
    Ratio(f64),
    /// Done without an estimate (too few exchanges, or an implausible one).
    Nothing,
}

/// Least-squares fit of the grandmaster's origin timestamps against local receive stamps.
#[derive(Debug, Default)]
pub struct RateProbe {
    /// The grandmaster port (sourcePortIdentity) followed: the first Sync's sender.
    source: Option<[u8; 10]>,
    /// A two-step Sync waiting for its Follow_Up: (sequence id, local receive stamp).
    waiting: Option<(u16, u64)>,
    /// The first exchange (local rx, origin), the origin of the differences below.
    first: Option<(u64, i128)>,
    /// (local rx − first, origin − first), seconds.
    samples: Vec<(f64, f64)>,
    /// The glue's `now` at the first exchange (for giving up), and the last local rx stamp.
    first_now: Option<u64>,
    last_rx: u64,
    /// statime is ready to measure (its port is a slave): end as soon as the span allows.
    ready: bool,
    done: Option<ProbeResult>,
}

/// The origin timestamp (bytes 34..44) plus the correction field (bytes 8..16, ns × 2^16) of
/// a Sync or Follow_Up, ns.
fn origin_ns(data: &[u8]) -> Option<i128> {
    let ts = data.get(34..44)?;
    let secs = ts[..6].iter().fold(0i128, |a, b| (a << 8) | *b as i128);
    let nanos = u32::from_be_bytes([ts[6], ts[7], ts[8], ts[9]]) as i128;
    let corr = i64::from_be_bytes(data.get(8..16)?.try_into().ok()?) as i128 >> 16;
    Some(secs * 1_000_000_000 + nanos + corr)
}

fn source(data: &[u8]) -> Option<[u8; 10]> {
    data.get(20..30)?.try_into().ok()
}

fn seq(data: &[u8]) -> u16 {
    u16::from_be_bytes([data[30], data[31]])
}

impl RateProbe {
    /// A probe that has not seen anything yet.
    pub fn new() -> Self {
        RateProbe {
            samples: Vec::with_capacity(MAX_SAMPLES),
            ..Default::default()
        }
    }

    /// Where the probe stands.
    pub fn result(&self) -> ProbeResult {
        self.done.unwrap_or(ProbeResult::Running)
    }

    /// A Sync (message header already checked) received at local time `rx_local`.
    /// `now` is the glue's monotonic time (for [`RateProbe::expire`]).
    pub fn sync(&mut self, now: u64, data: &[u8], two_step: bool, rx_local: u64) {
        if self.done.is_some() || data.len() < 44 {
            return;
        }
        self.first_now.get_or_insert(now);
        let Some(src) = source(data) else { return };
        if *self.source.get_or_insert(src) != src {
            return;
        }
        if two_step {
            self.waiting = Some((seq(data), rx_local));
        } else if let Some(origin) = origin_ns(data) {
            self.add(rx_local, origin);
        }
    }

    /// A Follow_Up (header checked).
    pub fn follow_up(&mut self, data: &[u8]) {
        if self.done.is_some() || data.len() < 44 || source(data) != self.source {
            return;
        }
        match self.waiting {
            Some((s, rx)) if s == seq(data) => {
                self.waiting = None;
                if let Some(origin) = origin_ns(data) {
                    self.add(rx, origin);
                }
            }
            _ => {}
        }
    }

    /// statime's port is ready to measure: the probe ends at the next exchange once it has
    /// [`PROBE_SPAN_NS`] of them (until then it keeps collecting, up to
    /// [`PROBE_MAX_SPAN_NS`]).
    pub fn set_ready(&mut self) {
        self.ready = true;
    }

    /// The local receive stamp of the last exchange used (where a new rate takes effect).
    pub fn last_rx(&self) -> u64 {
        self.last_rx
    }

    fn add(&mut self, rx_local: u64, origin: i128) {
        self.last_rx = rx_local;
        let (rx0, o0) = *self.first.get_or_insert((rx_local, origin));
        let dt = rx_local.wrapping_sub(rx0) as i64;
        if dt < 0 {
            return;
        }
        let dt = dt as u64;
        if self.samples.len() < MAX_SAMPLES {
            self.samples
                .push((dt as f64 * 1e-9, (origin - o0) as f64 * 1e-9));
        }
        let enough = self.samples.len() >= PROBE_MIN_SAMPLES;
        if enough && dt >= PROBE_SPAN_NS && (self.ready || dt >= PROBE_MAX_SPAN_NS) {
            self.done = Some(match self.slope() {
                Some(r) if ((r - 1.0) * 1e6).abs() <= PROBE_MAX_PPM => ProbeResult::Ratio(r),
                _ => ProbeResult::Nothing,
            });
        } else if dt >= PROBE_GIVE_UP_NS {
            self.done = Some(ProbeResult::Nothing);
        }
    }

    /// Gives up at `now` (glue time) if the probe has run too long since the first Sync
    /// without enough exchanges (the grandmaster's Syncs stopped).
    pub fn expire(&mut self, now: u64) {
        if self.done.is_none()
            && let Some(t0) = self.first_now
            && now.saturating_sub(t0) >= PROBE_GIVE_UP_NS
        {
            self.done = Some(ProbeResult::Nothing);
        }
    }

    fn slope(&self) -> Option<f64> {
        let n = self.samples.len() as f64;
        let (sx, sy) = self
            .samples
            .iter()
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
        let (mx, my) = (sx / n, sy / n);
        let (mut sxx, mut sxy) = (0.0, 0.0);
        for (x, y) in &self.samples {
            sxx += (x - mx) * (x - mx);
            sxy += (x - mx) * (y - my);
        }
        (sxx > 0.0).then(|| sxy / sxx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, two_step: bool, seq: u16, origin_ns: u64) -> Vec<u8> {
        let mut d = vec![0u8; 44];
        d[0] = kind;
        d[1] = 2;
        d[6] = if two_step { 0x02 } else { 0 };
        d[20..30].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 1]);
        d[30..32].copy_from_slice(&seq.to_be_bytes());
        let secs = origin_ns / 1_000_000_000;
        d[34..40].copy_from_slice(&secs.to_be_bytes()[2..]);
        d[40..44].copy_from_slice(&((origin_ns % 1_000_000_000) as u32).to_be_bytes());
        d
    }

    #[test]
    fn measures_a_50_ppm_grandmaster_from_two_step_syncs_in_one_second() {
        let mut p = RateProbe::new();
        let base = 1_800_000_000_000_000_000u64;
        p.set_ready();
        for i in 0..9u16 {
            let local = 5_000_000_000 + i as u64 * 125_000_000;
            // The grandmaster runs 50 ppm faster than the local clock, 30 µs path.
            let origin = base + ((local - 5_000_000_000) as f64 * (1.0 + 50e-6)) as u64;
            p.sync(local, &msg(0, true, i, 0), true, local + 30_000);
            assert_eq!(p.result(), ProbeResult::Running);
            p.follow_up(&msg(8, false, i, origin));
        }
        match p.result() {
            ProbeResult::Ratio(r) => assert!(((r - 1.0) * 1e6 - 50.0).abs() < 0.01, "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keeps_collecting_until_statime_is_ready() {
        let mut p = RateProbe::new();
        let mut i = 0u16;
        let mut exchange = |p: &mut RateProbe| {
            let local = i as u64 * 125_000_000;
            p.sync(
                local,
                &msg(0, false, i, 7_000_000_000 + local),
                false,
                local,
            );
            i += 1;
        };
        for _ in 0..12 {
            exchange(&mut p);
        }
        assert_eq!(p.result(), ProbeResult::Running, "1.4 s, not ready");
        p.set_ready();
        exchange(&mut p);
        assert_eq!(p.result(), ProbeResult::Ratio(1.0));
    }

    #[test]
    fn too_few_exchanges_give_nothing_and_a_late_follow_up_is_ignored() {
        let mut p = RateProbe::new();
        p.sync(1_000, &msg(0, true, 1, 0), true, 1_000);
        p.follow_up(&msg(8, false, 2, 5)); // not the Follow_Up of Sync 1
        p.sync(2_000, &msg(0, false, 3, 10), false, 2_000);
        assert_eq!(p.result(), ProbeResult::Running);
        p.expire(2_000 + PROBE_GIVE_UP_NS);
        assert_eq!(p.result(), ProbeResult::Nothing);
    }
}
