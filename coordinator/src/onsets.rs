//! Onset spread: how closely the nodes start the notes of one chord (sans-IO).
//!
//! Nodes that speak protocol 1.2 report every voice start as an `Onset`: the `at` the
//! coordinator stamped on the `VoiceOn`, the cluster time of the note's first frame by the
//! node's audio clock model (`at_frame`), and the `CLOCK_MONOTONIC` instant the node's output
//! emits that frame (`emitted_mono_ns`). [`OnsetLog`] keeps the most recent ones and groups
//! them into chords by `at`: the notes the coordinator asked to start at the same instant.
//! For each chord that reached at least two nodes it gives two spreads:
//!
//! - **emitted** (`max − min` of `emitted_mono_ns` over the chord's nodes): the true spread,
//!   measured on the one clock every process of a machine shares. Only meaningful when the
//!   nodes run on one machine (a measurement setup: `voicemesh bench sync`, the tests).
//! - **model** (`max − min` of `at_frame`): what the nodes themselves believe; small even when
//!   their clocks are wrong, so it says nothing about accuracy, only about scheduling and
//!   frame quantisation.
//!
//! A node's first onset of a chord counts (re-triggers within a chord are ignored).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use voicemesh_protocol::Onset;

/// Onsets kept.
pub const ONSET_LOG: usize = 8192;

/// One onset as received, with the node that reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnsetRecord {
    /// Node id.
    pub node: String,
    /// Voice slot.
    pub voice: u16,
    /// MIDI note.
    pub note: u8,
    /// The `VoiceOn`'s `at`, ns.
    pub at_ns: u64,
    /// Cluster time of the first frame by the node's model, ns.
    pub at_frame_ns: u64,
    /// `CLOCK_MONOTONIC` ns the node's output emitted that frame (0: unknown).
    pub emitted_mono_ns: u64,
}

/// One chord's spread.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChordSpread {
    /// The chord's `at`, ns.
    pub at_ns: u64,
    /// Distinct nodes that started a note of it.
    pub nodes: usize,
    /// `max − min` of the nodes' emission instants, ns (None if a node did not know it).
    pub emitted_spread_ns: Option<u64>,
    /// `max − min` of the nodes' model times of the first frame, ns.
    pub model_spread_ns: u64,
    /// The earliest emission instant of the chord (`CLOCK_MONOTONIC` ns), if every node knew
    /// its own.
    pub first_emitted_mono_ns: Option<u64>,
}

/// p50 / p99 / max of a set of spreads, in µs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpreadSummary {
    /// How many chords.
    pub chords: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile (nearest rank), µs.
    pub p99_us: f64,
    /// Largest, µs.
    pub max_us: f64,
}

impl SpreadSummary {
    /// The summary of `ns` (any order).
    pub fn of(ns: &[u64]) -> Self {
        let mut v = ns.to_vec();
        v.sort_unstable();
        let pct = |p: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            // Nearest rank: the smallest value with at least p% of the set at or below it.
            let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
            v[rank.min(v.len()) - 1] as f64 / 1000.0
        };
        SpreadSummary {
            chords: v.len() as u64,
            p50_us: pct(50.0),
            p99_us: pct(99.0),
            max_us: v.last().map_or(0.0, |m| *m as f64 / 1000.0),
        }
    }
}

/// What `/api/cluster` reports under `onsets`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OnsetSummary {
    /// Onsets received since start.
    pub received: u64,
    /// Spread of the emission instants over the recent chords that reached ≥ 2 nodes.
    pub emitted_spread: SpreadSummary,
    /// Spread of the nodes' model times over the same chords.
    pub model_spread: SpreadSummary,
}

/// The recent onsets of the cluster. See the module docs.
#[derive(Debug, Default)]
pub struct OnsetLog {
    log: VecDeque<OnsetRecord>,
    received: u64,
}

impl OnsetLog {
    /// Records `o` from `node`; the oldest record goes when [`ONSET_LOG`] are kept.
    pub fn record(&mut self, node: &str, o: &Onset) {
        if self.log.len() == ONSET_LOG {
            self.log.pop_front();
        }
        self.received += 1;
        self.log.push_back(OnsetRecord {
            node: node.to_owned(),
            voice: o.voice,
            note: o.note,
            at_ns: o.at.as_nanos(),
            at_frame_ns: o.at_frame.as_nanos(),
            emitted_mono_ns: o.emitted_mono_ns,
        });
    }

    /// Onsets received since start.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The recent onsets, oldest first.
    pub fn records(&self) -> impl Iterator<Item = &OnsetRecord> {
        self.log.iter()
    }

    /// Every recent chord that reached at least two nodes, in `at` order.
    pub fn chords(&self) -> Vec<ChordSpread> {
        chords(self.log.iter())
    }

