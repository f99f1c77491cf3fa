//! A safe ALSA playback PCM over `libasound.so.2`, loaded at run time.
//!
//! [`Pcm::open_playback`] opens a PCM by name (`default`, `hw:0,0`, `plughw:1`, `null`, …)
//! in blocking mode and sets it to interleaved 32-bit float (`snd_pcm_set_params`).
//! [`Pcm::write_interleaved`] writes whole frames, recovering from underruns (counted in
//! [`Pcm::xruns`]); [`Pcm::delay`] says how many frames written now will sound only later,
//! which maps a block to the moment it is heard. Closed on drop.
//!
//! Writing and the delay query allocate nothing except on the error path; a `Pcm` is used
//! from one thread at a time (`Send`, not `Sync`).

use super::owned_str;
use std::ffi::{CString, c_char, c_int, c_long, c_uint, c_ulong, c_void};
use std::fmt;
use std::ptr::{self, NonNull};
use std::sync::OnceLock;

/// The shared library this module loads.
pub const LIBRARY: &str = "libasound.so.2";

// snd_pcm_stream_t
const STREAM_PLAYBACK: c_int = 0;
// snd_pcm_format_t
const FORMAT_FLOAT_LE: c_int = 14;
// snd_pcm_access_t
const ACCESS_RW_INTERLEAVED: c_int = 3;

dl_api! {
    struct Api {
        required {
            snd_pcm_open: unsafe extern "C" fn(*mut *mut c_void, *const c_char, c_int, c_int) -> c_int,
            snd_pcm_set_params: unsafe extern "C" fn(
                *mut c_void, c_int, c_int, c_uint, c_uint, c_int, c_uint,
            ) -> c_int,
            snd_pcm_get_params: unsafe extern "C" fn(*mut c_void, *mut c_ulong, *mut c_ulong) -> c_int,
            snd_pcm_writei: unsafe extern "C" fn(*mut c_void, *const c_void, c_ulong) -> c_long,
            snd_pcm_recover: unsafe extern "C" fn(*mut c_void, c_int, c_int) -> c_int,
            snd_pcm_delay: unsafe extern "C" fn(*mut c_void, *mut c_long) -> c_int,
            snd_pcm_drain: unsafe extern "C" fn(*mut c_void) -> c_int,
            snd_pcm_close: unsafe extern "C" fn(*mut c_void) -> c_int,
            snd_strerror: unsafe extern "C" fn(c_int) -> *const c_char,
        }
        optional {}
    }
}

static API: OnceLock<Result<Api, AlsaError>> = OnceLock::new();

/// libasound, opened on first use and kept for the life of the process.
fn api() -> Result<&'static Api, AlsaError> {
    API.get_or_init(|| load(LIBRARY))
        .as_ref()
        .map_err(Clone::clone)
}

fn load(library: &str) -> Result<Api, AlsaError> {
    // SAFETY: loading libasound runs its initialisers, which have no preconditions.
    let lib =
        unsafe { libloading::Library::new(library) }.map_err(|e| AlsaError::NotInstalled {
            library: library.to_string(),
            detail: e.to_string(),
        })?;
    // SAFETY: every type in `Api` is written from alsa-lib's documented C declarations.
    unsafe { Api::from_library(lib) }.map_err(|(symbol, detail)| AlsaError::MissingSymbol {
        library: library.to_string(),
        symbol,
        detail,
    })
}

/// Why an ALSA operation failed. Every variant about a device names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AlsaError {
    /// libasound could not be loaded.
    #[error(
        "ALSA is not installed ({library} not found): install libasound2, or use --audio \
         wav:DIR or null"
    )]
    NotInstalled {
        /// The library asked for ([`LIBRARY`]).
        library: String,
        /// What the dynamic loader said.
        detail: String,
    },
    /// libasound lacks a function this module needs.
    #[error("{library} has no {symbol}: {detail}")]
    MissingSymbol {
        /// The library.
        library: String,
        /// The missing function.
        symbol: &'static str,
        /// What the dynamic loader said.
        detail: String,
    },
    /// The device name contains a NUL byte.
    #[error("invalid ALSA device name {device:?}: it contains a NUL byte")]
    InvalidDevice {
        /// The name.
        device: String,
    },
    /// `snd_pcm_open` failed: no such device, busy, no sound card, ….
    #[error("cannot open ALSA playback device {device:?}: {message}")]
    Open {
        /// The PCM name.
        device: String,
        /// ALSA's (negative errno) code.
        code: i32,
        /// `snd_strerror(code)`.
        message: String,
    },
    /// The device does not accept the format, channel count, rate or latency.
    #[error(
        "ALSA device {device:?} does not accept {channels} channels of 32-bit float at {rate} Hz \
         with {latency_us} µs latency: {message}"
    )]
    SetParams {
        /// The PCM name.
        device: String,
        /// Channels asked for.
        channels: u32,
        /// Rate asked for.
        rate: u32,
        /// Latency asked for.
        latency_us: u32,
        /// ALSA's code.
        code: i32,
        /// `snd_strerror(code)`.
        message: String,
    },
    /// An operation on an open device failed (and could not be recovered).
    #[error("ALSA device {device:?}: {op} failed: {message}")]
    Io {
        /// The PCM name.
        device: String,
        /// The operation (`write`, `delay`, …).
        op: &'static str,
        /// ALSA's code.
        code: i32,
        /// `snd_strerror(code)`.
        message: String,
    },
    /// A write whose length is not a whole number of frames.
    #[error(
        "ALSA device {device:?}: {samples} samples are not whole frames of {channels} channels"
    )]
    PartialFrame {
        /// The PCM name.
        device: String,
        /// Samples passed.
        samples: usize,
        /// The device's channel count.
        channels: u32,
    },
}

