//! The HTTP access token: given, loaded from `state_dir/token`, or generated and stored.
//!
//! Stored atomically (temp file, fsync, rename, fsync of the directory). A token file that
//! exists but does not hold a valid token is an error naming its path; it is never replaced
//! silently, because that would lock out every dashboard the user already opened.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;

use crate::StartError;

/// Name of the token file inside the state directory.
pub const TOKEN_FILE: &str = "token";

/// Whether `t` is acceptable as a token: 16–128 characters of `[A-Za-z0-9_-]`.
pub fn is_valid(t: &str) -> bool {
    (16..=128).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Finds the token: `given` wins; else the token file; else a new one, written to the file.
pub fn load_or_create(given: Option<&str>, state_dir: &Path) -> Result<String, StartError> {
    if let Some(t) = given {
        if !is_valid(t) {
            return Err(StartError::BadToken);
        }
        return Ok(t.to_owned());
    }
    let path = state_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let t = s.trim();
            if is_valid(t) {
                Ok(t.to_owned())
            } else {
                Err(StartError::CorruptToken { path })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            write_atomic(state_dir, &path, token.as_bytes()).map_err(|source| {
                StartError::StateDirNotWritable {
                    path: state_dir.to_owned(),
                    source,
                }
            })?;
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(StartError::CorruptToken { path })
        }
        Err(source) => Err(StartError::StateDirNotWritable {
            path: state_dir.to_owned(),
            source,
        }),
    }
}

fn write_atomic(dir: &Path, path: &PathBuf, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{TOKEN_FILE}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vm-coord-token-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn generates_then_reloads() {
        let d = tmpdir("gen");
        let t = load_or_create(None, &d).expect("generated");
        assert_eq!(t.len(), 32);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(load_or_create(None, &d).expect("reloaded"), t);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn corrupt_or_empty_file_is_an_error_and_kept() {
        let d = tmpdir("bad");
        std::fs::create_dir_all(&d).unwrap();
        for content in [&b""[..], b"short", b"\xff\xfe not utf8 at all......"] {
            std::fs::write(d.join(TOKEN_FILE), content).unwrap();
            let e = load_or_create(None, &d).expect_err("corrupt");
            assert!(
                e.to_string()
                    .contains(&d.join(TOKEN_FILE).display().to_string()),
                "{e}"
            );
            assert_eq!(std::fs::read(d.join(TOKEN_FILE)).unwrap(), content);
        }
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn unwritable_state_dir_is_named() {
        let d = tmpdir("ro");
        std::fs::write(&d, b"a file, not a directory").unwrap();
        let e = load_or_create(None, &d).expect_err("not a dir");
        assert!(matches!(e, StartError::StateDirNotWritable { .. }), "{e}");
        std::fs::remove_file(&d).ok();
    }
}
