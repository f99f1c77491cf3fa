//! PTP in a deterministic simulated world (CONVENTIONS.md §5): the real statime instances,
//! the real [`PtpCore`](voicemesh_node::clock::ptp::port::PtpCore) and clock adapters, with
//! simulated oscillators (offsets up to ±10 ms, drift up to ±100 ppm) and a simulated network
//! (latency, queueing jitter, timestamp noise, loss, partitions). Every scenario runs over many
//! seeds; a failure prints its seed. `PTP_SIM_SEED=n` runs one seed and prints its trace.
//!
//! Bounds: "converged" means every slave's true offset from the grandmaster is below
//! [`CONVERGED_NS`] (5 µs, a quarter of a sample at 48 kHz); the worlds have 500 ns rms stamp
//! noise and up to 10 µs of one-way queueing jitter.

use voicemesh_node::clock::ptp::ServoState;
use voicemesh_node::clock::ptp::sim::{Fault, SimConfig, Trace, simulate};

const S: u64 = 1_000_000_000;
const CONVERGED_NS: i64 = 5_000;
/// One sample at 48 kHz: the bound while a slave re-acquires a master after holdover (a fresh
/// statime filter re-learns the frequency from noisy first measurements).
const SAMPLE_NS: i64 = 20_833;

/// The seeds a scenario runs over: `PTP_SIM_SEED` alone, or `n` seeds from `base`.
fn seeds(base: u64, n: u64) -> Vec<u64> {
    match std::env::var("PTP_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("PTP_SIM_SEED is a number")],
        Err(_) => (base..base + n).collect(),
    }
}

fn show(trace: &Trace) -> String {
    let mut out = String::new();
    for s in trace.samples.iter().step_by(10) {
        let line: Vec<String> = s
            .slaves
            .iter()
            .map(|x| {
                format!(
                    "{:>10} {:<8} st{} r{:>7}",
                    x.offset_ns,
                    x.servo_name(),
                    x.steps,
                    x.rate_ppb
                )
            })
            .collect();
        out += &format!("{:>5.1}s {}\n", s.t_ns as f64 / 1e9, line.join(" | "));
    }
    out
}

trait Name {
    fn servo_name(&self) -> &'static str;
}
impl Name for voicemesh_node::clock::ptp::sim::SlaveSample {
    fn servo_name(&self) -> &'static str {
        self.servo.as_str()
    }
}

/// Runs `scenario` on every seed; on a failure, names the seed and shows its trace.
fn each_seed(
    base: u64,
    n: u64,
    world: impl Fn(u64) -> (SimConfig, Vec<Fault>),
    check: impl Fn(&Trace) -> Result<(), String>,
) {
    let single = std::env::var("PTP_SIM_SEED").is_ok();
    for seed in seeds(base, n) {
        let (cfg, faults) = world(seed);
        let trace = simulate(&cfg, &faults);
        if single {
            println!("{}", show(&trace));
        }
        if let Err(why) = check(&trace) {
            panic!(
                "seed {seed}: {why}\nrerun: PTP_SIM_SEED={seed} cargo test -p voicemesh-node \
                 --test ptp_sim -- --nocapture\n{}",
                show(&trace)
            );
        }
    }
}

fn ensure(ok: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(why()) }
}

/// Every slave below `bound` at every sample in `from..until`.
fn stays_within(trace: &Trace, from: u64, until: u64, bound: i64) -> Result<(), String> {
    let worst = trace.worst_offset_ns(from, until);
    ensure(worst < bound, || {
        format!(
            "|offset| reached {worst} ns between {:.1} s and {:.1} s (bound {bound} ns)",
            from as f64 / 1e9,
            until as f64 / 1e9
        )
    })
}

/// When every slave came within `bound` for good; an error unless that was by `by`.
fn converged_by(trace: &Trace, bound: i64, by: u64) -> Result<u64, String> {
    let at = trace
        .converged_at(bound, u64::MAX)
        .ok_or_else(|| format!("never stayed within {bound} ns"))?;
    ensure(at <= by, || {
        format!("within {bound} ns only from {:.1} s", at as f64 / 1e9)
    })?;
    Ok(at)
}

fn steps_at(trace: &Trace, t: u64) -> Vec<u64> {
    trace
        .samples
        .iter()
        .rfind(|s| s.t_ns <= t)
        .map(|s| s.slaves.iter().map(|x| x.steps).collect())
        .unwrap_or_default()
}

