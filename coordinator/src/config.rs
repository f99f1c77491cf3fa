//! The coordinator's persisted configuration: allocation policy, channel routing, CV routing and
//! calibration, in `STATE_DIR/config.json`.
//!
//! The file carries a schema `version`; a file of another version is refused rather than
//! guessed at. It is written atomically (temporary file, fsync, rename, fsync of the directory,
//! like the token file), so a crash leaves the old or the new file, never half of one. A file
//! that exists but cannot be parsed or validated stops the start-up with an error naming its
//! path; it is never replaced silently. Without a file the defaults apply, and the file is
//! first written by a change through the HTTP API.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::allocator::{ChannelRoute, Policy, StealMode};
use crate::cv::{CvConfig, CvConfigError};

/// Name of the configuration file inside the state directory.
pub const CONFIG_FILE: &str = "config.json";
/// The schema version this coordinator reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// Most channel routes in a configuration.
pub const MAX_CHANNEL_ROUTES: usize = 128;

/// Allocation policy: how nodes are chosen and which voice is stolen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `round_robin`, `least_loaded` or `lowest_latency`.
    #[serde(default)]
    pub policy: Policy,
    /// `oldest`, `quietest` or `same_note`.
    #[serde(default)]
    pub steal: StealMode,
}

/// Everything in `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Schema version, [`SCHEMA_VERSION`].
    pub version: u32,
    /// Allocation policy.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// MIDI channel routes to node groups (see the allocator).
    #[serde(default)]
    pub channels: Vec<ChannelRoute>,
    /// CV voices, routes and calibration tables.
    #[serde(default)]
    pub cv: CvConfig,
    /// Tempo and Ableton Link settings.
    #[serde(default)]
    pub link: LinkConfig,
    /// RTP-MIDI sessions to invite and keep (docs/midi.md).
    #[serde(default)]
    pub rtpmidi: crate::rtpmidi::RtpMidiSettings,
}

/// Tempo and Ableton Link settings (docs/link.md).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Bar length in beats: phase is reported modulo it (default 4).
    #[serde(default = "default_quantum")]
    pub quantum: f64,
}

fn default_quantum() -> f64 {
    crate::tempo::DEFAULT_QUANTUM
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            quantum: default_quantum(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: SCHEMA_VERSION,
            policy: PolicyConfig::default(),
            channels: Vec::new(),
            cv: CvConfig::default(),
            link: LinkConfig::default(),
            rtpmidi: Default::default(),
        }
    }
}

/// A refused value: the field (a JSON path like `[0].key_range` or `routes[1].source.ppqn`) and
/// what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the offending field (empty for the document as a whole).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl From<CvConfigError> for FieldError {
    fn from(e: CvConfigError) -> Self {
        FieldError {
            field: e.field,
            message: e.message,
        }
    }
}

/// Why the configuration could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid configuration.
    #[error("corrupt configuration file {path}: {detail}; fix or delete it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the field when known.
        detail: String,
    },
    /// The file is of another schema version.
    #[error(
        "configuration file {path} has schema version {found}, this coordinator reads version {SCHEMA_VERSION}; convert or delete it"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u64,
    },
    /// The file cannot be written.
    #[error("cannot write configuration file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Parses JSON into `T`, naming the field that failed.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FieldError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let v: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        FieldError {
            field: if field == "." || field == "?" {
                String::new()
            } else {
                field
            },
            message: e.into_inner().to_string(),
        }
    })?;
    Ok(v)
}

/// Parses a list of channel routes, refusing fields a route does not have (the allocator's
/// route type fills missing fields with defaults, so a misspelt field would otherwise be
/// ignored without a word).
pub fn parse_channels(bytes: &[u8]) -> Result<Vec<ChannelRoute>, FieldError> {
    let routes: Vec<ChannelRoute> = parse_json(bytes)?;
    let value: serde_json::Value = parse_json(bytes)?;
    unknown_channel_fields(&value)?;
    Ok(routes)
}

