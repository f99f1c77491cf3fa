//! A deterministic simulation of a PTP cluster (CONVENTIONS.md §5): one grandmaster and N
//! slaves, each the real [`PtpCore`] over a real statime instance and the real clock adapters
//! ([`ReferenceClock`], [`SteeredClock`]) steering a real [`ClusterClock`] model — only the
//! oscillators and the network are simulated.
//!
//! - True time is a `u64` of nanoseconds. Each node has its own oscillator: `local = offset +
//!   true × (1 + drift)`, the local clock its [`ClusterClock`] model is read over.
//! - The network is one multicast segment: every datagram reaches every other node after a
//!   base latency plus a random extra delay, or is lost; a partitioned node neither sends nor
//!   receives.
//! - Timestamps (transmit and receive) are the node's local time plus Gaussian noise, as a
//!   kernel's software stamps would be.
//! - One seed drives everything; the harness jumps from one deadline to the next (a core's
//!   timer, a datagram's arrival, a fault, a sample).
//!
//! [`simulate`] runs a [`SimConfig`] with a list of [`Fault`]s and returns a [`Trace`]: the true
//! offset of every slave's cluster clock from the grandmaster's at every sample, with the servo
//! state, steps and rate each slave reported. The tests in `node/tests/ptp_sim.rs` judge it.

use super::clocks::{ReferenceClock, SteeredClock};
use super::port::{Channel, Instance, PtpCore, Role};
use super::{PtpStatus, ServoState, random_identity};
use crate::clock::{ClockModel, ClusterClock, LocalClock};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::sync::Arc;
use voicemesh_protocol::ClusterTime;

/// Cluster time at true time 0 (about 2026 on the TAI scale); any large value would do.
const EPOCH_NS: u64 = 1_795_000_000_000_000_000;

/// The world a simulation runs in.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Drives every random choice.
    pub seed: u64,
    /// Number of slaves.
    pub slaves: usize,
    /// Each slave's cluster clock starts off by a uniform random offset in ±this, ns.
    pub max_offset_ns: i64,
    /// When not 0, the start offset's magnitude is uniform in this..=`max_offset_ns` instead
    /// (with a random sign): `min = max` starts every slave exactly that far off.
    pub min_offset_ns: i64,
    /// Each oscillator (grandmaster's too) runs fast or slow by a uniform random drift in
    /// ±this, ppm.
    pub max_drift_ppm: f64,
    /// One-way network latency, ns.
    pub latency_ns: u64,
    /// Random extra one-way delay, uniform in 0..this, ns (queueing).
    pub latency_jitter_ns: u64,
    /// Standard deviation of the noise on every timestamp, ns.
    pub stamp_jitter_ns: f64,
    /// Probability that a datagram is lost on its way to one receiver.
    pub loss: f64,
    /// Random extra delay of general messages (Follow_Up, Delay_Resp, Announce), uniform in
    /// 0..this, ns: a busy sender answers late, which widens the window in which a clock step
    /// falls between an event message and the general message that completes its measurement.
    pub general_delay_ns: u64,
    /// How long to simulate, ns.
    pub duration_ns: u64,
    /// Sample the clocks this often, ns.
    pub sample_every_ns: u64,
}

impl SimConfig {
    /// A LAN-like world: ±10 ms, ±100 ppm, 20 µs ± 10 µs latency, 500 ns stamp noise, 1 % loss,
    /// 4 slaves, 60 s, sampled every 100 ms.
    pub fn lan(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            slaves: 4,
            max_offset_ns: 10_000_000,
            min_offset_ns: 0,
            max_drift_ppm: 100.0,
            latency_ns: 20_000,
            latency_jitter_ns: 10_000,
            stamp_jitter_ns: 500.0,
            loss: 0.01,
            general_delay_ns: 0,
            duration_ns: 60_000_000_000,
            sample_every_ns: 100_000_000,
        }
    }
}