    /// Spread summaries over [`OnsetLog::chords`].
    pub fn summary(&self) -> OnsetSummary {
        let chords = self.chords();
        let emitted: Vec<u64> = chords.iter().filter_map(|c| c.emitted_spread_ns).collect();
        let model: Vec<u64> = chords.iter().map(|c| c.model_spread_ns).collect();
        OnsetSummary {
            received: self.received,
            emitted_spread: SpreadSummary::of(&emitted),
            model_spread: SpreadSummary::of(&model),
        }
    }
}

/// Groups `records` into chords by `at` (each node's first onset of a chord) and measures the
/// spread of those that reached at least two nodes.
pub fn chords<'a>(records: impl Iterator<Item = &'a OnsetRecord>) -> Vec<ChordSpread> {
    // at → node → (at_frame, emitted)
    let mut by_at: BTreeMap<u64, BTreeMap<&str, (u64, u64)>> = BTreeMap::new();
    for r in records {
        by_at
            .entry(r.at_ns)
            .or_default()
            .entry(r.node.as_str())
            .or_insert((r.at_frame_ns, r.emitted_mono_ns));
    }
    by_at
        .into_iter()
        .filter(|(_, nodes)| nodes.len() >= 2)
        .map(|(at, nodes)| {
            let spread = |it: &mut dyn Iterator<Item = u64>| -> u64 {
                let (mut lo, mut hi) = (u64::MAX, 0u64);
                for x in it {
                    lo = lo.min(x);
                    hi = hi.max(x);
                }
                hi - lo
            };
            let known = nodes.values().all(|(_, e)| *e != 0);
            ChordSpread {
                at_ns: at,
                nodes: nodes.len(),
                emitted_spread_ns: known.then(|| spread(&mut nodes.values().map(|(_, e)| *e))),
                first_emitted_mono_ns: known
                    .then(|| nodes.values().map(|(_, e)| *e).min())
                    .flatten(),
                model_spread_ns: spread(&mut nodes.values().map(|(f, _)| *f)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use voicemesh_protocol::ClusterTime;

    fn onset(at: u64, at_frame: u64, emitted: u64) -> Onset {
        Onset {
            voice: 0,
            note: 60,
            at: ClusterTime(at),
            at_frame: ClusterTime(at_frame),
            emitted_mono_ns: emitted,
        }
    }

    #[test]
    fn a_chord_spread_is_max_minus_min_over_its_nodes() {
        let mut log = OnsetLog::default();
        log.record("a", &onset(1_000, 1_010, 50_000));
        log.record("b", &onset(1_000, 1_000, 53_000));
        log.record("c", &onset(1_000, 1_020, 49_000));
        // A re-trigger on a: its first onset counts.
        log.record("a", &onset(1_000, 1_900, 90_000));
        let c = log.chords();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].nodes, 3);
        assert_eq!(c[0].emitted_spread_ns, Some(4_000));
        assert_eq!(c[0].model_spread_ns, 20);
        assert_eq!(c[0].first_emitted_mono_ns, Some(49_000));
    }

    #[test]
    fn single_node_chords_and_unknown_emission_are_left_out() {
        let mut log = OnsetLog::default();
        log.record("a", &onset(1, 1, 5));
        log.record("a", &onset(2, 2, 6));
        log.record("b", &onset(2, 3, 0));
        let c = log.chords();
        assert_eq!(c.len(), 1, "the chord at 1 reached one node only");
        assert_eq!(c[0].emitted_spread_ns, None);
        let s = log.summary();
        assert_eq!(s.emitted_spread.chords, 0);
        assert_eq!(s.model_spread.chords, 1);
        assert_eq!(s.received, 3);
    }

    #[test]
    fn summary_uses_nearest_rank_percentiles() {
        let ns: Vec<u64> = (1..=200).map(|i| i * 1000).collect();
        let s = SpreadSummary::of(&ns);
        assert_eq!(s.chords, 200);
        assert_eq!(s.p50_us, 100.0);
        assert_eq!(s.p99_us, 198.0);
        assert_eq!(s.max_us, 200.0);
        assert_eq!(SpreadSummary::of(&[]), SpreadSummary::default());
    }

    #[test]
    fn the_log_is_bounded() {
        let mut log = OnsetLog::default();
        for i in 0..(ONSET_LOG as u64 + 10) {
            log.record("a", &onset(i, i, i + 1));
        }
        assert_eq!(log.records().count(), ONSET_LOG);
        assert_eq!(log.received(), ONSET_LOG as u64 + 10);
        assert_eq!(log.records().next().unwrap().at_ns, 10);
    }
}
