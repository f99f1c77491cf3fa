//! MIDI 1.0 byte streams: the RTP-MIDI command list (delta times, running status, Z and P,
//! SysEx including segmented SysEx) and single complete messages (JACK MIDI events), decoded
//! into [`MidiMessage`]s.

use super::wire::WireError;
use crate::allocator::MidiEvent;

/// Longest SysEx kept whole; longer ones are counted and dropped.
pub const MAX_SYSEX: usize = 4096;

/// One decoded MIDI message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MidiMessage {
    /// A channel voice message.
    Channel(MidiEvent),
    /// Timing clock (F8), 24 per quarter note.
    Clock,
    /// Start (FA).
    Start,
    /// Continue (FB).
    Continue,
    /// Stop (FC).
    Stop,
    /// Active sensing (FE).
    ActiveSensing,
    /// System reset (FF).
    Reset,
    /// A complete SysEx message of this many bytes (F0 and F7 included); segments are joined.
    SysEx(usize),
    /// A SysEx cancelled by its sender (segment ending in F4) or too long to keep.
    SysExDropped,
    /// Another system common message (MTC quarter frame, song position, song select, tune
    /// request, undefined F4/F5): accepted and ignored.
    Common,
}

/// Data bytes after a status byte, or `None` for SysEx (F0) and its end (F7).
pub const fn data_len(status: u8) -> Option<usize> {
    match status {
        0x80..=0xBF | 0xE0..=0xEF => Some(2),
        0xC0..=0xDF => Some(1),
        0xF1 | 0xF3 => Some(1),
        0xF2 => Some(2),
        0xF0 | 0xF7 => None,
        _ => Some(0),
    }
}

/// The message a status byte and its data bytes make (no SysEx).
pub fn message(status: u8, d: &[u8]) -> MidiMessage {
    let channel = status & 0x0F;
    let d0 = d.first().copied().unwrap_or(0) & 0x7F;
    let d1 = d.get(1).copied().unwrap_or(0) & 0x7F;
    MidiMessage::Channel(match status & 0xF0 {
        0x80 => MidiEvent::NoteOff {
            channel,
            note: d0,
            velocity: d1,
        },
        0x90 => MidiEvent::NoteOn {
            channel,
            note: d0,
            velocity: d1,
        },
        0xA0 => MidiEvent::PolyPressure {
            channel,
            note: d0,
            value: d1,
        },
        0xB0 => MidiEvent::ControlChange {
            channel,
            controller: d0,
            value: d1,
        },
        0xC0 => MidiEvent::ProgramChange {
            channel,
            program: d0,
        },
        0xD0 => MidiEvent::ChannelPressure { channel, value: d0 },
        0xE0 => MidiEvent::PitchBend {
            channel,
            value: ((i16::from(d1) << 7) | i16::from(d0)) - 8192,
        },
        _ => {
            return match status {
                0xF8 => MidiMessage::Clock,
                0xFA => MidiMessage::Start,
                0xFB => MidiMessage::Continue,
                0xFC => MidiMessage::Stop,
                0xFE => MidiMessage::ActiveSensing,
                0xFF => MidiMessage::Reset,
                _ => MidiMessage::Common,
            };
        }
    })
}

/// Decodes one complete MIDI message, as a JACK MIDI event carries it. Running status is not
/// allowed here (JACK events always carry their status byte). `None` for anything malformed.
pub fn decode_message(bytes: &[u8]) -> Option<MidiMessage> {
    let (&status, data) = bytes.split_first()?;
    if status < 0x80 {
        return None;
    }
    match data_len(status) {
        Some(n) => {
            (data.len() == n && data.iter().all(|&b| b < 0x80)).then(|| message(status, data))
        }
        None if status == 0xF0 => (bytes.len() <= MAX_SYSEX
            && bytes.last() == Some(&0xF7)
            && data[..data.len().saturating_sub(1)]
                .iter()
                .all(|&b| b < 0x80))
        .then_some(MidiMessage::SysEx(bytes.len())),
        None => None,
    }
}

