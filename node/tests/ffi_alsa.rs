//! `audio::ffi::alsa` (libasound loaded at run time): a device that cannot be opened is a
//! clear error naming it; ALSA's `null` PCM (a sink that takes everything at once, not a
//! clock) opens and takes writes.

use voicemesh_node::audio::ffi::alsa::{AlsaError, Pcm, PcmConfig};

/// Whether the kernel has no sound card (no `/proc/asound/cards`, or it says so).
fn no_sound_card() -> bool {
    match std::fs::read_to_string("/proc/asound/cards") {
        Ok(cards) => cards.contains("no soundcards") || cards.trim().is_empty(),
        Err(_) => true,
    }
}

#[test]
fn an_absent_device_is_a_clear_error_naming_it() {
    let e = Pcm::open_playback("hw:97,0", &PcmConfig::default()).unwrap_err();
    assert!(matches!(e, AlsaError::Open { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("cannot open ALSA playback device \"hw:97,0\": "),
        "{msg}"
    );

    if no_sound_card() {
        let e = Pcm::open_playback("default", &PcmConfig::default()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("ALSA") && msg.contains("\"default\""), "{msg}");
    }

    let e = Pcm::open_playback("bad\0name", &PcmConfig::default()).unwrap_err();
    assert!(matches!(e, AlsaError::InvalidDevice { .. }), "{e:?}");
}

#[test]
fn the_null_device_takes_writes() {
    let config = PcmConfig {
        channels: 2,
        rate: 48_000,
        soft_resample: true,
        latency_us: 10_000,
    };
    let mut pcm = Pcm::open_playback("null", &config).unwrap();
    assert_eq!(pcm.device(), "null");
    assert_eq!(pcm.config(), &config);
    assert!(
        pcm.buffer_frames() > 0 && pcm.period_frames() > 0,
        "{pcm:?}"
    );
    assert!(pcm.period_frames() <= pcm.buffer_frames(), "{pcm:?}");

    let block: Vec<f32> = (0..2 * 256).map(|i| (i as f32 * 0.01).sin()).collect();
    let mut frames = 0;
    for _ in 0..64 {
        frames += pcm.write_interleaved(&block).unwrap();
    }
    assert_eq!(frames, 64 * 256);
    let delay = pcm.delay().unwrap();
    assert!(
        delay >= 0 && delay as u64 <= pcm.buffer_frames(),
        "delay {delay} frames, {pcm:?}"
    );

    let e = pcm.write_interleaved(&block[..3]).unwrap_err();
    assert!(
        matches!(e, AlsaError::PartialFrame { .. }) && e.to_string().contains("\"null\""),
        "{e}"
    );
    pcm.drain().unwrap();
}
