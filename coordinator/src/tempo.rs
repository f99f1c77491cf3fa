//! The cluster's tempo and transport: one [`Timeline`] (tempo, beat origin, time origin in
//! cluster time) and a playing flag, owned by the coordinator and sent to every node.
//!
//! [`TempoHandle`] is how the rest of the coordinator changes them: the HTTP API
//! (`POST /api/tempo`), OSC (`/voicemesh/tempo f`, `/voicemesh/transport i`) and the Ableton Link
//! peer. A change that alters the timeline is applied to the CV router's clock outputs at once and
//! queued as a [`Message::Timeline`] on every node session; a change that alters nothing sends
//! nothing. A tempo change keeps the musical position continuous: the beat at the moment of the
//! change stays where it was, only the slope of the line changes.
//!
//! Local edits (HTTP, OSC) are also counted in `app_edits` and announced through
//! [`TempoHandle::app_changed`], so the Link glue can carry them into the Link session; changes
//! that come *from* Link go through [`TempoHandle::apply_session`] and are not announced back.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use voicemesh_protocol::{ClusterTime, MAX_BPM, MIN_BPM, Message, Timeline};

use crate::state::Shared;

/// Default bar length, in beats, for phase reporting and Link.
pub const DEFAULT_QUANTUM: f64 = 4.0;

/// The coordinator's tempo state (inside the shared state's lock).
#[derive(Clone, Debug)]
pub(crate) struct TempoState {
    /// The cluster timeline nodes follow.
    pub timeline: Timeline,
    /// Whether the transport is playing.
    pub playing: bool,
    /// Bar length in beats (phase = beats mod quantum).
    pub quantum: f64,
    /// Tempo/transport edits made locally (HTTP, OSC) since start, for the Link glue.
    pub app_edits: u64,
    /// Link status, filled in by the Link glue when it runs.
    pub link: LinkStatus,
}

impl TempoState {
    pub fn new(timeline: Timeline, quantum: f64) -> Self {
        TempoState {
            timeline,
            playing: false,
            quantum,
            app_edits: 0,
            link: LinkStatus::default(),
        }
    }
}

/// What the Link peer reports, in [`TempoSnapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// Whether the coordinator takes part in an Ableton Link session.
    pub enabled: bool,
    /// Other Link peers in our session (unique node ids).
    pub peers: u32,
    /// Interface addresses Link runs on (one gateway each).
    pub gateways: u32,
}

/// The tempo and transport as served by `/api/cluster` (`tempo` section) and `/api/tempo`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TempoSnapshot {
    /// Tempo in BPM.
    pub tempo_bpm: f64,
    /// Whether the transport is playing.
    pub playing: bool,
    /// Beats since beat 0 of the timeline, at `cluster_time_ns`.
    pub beats: f64,
    /// `beats` modulo `quantum`, in `0..quantum`.
    pub phase: f64,
    /// Bar length in beats.
    pub quantum: f64,
    /// Cluster time the beat and phase are taken at, in nanoseconds.
    pub cluster_time_ns: u64,
    /// The timeline nodes follow.
    pub timeline: Timeline,
    /// Ableton Link state.
    pub link: LinkStatus,
}

impl TempoSnapshot {
    pub(crate) fn of(state: &TempoState, now: ClusterTime) -> Self {
        let tl = &state.timeline;
        let beats = tl.beats_at(now);
        TempoSnapshot {
            tempo_bpm: bpm_of(tl),
            playing: state.playing,
            beats,
            phase: phase_of(beats, state.quantum),
            quantum: state.quantum,
            cluster_time_ns: now.as_nanos(),
            timeline: *tl,
            link: state.link,
        }
    }
}

/// Tempo of a timeline in BPM, without the rounding of [`Timeline::milli_bpm`].
pub fn bpm_of(tl: &Timeline) -> f64 {
    60e9 / tl.ns_per_beat.max(1) as f64
}

/// `beats` modulo `quantum`, flooring (negative beats give a phase in `0..quantum` too).
pub fn phase_of(beats: f64, quantum: f64) -> f64 {
    if quantum > 0.0 {
        beats.rem_euclid(quantum)
    } else {
        0.0
    }
}

/// Why a tempo change was refused.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TempoError {
    /// Not a finite number, or outside 20–999 BPM.
    #[error("tempo {0} BPM is out of range: use {MIN_BPM}–{MAX_BPM}")]
    OutOfRange(f64),
}

/// Changes the cluster's tempo and transport; cheap to clone. See the module docs.
#[derive(Clone, Debug)]
pub struct TempoHandle {
    shared: Arc<Shared>,
}

