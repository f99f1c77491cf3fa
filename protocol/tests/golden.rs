//! Golden byte vectors: the exact frame bytes of one message per variant, per protocol version.
//!
//! Each file under `tests/golden/` is hex text; `#` starts a comment that runs to the end of
//! the line (the first comment line describes the message). For every vector both codecs —
//! `rmp-serde` ([`encode_frame`]/[`decode_frame`]) and `messagepack-serde`
//! ([`codec::portable`]) — must produce exactly these bytes and decode them back to exactly the
//! message. A change to a message type that changes its bytes therefore fails here, and must
//! come with a new protocol version (see docs/wire-protocol.md).
//!
//! To write the vector of a *new* message, add it to [`vectors`] and run
//! `VOICEMESH_BLESS=1 cargo test -p voicemesh-protocol --test golden`: files that do not exist
//! yet are written from the encoder (existing files are never overwritten); review the new file
//! by hand against the MessagePack spec before committing it.

use std::path::PathBuf;
use voicemesh_protocol::{
    Bye, CalPoint, ClockState, ClusterTime, Control, ControlKind, CvAssign, CvFunction, CvReport,
    CvSet, ErrorCode, ErrorMsg, Heartbeat, Hello, LeaseRenew, MAX_FRAME_LEN, Message, Onset,
    PROTOCOL_MINOR, PROTOCOL_VERSION, Role, RxCounters, Status, TimeSync, Timeline, VoiceOff,
    VoiceOn, VoiceParam, Welcome, codec, decode_frame, encode_frame,
};

/// One golden vector: file stem and the message it holds.
struct Vector {
    file: &'static str,
    describe: &'static str,
    message: Message,
    /// The minor version the vector was written with (its frame header says so).
    minor: u8,
    /// Whether this build still encodes the message to the same body. False for a vector of
    /// an older minor whose message later gained a field: it must still decode, but this
    /// build's encoding is pinned by the newer vector.
    same_body_now: bool,
}

fn s<const N: usize>(text: &str) -> heapless::String<N> {
    heapless::String::try_from(text).expect("fits")
}

fn timeline() -> Timeline {
    Timeline {
        ns_per_beat: 500_000_000,
        beat0_micro: -2_500_000,
        t0: ClusterTime(1_700_000_000_000_000_000),
    }
}