/// Something that goes wrong, at a true time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Slave `slave` (0-based) is cut off the network from `from_ns` until `until_ns`.
    Partition {
        /// Which slave.
        slave: usize,
        /// Start, true ns.
        from_ns: u64,
        /// End, true ns.
        until_ns: u64,
    },
    /// The grandmaster is gone (sends nothing, hears nothing) from `from_ns` until `until_ns`;
    /// it comes back as it was (same identity, same clock).
    GrandmasterDown {
        /// Start, true ns.
        from_ns: u64,
        /// End, true ns.
        until_ns: u64,
    },
    /// The grandmaster's clock jumps by `step_ns` (an operator set its time): every slave
    /// should follow with one step.
    GrandmasterStep {
        /// When, true ns.
        at_ns: u64,
        /// By how much.
        step_ns: i64,
    },
    /// The grandmaster dies at `at_ns` and a new one (a new coordinator: new identity, its own
    /// clock `offset_ns` off the old one's) starts `gap_ns` later.
    NewGrandmaster {
        /// When the old one dies, true ns.
        at_ns: u64,
        /// How long no grandmaster runs, ns.
        gap_ns: u64,
        /// The new grandmaster's clock minus the old one's, ns.
        offset_ns: i64,
    },
}

/// What one slave looked like at one sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlaveSample {
    /// True offset of the slave's cluster clock from the running grandmaster's, ns (the old
    /// one's while no grandmaster runs).
    pub offset_ns: i64,
    /// The servo state the slave reports.
    pub servo: ServoState,
    /// Steps so far.
    pub steps: u64,
    /// The rate correction the slave applies, ppb.
    pub rate_ppb: i64,
    /// The slave's own offset estimate, ns.
    pub estimate_ns: i64,
}

/// One sample of the whole cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// True time, ns.
    pub t_ns: u64,
    /// Per slave.
    pub slaves: Vec<SlaveSample>,
}

/// The result of a simulation.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// The configuration it ran with.
    pub config: SimConfig,
    /// Every sample, in time order.
    pub samples: Vec<Sample>,
    /// How often the BMCA ran on each slave.
    pub bmca_runs: Vec<u64>,
    /// Datagrams delivered and lost.
    pub delivered: u64,
    /// Datagrams lost (loss, partitions, a dead grandmaster).
    pub lost: u64,
}

impl Trace {
    /// Samples at or after true time `from_ns`.
    pub fn after(&self, from_ns: u64) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.t_ns >= from_ns)
    }

    /// Largest |true offset| of any slave over the samples in `from_ns..until_ns`.
    pub fn worst_offset_ns(&self, from_ns: u64, until_ns: u64) -> i64 {
        self.samples
            .iter()
            .filter(|s| s.t_ns >= from_ns && s.t_ns < until_ns)
            .flat_map(|s| s.slaves.iter().map(|x| x.offset_ns.abs()))
            .max()
            .unwrap_or(0)
    }

    /// The first true time from which every slave's |offset| stays below `bound_ns` until
    /// `until_ns` (None if they never do).
    pub fn converged_at(&self, bound_ns: i64, until_ns: u64) -> Option<u64> {
        let mut since = None;
        for s in self.samples.iter().filter(|s| s.t_ns < until_ns) {
            let ok = s.slaves.iter().all(|x| x.offset_ns.abs() < bound_ns);
            match (ok, since) {
                (true, None) => since = Some(s.t_ns),
                (false, _) => since = None,
                _ => {}
            }
        }
        since
    }

    /// The last sample (at the end of the run).
    pub fn last(&self) -> &Sample {
        &self.samples[self.samples.len() - 1]
    }
}

/// A simulated oscillator: `local = offset + true × (1 + drift)`.
#[derive(Clone, Copy, Debug)]
struct Oscillator {
    offset: u64,
    drift: f64,
}

impl Oscillator {
    fn local(&self, t: u64) -> u64 {
        self.offset
            .wrapping_add(t)
            .wrapping_add((t as f64 * self.drift).round() as i64 as u64)
    }
}

/// A node's local clock: its oscillator read at the simulation's true time.
#[derive(Clone, Debug)]
pub struct SimLocal {
    truth: Rc<Cell<u64>>,
    osc: Oscillator,
}

impl LocalClock for SimLocal {
    fn now_ns(&self) -> u64 {
        self.osc.local(self.truth.get())
    }
}

