//! MIDI through JACK: a JACK MIDI input port (`voicemesh:midi_in` by default) whose events are
//! played like RTP-MIDI's, for USB keyboards on a JACK system (a2jmidid, or JACK's own ALSA
//! MIDI bridge, exposes them as JACK MIDI ports).
//!
//! libjack is loaded at run time (`voicemesh_node::audio::ffi::jack::MidiInput`): the process
//! callback only copies events into a wait-free queue; a plain thread drains it every
//! millisecond, decodes each event ([`crate::rtpmidi::midi::decode_message`]) and hands it to
//! the allocator. Each event keeps its place in time: its frame's time on JACK's clock
//! (`jack_frames_to_time`), mapped to cluster time through the offset between the two clocks
//! read at drain time, plus one JACK period (an input event is at most one period old when
//! the process callback sees it, so events are never placed before "now" and their spacing is
//! kept). Keys and pedals held when the coordinator stops are released.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use voicemesh_node::audio::ffi::jack::{Client, MidiInput};
use voicemesh_protocol::ClusterTime;

use crate::rtpmidi::midi::{HeldNotes, MidiMessage, decode_message};
use crate::state::Shared;

/// How the JACK MIDI input runs.
#[derive(Clone, Debug)]
pub struct JackMidiConfig {
    /// JACK client name (JACK makes it unique if taken).
    pub client: String,
    /// Input port name.
    pub port: String,
    /// JACK MIDI output ports (full names) to connect to the input at start.
    pub connect: Vec<String>,
}

impl Default for JackMidiConfig {
    fn default() -> Self {
        JackMidiConfig {
            client: "voicemesh".into(),
            port: "midi_in".into(),
            connect: Vec::new(),
        }
    }
}

/// Opens the JACK client and its port (errors are reported before anything runs).
pub(crate) fn open(cfg: &JackMidiConfig) -> Result<MidiInput, String> {
    let client = Client::open(&cfg.client, None).map_err(|e| e.to_string())?;
    let input = MidiInput::start(client, &cfg.port, 4096).map_err(|e| e.to_string())?;
    for src in &cfg.connect {
        input.connect_from(src).map_err(|e| e.to_string())?;
    }
    Ok(input)
}

/// Drains `input` into the allocator until `cancel`; then releases what is held.
pub(crate) fn run(mut input: MidiInput, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut held = HeldNotes::default();
    let period_ns = {
        let c = input.client();
        u64::from(c.buffer_size()) * 1_000_000_000 / u64::from(c.sample_rate().max(1))
    };
    let mut dropped_seen = 0;
    while !cancel.is_cancelled() {
        let now = shared.now();
        // JACK's clock → cluster time, read together.
        let offset = now.as_nanos() as i128 - i128::from(input.client().time_us()) * 1000;
        let mut wake = false;
        let mut g = None;
        while let Some(ev) = input.pop() {
            let Some(msg) = (ev.len <= 3)
                .then(|| decode_message(&ev.bytes[..ev.len]))
                .flatten()
            else {
                continue;
            };
            let MidiMessage::Channel(e) = msg else {
                continue;
            };
            let at = (i128::from(ev.time_us) * 1000 + offset + i128::from(period_ns))
                .clamp(now.as_nanos() as i128, i128::from(u64::MAX)) as u64;
            held.track(&e);
            wake |=
                matches!(e, crate::allocator::MidiEvent::NoteOn { velocity, .. } if velocity > 0);
            let inner = g.get_or_insert_with(|| shared.lock());
            let actions = inner.midi_actions(ClusterTime(at), e);
            inner.dispatch(actions, None);
        }
        drop(g);
        if wake {
            shared.renew_wakeup.notify_one();
        }
        let dropped = input.dropped();
        if dropped != dropped_seen {
            tracing::warn!(dropped, "JACK MIDI queue full: events dropped");
            dropped_seen = dropped;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let now = shared.now();
    let mut g = shared.lock();
    for e in held.release_all() {
        let actions = g.midi_actions(now, e);
        g.dispatch(actions, None);
    }
}