/// Every vector: those of protocol 1.0 (each 1.0 `Message` variant at least once), of 1.1 and of
/// 1.2 (the MCU messages).
fn vectors() -> Vec<Vector> {
    let mut engines = heapless::Vec::new();
    engines.push(s("subtractive")).unwrap();
    engines.push(s("fm")).unwrap();
    let mut voices = heapless::Vec::new();
    for v in [0u16, 1, 200, 65535] {
        voices.push(v).unwrap();
    }
    vec![
        Vector {
            file: "v1_0_hello",
            minor: 0,
            same_body_now: true,
            describe: "Hello { id: \"n-01\", name: \"pi-kitchen\", role: Node, voices: 16, cv: 0, engines: [\"subtractive\", \"fm\"], sample_rate: 48000 }",
            message: Message::Hello(Hello {
                id: s("n-01"),
                name: s("pi-kitchen"),
                role: Role::Node,
                voices: 16,
                cv: 0,
                engines,
                sample_rate: 48_000,
            }),
        },
        Vector {
            file: "v1_0_hello_mcu",
            minor: 0,
            same_body_now: true,
            describe: "Hello { id: \"t41\", name: \"teensy\", role: Mcu, voices: 0, cv: 8, engines: [], sample_rate: 0 }",
            message: Message::Hello(Hello {
                id: s("t41"),
                name: s("teensy"),
                role: Role::Mcu,
                voices: 0,
                cv: 8,
                engines: heapless::Vec::new(),
                sample_rate: 0,
            }),
        },
        Vector {
            file: "v1_0_welcome",
            minor: 0,
            same_body_now: true,
            describe: "Welcome { coordinator: \"coord-a\", heartbeat_ms: 100, lease_ms: 1000, timeline: { ns_per_beat: 500000000, beat0_micro: -2500000, t0: 1700000000000000000 } }",
            message: Message::Welcome(Welcome {
                coordinator: s("coord-a"),
                heartbeat_ms: 100,
                lease_ms: 1000,
                timeline: timeline(),
            }),
        },
        Vector {
            file: "v1_0_heartbeat",
            minor: 0,
            same_body_now: true,
            describe: "Heartbeat { seq: 7, now: 1000000000 }",
            message: Message::Heartbeat(Heartbeat {
                seq: 7,
                now: ClusterTime(1_000_000_000),
            }),
        },
        Vector {
            file: "v1_0_status",
            minor: 0,
            same_body_now: false,
            describe: "Status { active_voices: 3, clock_offset_ns: -1500, clock_locked: true, load_permille: 250, xruns: 0, late_events: 70000 } (1.0: no load_max_permille, decodes as 0)",
            message: Message::Status(Status {
                active_voices: 3,
                clock_offset_ns: -1500,
                clock_locked: true,
                load_permille: 250,
                xruns: 0,
                late_events: 70_000,
                load_max_permille: 0,
                ..Status::default()
            }),
        },
        Vector {
            file: "v1_1_status",
            minor: 1,
            same_body_now: false,
            describe: "Status { active_voices: 3, clock_offset_ns: -1500, clock_locked: true, load_permille: 250, xruns: 0, late_events: 70000, load_max_permille: 900 } (1.1: no PTP fields, decode as unknown/0)",
            message: Message::Status(Status {
                active_voices: 3,
                clock_offset_ns: -1500,
                clock_locked: true,
                load_permille: 250,
                xruns: 0,
                late_events: 70_000,
                load_max_permille: 900,
                ..Status::default()
            }),
        },
        Vector {
            file: "v1_2_status",
            minor: 2,
            same_body_now: true,
            describe: "Status { active_voices: 3, clock_offset_ns: -1500, clock_locked: true, load_permille: 250, xruns: 0, late_events: 70000, load_max_permille: 900, clock_state: Locked, clock_path_delay_ns: 2800, clock_rate_ppb: -49750, clock_jitter_ns: 420, clock_steps: 1 }",
            message: Message::Status(Status {
                active_voices: 3,
                clock_offset_ns: -1500,
                clock_locked: true,
                load_permille: 250,
                xruns: 0,
                late_events: 70_000,
                load_max_permille: 900,
                clock_state: ClockState::Locked,
                clock_path_delay_ns: 2_800,
                clock_rate_ppb: -49_750,
                clock_jitter_ns: 420,
                clock_steps: 1,
            }),
        },
        Vector {
            file: "v1_2_onset",
            minor: 2,
            same_body_now: true,
            describe: "Onset { voice: 5, note: 64, at: 1700000000005000000, at_frame: 1700000000005000417, emitted_mono_ns: 123456789012345 }",
            message: Message::Onset(Onset {
                voice: 5,
                note: 64,
                at: ClusterTime(1_700_000_000_005_000_000),
                at_frame: ClusterTime(1_700_000_000_005_000_417),
                emitted_mono_ns: 123_456_789_012_345,
            }),
        },
        Vector {
            file: "v1_0_voice_on",
            minor: 0,
            same_body_now: true,
            describe: "VoiceOn { voice: 2, note: 60, velocity: 100, channel: 0, at: 5000000, lease_until: 1005000000 }",
            message: Message::VoiceOn(VoiceOn {
                voice: 2,
                note: 60,
                velocity: 100,
                channel: 0,
                at: ClusterTime(5_000_000),
                lease_until: ClusterTime(1_005_000_000),
            }),
        },
        Vector {
            file: "v1_0_voice_off",
            minor: 0,
            same_body_now: true,
            describe: "VoiceOff { voice: 2, at: 505000000 }",
            message: Message::VoiceOff(VoiceOff {
                voice: 2,
                at: ClusterTime(505_000_000),
            }),
        },
        Vector {
            file: "v1_0_voice_param",
            minor: 0,
            same_body_now: true,
            describe: "VoiceParam { voice: 2, param: 7, value: 0.25 (f32), at: 6000000 }",
            message: Message::VoiceParam(VoiceParam {
                voice: 2,
                param: 7,
                value: 0.25,
                at: ClusterTime(6_000_000),
            }),
        },
        Vector {
            file: "v1_0_lease_renew",
            minor: 0,
            same_body_now: true,
            describe: "LeaseRenew { voices: [0, 1, 200, 65535], until: 2000000000 }",
            message: Message::LeaseRenew(LeaseRenew {
                voices,
                until: ClusterTime(2_000_000_000),
            }),
        },
        Vector {
            file: "v1_0_timeline",
            minor: 0,
            same_body_now: true,
            describe: "Timeline { ns_per_beat: 500000000, beat0_micro: -2500000, t0: 1700000000000000000 }",
            message: Message::Timeline(timeline()),
        },
        Vector {
            file: "v1_0_cv_set",
            minor: 0,
            same_body_now: true,
            describe: "CvSet { channel: 1, microvolts: -5000000, at: 7000000 }",
            message: Message::CvSet(CvSet {
                channel: 1,
                microvolts: -5_000_000,
                at: ClusterTime(7_000_000),
            }),
        },
        Vector {
            file: "v1_0_bye",
            minor: 0,
            same_body_now: true,
            describe: "Bye { reason: \"shutting down\" }",
            message: Message::Bye(Bye {
                reason: s("shutting down"),
            }),
        },
        Vector {
            file: "v1_0_error_version_mismatch",
            minor: 0,
            same_body_now: true,
            describe: "Error(ErrorMsg { code: VersionMismatch, text: \"peer speaks 2.x\" })",
            message: Message::Error(ErrorMsg {
                code: ErrorCode::VersionMismatch,
                text: s("peer speaks 2.x"),
            }),
        },
        Vector {
            file: "v1_0_error_refused",
            minor: 0,
            same_body_now: true,
            describe: "Error(ErrorMsg { code: Refused, text: \"no capacity\" })",
            message: Message::Error(ErrorMsg {
                code: ErrorCode::Refused,
                text: s("no capacity"),
            }),
        },
        Vector {
            file: "v1_0_error_bad_message",
            minor: 0,
            same_body_now: true,
            describe: "Error(ErrorMsg { code: BadMessage, text: \"\" })",
            message: Message::Error(ErrorMsg {
                code: ErrorCode::BadMessage,
                text: s(""),
            }),
        },
        Vector {
            file: "v1_0_error_other",
            minor: 0,
            same_body_now: true,
            describe: "Error(ErrorMsg { code: Other, text: \"é\" })",
            message: Message::Error(ErrorMsg {
                code: ErrorCode::Other,
                text: s("é"),
            }),
        },
        Vector {
            file: "v1_2_cv_assign",
            minor: 2,
            same_body_now: true,
            describe: "CvAssign { channel: 0, function: Pitch, voice: 1, midi_channel: 0, param: 0, min_uv: 0, max_uv: 5000000, base_note: 36, bend_semitones: 2, glide_ms: 30, pulse_ms: 0, calibration: [{ microvolts: 0, code: 3 }, { microvolts: 5000000, code: 4090 }] }",
            message: Message::CvAssign(CvAssign {
                channel: 0,
                function: CvFunction::Pitch,
                voice: 1,
                midi_channel: 0,
                param: 0,
                min_uv: 0,
                max_uv: 5_000_000,
                base_note: 36,
                bend_semitones: 2,
                glide_ms: 30,
                pulse_ms: 0,
                calibration: heapless::Vec::from_iter([
                    CalPoint {
                        microvolts: 0,
                        code: 3,
                    },
                    CalPoint {
                        microvolts: 5_000_000,
                        code: 4090,
                    },
                ]),
            }),
        },
        Vector {
            file: "v1_2_cv_assign_clock",
            minor: 2,
            same_body_now: true,
            describe: "CvAssign { channel: 7, function: Clock, voice: 0, midi_channel: 0, param: 24, min_uv: 0, max_uv: 5000000, base_note: 0, bend_semitones: 0, glide_ms: 0, pulse_ms: 5, calibration: [] }",
            message: Message::CvAssign(CvAssign {
                channel: 7,
                function: CvFunction::Clock,
                voice: 0,
                midi_channel: 0,
                param: 24,
                min_uv: 0,
                max_uv: 5_000_000,
                base_note: 0,
                bend_semitones: 0,
                glide_ms: 0,
                pulse_ms: 5,
                calibration: heapless::Vec::new(),
            }),
        },
        Vector {
            file: "v1_2_control",
            minor: 2,
            same_body_now: true,
            describe: "Control { midi_channel: 1, kind: PitchBend, number: 0, value: 16383, at: 9000000 }",
            message: Message::Control(Control {
                midi_channel: 1,
                kind: ControlKind::PitchBend,
                number: 0,
                value: 16383,
                at: ClusterTime(9_000_000),
            }),
        },
        Vector {
            file: "v1_2_time_sync",
            minor: 2,
            same_body_now: true,
            describe: "TimeSync { origin: 123456789, receive: 1700000000000000000, transmit: 1700000000000020000 }",
            message: Message::TimeSync(TimeSync {
                origin: 123_456_789,
                receive: ClusterTime(1_700_000_000_000_000_000),
                transmit: ClusterTime(1_700_000_000_000_020_000),
            }),
        },
        Vector {
            file: "v1_2_cv_report",
            minor: 2,
            same_body_now: true,
            describe: "CvReport { now: 2000000000, codes: [1638, 0, 4095], changed_at: [5000000, 0, 5000000], applied_at: 5000000, dac_faults: 2, writes: 40, skipped_writes: 12, write_errors: 1, late_events: 0, lease_expiries: 1, clock_offset_ns: -250, clock_locked: true, rx: { accepted: 30, duplicates: 1, replays: 0, reordered: 2, gaps: 3, malformed: 0 } }",
            message: Message::CvReport(CvReport {
                now: ClusterTime(2_000_000_000),
                codes: heapless::Vec::from_iter([1638, 0, 4095]),
                changed_at: heapless::Vec::from_iter([
                    ClusterTime(5_000_000),
                    ClusterTime(0),
                    ClusterTime(5_000_000),
                ]),
                applied_at: ClusterTime(5_000_000),
                dac_faults: 2,
                writes: 40,
                skipped_writes: 12,
                write_errors: 1,
                late_events: 0,
                lease_expiries: 1,
                clock_offset_ns: -250,
                clock_locked: true,
                rx: RxCounters {
                    accepted: 30,
                    duplicates: 1,
                    replays: 0,
                    reordered: 2,
                    gaps: 3,
                    malformed: 0,
                },
            }),
        },
    ]
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Hex text to bytes: `#` comments and whitespace are ignored.
fn parse_hex(text: &str) -> Vec<u8> {
    let digits: String = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn to_hex_lines(bytes: &[u8]) -> String {
    let mut out = String::new();
    // The header on its own line, then the body 16 bytes a line.
    let (head, body) = bytes.split_at(6);
    for b in head {
        out.push_str(&format!("{b:02x} "));
    }
    out.pop();
    out.push_str("  # len (u32 BE), major, minor\n");
    for chunk in body.chunks(16) {
        let line: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&line.join(" "));
        out.push('\n');
    }
    out
}

fn encode_rmp(m: &Message) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let n = encode_frame(m, &mut buf).expect("rmp-serde encodes");
    buf[..n].to_vec()
}