/// Finds a field that no [`ChannelRoute`] has, in a JSON list of routes.
fn unknown_channel_fields(list: &serde_json::Value) -> Result<(), FieldError> {
    let known = match serde_json::to_value(ChannelRoute::default()) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => return Ok(()),
    };
    let Some(items) = list.as_array() else {
        return Ok(());
    };
    for (i, item) in items.iter().enumerate() {
        if let Some(obj) = item.as_object()
            && let Some(k) = obj.keys().find(|k| !known.contains_key(k.as_str()))
        {
            let fields: Vec<&str> = known.keys().map(String::as_str).collect();
            return Err(FieldError {
                field: format!("[{i}].{k}"),
                message: format!("unknown field `{k}`, expected one of {}", fields.join(", ")),
            });
        }
    }
    Ok(())
}

/// Checks channel routes: channel 0–15, unison 1–8, detune finite 0–1200 cents, a key range
/// `low <= high <= 127`, node ids 1–32 bytes.
pub fn validate_channels(routes: &[ChannelRoute]) -> Result<(), FieldError> {
    let bad = |i: usize, f: &str, m: &str| FieldError {
        field: format!("[{i}].{f}"),
        message: m.to_owned(),
    };
    if routes.len() > MAX_CHANNEL_ROUTES {
        return Err(FieldError {
            field: String::new(),
            message: format!("at most {MAX_CHANNEL_ROUTES} routes"),
        });
    }
    for (i, r) in routes.iter().enumerate() {
        if r.channel > 15 {
            return Err(bad(i, "channel", "MIDI channel must be 0–15"));
        }
        if !(1..=8).contains(&r.unison) {
            return Err(bad(i, "unison", "must be 1–8"));
        }
        if !r.unison_detune_cents.is_finite() || !(0.0..=1200.0).contains(&r.unison_detune_cents) {
            return Err(bad(i, "unison_detune_cents", "must be 0–1200"));
        }
        let (lo, hi) = r.key_range;
        if lo > hi || hi > 127 {
            return Err(bad(
                i,
                "key_range",
                "must be [low, high] with low ≤ high ≤ 127",
            ));
        }
        if let Some(nodes) = &r.nodes {
            if nodes.is_empty() {
                return Err(bad(
                    i,
                    "nodes",
                    "an empty node list would play nothing; use null for every node",
                ));
            }
            if nodes.iter().any(|n| n.is_empty() || n.len() > 32) {
                return Err(bad(i, "nodes", "node ids are 1–32 bytes"));
            }
        }
    }
    Ok(())
}

impl Config {
    /// Checks every part.
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_channels(&self.channels).map_err(|e| FieldError {
            field: format!("channels{}", e.field),
            message: e.message,
        })?;
        self.cv.validate().map_err(|e| FieldError {
            field: format!("cv.{}", e.field),
            message: e.message,
        })?;
        let q = self.link.quantum;
        if !(q.is_finite() && q > 0.0 && q <= 64.0) {
            return Err(FieldError {
                field: "link.quantum".into(),
                message: format!("{q} is not a bar length: use more than 0 and at most 64 beats"),
            });
        }
        self.rtpmidi.validate().map_err(|e| FieldError {
            field: format!("rtpmidi.{}", e.field),
            message: e.message,
        })?;
        Ok(())
    }
}

/// Path of the configuration file in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(CONFIG_FILE)
}