/// Decodes RTP-MIDI command lists of one sender, in packet order. Keeps the running status
/// and an unfinished SysEx from one packet to the next (a phantom status byte under P, a
/// SysEx segmented over several packets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandDecoder {
    running: Option<u8>,
    /// Bytes of the SysEx in progress (`Some` between a segment ending in F0 and the next).
    sysex: Option<usize>,
}

impl CommandDecoder {
    /// A decoder with no running status.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes a command list. `emit(delta, message)` gets each message with its delta time
    /// from the packet's timestamp, in RTP ticks (the sum of the delta times before it). On
    /// a malformed command the messages before it have been emitted, the rest of the list is
    /// dropped and the error returned.
    pub fn decode(
        &mut self,
        list: &[u8],
        z: bool,
        _p: bool,
        mut emit: impl FnMut(u32, MidiMessage),
    ) -> Result<(), WireError> {
        let mut pos = 0;
        let mut at: u32 = 0;
        let mut first = true;
        while pos < list.len() {
            if !first || z {
                let mut d: u32 = 0;
                let mut n = 0;
                loop {
                    let b = *list.get(pos).ok_or(WireError::BadDelta)?;
                    pos += 1;
                    n += 1;
                    d = (d << 7) | u32::from(b & 0x7F);
                    if b & 0x80 == 0 {
                        break;
                    }
                    if n == 4 {
                        return Err(WireError::BadDelta);
                    }
                }
                at = at.saturating_add(d);
                if pos == list.len() {
                    // A trailing delta time without a command: RFC 6295 allows it (it only
                    // says how long the packet's content lasts).
                    return Ok(());
                }
            }
            first = false;
            let b = list[pos];
            match b {
                0xF8..=0xFF => {
                    pos += 1;
                    emit(at, message(b, &[]));
                }
                0xF0 | 0xF7 => {
                    pos = self.sysex(list, pos, at, &mut emit)?;
                }
                0x80..=0xF6 => {
                    pos += 1;
                    if b < 0xF0 {
                        self.running = Some(b);
                    } else {
                        // System common messages cancel running status.
                        self.running = None;
                    }
                    pos = self.data(list, pos, b, at, &mut emit)?;
                }
                _ => {
                    // A data byte: running status (within the packet, or the phantom status
                    // of the previous packet, whether or not P says so).
                    let status = self.running.ok_or(WireError::BadCommand)?;
                    pos = self.data(list, pos, status, at, &mut emit)?;
                }
            }
        }
        Ok(())
    }

    /// Reads the data bytes of `status` starting at `pos`; realtime bytes in between are
    /// emitted as they come.
    fn data(
        &mut self,
        list: &[u8],
        mut pos: usize,
        status: u8,
        at: u32,
        emit: &mut impl FnMut(u32, MidiMessage),
    ) -> Result<usize, WireError> {
        let n = data_len(status).unwrap_or(0);
        let mut d = [0u8; 2];
        let mut got = 0;
        while got < n {
            let b = *list.get(pos).ok_or(WireError::BadCommand)?;
            pos += 1;
            if b >= 0xF8 {
                emit(at, message(b, &[]));
            } else if b >= 0x80 {
                return Err(WireError::BadCommand);
            } else {
                d[got] = b;
                got += 1;
            }
        }
        emit(at, message(status, &d[..n]));
        Ok(pos)
    }

