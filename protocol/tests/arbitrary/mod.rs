//! Proptest strategies for every [`Message`], shared by the property and allocation tests.

use proptest::collection::vec;
use proptest::prelude::*;
use voicemesh_protocol::{
    Bye, ClockState, ClusterTime, CvSet, ErrorCode, ErrorMsg, Heartbeat, Hello, LeaseRenew,
    MAX_ENGINES, MAX_LEASE_BATCH, Message, Role, Status, Timeline, VoiceOff, VoiceOn, VoiceParam,
    Welcome,
};
use voicemesh_protocol::{
    CalPoint, Control, ControlKind, CvAssign, CvFunction, CvReport, MAX_CV_CAL_POINTS,
    MAX_CV_CHANNELS, RxCounters, TimeSync,
};

/// Any text up to `N` bytes, cut at a character boundary (multi-byte characters included).
pub fn text<const N: usize>() -> impl Strategy<Value = heapless::String<N>> {
    any::<String>().prop_map(|s| Message::text::<N>(&s))
}

/// Any f32 but NaN (NaN != NaN would make equal round trips look different).
pub fn f32_not_nan() -> impl Strategy<Value = f32> {
    any::<f32>().prop_filter("not NaN", |v| !v.is_nan())
}

fn time() -> impl Strategy<Value = ClusterTime> {
    any::<u64>().prop_map(ClusterTime)
}

fn timeline() -> impl Strategy<Value = Timeline> {
    (any::<u64>(), any::<i64>(), time()).prop_map(|(ns_per_beat, beat0_micro, t0)| Timeline {
        ns_per_beat,
        beat0_micro,
        t0,
    })
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Node), Just(Role::Mcu)]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::VersionMismatch),
        Just(ErrorCode::BadMessage),
        Just(ErrorCode::Refused),
        Just(ErrorCode::Other),
    ]
}

fn cv_function() -> impl Strategy<Value = CvFunction> {
    prop_oneof![
        Just(CvFunction::Off),
        Just(CvFunction::Direct),
        Just(CvFunction::Pitch),
        Just(CvFunction::Gate),
        Just(CvFunction::Trigger),
        Just(CvFunction::Velocity),
        Just(CvFunction::Cc),
        Just(CvFunction::Aftertouch),
        Just(CvFunction::PitchBend),
        Just(CvFunction::Clock),
        Just(CvFunction::Reset),
    ]
}

/// Any message of the MCU additions of protocol 1.2.
pub fn mcu_message() -> impl Strategy<Value = Message> {
    let assign = (
        (
            any::<u16>(),
            cv_function(),
            any::<u16>(),
            any::<u8>(),
            any::<u16>(),
        ),
        (any::<i32>(), any::<i32>(), any::<u8>(), any::<u8>()),
        (any::<u16>(), any::<u16>()),
        vec((any::<i32>(), any::<i32>()), 0..=MAX_CV_CAL_POINTS),
    )
        .prop_map(
            |(
                (channel, function, voice, midi_channel, param),
                (min_uv, max_uv, base_note, bend_semitones),
                (glide_ms, pulse_ms),
                cal,
            )| {
                Message::CvAssign(CvAssign {
                    channel,
                    function,
                    voice,
                    midi_channel,
                    param,
                    min_uv,
                    max_uv,
                    base_note,
                    bend_semitones,
                    glide_ms,
                    pulse_ms,
                    calibration: heapless::Vec::from_iter(
                        cal.into_iter()
                            .map(|(microvolts, code)| CalPoint { microvolts, code }),
                    ),
                })
            },
        );
    let kind = prop_oneof![
        Just(ControlKind::PitchBend),
        Just(ControlKind::Cc),
        Just(ControlKind::Aftertouch)
    ];
    let control = (any::<u8>(), kind, any::<u8>(), any::<u16>(), time()).prop_map(
        |(midi_channel, kind, number, value, at)| {
            Message::Control(Control {
                midi_channel,
                kind,
                number,
                value,
                at,
            })
        },
    );
    let sync = (any::<u64>(), time(), time()).prop_map(|(origin, receive, transmit)| {
        Message::TimeSync(TimeSync {
            origin,
            receive,
            transmit,
        })
    });
    let rx = any::<[u32; 6]>().prop_map(|c| RxCounters {
        accepted: c[0],
        duplicates: c[1],
        replays: c[2],
        reordered: c[3],
        gaps: c[4],
        malformed: c[5],
    });
    let report = (
        (time(), vec(any::<u16>(), 0..=MAX_CV_CHANNELS)),
        vec(time(), 0..=MAX_CV_CHANNELS),
        (time(), any::<u32>(), any::<[u32; 6]>()),
        (any::<i64>(), any::<bool>(), rx),
    )
        .prop_map(
            |((now, codes), changed, (applied_at, dac_faults, n), (off, locked, rx))| {
                Message::CvReport(CvReport {
                    now,
                    codes: heapless::Vec::from_iter(codes),
                    changed_at: heapless::Vec::from_iter(changed),
                    applied_at,
                    dac_faults,
                    writes: n[0],
                    skipped_writes: n[1],
                    write_errors: n[2],
                    late_events: n[3],
                    lease_expiries: n[4],
                    clock_offset_ns: off,
                    clock_locked: locked,
                    rx,
                })
            },
        );
    prop_oneof![assign, control, sync, report]
}