/// How to set up a playback PCM (`snd_pcm_set_params`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcmConfig {
    /// Interleaved channels per frame.
    pub channels: u32,
    /// Frames per second.
    pub rate: u32,
    /// Let alsa-lib resample (and convert) when the hardware cannot do `rate` itself.
    pub soft_resample: bool,
    /// Wanted total buffer latency in µs (alsa-lib picks buffer and period from it).
    pub latency_us: u32,
}

impl Default for PcmConfig {
    /// Stereo, 48 kHz, resampling allowed, 20 ms.
    fn default() -> Self {
        PcmConfig {
            channels: 2,
            rate: 48_000,
            soft_resample: true,
            latency_us: 20_000,
        }
    }
}

/// An open ALSA playback PCM, set to interleaved `f32`. Closed on drop.
pub struct Pcm {
    api: &'static Api,
    pcm: NonNull<c_void>,
    device: String,
    config: PcmConfig,
    buffer_frames: u64,
    period_frames: u64,
    xruns: u64,
}

// SAFETY: an ALSA PCM handle may be used from any thread, one at a time; `Pcm` is not `Sync`
// and every operation takes `&mut self` or only reads fields copied at open.
unsafe impl Send for Pcm {}

impl fmt::Debug for Pcm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pcm")
            .field("device", &self.device)
            .field("config", &self.config)
            .field("buffer_frames", &self.buffer_frames)
            .field("period_frames", &self.period_frames)
            .field("xruns", &self.xruns)
            .finish_non_exhaustive()
    }
}

fn message(api: &Api, code: c_int) -> String {
    // SAFETY: snd_strerror returns a static string for any code.
    unsafe { owned_str((api.snd_strerror)(code)) }
}

impl Pcm {
    /// Opens the playback PCM `device` (blocking) and sets it up as `config` says.
    pub fn open_playback(device: &str, config: &PcmConfig) -> Result<Pcm, AlsaError> {
        let api = api()?;
        let name = CString::new(device).map_err(|_| AlsaError::InvalidDevice {
            device: device.to_string(),
        })?;
        let mut raw: *mut c_void = ptr::null_mut();
        // SAFETY: valid out-pointer and name; stream PLAYBACK, mode 0 (blocking).
        let code = unsafe { (api.snd_pcm_open)(&mut raw, name.as_ptr(), STREAM_PLAYBACK, 0) };
        let pcm = match NonNull::new(raw) {
            Some(pcm) if code >= 0 => pcm,
            _ => {
                return Err(AlsaError::Open {
                    device: device.to_string(),
                    code,
                    message: message(api, code),
                });
            }
        };
        // From here on `Drop` closes the handle, whatever fails.
        let mut this = Pcm {
            api,
            pcm,
            device: device.to_string(),
            config: *config,
            buffer_frames: 0,
            period_frames: 0,
            xruns: 0,
        };
        // SAFETY: an open PCM.
        let code = unsafe {
            (api.snd_pcm_set_params)(
                pcm.as_ptr(),
                FORMAT_FLOAT_LE,
                ACCESS_RW_INTERLEAVED,
                config.channels,
                config.rate,
                c_int::from(config.soft_resample),
                config.latency_us,
            )
        };
        if code < 0 {
            return Err(AlsaError::SetParams {
                device: device.to_string(),
                channels: config.channels,
                rate: config.rate,
                latency_us: config.latency_us,
                code,
                message: message(api, code),
            });
        }
        let (mut buffer, mut period): (c_ulong, c_ulong) = (0, 0);
        // SAFETY: an open, configured PCM; valid out-pointers.
        let code = unsafe { (api.snd_pcm_get_params)(pcm.as_ptr(), &mut buffer, &mut period) };
        if code < 0 {
            return Err(this.io_error("reading the buffer and period sizes", code));
        }
        // `unsigned long` is 32 bits on 32-bit targets (Raspberry Pi OS armhf).
        #[allow(clippy::useless_conversion)]
        {
            this.buffer_frames = u64::from(buffer);
            this.period_frames = u64::from(period);
        }
        Ok(this)
    }