enum AnyCore<'a> {
    Master(PtpCore<'a, ReferenceClock<SimLocal>>),
    Slave(PtpCore<'a, SteeredClock<SimLocal>>),
}

macro_rules! each {
    ($core:expr, $c:ident => $e:expr) => {
        match $core {
            AnyCore::Master($c) => $e,
            AnyCore::Slave($c) => $e,
        }
    };
}

struct SimNode<'a> {
    core: AnyCore<'a>,
    local: SimLocal,
    clock: Arc<ClusterClock>,
    status: Arc<PtpStatus>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    /// When the receiving process handles it ([`PROCESSING_NS`] after it arrived).
    at: u64,
    seq: u64,
    /// When it reached the receiver's network interface (its receive stamp is taken then).
    arrived: u64,
    to: usize,
    event: bool,
    data: Vec<u8>,
}

/// Time from a datagram's arrival (its receive stamp) to the process handling it, beyond the
/// largest stamp noise: a kernel stamp is always taken before the program sees the packet
/// (statime's filter relies on it: it asserts that measurements never come from its future).
const PROCESSING_NS: u64 = 2_000;

/// Gaussian noise of standard deviation `sigma`, cut at ±3σ (a stamp is never off by more
/// than the time it takes to reach the process, see [`PROCESSING_NS`]).
fn noise(rng: &mut SmallRng, sigma: f64) -> i64 {
    // Box–Muller.
    let u1: f64 = rng.r#gen::<f64>().max(1e-300);
    let u2: f64 = rng.r#gen();
    let g = (-2.0 * u1.ln()).sqrt() * (2.0 * core::f64::consts::PI * u2).cos();
    (g.clamp(-3.0, 3.0) * sigma).round() as i64
}