#[test]
fn slaves_converge_from_random_offsets_and_drifts_and_stay_converged() {
    each_seed(
        1,
        16,
        |seed| {
            (
                SimConfig {
                    duration_ns: 50 * S,
                    ..SimConfig::lan(seed)
                },
                vec![],
            )
        },
        |t| {
            converged_by(t, CONVERGED_NS, 25 * S)?;
            stays_within(t, 25 * S, u64::MAX, CONVERGED_NS)?;
            let first = &t.samples[0];
            for (i, (start, end)) in first.slaves.iter().zip(&t.last().slaves).enumerate() {
                ensure(end.servo == ServoState::Locked, || {
                    format!("slave {i} ends {:?}", end.servo)
                })?;
                // statime steps offsets above 1 ms and slews below: one step at most, and one
                // whenever the start was clearly beyond slewing range.
                ensure(end.steps <= 1, || {
                    format!("slave {i} stepped {} times", end.steps)
                })?;
                if start.offset_ns.abs() > 2_000_000 {
                    ensure(end.steps == 1, || {
                        format!(
                            "slave {i} started {} ns off and never stepped",
                            start.offset_ns
                        )
                    })?;
                }
            }
            // The BMCA runs on its interval (0.5 s): 100 runs in 50 s on every slave.
            for (i, runs) in t.bmca_runs.iter().enumerate() {
                ensure((99..=101).contains(runs), || {
                    format!("slave {i}: BMCA ran {runs} times in 50 s")
                })?;
            }
            Ok(())
        },
    );
}

/// Issue 4: "convergence from 3 ms / 50 ppm takes under 10 s". Every slave's clock starts
/// ±3 ms off on an oscillator up to ±50 ppm off (the grandmaster's too, so up to 100 ppm
/// relative); grandmaster and slaves start together (the grandmaster's Syncs begin and the BMCA
/// makes the slaves slaves ~3 s in). Converged means what the real-process test
/// (`tests/tests/sync_cluster.rs`) measures: every slave within one sample at 48 kHz, and
/// staying there — by 7 s here (4.2–6.0 s measured; 8.2–10.6 s without the frequency probe
/// and with statime's default filter, 9.5–12.8 s). Within 5 µs by 12 s.
#[test]
fn slaves_converge_from_3_ms_and_50_ppm_within_7_s() {
    let times = std::sync::Mutex::new(Vec::new());
    each_seed(
        400,
        16,
        |seed| {
            (
                SimConfig {
                    max_offset_ns: 3_000_000,
                    min_offset_ns: 3_000_000,
                    max_drift_ppm: 50.0,
                    duration_ns: 30 * S,
                    ..SimConfig::lan(seed)
                },
                vec![],
            )
        },
        |t| {
            let sample = converged_by(t, SAMPLE_NS, 7 * S)?;
            let converged = converged_by(t, CONVERGED_NS, 12 * S)?;
            times
                .lock()
                .unwrap()
                .push((converged as f64 / 1e9, sample as f64 / 1e9));
            Ok(())
        },
    );
    let times = times.into_inner().unwrap();
    for (what, mut v) in [
        ("5 µs", times.iter().map(|t| t.0).collect::<Vec<_>>()),
        ("one sample", times.iter().map(|t| t.1).collect()),
    ] {
        v.sort_by(f64::total_cmp);
        println!(
            "converged to {what} after {:.1} s min, {:.1} s median, {:.1} s max",
            v[0],
            v[v.len() / 2],
            v[v.len() - 1]
        );
    }
}

#[test]
fn heavy_loss_and_jitter_slow_convergence_but_do_not_break_it() {
    each_seed(
        100,
        6,
        |seed| {
            (
                SimConfig {
                    loss: 0.2,
                    latency_jitter_ns: 30_000,
                    stamp_jitter_ns: 1_000.0,
                    duration_ns: 60 * S,
                    ..SimConfig::lan(seed)
                },
                vec![],
            )
        },
        |t| {
            stays_within(t, 35 * S, u64::MAX, SAMPLE_NS)?;
            let end = t.last();
            ensure(end.slaves.iter().all(|s| s.steps <= 1), || {
                "loss caused extra steps".into()
            })
        },
    );
}