fn encode_portable(m: &Message) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let n = codec::portable::encode_frame(m, &mut buf).expect("messagepack-serde encodes");
    buf[..n].to_vec()
}

fn variant_index(m: &Message) -> usize {
    match m {
        Message::Hello(_) => 0,
        Message::Welcome(_) => 1,
        Message::Heartbeat(_) => 2,
        Message::Status(_) => 3,
        Message::VoiceOn(_) => 4,
        Message::VoiceOff(_) => 5,
        Message::VoiceParam(_) => 6,
        Message::LeaseRenew(_) => 7,
        Message::Timeline(_) => 8,
        Message::CvSet(_) => 9,
        Message::Bye(_) => 10,
        Message::Error(_) => 11,
        Message::CvAssign(_) => 12,
        Message::Control(_) => 13,
        Message::TimeSync(_) => 14,
        Message::CvReport(_) => 15,
        Message::Onset(_) => 16,
        // A new variant must get a vector (and an index here) before this test passes.
        _ => panic!("Message variant {} has no golden vector index", m.kind()),
    }
}

#[test]
fn every_variant_has_a_vector() {
    let mut seen = [false; 17];
    for v in vectors() {
        seen[variant_index(&v.message)] = true;
    }
    assert!(
        seen.iter().all(|s| *s),
        "variants without a vector: {seen:?}"
    );
    // The newest vectors are of the version this build speaks.
    assert_eq!((PROTOCOL_VERSION, PROTOCOL_MINOR), (1, 2));
}