    /// One SysEx segment starting at `pos` (F0 = a new SysEx, F7 = a continuation), up to
    /// and including its closing F7 (end), F0 (more follows in a later command) or F4
    /// (cancelled).
    fn sysex(
        &mut self,
        list: &[u8],
        mut pos: usize,
        at: u32,
        emit: &mut impl FnMut(u32, MidiMessage),
    ) -> Result<usize, WireError> {
        let opener = list[pos];
        pos += 1;
        self.running = None;
        let mut len = match (opener, self.sysex) {
            (0xF0, _) => 1,
            (_, Some(n)) => n,
            // A continuation without a start (its first segment was lost): dropped, but the
            // segment is still walked so the commands after it decode.
            (_, None) => usize::MAX,
        };
        loop {
            let b = *list.get(pos).ok_or(WireError::BadCommand)?;
            pos += 1;
            match b {
                0x00..=0x7F => len = len.saturating_add(1),
                0xF8..=0xFF => emit(at, message(b, &[])),
                0xF7 => {
                    self.sysex = None;
                    let total = len.saturating_add(1);
                    emit(
                        at,
                        if total <= MAX_SYSEX {
                            MidiMessage::SysEx(total)
                        } else {
                            MidiMessage::SysExDropped
                        },
                    );
                    return Ok(pos);
                }
                0xF0 => {
                    self.sysex = Some(len);
                    return Ok(pos);
                }
                0xF4 => {
                    self.sysex = None;
                    emit(at, MidiMessage::SysExDropped);
                    return Ok(pos);
                }
                _ => {
                    self.sysex = None;
                    return Err(WireError::BadCommand);
                }
            }
        }
    }
}

/// The keys and pedals one input holds down, so they can be released when the input goes away
/// (a session ends, a peer goes silent, a JACK port closes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldNotes {
    keys: [u128; 16],
    sustain: u16,
    sostenuto: u16,
}

