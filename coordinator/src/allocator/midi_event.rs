//! The MIDI event type the allocator takes (its own file so the RTP-MIDI decoder's fuzz target
//! can include it without the allocator).

/// MIDI input, already split into messages (channel 0–15, data 0–127, bend −8192..=8191).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MidiEvent {
    /// Key pressed (velocity 0 is a note-off).
    NoteOn {
        /// Channel 0–15.
        channel: u8,
        /// Note 0–127.
        note: u8,
        /// Velocity 0–127.
        velocity: u8,
    },
    /// Key released.
    NoteOff {
        /// Channel 0–15.
        channel: u8,
        /// Note 0–127.
        note: u8,
        /// Release velocity (ignored).
        velocity: u8,
    },
    /// Control change: 64 sustain, 66 sostenuto, 74 timbre, 120/123 all off.
    ControlChange {
        /// Channel 0–15.
        channel: u8,
        /// Controller 0–127.
        controller: u8,
        /// Value 0–127.
        value: u8,
    },
    /// Channel (or, on an MPE member channel, per-note) pitch bend.
    PitchBend {
        /// Channel 0–15.
        channel: u8,
        /// −8192 ..= 8191, 0 = centre.
        value: i16,
    },
    /// Channel aftertouch (per-note on an MPE member channel).
    ChannelPressure {
        /// Channel 0–15.
        channel: u8,
        /// Pressure 0–127.
        value: u8,
    },
    /// Polyphonic aftertouch of one note.
    PolyPressure {
        /// Channel 0–15.
        channel: u8,
        /// Note 0–127.
        note: u8,
        /// Pressure 0–127.
        value: u8,
    },
    /// Program change: recorded per channel, no voice action.
    ProgramChange {
        /// Channel 0–15.
        channel: u8,
        /// Program 0–127.
        program: u8,
    },
}
