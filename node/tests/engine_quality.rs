//! Audio-quality tests on rendered buffers of the engines (through the plugin API): pitch,
//! aliasing, envelope timing, clicks, filter response.

use std::f64::consts::PI;
use voicemesh_node::engine::subtractive as sub;
use voicemesh_node::engine::{SynthEngine, create};

const SR: u32 = 48_000;
const SRF: f64 = SR as f64;

fn engine(name: &str, params: &[(u16, f32)]) -> Box<dyn SynthEngine> {
    let mut e = create(name, SR, 64, 8).unwrap();
    for (p, v) in params {
        assert!(e.set_param(0, *p, *v));
    }
    e
}

fn render(e: &mut dyn SynthEngine, frames: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; frames];
    for c in out.chunks_mut(64) {
        e.render_add(c);
    }
    out
}

/// Magnitude of the Hann-windowed DTFT of `x` at `f` Hz (normalised to a sine's amplitude).
fn dtft(x: &[f32], f: f64) -> f64 {
    let n = x.len();
    let w = 2.0 * PI * f / SRF;
    let (c, s) = (w.cos(), w.sin());
    let (mut re, mut im) = (0.0f64, 0.0f64);
    let (mut cr, mut ci) = (1.0f64, 0.0f64);
    for (i, v) in x.iter().enumerate() {
        let win = 0.5 - 0.5 * (2.0 * PI * i as f64 / n as f64).cos();
        let y = f64::from(*v) * win;
        re += y * cr;
        im -= y * ci;
        let t = cr * c - ci * s;
        ci = cr * s + ci * c;
        cr = t;
    }
    2.0 * (re * re + im * im).sqrt() / (n as f64 * 0.5)
}