/// Any message of any variant, with values over each field's whole range.
pub fn message() -> impl Strategy<Value = Message> {
    let hello = (
        text::<32>(),
        text::<32>(),
        role(),
        any::<u16>(),
        any::<u16>(),
        vec(text::<32>(), 0..=MAX_ENGINES),
        any::<u32>(),
    )
        .prop_map(|(id, name, role, voices, cv, engines, sample_rate)| {
            Message::Hello(Hello {
                id,
                name,
                role,
                voices,
                cv,
                engines: heapless::Vec::from_iter(engines),
                sample_rate,
            })
        });
    let welcome = (text::<32>(), any::<u16>(), any::<u32>(), timeline()).prop_map(
        |(coordinator, heartbeat_ms, lease_ms, timeline)| {
            Message::Welcome(Welcome {
                coordinator,
                heartbeat_ms,
                lease_ms,
                timeline,
            })
        },
    );
    let heartbeat =
        (any::<u32>(), time()).prop_map(|(seq, now)| Message::Heartbeat(Heartbeat { seq, now }));
    let clock_state = prop_oneof![
        Just(ClockState::Unknown),
        Just(ClockState::Unlocked),
        Just(ClockState::Locking),
        Just(ClockState::Locked),
        Just(ClockState::Holdover),
    ];
    let status = (
        (
            any::<u16>(),
            any::<i64>(),
            any::<bool>(),
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            any::<u16>(),
        ),
        (
            clock_state,
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            any::<u32>(),
        ),
    )
        .prop_map(
            |(
                (
                    active_voices,
                    clock_offset_ns,
                    clock_locked,
                    load_permille,
                    xruns,
                    late_events,
                    load_max_permille,
                ),
                (clock_state, clock_path_delay_ns, clock_rate_ppb, clock_jitter_ns, clock_steps),
            )| {
                Message::Status(Status {
                    active_voices,
                    clock_offset_ns,
                    clock_locked,
                    load_permille,
                    xruns,
                    late_events,
                    load_max_permille,
                    clock_state,
                    clock_path_delay_ns,
                    clock_rate_ppb,
                    clock_jitter_ns,
                    clock_steps,
                })
            },
        );
    let voice_on = (
        any::<u16>(),
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        time(),
        time(),
    )
        .prop_map(|(voice, note, velocity, channel, at, lease_until)| {
            Message::VoiceOn(VoiceOn {
                voice,
                note,
                velocity,
                channel,
                at,
                lease_until,
            })
        });
    let voice_off =
        (any::<u16>(), time()).prop_map(|(voice, at)| Message::VoiceOff(VoiceOff { voice, at }));
    let voice_param = (any::<u16>(), any::<u16>(), f32_not_nan(), time()).prop_map(
        |(voice, param, value, at)| {
            Message::VoiceParam(VoiceParam {
                voice,
                param,
                value,
                at,
            })
        },
    );
    let lease_renew = (vec(any::<u16>(), 0..=MAX_LEASE_BATCH), time()).prop_map(|(v, until)| {
        Message::LeaseRenew(LeaseRenew {
            voices: heapless::Vec::from_iter(v),
            until,
        })
    });
    let cv_set = (any::<u16>(), any::<i32>(), time()).prop_map(|(channel, microvolts, at)| {
        Message::CvSet(CvSet {
            channel,
            microvolts,
            at,
        })
    });
    let bye = text::<128>().prop_map(|reason| Message::Bye(Bye { reason }));
    let error = (error_code(), text::<128>())
        .prop_map(|(code, text)| Message::Error(ErrorMsg { code, text }));
    prop_oneof![
        hello,
        welcome,
        heartbeat,
        status,
        voice_on,
        voice_off,
        voice_param,
        lease_renew,
        timeline().prop_map(Message::Timeline),
        cv_set,
        bye,
        error,
        mcu_message(),
    ]
}