impl TempoHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        TempoHandle { shared }
    }

    /// Sets the tempo from now on, keeping the current beat where it is. Refuses NaN, infinities
    /// and tempos outside 20–999 BPM.
    pub fn set_tempo_bpm(&self, bpm: f64) -> Result<TempoSnapshot, TempoError> {
        if !bpm.is_finite() || bpm < f64::from(MIN_BPM) || bpm > f64::from(MAX_BPM) {
            return Err(TempoError::OutOfRange(bpm));
        }
        let now = self.shared.now();
        let mut g = self.shared.lock();
        let old = g.tempo.timeline;
        let ns_per_beat = (60e9 / bpm).round() as u64;
        if ns_per_beat != old.ns_per_beat {
            let tl = Timeline {
                ns_per_beat,
                beat0_micro: old.micro_beats_at(now),
                t0: now,
            };
            g.set_timeline(tl);
            g.tempo.app_edits += 1;
        }
        let snap = TempoSnapshot::of(&g.tempo, now);
        drop(g);
        self.shared.tempo_changed.notify_one();
        Ok(snap)
    }

    /// Starts or stops the transport.
    pub fn set_playing(&self, playing: bool) -> TempoSnapshot {
        let now = self.shared.now();
        let mut g = self.shared.lock();
        if g.tempo.playing != playing {
            g.tempo.playing = playing;
            g.tempo.app_edits += 1;
        }
        let snap = TempoSnapshot::of(&g.tempo, now);
        drop(g);
        self.shared.tempo_changed.notify_one();
        snap
    }

    /// The tempo, transport and phase now.
    pub fn snapshot(&self) -> TempoSnapshot {
        let now = self.shared.now();
        TempoSnapshot::of(&self.shared.lock().tempo, now)
    }

    /// Applies a timeline and playing state that come from outside the coordinator (the Link
    /// session): sent to the nodes if they differ, but not counted as a local edit.
    pub fn apply_session(&self, timeline: Timeline, playing: bool) {
        let mut g = self.shared.lock();
        g.set_timeline(timeline);
        g.tempo.playing = playing;
    }

    /// Turns the Ableton Link peer on or off at run time (off sends BYEBYE).
    pub fn set_link_enabled(&self, on: bool) {
        self.shared.link_enabled.send_replace(on);
    }

    /// Records the Link peer's status for the snapshot.
    pub fn set_link_status(&self, link: LinkStatus) {
        self.shared.lock().tempo.link = link;
    }

    /// Local tempo/transport edits (HTTP, OSC) made since start.
    pub fn app_edits(&self) -> u64 {
        self.shared.lock().tempo.app_edits
    }

    /// Resolves at the next local tempo or transport edit.
    pub async fn app_changed(&self) {
        self.shared.tempo_changed.notified().await;
    }
}

impl crate::state::Inner {
    /// Installs `tl` as the cluster timeline and queues it to every node with a session, if it
    /// differs from the current one.
    pub(crate) fn set_timeline(&mut self, tl: Timeline) {
        if tl == self.tempo.timeline {
            return;
        }
        self.tempo.timeline = tl;
        let actions: Vec<_> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.session.is_some())
            .map(|(id, _)| (id.clone(), Message::Timeline(tl)))
            .collect();
        self.dispatch(actions, None);
    }
}

/// Body of `POST /api/tempo`: either field may be left out.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TempoRequest {
    tempo_bpm: Option<f64>,
    playing: Option<bool>,
    link: Option<bool>,
}

/// `POST /api/tempo` `{"tempo_bpm": 128, "playing": true}`: answers with the new snapshot, or
/// 400 with the reason.
pub(crate) async fn post_tempo(
    axum::extract::State(app): axum::extract::State<crate::http::App>,
    body: bytes::Bytes,
) -> axum::response::Response {
    use crate::http::{json_error, json_ok};
    use axum::http::StatusCode;
    let req: TempoRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
    };
    let h = TempoHandle::new(app.shared.clone());
    if let Some(bpm) = req.tempo_bpm
        && let Err(e) = h.set_tempo_bpm(bpm)
    {
        return json_error(StatusCode::BAD_REQUEST, &e.to_string());
    }
    if let Some(p) = req.playing {
        h.set_playing(p);
    }
    if let Some(on) = req.link {
        h.set_link_enabled(on);
    }
    json_ok(&h.snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_floors_negative_beats() {
        assert_eq!(phase_of(5.5, 4.0), 1.5);
        assert_eq!(phase_of(-0.5, 4.0), 3.5);
        assert_eq!(phase_of(3.0, 0.0), 0.0);
    }

    #[test]
    fn bpm_is_exact() {
        let tl = Timeline {
            ns_per_beat: 535_714_000,
            beat0_micro: 0,
            t0: ClusterTime(0),
        };
        assert!((bpm_of(&tl) - 112.000_059_7).abs() < 1e-6);
    }
}
