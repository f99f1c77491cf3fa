//! The QEMU board's DACs: `voicemesh-mcu`'s virtual DACs. The core reports their codes in its
//! `CvReport`s; every change of a channel's code is also logged over semihosting
//! (`dac: d=0 ch=1 code=2048 t=…` with the local time in ns) for the test's eyes.

use embassy_time::Delay;
use voicemesh_fw_app::info;
use voicemesh_fw_app::session::DacBank;
use voicemesh_mcu::LocalTime;
use voicemesh_mcu::dac::{Dac, VirtualDac};

/// Virtual DACs, as many as the node config lists.
pub struct VirtualBank<const N: usize> {
    dacs: [VirtualDac; N],
}

impl<const N: usize> VirtualBank<N> {
    /// `N` fresh virtual DACs.
    pub fn new() -> Self {
        VirtualBank {
            dacs: core::array::from_fn(|_| VirtualDac::default()),
        }
    }
}

impl<const N: usize> DacBank for VirtualBank<N> {
    async fn init(&mut self, dac: u8) -> bool {
        let Some(d) = self.dacs.get_mut(usize::from(dac)) else {
            return false;
        };
        let ok = d.init(&mut Delay).await.is_ok();
        info!("dac: d={} init ok={}", dac, ok);
        ok
    }

    async fn write(&mut self, dac: u8, channel: u8, code: u16, at: LocalTime) -> bool {
        let Some(d) = self.dacs.get_mut(usize::from(dac)) else {
            return false;
        };
        let before = d.codes().get(usize::from(channel)).copied();
        let ok = d.write(channel, code).await.is_ok();
        if ok && before != Some(code & 0x0fff) {
            info!("dac: d={} ch={} code={} t={}", dac, channel, code, at.0);
        }
        ok
    }
}
