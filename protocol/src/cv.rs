//! Control-voltage arithmetic shared by the coordinator's CV router and the MCU node's CV
//! engine, so both sides compute the same microvolts and codes: 1 V/octave pitch, MIDI value
//! scaling through a 16-bit intermediate, piecewise-linear calibration tables, a DAC's nominal
//! transfer line, and clock/reset pulse times on the [`Timeline`].
//!
//! All integer maths (no floats), exact and identical on a Cortex-M7 and on Linux.

use crate::msg::CalPoint;
use crate::time::{ClusterTime, Timeline};

/// Microvolts in one volt.
pub const UV_PER_VOLT: i64 = 1_000_000;
/// Pitch bend centre (14-bit).
pub const BEND_CENTRE: u16 = 8192;
/// Largest 14-bit pitch-bend value.
pub const BEND_MAX: u16 = 16383;

/// Rounds `num / den` to the nearest integer, halves away from zero (`den > 0`).
const fn div_round(num: i128, den: i128) -> i128 {
    if num >= 0 {
        (num + den / 2) / den
    } else {
        -((-num + den / 2) / den)
    }
}

const fn clamp_i32(v: i128) -> i32 {
    if v > i32::MAX as i128 {
        i32::MAX
    } else if v < i32::MIN as i128 {
        i32::MIN
    } else {
        v as i32
    }
}

/// 1 V/octave: the output of `note` with `base_note` at 0 V, plus pitch bend `bend`
/// (−8192 … 8191, 0 = centre) scaled so that ±8192 is ±`bend_cents` cents. Rounded to the
/// microvolt.
pub const fn pitch_microvolts(note: u8, base_note: u8, bend: i16, bend_cents: u32) -> i32 {
    // cents · 8192 = semitones · 100 · 8192 + bend · bend_cents; µV = cents · 10⁶ / 1200.
    let semis = note as i128 - base_note as i128;
    let cents_8192 = semis * 100 * 8192 + bend as i128 * bend_cents as i128;
    clamp_i32(div_round(cents_8192 * UV_PER_VOLT as i128, 1200 * 8192))
}

/// A 14-bit pitch-bend value (0 … 16383) as a signed offset from the centre (−8192 … 8191).
pub const fn bend_from_14bit(value: u16) -> i16 {
    let v = if value > BEND_MAX { BEND_MAX } else { value };
    v as i16 - BEND_CENTRE as i16
}

/// A 14-bit value (0 … 16383) stretched to 16 bits (0 … 65535) by repeating its top bits, so
/// both ends map to both ends.
pub const fn u14_to_u16(value: u16) -> u16 {
    let v = if value > BEND_MAX { BEND_MAX } else { value };
    (v << 2) | (v >> 12)
}

/// A 7-bit value (0 … 127) stretched to 16 bits (0 … 65535), ends to ends.
pub const fn u7_to_u16(value: u8) -> u16 {
    let v = (if value > 127 { 127 } else { value }) as u16;
    (v << 9) | (v << 2) | (v >> 5)
}

/// `min_uv + (max_uv − min_uv) · value / 65535`, rounded: a 16-bit value on an output range.
pub const fn scale_u16(min_uv: i32, max_uv: i32, value: u16) -> i32 {
    let span = max_uv as i128 - min_uv as i128;
    clamp_i32(min_uv as i128 + div_round(span * value as i128, 65535))
}

/// The DAC code for `microvolts` through a calibration table: linear between neighbouring
/// points, clamped to the first and last point's code outside the table. `None` for a table
/// of fewer than two points or whose volts are not strictly increasing.
pub fn calibrated_code(points: &[CalPoint], microvolts: i32) -> Option<i32> {
    if points.len() < 2
        || points
            .windows(2)
            .any(|w| w[1].microvolts <= w[0].microvolts)
    {
        return None;
    }
    let (first, last) = (points[0], points[points.len() - 1]);
    if microvolts <= first.microvolts {
        return Some(first.code);
    }
    if microvolts >= last.microvolts {
        return Some(last.code);
    }
    let i = points.partition_point(|p| p.microvolts <= microvolts);
    let (a, b) = (points[i - 1], points[i]);
    let dv = microvolts as i128 - a.microvolts as i128;
    let span = b.microvolts as i128 - a.microvolts as i128;
    let dc = b.code as i128 - a.code as i128;
    Some(clamp_i32(a.code as i128 + div_round(dv * dc, span)))
}

/// The nominal code of a `bits`-bit DAC whose full scale (code 2^bits) is `full_scale_uv`:
/// `round(µV · 2^bits / full_scale)`, clamped to `0 … 2^bits − 1`.
pub const fn nominal_code(microvolts: i32, bits: u8, full_scale_uv: u32) -> u16 {
    if full_scale_uv == 0 || bits == 0 || bits > 16 {
        return 0;
    }
    let top = (1i128 << bits) - 1;
    let c = div_round(microvolts as i128 * (1i128 << bits), full_scale_uv as i128);
    if c < 0 {
        0
    } else if c > top {
        top as u16
    } else {
        c as u16
    }
}

