//! The coordinator's OSC input path on arbitrary bytes: TCP deframing (SLIP and length
//! prefix), the packet parser (nesting prechecks, rosc's decoder, bundles and their timetags),
//! and the address table's argument checks that turn messages into commands.
//!
//! The coordinator's `osc/decode.rs` and `osc/slip.rs` are compiled here on their own (they
//! need nothing of the coordinator but `MidiEvent`, the CV volt limit and the engine's
//! parameter list, given below), so this target builds without the node crate or tokio.
//! For any input: nothing panics; every message becomes a command or a counted drop, and there
//! are never more of them than the bytes can hold; every command's numbers are within the
//! table's ranges; a bundle's "immediately" timetag is `When::Now`; deframing does not depend
//! on where the stream is cut; frames never exceed `MAX_FRAME`; and a frame re-framed and
//! deframed comes back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../coordinator/src/osc/decode.rs"]
mod decode;
#[allow(dead_code)]
#[path = "../../coordinator/src/allocator/midi_event.rs"]
mod midi_event;
#[allow(dead_code)]
#[path = "../../coordinator/src/osc/slip.rs"]
mod slip;

/// The paths the included sources use.
mod allocator {
    pub use crate::midi_event::MidiEvent;
}
use decode::{DropReason, OscCommand, Parsed, When, parse_packet, table};
use midi_event::MidiEvent;
use slip::{Deframer, Framing, MAX_FRAME, frame};

/// `crate::cv::MAX_VOLTS` in the coordinator (its module needs the allocator).
const MAX_CV_VOLTS: f64 = 15.0;

/// The fields of `voicemesh_node::engine::ParamInfo` the table reads.
struct ParamInfo {
    id: u16,
    name: &'static str,
    min: f32,
    max: f32,
    default: f32,
    unit: &'static str,
}

/// Two parameters stand in for the engine's list: the table code is the same for every one.
fn engine_params() -> &'static [ParamInfo] {
    const P: [ParamInfo; 2] = [
        ParamInfo {
            id: 0,
            name: "cutoff",
            min: 20.0,
            max: 20_000.0,
            default: 2_000.0,
            unit: "Hz",
        },
        ParamInfo {
            id: 1,
            name: "resonance",
            min: 0.0,
            max: 1.0,
            default: 0.2,
            unit: "0–1",
        },
    ];
    &P
}

fn param_range(param: u16) -> (f32, f32) {
    let p = engine_params()
        .iter()
        .find(|p| p.id == param)
        .expect("a known parameter");
    (p.min, p.max)
}

/// Checks what came out of one packet of `len` bytes.
fn check(parsed: &Parsed, len: usize) {
    // Every message, bundle element and bundle header takes at least 4 bytes.
    assert!(parsed.cmds.len() + parsed.drops.len() <= len / 4 + 1);
    if parsed.cmds.is_empty() {
        assert!(
            !parsed.drops.is_empty() || len >= 16,
            "an empty result is an empty bundle"
        );
    }
    for d in &parsed.drops {
        assert!(DropReason::ALL.contains(d));
    }
    for (when, cmd) in &parsed.cmds {
        assert_ne!(*when, When::At(1), "the immediate timetag is Now");
        match cmd {
            OscCommand::Note {
                note,
                velocity,
                channel,
            } => {
                assert!(*note <= 127 && *velocity <= 127 && *channel <= 15)
            }
            OscCommand::Midi(MidiEvent::ControlChange {
                controller,
                value,
                channel,
            }) => {
                assert!(*controller <= 127 && *value <= 127 && *channel <= 15)
            }
            OscCommand::Midi(MidiEvent::PitchBend { value, channel }) => {
                assert!((-8192..=8191).contains(value) && *channel <= 15)
            }
            OscCommand::Midi(MidiEvent::ChannelPressure { value, channel }) => {
                assert!(*value <= 127 && *channel <= 15)
            }
            OscCommand::Midi(other) => panic!("OSC makes no {other:?}"),
            OscCommand::Param { param, value } => {
                let (min, max) = param_range(*param);
                assert!(value.is_finite() && *value >= min && *value <= max);
            }
            OscCommand::VoiceParam {
                note,
                channel,
                param,
                value,
            } => {
                let (min, max) = param_range(*param);
                assert!(*note <= 127 && *channel <= 15);
                assert!(value.is_finite() && *value >= min && *value <= max);
            }
            OscCommand::Cv {
                node, microvolts, ..
            } => {
                assert!(!node.is_empty());
                assert!(f64::from(microvolts.unsigned_abs()) <= MAX_CV_VOLTS * 1e6);
            }
            OscCommand::Tempo { bpm } => assert!(
                *bpm >= f64::from(voicemesh_protocol::MIN_BPM)
                    && *bpm <= f64::from(voicemesh_protocol::MAX_BPM)
            ),
            OscCommand::Subscribe { port } => assert_ne!(*port, Some(0)),
            OscCommand::Panic | OscCommand::Transport { .. } | OscCommand::Unsubscribe => {}
        }
    }
}

fn deframe(chunks: &[&[u8]]) -> (Deframer, Vec<Result<Vec<u8>, DropReason>>) {
    let mut d = Deframer::new();
    let mut out = Vec::new();
    for c in chunks {
        d.feed(c, &mut out);
    }
    (d, out)
}

fuzz_target!(|data: &[u8]| {
    assert!(table().entries().len() > 10);
    // The bytes as one UDP datagram.
    check(&parse_packet(data), data.len());

    // The same bytes as a TCP stream, whole and cut at a data-derived point.
    let (d, frames) = deframe(&[data]);
    let cut = data
        .last()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let (_, cut_frames) = deframe(&[&data[..cut], &data[cut..]]);
    assert_eq!(frames, cut_frames, "deframing does not depend on the cut");
    let mut total = 0;
    for f in frames.iter().flatten() {
        assert!(!f.is_empty() && f.len() <= MAX_FRAME);
        total += f.len();
        check(&parse_packet(f), f.len());
        let framing = d
            .framing()
            .expect("a frame came out, so the framing is known");
        let (_, again) = deframe(&[&frame(framing, f)]);
        assert_eq!(again, vec![Ok(f.clone())], "re-framed and deframed");
    }
    assert!(total <= data.len());
    if d.framing() == Some(Framing::LengthPrefixed) {
        assert!(data.first() == Some(&0));
    }
});
