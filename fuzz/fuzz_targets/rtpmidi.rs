//! The RTP-MIDI decoder and session core on arbitrary datagrams.
//!
//! The coordinator's `rtpmidi::{wire, midi, session}` sources are compiled here on their own
//! (they need nothing of the coordinator but the `MidiEvent` type), so this target builds
//! without the coordinator's network stack. For any input: nothing panics; a parsed control
//! packet re-encodes to bytes that parse to the same packet; a command list decodes with
//! non-decreasing delta times; and a session core fed the input as a stream of datagrams (on
//! both ports, from an established session's address) keeps its invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../coordinator/src/allocator/midi_event.rs"]
mod midi_event;
#[allow(dead_code)]
#[path = "../../coordinator/src/rtpmidi/midi.rs"]
mod midi;
#[allow(dead_code)]
#[path = "../../coordinator/src/rtpmidi/session.rs"]
mod session;
#[allow(dead_code)]
#[path = "../../coordinator/src/rtpmidi/wire.rs"]
mod wire;

/// The paths the included sources use.
mod allocator {
    pub use crate::midi_event::MidiEvent;
}

use session::{CoreConfig, Port, SessionCore};
use wire::{Control, Exchange, RtpMidi};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Control::parse(data) {
        let again = Control::parse(&c.to_vec()).expect("a parsed control packet re-encodes");
        // The version is always written as 2 and the name only for IN/OK; compare the rest.
        match (&c, &again) {
            (Control::Invitation(a), Control::Invitation(b))
            | (Control::Accepted(a), Control::Accepted(b)) => {
                assert_eq!((a.token, a.ssrc, &a.name), (b.token, b.ssrc, &b.name))
            }
            (Control::Rejected(a), Control::Rejected(b)) | (Control::End(a), Control::End(b)) => {
                assert_eq!((a.token, a.ssrc), (b.token, b.ssrc))
            }
            (a, b) => assert_eq!(a, b),
        }
    }
    if let Ok(p) = RtpMidi::parse(data) {
        let mut d = midi::CommandDecoder::new();
        let mut last = 0;
        let _ = d.decode(p.list, p.z, p.p, |t, _| {
            assert!(t >= last);
            last = t;
        });
    }
    // A listener with one connected session at 10.0.0.2:5004/5005, then the input split into
    // datagrams at 0xF5 bytes, alternating ports.
    let mut core = SessionCore::new(CoreConfig::default());
    let ctrl = "10.0.0.2:5004".parse().unwrap();
    let dport = "10.0.0.2:5005".parse().unwrap();
    let inv = |ssrc| {
        Control::Invitation(Exchange { version: 2, token: 1, ssrc, name: None }).to_vec()
    };
    core.handle_datagram(1, Port::Control, ctrl, &inv(7));
    core.handle_datagram(1, Port::Data, dport, &inv(7));
    let mut now = 2;
    for (i, chunk) in data.split(|&b| b == 0xF5).enumerate() {
        now += u64::from(chunk.first().copied().unwrap_or(0)) * 10_000_000;
        let (port, from) = if i % 2 == 0 { (Port::Data, dport) } else { (Port::Control, ctrl) };
        core.handle_datagram(now, port, from, chunk);
        core.handle_timeout(now);
        while core.poll_transmit().is_some() {}
        while let Some(e) = core.poll_event() {
            if let session::Event::Midi { at_ns, .. } = e {
                assert!(at_ns <= now + 1_000_000_000, "never more than 1 s ahead");
            }
        }
        assert!(core.peers().len() <= 16);
    }
});