/// Loads `state_dir/config.json`; the defaults when there is none.
pub fn load(state_dir: &Path) -> Result<Config, ConfigError> {
    let path = path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    let corrupt = |detail: String| ConfigError::Corrupt {
        path: path.clone(),
        detail,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not JSON: {e}")))?;
    match value.get("version").map(serde_json::Value::as_u64) {
        None => return Err(corrupt("no \"version\" field".into())),
        Some(None) => return Err(corrupt("\"version\" is not a number".into())),
        Some(Some(v)) if v != u64::from(SCHEMA_VERSION) => {
            return Err(ConfigError::Version { path, found: v });
        }
        Some(Some(_)) => {}
    }
    let cfg: Config = parse_json(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if let Some(channels) = value.get("channels") {
        unknown_channel_fields(channels).map_err(|e| corrupt(format!("channels{e}")))?;
    }
    cfg.validate().map_err(|e| corrupt(e.to_string()))?;
    Ok(cfg)
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `cfg` to `state_dir/config.json` atomically: temporary file, fsync, rename, fsync of
/// the directory.
pub fn save(state_dir: &Path, cfg: &Config) -> Result<(), ConfigError> {
    let path = path(state_dir);
    let tmp = state_dir.join(format!(
        ".{CONFIG_FILE}.tmp-{}-{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut data = serde_json::to_vec_pretty(cfg).map_err(std::io::Error::other)?;
        data.push(b'\n');
        std::fs::create_dir_all(state_dir)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(state_dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|source| ConfigError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vm-coord-config-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn missing_file_gives_defaults_and_save_round_trips() {
        let d = tmpdir("rt");
        assert_eq!(load(&d).unwrap(), Config::default());
        let mut c = Config::default();
        c.policy.policy = Policy::LeastLoaded;
        c.channels.push(ChannelRoute {
            channel: 3,
            key_range: (10, 60),
            ..Default::default()
        });
        save(&d, &c).unwrap();
        assert_eq!(load(&d).unwrap(), c);
        let leftovers: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn corrupt_and_foreign_files_are_refused_and_kept() {
        let d = tmpdir("bad");
        std::fs::create_dir_all(&d).unwrap();
        let p = path(&d);
        for (content, want) in [
            (&b"{not json"[..], "not JSON"),
            (b"{}", "version"),
            (b"{\"version\":1,\"bogus\":2}", "bogus"),
            (
                b"{\"version\":1,\"channels\":[{\"channel\":99}]}",
                "channels[0].channel",
            ),
            (b"{\"version\":2}", "schema version 2"),
            (
                b"{\"version\":1,\"channels\":[{\"chanel\":3}]}",
                "channels[0].chanel",
            ),
        ] {
            std::fs::write(&p, content).unwrap();
            let e = load(&d).expect_err("refused").to_string();
            assert!(e.contains(&p.display().to_string()), "{e}");
            assert!(e.contains(want), "{e}");
            assert_eq!(std::fs::read(&p).unwrap(), content);
        }
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn parse_json_names_the_field() {
        let e = parse_json::<PolicyConfig>(br#"{"policy":"fastest"}"#).unwrap_err();
        assert_eq!(e.field, "policy");
        let e = parse_json::<CvConfig>(br#"{"voices":[{"node":"m","voice":"x"}]}"#).unwrap_err();
        assert_eq!(e.field, "voices[0].voice", "{e}");
        // Inside a tagged enum serde buffers, so the path ends at the enum.
        let e = parse_json::<CvConfig>(br#"{"routes":[{"source":{"type":"clock","ppqn":"x"}}]}"#)
            .unwrap_err();
        assert!(e.field.starts_with("routes[0].source"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Any bytes, and any mutation of a valid document, give a config or a named error.
        #[test]
        fn hostile_documents_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            cut in 0usize..400,
            flip in 0usize..400,
        ) {
            let _ = parse_json::<Config>(&bytes);
            let _ = parse_channels(&bytes);
            let doc = br#"{"voices":[{"node":"m","voice":0,"pitch":{"node":"m","channel":0},"gate_mode":{"mode":"trigger","ms":5}}],"routes":[{"source":{"type":"clock","ppqn":24,"pulse_ms":5},"output":{"node":"m","channel":1}}],"calibration":[{"output":{"node":"m","channel":0},"points":[{"volts":0,"code":0},{"volts":1,"code":100}]}]}"#;
            let mut m = doc.to_vec();
            if flip < m.len() {
                m[flip] = m[flip].wrapping_add(1);
            }
            m.truncate(cut.max(1));
            if let Ok(cv) = parse_json::<CvConfig>(&m)
                && cv.validate().is_ok()
            {
                let r = crate::cv::CvRouter::new(cv, 0).expect("validated");
                let _ = r.assignments("m", u16::MAX);
                let _ = r.refresh_controls(voicemesh_protocol::ClusterTime(0), "m");
            }
        }
    }
}