#[test]
fn a_partitioned_slave_holds_over_and_rejoins_without_a_step() {
    each_seed(
        200,
        6,
        |seed| {
            (
                SimConfig {
                    duration_ns: 70 * S,
                    ..SimConfig::lan(seed)
                },
                vec![Fault::Partition {
                    slave: 0,
                    from_ns: 30 * S,
                    until_ns: 45 * S,
                }],
            )
        },
        |t| {
            stays_within(t, 25 * S, 30 * S, CONVERGED_NS)?;
            let before = steps_at(t, 30 * S);
            // Cut off: the slave says so within a few announce intervals, and free-runs on its
            // learnt rate: its offset stays small.
            let s = t.after(34 * S).next().ok_or("no sample")?;
            ensure(s.slaves[0].servo == ServoState::Holdover, || {
                format!("partitioned slave reports {:?}", s.slaves[0].servo)
            })?;
            ensure(
                s.slaves[1..].iter().all(|x| x.servo == ServoState::Locked),
                || "the others lost their lock".into(),
            )?;
            stays_within(t, 30 * S, 45 * S, CONVERGED_NS)?;
            stays_within(t, 45 * S, u64::MAX, SAMPLE_NS)?;
            ensure(steps_at(t, u64::MAX) == before, || {
                format!("steps {before:?} -> {:?}", steps_at(t, u64::MAX))
            })?;
            stays_within(t, 57 * S, u64::MAX, CONVERGED_NS)?;
            ensure(t.last().slaves[0].servo == ServoState::Locked, || {
                "the healed slave did not lock again".into()
            })
        },
    );
}

#[test]
fn a_grandmaster_time_jump_causes_exactly_one_step_per_slave() {
    each_seed(
        300,
        6,
        |seed| {
            (
                SimConfig {
                    duration_ns: 60 * S,
                    general_delay_ns: 60_000_000,
                    ..SimConfig::lan(seed)
                },
                vec![Fault::GrandmasterStep {
                    at_ns: 30 * S,
                    step_ns: 50_000_000,
                }],
            )
        },
        |t| {
            stays_within(t, 25 * S, 30 * S, CONVERGED_NS)?;
            let before = steps_at(t, 30 * S - 1);
            let after = steps_at(t, u64::MAX);
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                ensure(*a == b + 1, || {
                    format!("slave {i}: {b} steps before the jump, {a} after (wanted one more)")
                })?;
            }
            stays_within(t, 45 * S, u64::MAX, CONVERGED_NS)
        },
    );
}

#[test]
fn holdover_when_the_grandmaster_is_gone_and_no_step_when_it_returns() {
    each_seed(
        400,
        6,
        |seed| {
            (
                SimConfig {
                    duration_ns: 80 * S,
                    ..SimConfig::lan(seed)
                },
                vec![Fault::GrandmasterDown {
                    from_ns: 30 * S,
                    until_ns: 55 * S,
                }],
            )
        },
        |t| {
            stays_within(t, 25 * S, 30 * S, CONVERGED_NS)?;
            let before = steps_at(t, 30 * S);
            let gone = t.after(35 * S).next().ok_or("no sample")?;
            ensure(
                gone.slaves.iter().all(|x| x.servo == ServoState::Holdover),
                || format!("with the grandmaster gone: {:?}", gone.slaves),
            )?;
            // 25 s of free-running on the learnt rate.
            stays_within(t, 30 * S, 55 * S, CONVERGED_NS)?;
            ensure(steps_at(t, u64::MAX) == before, || {
                format!("steps {before:?} -> {:?}", steps_at(t, u64::MAX))
            })?;
            stays_within(t, 55 * S, u64::MAX, SAMPLE_NS)?;
            stays_within(t, 67 * S, u64::MAX, CONVERGED_NS)?;
            ensure(
                t.last()
                    .slaves
                    .iter()
                    .all(|x| x.servo == ServoState::Locked),
                || "not locked again".into(),
            )
        },
    );
}

#[test]
fn a_new_grandmaster_close_in_time_is_slewed_to_one_far_off_is_stepped_to_once() {
    for (offset, steps) in [(300_000i64, 0u64), (-20_000_000, 1)] {
        each_seed(
            500,
            4,
            |seed| {
                (
                    SimConfig {
                        duration_ns: 75 * S,
                        general_delay_ns: 60_000_000,
                        ..SimConfig::lan(seed)
                    },
                    vec![Fault::NewGrandmaster {
                        at_ns: 30 * S,
                        gap_ns: 5 * S,
                        offset_ns: offset,
                    }],
                )
            },
            |t| {
                stays_within(t, 25 * S, 30 * S, CONVERGED_NS)?;
                let before = steps_at(t, 30 * S);
                let after = steps_at(t, u64::MAX);
                for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                    ensure(*a == b + steps, || {
                        format!(
                            "new grandmaster {offset} ns off: slave {i} stepped {} times, \
                             wanted {steps}",
                            a - b
                        )
                    })?;
                }
                stays_within(t, 65 * S, u64::MAX, CONVERGED_NS)
            },
        );
    }
}
