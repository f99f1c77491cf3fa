//! The timetag scheduler (sans-IO): holds the commands of future bundles until their time.
//!
//! A command stamped with timetag `T` (cluster time, see [`super::ntp_to_cluster`]) must sound
//! at `T`. The allocator stamps every event with `now + lookahead`, so the command is handed to
//! it as if it arrived at `due = T − lookahead`: the voice events then carry `at = T` exactly.
//! The glue wakes [`MARGIN_NS`] before `due`: the lookahead covers the way to the node, the
//! margin covers the timer's wake-up jitter, which on a loaded 2-core machine was seen to exceed
//! 2 ms. The allocator's `now` may therefore run up to the margin ahead of the clock (the node
//! simply holds the events a little longer).
//!
//! A timetag whose `due` has passed (a late bundle, or one inside the lookahead) runs at once,
//! as OSC says, and is counted as late; one more than [`MAX_AHEAD_NS`] ahead is dropped
//! (`too_far_ahead`), and so is one that finds [`CAPACITY`] commands waiting (`queue_full`).
//!
//! Call order: [`Scheduler::handle`] for each received command (run what it returns), then
//! [`Scheduler::poll_due`] until `None` whenever the clock reaches [`Scheduler::poll_timeout`].
#![deny(clippy::disallowed_methods)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use voicemesh_protocol::ClusterTime;

use super::{DropReason, OscCommand, When, ntp_to_cluster};

/// How long before its time a command is handed to the allocator.
pub const MARGIN_NS: u64 = 20_000_000;
/// Furthest ahead a timetag may be.
pub const MAX_AHEAD_NS: u64 = 60_000_000_000;
/// Most commands waiting at once.
pub const CAPACITY: usize = 4096;

#[derive(Debug)]
struct Entry {
    due: ClusterTime,
    seq: u64,
    cmd: OscCommand,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

/// A command to run now, with the `now` to give the allocator.
pub type Run = (ClusterTime, OscCommand);

/// See the module documentation.
#[derive(Debug)]
pub struct Scheduler {
    lookahead_ns: u64,
    heap: BinaryHeap<Reverse<Entry>>,
    seq: u64,
    late: u64,
    scheduled: u64,
}

impl Scheduler {
    /// A scheduler for an allocator with this lookahead.
    pub fn new(lookahead_ns: u64) -> Self {
        Scheduler {
            lookahead_ns,
            heap: BinaryHeap::new(),
            seq: 0,
            late: 0,
            scheduled: 0,
        }
    }

    /// Takes one received command at `now`: returns it if it must run now, keeps it if it is
    /// for later, or says why it was dropped.
    pub fn handle(
        &mut self,
        now: ClusterTime,
        when: When,
        cmd: OscCommand,
    ) -> Result<Option<Run>, DropReason> {
        let When::At(tt) = when else {
            return Ok(Some((now, cmd)));
        };
        let t = ntp_to_cluster(tt);
        let due = ClusterTime(t.0.saturating_sub(self.lookahead_ns));
        if due.0 <= now.0.saturating_add(MARGIN_NS) {
            if due < now {
                self.late += 1;
            }
            return Ok(Some((due.max(now), cmd)));
        }
        if t.0 - now.0 > MAX_AHEAD_NS {
            return Err(DropReason::TooFarAhead);
        }
        if self.heap.len() >= CAPACITY {
            return Err(DropReason::QueueFull);
        }
        self.seq += 1;
        self.scheduled += 1;
        self.heap.push(Reverse(Entry {
            due,
            seq: self.seq,
            cmd,
        }));
        Ok(None)
    }

    /// When [`Scheduler::poll_due`] has something next.
    pub fn poll_timeout(&self) -> Option<ClusterTime> {
        self.heap
            .peek()
            .map(|Reverse(e)| ClusterTime(e.due.0.saturating_sub(MARGIN_NS)))
    }

    /// The next command whose time has come, in timetag order (ties in arrival order).
    pub fn poll_due(&mut self, now: ClusterTime) -> Option<Run> {
        let Reverse(e) = self.heap.peek()?;
        if e.due.0 > now.0.saturating_add(MARGIN_NS) {
            return None;
        }
        let Reverse(e) = self.heap.pop()?;
        if e.due < now {
            self.late += 1;
        }
        Some((e.due.max(now), e.cmd))
    }