#[test]
fn golden_vectors_match_both_codecs() {
    let bless = std::env::var_os("VOICEMESH_BLESS").is_some();
    let mut checked = 0;
    for v in vectors() {
        let path = golden_dir().join(format!("{}.hex", v.file));
        if bless && !path.exists() && v.minor == PROTOCOL_MINOR {
            std::fs::create_dir_all(golden_dir()).unwrap();
            let text = format!(
                "# {}\n# VoiceMesh protocol {}.{}, generated from the encoder.\n{}",
                v.describe,
                PROTOCOL_VERSION,
                PROTOCOL_MINOR,
                to_hex_lines(&encode_rmp(&v.message))
            );
            std::fs::write(&path, text).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (new vector? see this file's docs)", path.display())
        });
        let golden = parse_hex(&text);
        assert_eq!(golden[5], v.minor, "{}: header minor", v.file);

        // Every vector, of any minor, decodes to its message with both codecs.
        let (frame, used) = decode_frame(&golden).expect("rmp-serde decodes");
        assert_eq!(used, golden.len(), "{}", v.file);
        assert_eq!(frame.message, v.message, "{}: rmp-serde", v.file);
        assert_eq!(frame.minor, v.minor, "{}", v.file);

        let (frame, used) = codec::portable::decode_frame(&golden).expect("portable decodes");
        assert_eq!(used, golden.len(), "{}", v.file);
        assert_eq!(frame.message, v.message, "{}: messagepack-serde", v.file);

        // This build writes its own minor in the header; the body is unchanged unless the
        // message gained a field since.
        let mut now = golden.clone();
        now[5] = PROTOCOL_MINOR;
        if v.same_body_now {
            assert_eq!(
                encode_rmp(&v.message),
                now,
                "{}: rmp-serde bytes differ",
                v.file
            );
            assert_eq!(
                encode_portable(&v.message),
                now,
                "{}: messagepack-serde bytes differ",
                v.file
            );
        } else {
            assert_ne!(encode_rmp(&v.message), now, "{}: still current?", v.file);
        }
        checked += 1;
    }
    assert_eq!(checked, vectors().len());
}

