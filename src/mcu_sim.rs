//! `voicemesh mcu-sim`: the MCU node core (`voicemesh_mcu::sim`) on this machine, with virtual
//! DACs, until Ctrl-C or SIGTERM.
//!
//! With `--print-codes` it prints every DAC code change the node reports, with the cluster time
//! the code was written — what a Teensy's outputs would do, for people and for tests.

use crate::{McuSimArgs, cancel_on_signals, scope_text};
use anyhow::{Context, Result, bail};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use voicemesh_mcu::sim::{SimConfig, SimHandle, start_sim};
use voicemesh_node::NetScope;

/// Channels of one virtual DAC.
const DAC_CHANNELS: u16 = 8;
/// How often `--print-codes` looks at the node's reports.
const PRINT_EVERY: Duration = Duration::from_millis(5);

/// The simulator's configuration from the command line.
pub fn sim_config(a: &McuSimArgs, scope: NetScope) -> Result<SimConfig> {
    if a.channels == 0 || !a.channels.is_multiple_of(DAC_CHANNELS) || a.channels > 4 * DAC_CHANNELS
    {
        bail!(
            "--channels {} must be 8, 16, 24 or 32 (one virtual 8-channel DAC per 8)",
            a.channels
        );
    }
    Ok(SimConfig {
        id: a.id.clone().unwrap_or_else(|| a.name.clone()),
        name: a.name.clone(),
        dacs: (a.channels / DAC_CHANNELS) as u8,
        voices: a.voices,
        port: a.port,
        scope,
        advertise: true,
    })
}

pub async fn run(a: McuSimArgs) -> Result<()> {
    let scope = crate::scope_of(a.lan, a.interface)?;
    let cfg = sim_config(&a, scope)?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone())?;
    let name = cfg.name.clone();
    let sim = start_sim(cfg, shutdown.clone())
        .await
        .with_context(|| format!("starting mcu-sim {name}"))?;
    println!(
        "mcu-sim {name}: listening on udp://{} ({}), {} CV channels, {} voices",
        sim.local_addr,
        scope_text(scope),
        a.channels,
        a.voices
    );
    let watch = watch(&name, &sim, a.print_codes, &shutdown);
    watch.await;
    sim.join()
        .await
        .with_context(|| format!("mcu-sim {name}"))?;
    Ok(())
}

/// Until `shutdown`: says when a coordinator welcomed the node or was lost, and with `codes`
/// prints every change of its DAC codes: `at_ns` is the cluster time the node wrote it at (from
/// its report; `-` when it made none, e.g. with no coordinator), `seen_unix_ns` when this loop
/// saw it (`CLOCK_REALTIME`, at most [`PRINT_EVERY`] late).
async fn watch(name: &str, sim: &SimHandle, codes: bool, shutdown: &CancellationToken) {
    let mut joined = false;
    let mut last: Vec<u16> = Vec::new();
    loop {
        let s = sim.snapshot();
        if s.joined != joined {
            joined = s.joined;
            match (joined, s.coordinator) {
                (true, Some(c)) => println!("mcu-sim {name}: joined the coordinator at {c}"),
                _ => println!("mcu-sim {name}: no coordinator"),
            }
        }
        if codes && s.codes != last {
            let seen = unix_ns();
            last.resize(s.codes.len(), 0);
            for (ch, &code) in s.codes.iter().enumerate() {
                if code == last[ch] {
                    continue;
                }
                last[ch] = code;
                let at = s
                    .report
                    .as_ref()
                    .filter(|r| r.codes.get(ch) == Some(&code))
                    .and_then(|r| r.changed_at.get(ch))
                    .map_or_else(|| "-".to_owned(), |t| t.0.to_string());
                println!("mcu-sim {name}: dac ch {ch} code {code} at_ns {at} seen_unix_ns {seen}");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PRINT_EVERY) => {}
        }
    }
}

fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