    fn io_error(&self, op: &'static str, code: c_int) -> AlsaError {
        AlsaError::Io {
            device: self.device.clone(),
            op,
            code,
            message: message(self.api, code),
        }
    }

    /// The PCM name it was opened with.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The set-up it was opened with (channels and rate are exact: ALSA converts the rest).
    pub fn config(&self) -> &PcmConfig {
        &self.config
    }

    /// The ring buffer's size in frames, as ALSA chose it.
    pub fn buffer_frames(&self) -> u64 {
        self.buffer_frames
    }

    /// The period's size in frames, as ALSA chose it.
    pub fn period_frames(&self) -> u64 {
        self.period_frames
    }

    /// Underruns met (and recovered from) by [`write_interleaved`](Pcm::write_interleaved).
    pub fn xruns(&self) -> u64 {
        self.xruns
    }

    /// Writes `samples` (interleaved, a whole number of frames), blocking until ALSA took
    /// them all; returns the frames written. An underrun (or a suspend) is recovered with
    /// `snd_pcm_recover` and the rest written; underruns are counted in [`Pcm::xruns`].
    pub fn write_interleaved(&mut self, samples: &[f32]) -> Result<usize, AlsaError> {
        let channels = self.config.channels as usize;
        if channels == 0 || !samples.len().is_multiple_of(channels) {
            return Err(AlsaError::PartialFrame {
                device: self.device.clone(),
                samples: samples.len(),
                channels: self.config.channels,
            });
        }
        let frames = samples.len() / channels;
        let mut done = 0;
        while done < frames {
            let rest = &samples[done * channels..];
            // SAFETY: an open PCM set to interleaved f32 of `channels` channels; `rest` holds
            // `frames - done` whole frames.
            let n = unsafe {
                (self.api.snd_pcm_writei)(
                    self.pcm.as_ptr(),
                    rest.as_ptr().cast(),
                    (frames - done) as c_ulong,
                )
            };
            if n > 0 {
                done += n as usize;
                continue;
            }
            if n == 0 {
                // A blocking write takes at least one frame; stop rather than spin.
                break;
            }
            let code = n as c_int;
            if code == -libc::EPIPE {
                self.xruns += 1;
            }
            // SAFETY: an open PCM; `silent` = 1 (no message on stderr).
            let r = unsafe { (self.api.snd_pcm_recover)(self.pcm.as_ptr(), code, 1) };
            if r < 0 {
                return Err(self.io_error("write", r));
            }
        }
        Ok(done)
    }

    /// Frames between the next frame written and the one sounding now (`snd_pcm_delay`): a
    /// frame written now is heard after `delay / rate` s. Negative after an underrun.
    pub fn delay(&mut self) -> Result<i64, AlsaError> {
        let mut d: c_long = 0;
        // SAFETY: an open PCM; valid out-pointer.
        let code = unsafe { (self.api.snd_pcm_delay)(self.pcm.as_ptr(), &mut d) };
        if code < 0 {
            return Err(self.io_error("delay", code));
        }
        // `long` is 32 bits on 32-bit targets.
        #[allow(clippy::useless_conversion)]
        Ok(i64::from(d))
    }

    /// Blocks until every frame written has been played (`snd_pcm_drain`).
    pub fn drain(&mut self) -> Result<(), AlsaError> {
        // SAFETY: an open PCM.
        let code = unsafe { (self.api.snd_pcm_drain)(self.pcm.as_ptr()) };
        if code < 0 {
            return Err(self.io_error("drain", code));
        }
        Ok(())
    }
}

impl Drop for Pcm {
    fn drop(&mut self) {
        // SAFETY: the PCM is open; closed only here.
        unsafe { (self.api.snd_pcm_close)(self.pcm.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let e = load("libasound-voicemesh-absent.so.2").unwrap_err();
        assert!(matches!(e, AlsaError::NotInstalled { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "ALSA is not installed (libasound-voicemesh-absent.so.2 not found): install \
             libasound2, or use --audio wav:DIR or null"
        );
    }
}