impl HeldNotes {
    /// Records what `ev` presses or releases.
    pub fn track(&mut self, ev: &MidiEvent) {
        match *ev {
            MidiEvent::NoteOn {
                channel,
                note,
                velocity,
            } if velocity > 0 => self.keys[usize::from(channel & 15)] |= 1 << (note & 127),
            MidiEvent::NoteOn { channel, note, .. } | MidiEvent::NoteOff { channel, note, .. } => {
                self.keys[usize::from(channel & 15)] &= !(1 << (note & 127));
            }
            MidiEvent::ControlChange {
                channel,
                controller,
                value,
            } => {
                let bit = 1u16 << (channel & 15);
                match controller {
                    64 if value >= 64 => self.sustain |= bit,
                    64 => self.sustain &= !bit,
                    66 if value >= 64 => self.sostenuto |= bit,
                    66 => self.sostenuto &= !bit,
                    120 | 123 => self.keys[usize::from(channel & 15)] = 0,
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.keys.iter().all(|&k| k == 0) && self.sustain == 0 && self.sostenuto == 0
    }

    /// Keys held down right now.
    pub fn keys(&self) -> usize {
        self.keys.iter().map(|k| k.count_ones() as usize).sum()
    }

    /// The events that let go of everything held (pedals up, then note-offs), and forgets it.
    pub fn release_all(&mut self) -> Vec<MidiEvent> {
        let mut out = Vec::new();
        for channel in 0..16u8 {
            let bit = 1u16 << channel;
            for (controller, held) in [(64, self.sustain), (66, self.sostenuto)] {
                if held & bit != 0 {
                    out.push(MidiEvent::ControlChange {
                        channel,
                        controller,
                        value: 0,
                    });
                }
            }
            let keys = self.keys[usize::from(channel)];
            for note in 0..128u8 {
                if keys & (1 << note) != 0 {
                    out.push(MidiEvent::NoteOff {
                        channel,
                        note,
                        velocity: 0,
                    });
                }
            }
        }
        *self = HeldNotes::default();
        out
    }
}

/// Follows MIDI clock and transport: start/continue/stop and the tempo the clock implies
/// (24 clocks per quarter note, averaged over the last 24 intervals).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClockFollower {
    last_ns: Option<u64>,
    mean_ns: Option<f64>,
    /// Whether the sender's transport runs (Start/Continue seen more recently than Stop).
    pub playing: bool,
    /// Clock messages received.
    pub clocks: u64,
}

impl ClockFollower {
    /// Takes one message at cluster time `at_ns`; returns whether it was a clock or transport
    /// message.
    pub fn handle(&mut self, at_ns: u64, msg: &MidiMessage) -> bool {
        match msg {
            MidiMessage::Clock => {
                self.clocks += 1;
                if let Some(last) = self.last_ns {
                    let d = at_ns.saturating_sub(last) as f64;
                    // Gaps longer than a 10 BPM clock restart the estimate.
                    if d > 0.0 && d < 250_000_000.0 {
                        let m = self.mean_ns.unwrap_or(d);
                        self.mean_ns = Some(m + (d - m) / 24.0);
                    } else {
                        self.mean_ns = None;
                    }
                }
                self.last_ns = Some(at_ns);
                true
            }
            MidiMessage::Start | MidiMessage::Continue => {
                self.playing = true;
                true
            }
            MidiMessage::Stop => {
                self.playing = false;
                true
            }
            _ => false,
        }
    }

    /// The tempo the clock implies, in BPM.
    pub fn bpm(&self) -> Option<f64> {
        self.mean_ns.map(|m| 60e9 / (m * 24.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(d: &mut CommandDecoder, list: &[u8], z: bool) -> (Vec<(u32, MidiMessage)>, bool) {
        let mut v = Vec::new();
        let ok = d.decode(list, z, false, |t, m| v.push((t, m))).is_ok();
        (v, ok)
    }

    fn on(channel: u8, note: u8, velocity: u8) -> MidiMessage {
        MidiMessage::Channel(MidiEvent::NoteOn {
            channel,
            note,
            velocity,
        })
    }

    fn cc(controller: u8, value: u8) -> MidiMessage {
        MidiMessage::Channel(MidiEvent::ControlChange {
            channel: 0,
            controller,
            value,
        })
    }

    #[test]
    fn running_status_inside_a_packet_gives_two_ccs() {
        let (v, ok) = decode(
            &mut CommandDecoder::new(),
            &[0xB0, 0x4A, 0x40, 0x00, 0x4B, 0x0A],
            false,
        );
        assert!(ok);
        assert_eq!(v, [(0, cc(0x4A, 0x40)), (0, cc(0x4B, 0x0A))]);
    }

    #[test]
    fn delta_times_add_up_and_z_puts_one_before_the_first_command() {
        let list = [0x90, 60, 100, 0x64, 0x90, 64, 100, 0x81, 0x00, 0x80, 60, 0];
        let (v, ok) = decode(&mut CommandDecoder::new(), &list, false);
        assert!(ok);
        assert_eq!(v[0], (0, on(0, 60, 100)));
        assert_eq!(v[1], (100, on(0, 64, 100)));
        assert_eq!(v[2].0, 228);
        let mut z = vec![0x05];
        z.extend_from_slice(&list);
        let (v, ok) = decode(&mut CommandDecoder::new(), &z, true);
        assert!(ok);
        assert_eq!(v.iter().map(|x| x.0).collect::<Vec<_>>(), [5, 105, 233]);
    }

    #[test]
    fn pitch_bend_is_centred_and_14_bit() {
        let (v, _) = decode(
            &mut CommandDecoder::new(),
            &[0xE1, 0x00, 0x40, 0x00, 0x7F, 0x7F, 0x00, 0x00, 0x00],
            false,
        );
        let bends: Vec<i16> = v
            .iter()
            .map(|(_, m)| match m {
                MidiMessage::Channel(MidiEvent::PitchBend { channel: 1, value }) => *value,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(bends, [0, 8191, -8192]);
    }

    #[test]
    fn phantom_status_carries_over_to_the_next_packet() {
        let mut d = CommandDecoder::new();
        decode(&mut d, &[0x90, 60, 100], false);
        let mut v = Vec::new();
        d.decode(&[62, 100], false, true, |t, m| v.push((t, m)))
            .unwrap();
        assert_eq!(v, [(0, on(0, 62, 100))]);
        // Without any earlier status a data byte is an error.
        assert!(!decode(&mut CommandDecoder::new(), &[62, 100], false).1);
    }

    #[test]
    fn sysex_whole_and_segmented_and_cancelled() {
        let mut d = CommandDecoder::new();
        let (v, ok) = decode(&mut d, &[0xF0, 0x7E, 0x01, 0xF7, 0x00, 0x90, 60, 1], false);
        assert!(ok);
        assert_eq!(v, [(0, MidiMessage::SysEx(4)), (0, on(0, 60, 1))]);
        // F0 … F0 | F7 … F0 | F7 … F7 over three packets.
        assert_eq!(decode(&mut d, &[0xF0, 1, 2, 0xF0], false), (vec![], true));
        assert_eq!(decode(&mut d, &[0xF7, 3, 0xF0], false), (vec![], true));
        assert_eq!(
            decode(&mut d, &[0xF7, 4, 0xF7], false),
            (vec![(0, MidiMessage::SysEx(6))], true)
        );
        // Cancelled.
        decode(&mut d, &[0xF0, 1, 0xF0], false);
        assert_eq!(
            decode(&mut d, &[0xF7, 2, 0xF4], false),
            (vec![(0, MidiMessage::SysExDropped)], true)
        );
        // A realtime byte inside a SysEx is delivered.
        assert_eq!(
            decode(&mut d, &[0xF0, 1, 0xF8, 2, 0xF7], false).0,
            [(0, MidiMessage::Clock), (0, MidiMessage::SysEx(4))]
        );
    }

    #[test]
    fn system_common_cancels_running_status() {
        let (v, ok) = decode(
            &mut CommandDecoder::new(),
            &[0x90, 60, 1, 0x00, 0xF6, 0x00, 61, 1],
            false,
        );
        assert!(!ok);
        assert_eq!(v, [(0, on(0, 60, 1)), (0, MidiMessage::Common)]);
    }

    #[test]
    fn truncated_commands_and_deltas_are_errors() {
        for bad in [
            &[0x90, 60][..],
            &[0x90, 60, 1, 0x80],
            &[0x90, 60, 1, 0x80, 0x80, 0x80, 0x80, 0x00],
        ] {
            assert!(
                !decode(&mut CommandDecoder::new(), bad, false).1,
                "{bad:x?}"
            );
        }
    }

    #[test]
    fn single_messages_as_jack_delivers_them() {
        assert_eq!(decode_message(&[0x92, 60, 99]), Some(on(2, 60, 99)));
        assert_eq!(decode_message(&[0xF8]), Some(MidiMessage::Clock));
        assert_eq!(
            decode_message(&[0xF0, 1, 2, 0xF7]),
            Some(MidiMessage::SysEx(4))
        );
        for bad in [&[][..], &[60, 1], &[0x90, 60], &[0x90, 60, 200], &[0xF0, 1]] {
            assert_eq!(decode_message(bad), None, "{bad:x?}");
        }
    }

    #[test]
    fn held_notes_are_released_with_their_pedals() {
        let mut h = HeldNotes::default();
        for ev in [
            MidiEvent::NoteOn {
                channel: 0,
                note: 60,
                velocity: 100,
            },
            MidiEvent::NoteOn {
                channel: 3,
                note: 127,
                velocity: 1,
            },
            MidiEvent::NoteOn {
                channel: 0,
                note: 62,
                velocity: 100,
            },
            MidiEvent::NoteOff {
                channel: 0,
                note: 62,
                velocity: 0,
            },
            MidiEvent::ControlChange {
                channel: 0,
                controller: 64,
                value: 127,
            },
        ] {
            h.track(&ev);
        }
        assert_eq!(h.keys(), 2);
        let r = h.release_all();
        assert_eq!(
            r,
            [
                MidiEvent::ControlChange {
                    channel: 0,
                    controller: 64,
                    value: 0
                },
                MidiEvent::NoteOff {
                    channel: 0,
                    note: 60,
                    velocity: 0
                },
                MidiEvent::NoteOff {
                    channel: 3,
                    note: 127,
                    velocity: 0
                },
            ]
        );
        assert!(h.is_empty());
    }

    #[test]
    fn the_clock_gives_the_tempo() {
        let mut c = ClockFollower::default();
        assert!(c.handle(0, &MidiMessage::Start));
        // 120 BPM: a quarter note is 500 ms, a clock every 500/24 ms.
        for i in 0..100u64 {
            c.handle(i * 500_000_000 / 24, &MidiMessage::Clock);
        }
        assert!((c.bpm().unwrap() - 120.0).abs() < 0.01, "{:?}", c.bpm());
        assert!(c.playing);
        c.handle(0, &MidiMessage::Stop);
        assert!(!c.playing);
    }
}