/// The voltage a `bits`-bit DAC with full scale `full_scale_uv` nominally outputs for `code`.
pub const fn nominal_microvolts(code: u16, bits: u8, full_scale_uv: u32) -> i32 {
    if bits == 0 || bits > 16 {
        return 0;
    }
    clamp_i32(div_round(
        code as i128 * full_scale_uv as i128,
        1i128 << bits,
    ))
}

const MICROS_PER_BEAT: i128 = 1_000_000;

/// Cluster time of pulse `k` of a pulse train with `num / den` pulses per beat (clock:
/// `ppqn / 1`; bar reset: `1 / beats_per_bar`), pulse 0 at micro-beat 0 of `timeline`.
pub fn pulse_time(timeline: &Timeline, k: i64, num: i64, den: i64) -> ClusterTime {
    let num = num.max(1);
    let micro = (i128::from(k) * MICROS_PER_BEAT * i128::from(den)).div_euclid(i128::from(num));
    let micro = micro.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    timeline.time_at_micro_beats(micro)
}

/// Index of the first pulse of a `num / den` pulses-per-beat train at or after `t`.
pub fn first_pulse_at_or_after(timeline: &Timeline, t: ClusterTime, num: i64, den: i64) -> i64 {
    let num = num.max(1);
    let micro = i128::from(timeline.micro_beats_at(t));
    // Pulses per micro-beat = num / (den · 10⁶): ceil(micro · num / (den · 10⁶)).
    let d = i128::from(den.max(1)) * MICROS_PER_BEAT;
    let k = (micro * i128::from(num) + d - 1).div_euclid(d);
    let mut k = k.clamp(i128::from(i64::MIN / 2), i128::from(i64::MAX / 2)) as i64;
    // Rounding in the time ↔ beat maps can leave k one short; a few steps at most.
    for _ in 0..4 {
        if pulse_time(timeline, k, num, den) >= t {
            break;
        }
        k += 1;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pitch_is_one_volt_per_octave_with_bend() {
        assert_eq!(pitch_microvolts(48, 36, 0, 200), 1_000_000);
        assert_eq!(pitch_microvolts(37, 36, 0, 200), 83_333);
        assert_eq!(pitch_microvolts(24, 36, 0, 200), -1_000_000);
        assert_eq!(pitch_microvolts(48, 36, -8192, 200), 833_333);
        assert_eq!(pitch_microvolts(48, 36, 8191, 200), 1_166_646);
        assert_eq!(pitch_microvolts(127, 0, 8191, 4800), 14_582_845);
    }

    #[test]
    fn bit_stretching_maps_ends_to_ends() {
        assert_eq!(u14_to_u16(0), 0);
        assert_eq!(u14_to_u16(16383), 65535);
        assert_eq!(u14_to_u16(8192), 32770);
        assert_eq!(u7_to_u16(127), 65535);
        assert_eq!(u7_to_u16(0), 0);
        assert_eq!(bend_from_14bit(0), -8192);
        assert_eq!(bend_from_14bit(16383), 8191);
        assert_eq!(scale_u16(-5_000_000, 5_000_000, 65535), 5_000_000);
        assert_eq!(scale_u16(-5_000_000, 5_000_000, 0), -5_000_000);
    }

    #[test]
    fn calibration_interpolates_clamps_and_refuses_bad_tables() {
        let t = [
            CalPoint {
                microvolts: -5_000_000,
                code: 0,
            },
            CalPoint {
                microvolts: 0,
                code: 32_000,
            },
            CalPoint {
                microvolts: 5_000_000,
                code: 65_000,
            },
        ];
        assert_eq!(calibrated_code(&t, -10_000_000), Some(0));
        assert_eq!(calibrated_code(&t, 2_500_000), Some(48_500));
        assert_eq!(calibrated_code(&t, 9_000_000), Some(65_000));
        assert_eq!(calibrated_code(&t[..1], 0), None);
        assert_eq!(calibrated_code(&[t[1], t[0]], 0), None);
    }

    #[test]
    fn nominal_dac_line() {
        assert_eq!(nominal_code(0, 12, 5_000_000), 0);
        assert_eq!(nominal_code(2_500_000, 12, 5_000_000), 2048);
        assert_eq!(nominal_code(5_000_000, 12, 5_000_000), 4095);
        assert_eq!(nominal_code(-1, 12, 5_000_000), 0);
        assert_eq!(nominal_microvolts(2048, 12, 5_000_000), 2_500_000);
    }

    #[test]
    fn pulses_fall_on_the_timeline() {
        let tl = Timeline::from_milli_bpm(120_000, ClusterTime(0));
        assert_eq!(pulse_time(&tl, 1, 4, 1), ClusterTime(125_000_000));
        assert_eq!(pulse_time(&tl, 1, 1, 4), ClusterTime(2_000_000_000));
        assert_eq!(first_pulse_at_or_after(&tl, ClusterTime(1), 4, 1), 1);
        assert_eq!(first_pulse_at_or_after(&tl, ClusterTime(0), 4, 1), 0);
        assert_eq!(
            first_pulse_at_or_after(&tl, ClusterTime(125_000_001), 4, 1),
            2
        );
    }
}