/// Frequency of the strongest component within ±1.5 Hz of `guess` (golden-section search on
/// the windowed DTFT).
fn peak_hz(x: &[f32], guess: f64) -> f64 {
    let (mut a, mut b) = (guess - 1.5, guess + 1.5);
    let r = (5f64.sqrt() - 1.0) / 2.0;
    let mut c = b - r * (b - a);
    let mut d = a + r * (b - a);
    let (mut fc, mut fd) = (dtft(x, c), dtft(x, d));
    while b - a > 1e-4 {
        if fc > fd {
            b = d;
            d = c;
            fd = fc;
            c = b - r * (b - a);
            fc = dtft(x, c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + r * (b - a);
            fd = dtft(x, d);
        }
    }
    (a + b) / 2.0
}

fn hz(note: f64) -> f64 {
    440.0 * 2f64.powf((note - 69.0) / 12.0)
}

#[test]
fn every_waveform_sounds_within_a_hundredth_of_a_hertz() {
    for wave in 0..4 {
        for note in [45u8, 69, 93] {
            let mut e = engine("subtractive", &[(sub::OSC1_WAVE, wave as f32)]);
            e.note_on(0, note, 127);
            let x = render(&mut *e, 48_000 + 4_800);
            let target = hz(f64::from(note));
            let f = peak_hz(&x[4_800..], target);
            assert!(
                (f - target).abs() < 0.01,
                "wave {wave} note {note}: {f:.4} Hz, want {target:.4}"
            );
        }
    }
    // The FM carrier at ratio 1 too.
    for note in [57u8, 81] {
        let mut e = engine("fm2", &[(3, 1.0), (2, 1.0)]);
        e.note_on(0, note, 127);
        let x = render(&mut *e, 48_000 + 4_800);
        let target = hz(f64::from(note));
        let f = peak_hz(&x[4_800..], target);
        assert!((f - target).abs() < 0.01, "fm note {note}: {f:.4} Hz");
    }
}

#[test]
fn saw_at_5_khz_aliases_at_least_40_db_below_its_fundamental() {
    // 5 kHz exactly: note 111 bent up; every alias lands on a multiple of 1 kHz.
    let bend = (12.0 * (5000.0f64 / 440.0).log2() - 42.0) as f32;
    let mut e = engine("subtractive", &[(sub::PITCH_BEND, bend)]);
    e.note_on(0, 111, 127);
    let x = render(&mut *e, 48_000 + 4_800);
    let x = &x[4_800..];
    let fund = dtft(x, 5_000.0);
    let mut worst_audible = f64::NEG_INFINITY;
    let mut worst_all = f64::NEG_INFINITY;
    for k in 1..24 {
        let f = 1_000.0 * f64::from(k);
        if k % 5 == 0 {
            continue; // a harmonic, not an alias
        }
        let db = 20.0 * (dtft(x, f) / fund).log10();
        worst_all = worst_all.max(db);
        if f <= 20_000.0 {
            worst_audible = worst_audible.max(db);
        }
    }
    eprintln!("aliases: worst ≤ 20 kHz {worst_audible:.1} dB, worst ≤ Nyquist {worst_all:.1} dB");
    assert!(worst_all <= -40.0, "alias at {worst_all:.1} dB");
}

/// Amplitude envelope of a 6 kHz sine: x[n] and x[n+2] are a quarter period apart.
fn envelope(x: &[f32]) -> Vec<f32> {
    x.windows(3)
        .map(|w| (w[0] * w[0] + w[2] * w[2]).sqrt())
        .collect()
}

#[test]
fn envelope_stages_last_their_settings_within_a_millisecond() {
    let bend = (12.0 * (6000.0f64 / 440.0).log2() - 45.0) as f32;
    let (a, d, s, r) = (0.05f32, 0.1f32, 0.5f32, 0.2f32);
    let mut e = engine(
        "subtractive",
        &[
            (sub::OSC1_WAVE, 3.0),
            (sub::PITCH_BEND, bend),
            (sub::AMP_ATTACK, a),
            (sub::AMP_DECAY, d),
            (sub::AMP_SUSTAIN, s),
            (sub::AMP_RELEASE, r),
        ],
    );
    e.note_on(0, 114, 127);
    let mut x = render(&mut *e, 24_000);
    e.note_off(0);
    x.extend(render(&mut *e, 24_000));
    let env = envelope(&x);
    let peak = env.iter().fold(0.0f32, |m, v| m.max(*v));
    let ms = |frames: usize| frames as f64 * 1000.0 / SRF;
    let attack_end = env.iter().position(|v| *v >= 0.999 * peak).unwrap();
    let decay_end = attack_end
        + env[attack_end..]
            .iter()
            .position(|v| *v <= s * peak * 1.001)
            .unwrap();
    let release_end = 24_000
        + env[24_000..]
            .iter()
            .position(|v| *v <= 1e-4 * peak)
            .unwrap();
    let checks = [
        ("attack", ms(attack_end), a),
        ("decay", ms(decay_end - attack_end), d),
        ("release", ms(release_end - 24_000), r),
    ];
    for (stage, got, want) in checks {
        let want = f64::from(want) * 1000.0;
        assert!(
            (got - want).abs() <= 1.0,
            "{stage}: {got:.2} ms, want {want:.2} ms"
        );
    }
}

#[test]
fn no_click_at_note_start_end_or_steal() {
    for name in ["subtractive", "fm2"] {
        let mut e = if name == "subtractive" {
            engine(name, &[(sub::OSC1_WAVE, 3.0)])
        } else {
            // A pure sine carrier: index 0.
            engine(name, &[(3, 0.0)])
        };
        e.note_on(0, 69, 127);
        let mut x = render(&mut *e, 9_600);
        // Steal: the same voice gets another note while it sounds.
        e.note_on(0, 76, 127);
        x.extend(render(&mut *e, 9_600));
        e.note_off(0);
        x.extend(render(&mut *e, 24_000));
        let amp = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(amp > 0.05, "{name}: sounds ({amp})");
        // The steepest a sine of this amplitude at the higher note ever gets, plus 10 %.
        let bound = 1.1 * amp * (2.0 * std::f32::consts::PI * hz(76.0) as f32 / SR as f32);
        let (i, step) = x
            .windows(2)
            .map(|w| (w[1] - w[0]).abs())
            .enumerate()
            .fold((0, 0.0f32), |m, (i, s)| if s > m.1 { (i, s) } else { m });
        assert!(step <= bound, "{name}: step {step} at frame {i} > {bound}");
        assert_eq!(*x.last().unwrap(), 0.0, "{name}: silent after the release");
    }
}

#[test]
fn filter_response_is_within_1_db_of_theory() {
    let level = |mode: f32, cutoff: f32| {
        let mut e = engine(
            "subtractive",
            &[
                (sub::OSC1_WAVE, 3.0),
                (sub::FILTER_MODE, mode),
                (sub::CUTOFF, cutoff),
            ],
        );
        e.note_on(0, 69, 127);
        let x = render(&mut *e, 48_000);
        dtft(&x[24_000..], 440.0)
    };
    // Bilinear 2-pole with prewarped cutoff, Q = 1/√2 at resonance 0.
    let theory = |mode: f32, fc: f64| {
        let w = (PI * 440.0 / SRF).tan() / (PI * fc / SRF).tan();
        let den = ((1.0 - w * w).powi(2) + 2.0 * w * w).sqrt();
        match mode as u8 {
            0 => 1.0 / den,
            1 => w / den,
            _ => w * w / den,
        }
    };
    let reference = level(0.0, 20_000.0) / theory(0.0, 20_000.0);
    for mode in [0.0f32, 1.0, 2.0] {
        for fc in [220.0f32, 440.0, 880.0, 2_000.0] {
            let got = 20.0 * (level(mode, fc) / reference).log10();
            let want = 20.0 * theory(mode, f64::from(fc)).log10();
            assert!(
                (got - want).abs() <= 1.0,
                "mode {mode} cutoff {fc}: {got:.2} dB, theory {want:.2} dB"
            );
        }
    }
}