    /// Forgets every waiting command (on panic). Returns how many.
    pub fn clear(&mut self) -> usize {
        let n = self.heap.len();
        self.heap.clear();
        n
    }

    /// Commands waiting.
    pub fn pending(&self) -> usize {
        self.heap.len()
    }

    /// Commands that ran after their time (their bundle arrived late, or the glue woke late).
    pub fn late(&self) -> u64 {
        self.late
    }

    /// Commands that were held for later.
    pub fn scheduled(&self) -> u64 {
        self.scheduled
    }
}

#[cfg(test)]
mod tests {
    use super::super::cluster_to_ntp;
    use super::*;

    const MS: u64 = 1_000_000;
    const LOOKAHEAD: u64 = 5 * MS;

    fn note(n: u8) -> OscCommand {
        OscCommand::Note {
            note: n,
            velocity: 100,
            channel: 0,
        }
    }

    fn at(t: ClusterTime) -> When {
        When::At(cluster_to_ntp(t))
    }

    #[test]
    fn future_commands_run_lookahead_before_their_time_in_order() {
        let mut s = Scheduler::new(LOOKAHEAD);
        let now = ClusterTime(1_800_000_000 * 1_000_000_000);
        let t1 = now.add_nanos(100 * MS as i64);
        let t2 = now.add_nanos(50 * MS as i64);
        assert_eq!(s.handle(now, at(t1), note(1)), Ok(None));
        assert_eq!(s.handle(now, at(t2), note(2)), Ok(None));
        assert_eq!(s.handle(now, at(t2), note(3)), Ok(None));
        assert_eq!(s.pending(), 3);
        // Wakes MARGIN before t2 − lookahead.
        let wake = s.poll_timeout().unwrap();
        assert_eq!(wake.0, t2.0 - LOOKAHEAD - MARGIN_NS);
        assert_eq!(s.poll_due(ClusterTime(wake.0 - 1)), None);
        // The allocator is handed `due`, so its events carry at = due + lookahead = t2.
        let due2 = ClusterTime(t2.0 - LOOKAHEAD);
        assert_eq!(s.poll_due(wake), Some((due2, note(2))));
        assert_eq!(s.poll_due(wake), Some((due2, note(3))));
        assert_eq!(s.poll_due(wake), None);
        // Woken late: still runs, at the clock's now, counted.
        let late = ClusterTime(t1.0);
        assert_eq!(s.poll_due(late), Some((late, note(1))));
        assert_eq!(s.late(), 1);
        assert_eq!(s.scheduled(), 3);
    }

    #[test]
    fn immediate_late_too_far_and_full() {
        let mut s = Scheduler::new(LOOKAHEAD);
        let now = ClusterTime(1_800_000_000 * 1_000_000_000);
        assert_eq!(s.handle(now, When::Now, note(1)), Ok(Some((now, note(1)))));
        // Within the lookahead: runs now, aimed at the timetag.
        let soon = now.add_nanos(6 * MS as i64);
        assert_eq!(
            s.handle(now, at(soon), note(2)),
            Ok(Some((ClusterTime(now.0 + MS), note(2))))
        );
        assert_eq!(s.late(), 0);
        // In the past: runs now, counted late.
        let past = ClusterTime(now.0 - 10 * MS);
        assert_eq!(s.handle(now, at(past), note(3)), Ok(Some((now, note(3)))));
        assert_eq!(s.late(), 1);
        let far = now.add_nanos(MAX_AHEAD_NS as i64 + 1_000_000_000);
        assert_eq!(
            s.handle(now, at(far), note(4)),
            Err(DropReason::TooFarAhead)
        );
        let later = now.add_nanos(1_000_000_000);
        for _ in 0..CAPACITY {
            assert_eq!(s.handle(now, at(later), note(5)), Ok(None));
        }
        assert_eq!(
            s.handle(now, at(later), note(5)),
            Err(DropReason::QueueFull)
        );
        assert_eq!(s.clear(), CAPACITY);
        assert_eq!(s.poll_timeout(), None);
    }
}
