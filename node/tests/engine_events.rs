//! Events land on their exact frame in every registered engine: a note-on's first sound, a
//! note-off's first changed frame and a parameter's first changed frame.

use std::sync::Arc;
use voicemesh_node::engine::{
    Control, ENGINE_NAMES, Engine, EngineCounters, EngineEvent, EventKind, PARAM_VOLUME,
};
use voicemesh_protocol::ClusterTime;

const SR: u32 = 48_000;
const BLOCK: usize = 256;
const T0: u64 = 1_000_000_000_000;

fn at(frame: usize) -> ClusterTime {
    ClusterTime(T0 + (frame as u64 * 1_000_000_000).div_ceil(u64::from(SR)))
}

fn ev(voice: u16, frame: usize, kind: EventKind) -> Control {
    Control::Event(EngineEvent {
        voice,
        at: at(frame),
        kind,
    })
}

fn on() -> EventKind {
    EventKind::On {
        note: 64,
        velocity: 110,
        lease_until: ClusterTime(u64::MAX),
    }
}

/// Renders 3 blocks after sending `events`.
fn run(name: &str, events: &[Control]) -> (Vec<f32>, Arc<EngineCounters>) {
    let c = Arc::new(EngineCounters::default());
    let (mut e, mut tx) = Engine::with_engine(name, 8, SR, c.clone()).unwrap();
    for ev in events {
        assert!(tx.send(*ev));
    }
    let mut all = Vec::new();
    let mut out = [0.0f32; BLOCK];
    for b in 0..3 {
        let start = T0 + (b as u64 * BLOCK as u64 * 1_000_000_000) / u64::from(SR);
        e.render(ClusterTime(start), &mut out);
        all.extend_from_slice(&out);
    }
    (all, c)
}

fn first_difference(a: &[f32], b: &[f32]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn note_on_sounds_from_its_exact_frame() {
    for name in ENGINE_NAMES {
        for frame in [0usize, 1, 63, 64, 200, 255, 256, 300, 700] {
            let (x, c) = run(name, &[ev(5, frame, on())]);
            let first = x.iter().position(|s| *s != 0.0);
            assert_eq!(first, Some(frame), "{name}: note-on at frame {frame}");
            assert_eq!(c.late(), 0);
        }
    }
}

#[test]
fn note_off_and_params_change_the_sound_from_their_exact_frame() {
    for name in ENGINE_NAMES {
        let base = [ev(2, 10, on())];
        let (reference, _) = run(name, &base);
        for frame in [11usize, 100, 256, 511] {
            let (x, _) = run(name, &[base[0], ev(2, frame, EventKind::Off)]);
            assert_eq!(
                first_difference(&reference, &x),
                Some(frame),
                "{name}: note-off at frame {frame}"
            );
            let (x, c) = run(
                name,
                &[
                    base[0],
                    ev(
                        2,
                        frame,
                        EventKind::Param {
                            param: PARAM_VOLUME,
                            value: 0.2,
                        },
                    ),
                ],
            );
            // A parameter change starts its smoothing ramp within the control segment that
            // begins on its frame: never before, and by the next frame at the latest.
            let d = first_difference(&reference, &x).unwrap();
            assert!(
                d == frame || d == frame + 1,
                "{name}: volume at frame {frame} changed the sound at {d}"
            );
            assert_eq!(c.dropped(), 0);
        }
    }
}

#[test]
fn bad_parameters_are_dropped_and_counted_never_panic() {
    for name in ENGINE_NAMES {
        let bad = [
            ev(
                1,
                0,
                EventKind::Param {
                    param: 999,
                    value: 1.0,
                },
            ),
            ev(
                1,
                0,
                EventKind::Param {
                    param: PARAM_VOLUME,
                    value: f32::NAN,
                },
            ),
        ];
        let (_, c) = run(name, &bad);
        assert_eq!(c.dropped(), 2, "{name}");
        // Out of range is clamped, not dropped.
        let (x, c) = run(
            name,
            &[
                ev(1, 0, on()),
                ev(
                    1,
                    0,
                    EventKind::Param {
                        param: PARAM_VOLUME,
                        value: 1e9,
                    },
                ),
            ],
        );
        assert_eq!(c.dropped(), 0);
        assert!(x.iter().all(|s| s.abs() <= 1.0 && s.is_finite()));
    }
}