/// Each variant has a vector of the current minor or an older one it still encodes the same.
#[test]
fn every_variant_is_pinned_at_the_current_version() {
    let mut seen = [false; 17];
    for v in vectors().iter().filter(|v| v.same_body_now) {
        seen[variant_index(&v.message)] = true;
    }
    assert!(seen.iter().all(|s| *s), "variants not pinned: {seen:?}");
}

/// A 1.1 or 1.2 `Status` read by a 1.0 peer: the newer fields are skipped, the rest is kept.
/// Simulated with a struct of the 1.0 shape.
#[test]
fn newer_status_bodies_are_readable_by_the_1_0_shape() {
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct StatusV10 {
        active_voices: u16,
        clock_offset_ns: i64,
        clock_locked: bool,
        load_permille: u16,
        xruns: u32,
        late_events: u32,
    }
    #[derive(serde::Deserialize, Debug, PartialEq)]
    enum MessageV10 {
        Status(StatusV10),
    }
    for file in ["v1_1_status.hex", "v1_2_status.hex"] {
        let golden = parse_hex(&std::fs::read_to_string(golden_dir().join(file)).unwrap());
        let old: MessageV10 = rmp_serde::from_slice(&golden[6..])
            .unwrap_or_else(|e| panic!("the 1.0 shape decodes {file}: {e}"));
        assert_eq!(
            old,
            MessageV10::Status(StatusV10 {
                active_voices: 3,
                clock_offset_ns: -1500,
                clock_locked: true,
                load_permille: 250,
                xruns: 0,
                late_events: 70_000,
            }),
            "{file}"
        );
    }
}

/// A servo state added by a later minor reads as `Unknown`, not as an error.
#[test]
fn unknown_clock_states_read_as_unknown() {
    let future: ClockState = rmp_serde::from_slice(&rmp_serde::to_vec("drifting").unwrap())
        .expect("an unknown state decodes");
    assert_eq!(future, ClockState::Unknown);
    let known: ClockState = rmp_serde::from_slice(&rmp_serde::to_vec("holdover").unwrap())
        .expect("a known state decodes");
    assert_eq!(known, ClockState::Holdover);
}

/// Every `.hex` file under `tests/golden` is one of [`vectors`]: no stale vectors linger.
#[test]
fn no_stray_vector_files() {
    let names: Vec<String> = vectors()
        .iter()
        .map(|v| format!("{}.hex", v.file))
        .collect();
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(names.contains(&name), "{name} is not in vectors()");
    }
}

/// The header bytes of a golden vector are what docs/wire-protocol.md says they are.
#[test]
fn header_layout_is_as_documented() {
    let golden =
        parse_hex(&std::fs::read_to_string(golden_dir().join("v1_0_heartbeat.hex")).unwrap());
    let len = u32::from_be_bytes(golden[..4].try_into().unwrap()) as usize;
    assert_eq!(len, golden.len() - 4);
    assert_eq!(golden[4], 1, "major");
    assert_eq!(golden[5], 0, "minor");
}
