//! Certificate files of SDS secrets, re-read when they are replaced on disk (Envoy's
//! `SdsApi` file watch). A `TlsCertificate` or `CertificateValidationContext`
//! received over SDS whose `certificate_chain` / `private_key` (`trusted_ca` /
//! `crl`) name files is watched: its `watched_directory`, or else the directories
//! of those files. When something is moved or renamed into one (a symlink swap,
//! as Kubernetes updates a mounted secret), the files are read again and, if their
//! contents changed, the secret is replaced and every TLS context using it rebuilt
//! (new handshakes use it; established connections keep theirs). A set of files
//! that does not load keeps the previous secret, counted in
//! `sds.<name>.key_rotation_failed`.
//!
//! Envoy watches with inotify (`IN_MOVED_TO`); envoyx polls once a second
//! ([`FileWatch::poll`], on the control thread) for a change of the directories'
//! modification time, which a rename into them updates and a write to a file in
//! place does not, so the same events trigger a reload. Secrets of the bootstrap
//! (`static_resources.secrets`) and certificates given in a TLS context itself are
//! read once, as in Envoy.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::Value;

use super::secret_entry::SecretEntry;

/// What is watched of each SDS secret, by name.
#[derive(Debug, Default)]
pub struct FileWatch {
    watched: Mutex<HashMap<String, Watched>>,
}

#[derive(Debug)]
struct Watched {
    /// The entry the watch was set up for (a new SDS update resets it).
    entry: Arc<SecretEntry>,
    dirs: Vec<(PathBuf, Option<Stamp>)>,
    files: Vec<String>,
    /// The files' contents when last loaded.
    hash: u64,
}

/// A directory's modification (and change) time and inode.
type Stamp = (i64, i64, i64, i64, u64);

fn stamp(dir: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(dir).ok()?;
    Some((
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.ino(),
    ))
}

/// A reload to apply: the secret's name, the entry it replaces, and the resource
/// with the files' contents inlined (read once, consistently).
pub struct Reload {
    pub name: String,
    pub entry: Arc<SecretEntry>,
    pub resource: Value,
    /// The data sources' files, by field (`certificate_chain`, ...), to name
    /// them as the source of what was inlined.
    pub files: Vec<FieldFile>,
}