/// Runs the simulation. Node 0 is the grandmaster (node `slaves + 1` a replacement one, if a
/// [`Fault::NewGrandmaster`] asks for it); nodes `1..=slaves` are the slaves.
pub fn simulate(cfg: &SimConfig, faults: &[Fault]) -> Trace {
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let truth = Rc::new(Cell::new(0u64));
    let oscillator = |rng: &mut SmallRng| Oscillator {
        offset: rng.gen_range(1_000_000_000_000_000_000..1_700_000_000_000_000_000),
        drift: rng.gen_range(-cfg.max_drift_ppm..=cfg.max_drift_ppm) * 1e-6,
    };
    let mut roles = vec![Role::grandmaster(random_identity(&mut rng), 0)];
    for _ in 0..cfg.slaves {
        roles.push(Role::slave(random_identity(&mut rng), 0));
    }
    roles.push(Role::grandmaster(random_identity(&mut rng), 0));
    let instances: Vec<Instance> = roles.iter().map(|r| r.new_instance()).collect();

    let make_master = |i: usize, osc: Oscillator, cluster_at_0: u64, rng: &mut SmallRng| {
        let local = SimLocal {
            truth: truth.clone(),
            osc,
        };
        let clock = Arc::new(ClusterClock::from_model(ClockModel {
            anchor_local: osc.local(truth.get()),
            anchor_cluster: ClusterTime(cluster_at_0).add_nanos(truth.get() as i64),
            rate: 0.0,
        }));
        let status = Arc::new(PtpStatus::default());
        let core = PtpCore::new(
            &instances[i],
            roles[i],
            ReferenceClock::with_local(clock.clone(), local.clone()),
            clock.clone(),
            SmallRng::seed_from_u64(rng.r#gen()),
            status.clone(),
            truth.get(),
        );
        SimNode {
            core: AnyCore::Master(core),
            local,
            clock,
            status,
        }
    };

    let gm_osc = oscillator(&mut rng);
    let mut nodes: Vec<SimNode<'_>> = vec![make_master(0, gm_osc, EPOCH_NS, &mut rng)];
    for i in 1..=cfg.slaves {
        let osc = oscillator(&mut rng);
        let local = SimLocal {
            truth: truth.clone(),
            osc,
        };
        let offset = if cfg.min_offset_ns == 0 {
            rng.gen_range(-cfg.max_offset_ns..=cfg.max_offset_ns)
        } else {
            let m = rng.gen_range(cfg.min_offset_ns..=cfg.max_offset_ns.max(cfg.min_offset_ns));
            if rng.gen_bool(0.5) { m } else { -m }
        };
        let clock = Arc::new(ClusterClock::from_model(ClockModel {
            anchor_local: osc.local(0),
            anchor_cluster: ClusterTime(EPOCH_NS).add_nanos(offset),
            rate: 0.0,
        }));
        let status = Arc::new(PtpStatus::default());
        let core = PtpCore::new(
            &instances[i],
            roles[i],
            SteeredClock::with_local(clock.clone(), local.clone(), status.clone()),
            clock.clone(),
            SmallRng::seed_from_u64(rng.r#gen()),
            status.clone(),
            0,
        );
        nodes.push(SimNode {
            core: AnyCore::Slave(core),
            local,
            clock,
            status,
        });
    }

    // Which node is the grandmaster now (0, or the replacement), and whether it runs.
    let mut gm = 0usize;
    let replacement = cfg.slaves + 1;
    let mut flight: BinaryHeap<Reverse<InFlight>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut delivered = 0u64;
    let mut lost = 0u64;
    let mut samples = Vec::new();
    let mut next_sample = 0u64;
    let mut pending_faults: Vec<(u64, Fault)> = faults
        .iter()
        .flat_map(|f| match *f {
            Fault::GrandmasterStep { at_ns, .. } => vec![(at_ns, *f)],
            Fault::NewGrandmaster { at_ns, gap_ns, .. } => vec![(at_ns, *f), (at_ns + gap_ns, *f)],
            _ => vec![],
        })
        .collect();
    pending_faults.sort_by_key(|(t, _)| *t);
    let mut fault_idx = 0usize;
    let mut gm_dead = false;

    let cut = |node: usize, t: u64, gm: usize, gm_dead: bool| -> bool {
        if node == gm && gm_dead {
            return true;
        }
        faults.iter().any(|f| match *f {
            Fault::Partition {
                slave,
                from_ns,
                until_ns,
            } => node == slave + 1 && (from_ns..until_ns).contains(&t),
            Fault::GrandmasterDown { from_ns, until_ns } => {
                node == gm && (from_ns..until_ns).contains(&t)
            }
            _ => false,
        })
    };

    loop {
        // The next thing that happens.
        let mut t = next_sample;
        for (i, n) in nodes.iter().enumerate() {
            if (i == gm || (1..=cfg.slaves).contains(&i)) && !(i == gm && gm_dead) {
                t = t.min(each!(&n.core, c => c.poll_timeout()));
            }
        }
        if let Some(Reverse(f)) = flight.peek() {
            t = t.min(f.at);
        }
        if let Some((ft, _)) = pending_faults.get(fault_idx) {
            t = t.min(*ft);
        }
        if t > cfg.duration_ns {
            break;
        }
        truth.set(t);

        if t == next_sample {
            let reference = &nodes[gm];
            let m = reference.clock.to_cluster(reference.local.now_ns());
            let slaves = nodes[1..=cfg.slaves]
                .iter()
                .map(|n| SlaveSample {
                    offset_ns: n.clock.to_cluster(n.local.now_ns()).nanos_since(m),
                    servo: n.status.servo_state(),
                    steps: n.status.steps(),
                    rate_ppb: n.status.rate_ppb(),
                    estimate_ns: n.status.offset_ns(),
                })
                .collect();
            samples.push(Sample { t_ns: t, slaves });
            next_sample += cfg.sample_every_ns;
            continue;
        }

        if let Some((ft, f)) = pending_faults.get(fault_idx).copied()
            && ft == t
        {
            fault_idx += 1;
            match f {
                Fault::GrandmasterStep { step_ns, .. } => {
                    let n = &nodes[gm];
                    n.clock.step_at(n.local.now_ns(), step_ns);
                }
                Fault::NewGrandmaster {
                    at_ns, offset_ns, ..
                } => {
                    if t == at_ns && !gm_dead {
                        gm_dead = true;
                    } else {
                        // The new coordinator: its own oscillator, its clock offset from the
                        // old one's cluster time now.
                        let old = &nodes[gm];
                        let old_now = old.clock.to_cluster(old.local.now_ns());
                        let base = old_now.add_nanos(offset_ns).as_nanos() - t;
                        let osc = oscillator(&mut rng);
                        let node = make_master(replacement, osc, base, &mut rng);
                        if nodes.len() > replacement {
                            nodes[replacement] = node;
                        } else {
                            nodes.push(node);
                        }
                        gm = replacement;
                        gm_dead = false;
                    }
                }
                _ => {}
            }
            continue;
        }

        if flight.peek().is_some_and(|Reverse(f)| f.at == t) {
            let Some(Reverse(f)) = flight.pop() else {
                continue;
            };
            let live = f.to == gm || (1..=cfg.slaves).contains(&f.to);
            if !live || cut(f.to, t, gm, gm_dead) {
                lost += 1;
                continue;
            }
            delivered += 1;
            let n = &mut nodes[f.to];
            let stamp = n.local.osc.local(f.arrived) as i64 + noise(&mut rng, cfg.stamp_jitter_ns);
            if f.event {
                each!(&mut n.core, c => c.handle_event(t, &f.data, stamp as u64));
            } else {
                each!(&mut n.core, c => c.handle_general(t, &f.data));
            }
            send(
                cfg,
                &mut nodes,
                f.to,
                t,
                gm,
                gm_dead,
                &cut,
                &mut flight,
                &mut seq,
                &mut rng,
                &mut lost,
            );
            continue;
        }

        // A timer.
        for i in 0..nodes.len() {
            let active = (i == gm && !gm_dead) || (1..=cfg.slaves).contains(&i);
            if !active {
                continue;
            }
            let due = each!(&nodes[i].core, c => c.poll_timeout()) <= t;
            if due {
                each!(&mut nodes[i].core, c => c.handle_timeout(t));
                send(
                    cfg,
                    &mut nodes,
                    i,
                    t,
                    gm,
                    gm_dead,
                    &cut,
                    &mut flight,
                    &mut seq,
                    &mut rng,
                    &mut lost,
                );
            }
        }
    }

    Trace {
        config: cfg.clone(),
        samples,
        bmca_runs: nodes[1..=cfg.slaves]
            .iter()
            .map(|n| n.status.bmca_runs())
            .collect(),
        delivered,
        lost,
    }
}

/// Takes what node `from` wants sent at `t`: stamps event messages, puts a copy for every
/// other live node in flight (or loses it).
#[allow(clippy::too_many_arguments)]
fn send(
    cfg: &SimConfig,
    nodes: &mut [SimNode<'_>],
    from: usize,
    t: u64,
    gm: usize,
    gm_dead: bool,
    cut: &dyn Fn(usize, u64, usize, bool) -> bool,
    flight: &mut BinaryHeap<Reverse<InFlight>>,
    seq: &mut u64,
    rng: &mut SmallRng,
    lost: &mut u64,
) {
    loop {
        let n = &mut nodes[from];
        let Some(tx) = each!(&mut n.core, c => c.poll_transmit()) else {
            return;
        };
        let silenced = cut(from, t, gm, gm_dead);
        if let Some(context) = tx.context {
            // The kernel stamps the message as it leaves, even into a dead link.
            let stamp = n.local.now_ns() as i64 + noise(rng, cfg.stamp_jitter_ns);
            each!(&mut n.core, c => c.handle_send_timestamp(t, context, stamp as u64));
        }
        if silenced {
            *lost += 1;
            continue;
        }
        let count = nodes.len();
        for to in 0..count {
            if to == from {
                continue;
            }
            if rng.r#gen::<f64>() < cfg.loss {
                *lost += 1;
                continue;
            }
            let mut extra = if cfg.latency_jitter_ns > 0 {
                rng.gen_range(0..cfg.latency_jitter_ns)
            } else {
                0
            };
            if tx.channel == Channel::General && cfg.general_delay_ns > 0 {
                extra += rng.gen_range(0..cfg.general_delay_ns);
            }
            *seq += 1;
            let arrived = t + cfg.latency_ns + extra;
            flight.push(Reverse(InFlight {
                at: arrived + PROCESSING_NS + 3 * cfg.stamp_jitter_ns.ceil() as u64,
                seq: *seq,
                arrived,
                to,
                event: tx.channel == Channel::Event,
                data: tx.data.clone(),
            }));
        }
    }
}