/// The part of a `Secret` resource that names files, and which of its fields do.
fn watched_part(raw: &Value) -> Option<(&'static str, &'static [&'static str])> {
    if raw.get("tls_certificate").is_some() {
        Some(("tls_certificate", &["certificate_chain", "private_key"]))
    } else if raw.get("validation_context").is_some() {
        Some(("validation_context", &["trusted_ca", "crl"]))
    } else {
        None
    }
}

/// A data source's field (`certificate_chain`, ...) and the file it names.
type FieldFile = (String, String);

/// The files a secret's data sources name, and the directories to watch for them.
fn files_of(raw: &Value) -> Option<(Vec<FieldFile>, Vec<PathBuf>)> {
    let (part, fields) = watched_part(raw)?;
    let body = raw.get(part)?;
    let files: Vec<FieldFile> = fields
        .iter()
        .filter_map(|f| {
            let name = body.get(*f)?.get("filename")?.as_str()?;
            Some((f.to_string(), name.to_string()))
        })
        .collect();
    if files.is_empty() {
        return None;
    }
    let mut dirs: Vec<PathBuf> = match body
        .get("watched_directory")
        .and_then(|w| w.get("path"))
        .and_then(Value::as_str)
    {
        Some(dir) => vec![PathBuf::from(dir)],
        None => files
            .iter()
            .map(|(_, f)| {
                Path::new(f)
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf()
            })
            .collect(),
    };
    dirs.sort();
    dirs.dedup();
    Some((files, dirs))
}

/// The files' contents, read until two reads agree (a rotation may be under way;
/// Envoy retries five times too), and their hash.
fn read_stable(files: &[String]) -> Result<(Vec<Vec<u8>>, u64), String> {
    let read = || -> Result<(Vec<Vec<u8>>, u64), String> {
        let mut hasher = DefaultHasher::new();
        let mut out = Vec::new();
        for f in files {
            let data = std::fs::read(f).map_err(|e| format!("cannot read {f}: {e}"))?;
            f.hash(&mut hasher);
            data.hash(&mut hasher);
            out.push(data);
        }
        Ok((out, hasher.finish()))
    };
    let mut last = read()?;
    for _ in 0..5 {
        let next = read()?;
        if next.1 == last.1 {
            return Ok(next);
        }
        last = next;
    }
    crate::log!(
        Warn,
        "secret",
        "Unable to atomically refresh secrets due to > 5 non-atomic rotations observed"
    );
    Ok(last)
}

impl Watched {
    /// The state to compare with from now on.
    fn new(entry: &Arc<SecretEntry>) -> Option<Self> {
        let (files, dirs) = files_of(&entry.raw)?;
        let dirs = dirs
            .into_iter()
            .map(|d| {
                let s = stamp(&d);
                (d, s)
            })
            .collect();
        let files: Vec<String> = files.into_iter().map(|(_, f)| f).collect();
        let hash = read_stable(&files).map(|(_, h)| h).unwrap_or(0);
        Some(Watched {
            entry: entry.clone(),
            dirs,
            files,
            hash,
        })
    }
}

impl FileWatch {
    /// An SDS secret was installed (its files just read): watch them from now.
    pub fn track(&self, name: &str, entry: &Arc<SecretEntry>) {
        let mut watched = lock(&self.watched);
        match Watched::new(entry) {
            Some(w) => {
                watched.insert(name.to_string(), w);
            }
            None => {
                watched.remove(name);
            }
        }
    }

    /// Compares the watched directories of the SDS secrets in `entries` with what
    /// they were, and returns the secrets whose files changed, their contents
    /// inlined in the resource. A secret seen for the first time (or updated over
    /// SDS since) is only noted. Errors reading files: (secret name, why).
    pub fn poll(
        &self,
        entries: &HashMap<String, Arc<SecretEntry>>,
    ) -> (Vec<Reload>, Vec<(String, String)>) {
        let mut watched = lock(&self.watched);
        watched.retain(|name, w| entries.get(name).is_some_and(|e| Arc::ptr_eq(e, &w.entry)));
        let mut reloads = Vec::new();
        let mut failures = Vec::new();
        for (name, entry) in entries {
            // Static secrets (no version) are read once, as Envoy does.
            if entry.version_info.is_none() {
                continue;
            }
            let Some((files, _)) = files_of(&entry.raw) else {
                continue;
            };
            let Some(w) = watched.get_mut(name) else {
                // Not tracked when installed (see `track`): from now on.
                if let Some(w) = Watched::new(entry) {
                    watched.insert(name.clone(), w);
                }
                continue;
            };
            let mut moved = false;
            for (dir, last) in &mut w.dirs {
                let now = stamp(dir);
                if now != *last {
                    *last = now;
                    moved = true;
                }
            }
            if !moved {
                continue;
            }
            match read_stable(&w.files) {
                Ok((_, hash)) if hash == w.hash => {}
                Ok((contents, hash)) => {
                    w.hash = hash;
                    reloads.push(Reload {
                        name: name.clone(),
                        entry: entry.clone(),
                        resource: inline(&entry.raw, &files, &contents),
                        files: files.clone(),
                    });
                }
                Err(e) => failures.push((name.clone(), e)),
            }
        }
        (reloads, failures)
    }

    /// A reload did not take (the files do not make a valid secret): forget its
    /// contents so that the next change of its directory tries again.
    pub fn reload_failed(&self, name: &str) {
        if let Some(w) = lock(&self.watched).get_mut(name) {
            w.hash = 0;
        }
    }

    /// The secret was replaced by a reload: the watch carries on with the new
    /// entry (a reload is no SDS update).
    pub fn reloaded(&self, name: &str, entry: Arc<SecretEntry>) {
        if let Some(w) = lock(&self.watched).get_mut(name) {
            w.entry = entry;
        }
    }
}

/// The resource with each watched data source's file replaced by its contents.
fn inline(raw: &Value, files: &[FieldFile], contents: &[Vec<u8>]) -> Value {
    let mut out = raw.clone();
    let Some((part, _)) = watched_part(raw) else {
        return out;
    };
    for ((field, _), data) in files.iter().zip(contents) {
        if let Some(ds) = out.get_mut(part).and_then(|b| b.get_mut(field.as_str())) {
            *ds = serde_json::json!({
                "inline_bytes": base64::engine::general_purpose::STANDARD.encode(data)
            });
        }
    }
    out
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn watches_the_watched_directory_or_the_files_directories() {
        let raw = json!({"name": "s", "tls_certificate": {
            "certificate_chain": {"filename": "/a/b/cert.pem"},
            "private_key": {"filename": "/a/c/key.pem"},
        }});
        let (files, dirs) = files_of(&raw).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(dirs, vec![PathBuf::from("/a/b"), PathBuf::from("/a/c")]);

        let raw = json!({"name": "s", "validation_context": {
            "trusted_ca": {"filename": "/a/b/ca.pem"},
            "watched_directory": {"path": "/a"},
        }});
        let (files, dirs) = files_of(&raw).unwrap();
        assert_eq!(files, vec![("trusted_ca".into(), "/a/b/ca.pem".into())]);
        assert_eq!(dirs, vec![PathBuf::from("/a")]);

        let inline_only = json!({"name": "s", "tls_certificate": {
            "certificate_chain": {"inline_string": "x"},
            "private_key": {"inline_string": "y"},
        }});
        assert!(files_of(&inline_only).is_none());
    }

    #[test]
    fn inlines_what_was_read() {
        let raw = json!({"name": "s", "tls_certificate": {
            "certificate_chain": {"filename": "/a/cert.pem"},
            "private_key": {"filename": "/a/key.pem"},
            "watched_directory": {"path": "/a"},
        }});
        let (files, _) = files_of(&raw).unwrap();
        let out = inline(&raw, &files, &[b"C".to_vec(), b"K".to_vec()]);
        assert_eq!(
            out["tls_certificate"]["certificate_chain"],
            json!({"inline_bytes": "Qw=="})
        );
        assert_eq!(
            out["tls_certificate"]["private_key"],
            json!({"inline_bytes": "Sw=="})
        );
        assert_eq!(
            out["tls_certificate"]["watched_directory"],
            json!({"path": "/a"})
        );
    }
}
