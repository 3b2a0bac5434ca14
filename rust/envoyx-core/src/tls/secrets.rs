//! Secrets by name (Envoy's `SecretManager`): the bootstrap's static ones and those
//! received over SDS. TLS contexts resolve their certificate and validation
//! secrets here when built, and again when one of them changes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use serde_json::Value;

use super::files::FileWatch;
pub use super::secret_entry::SecretEntry;
use crate::config::{CommonTlsConfig, SecretConfig, SecretRef, TlsCertificate, ValidationConfig};

#[derive(Default, Debug)]
pub struct SecretStore {
    secrets: ArcSwap<HashMap<String, Arc<SecretEntry>>>,
    /// Dynamic secrets the management server said it does not have (removed, or
    /// the initial fetch timed out): contexts stop waiting for them.
    absent: ArcSwap<HashSet<String>>,
    /// The files of SDS secrets, re-read when replaced on disk.
    pub files: FileWatch,
}

/// A context's certificates and validation context with its secrets filled in.
pub struct Resolved {
    pub certificates: Vec<TlsCertificate>,
    pub validation: Option<ValidationConfig>,
}

pub enum Resolution {
    Ready(Resolved),
    /// Dynamic secrets not received yet (the context's owner warms).
    Missing(Vec<String>),
    /// Dynamic secrets the server does not have: the context works without
    /// them, which for a certificate means every handshake fails (as in Envoy).
    Absent(Vec<String>),
}

impl SecretStore {
    pub fn new(statics: Vec<(String, SecretConfig, Value)>) -> Self {
        let map = statics
            .into_iter()
            .map(|(name, secret, raw)| {
                let entry = SecretEntry {
                    secret,
                    version_info: None,
                    last_updated: SystemTime::now(),
                    raw,
                };
                (name, Arc::new(entry))
            })
            .collect();
        SecretStore {
            secrets: ArcSwap::from_pointee(map),
            absent: ArcSwap::default(),
            files: FileWatch::default(),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<SecretEntry>> {
        self.secrets.load().get(name).cloned()
    }

    /// Every secret held, by name.
    pub fn entries(&self) -> Arc<HashMap<String, Arc<SecretEntry>>> {
        self.secrets.load_full()
    }

    /// Installs SDS secrets; the caller serialises applies. A removed secret that
    /// is held stays (Envoy keeps what it has); one never received is marked
    /// absent, and contexts waiting for it stop waiting.
    pub fn apply(
        &self,
        upserts: Vec<(String, SecretConfig, Value)>,
        removed: &[String],
        version: &str,
    ) {
        let mut map = (**self.secrets.load()).clone();
        let mut absent = (**self.absent.load()).clone();
        for (name, secret, raw) in upserts {
            absent.remove(&name);
            let entry = Arc::new(SecretEntry {
                secret,
                version_info: Some(version.to_string()),
                last_updated: SystemTime::now(),
                raw,
            });
            self.files.track(&name, &entry);
            map.insert(name, entry);
        }
        for name in removed {
            if !map.contains_key(name) {
                absent.insert(name.clone());
            }
        }
        self.secrets.store(Arc::new(map));
        self.absent.store(Arc::new(absent));
    }

    /// Replaces a secret with the one its files now make (a rotation on disk),
    /// unless it changed since `current` was read; the new entry keeps the
    /// resource and version it came with.
    pub fn reload(
        &self,
        name: &str,
        current: &Arc<SecretEntry>,
        secret: SecretConfig,
    ) -> Option<Arc<SecretEntry>> {
        let mut map = (**self.secrets.load()).clone();
        if !map.get(name).is_some_and(|e| Arc::ptr_eq(e, current)) {
            return None;
        }
        let entry = Arc::new(SecretEntry {
            secret,
            version_info: current.version_info.clone(),
            last_updated: SystemTime::now(),
            raw: current.raw.clone(),
        });
        map.insert(name.to_string(), entry.clone());
        self.secrets.store(Arc::new(map));
        Some(entry)
    }

    /// The context's material with its secrets filled in.
    pub fn resolve(&self, common: &CommonTlsConfig) -> Result<Resolution, String> {
        let mut missing = Vec::new();
        let mut certificates = common.certificates.clone();
        for r in &common.certificate_secrets {
            match self.lookup(r, &mut missing)?.as_deref().map(|e| &e.secret) {
                Some(SecretConfig::TlsCertificate(c)) => certificates.push(c.clone()),
                Some(SecretConfig::ValidationContext(_)) => {
                    return Err(format!(
                        "secret {} is a validation context, not a TLS certificate",
                        r.name
                    ));
                }
                None => {}
            }
        }
        let mut validation = common.validation.clone();
        if let Some(r) = &common.validation_secret {
            match self.lookup(r, &mut missing)?.as_deref().map(|e| &e.secret) {
                Some(SecretConfig::ValidationContext(v)) => {
                    // The secret's trust anchors and CRLs, the inline default's
                    // matchers too (Envoy's combined validation context).
                    let mut merged = v.clone();
                    if let Some(default) = validation.take() {
                        merged.san_matchers.extend(default.san_matchers);
                        if merged.trusted_ca.is_empty() {
                            merged.trusted_ca = default.trusted_ca;
                        }
                        merged.crls.extend(default.crls);
                        if merged.spiffe.is_none() {
                            merged.spiffe = default.spiffe;
                        }
                    }
                    validation = Some(merged);
                }
                Some(SecretConfig::TlsCertificate(_)) => {
                    return Err(format!(
                        "secret {} is a TLS certificate, not a validation context",
                        r.name
                    ));
                }
                None => {}
            }
        }
        if !missing.is_empty() {
            let absent = self.absent.load();
            if missing.iter().all(|n| absent.contains(n)) {
                return Ok(Resolution::Absent(missing));
            }
            return Ok(Resolution::Missing(missing));
        }
        Ok(Resolution::Ready(Resolved {
            certificates,
            validation,
        }))
    }

    fn lookup(
        &self,
        r: &SecretRef,
        missing: &mut Vec<String>,
    ) -> Result<Option<Arc<SecretEntry>>, String> {
        match self.get(&r.name) {
            Some(s) => Ok(Some(s)),
            None if r.dynamic => {
                missing.push(r.name.clone());
                Ok(None)
            }
            None => Err(format!("Unknown static secret: {}", r.name)),
        }
    }
}

/// A rustls configuration built from a TLS context and the secrets it names,
/// rebuilt when one of them changes: what server and client contexts share.
pub struct SecretBound<T> {
    common: CommonTlsConfig,
    /// The certificates it was last built with (admin `/certs`, expiry gauge).
    certs: ArcSwap<CertInventory>,
    /// None while a secret it needs has not arrived, or after it was given up.
    config: ArcSwapOption<T>,
    /// The server said it has no such secret: no more waiting, no handshakes.
    given_up: AtomicBool,
}

impl<T> SecretBound<T> {
    pub fn new(common: CommonTlsConfig) -> Self {
        SecretBound {
            common,
            certs: ArcSwap::default(),
            config: ArcSwapOption::empty(),
            given_up: AtomicBool::new(false),
        }
    }

    /// (Re)builds the configuration with `build`; an error leaves the previous one.
    pub fn refresh(
        &self,
        secrets: &SecretStore,
        build: impl FnOnce(Resolved) -> Result<T, String>,
    ) -> Result<(), String> {
        match secrets.resolve(&self.common)? {
            Resolution::Ready(resolved) => {
                let inventory = CertInventory::of(&resolved);
                self.config.store(Some(Arc::new(build(resolved)?)));
                self.certs.store(Arc::new(inventory));
            }
            Resolution::Missing(_) => {}
            Resolution::Absent(_) => {
                self.config.store(None);
                self.given_up.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    pub fn certs(&self) -> Arc<CertInventory> {
        self.certs.load_full()
    }

    pub fn current(&self) -> Option<Arc<T>> {
        self.config.load_full()
    }

    /// Whether it waits for SDS secrets.
    pub fn is_warming(&self) -> bool {
        self.config.load().is_none() && !self.given_up.load(Ordering::Relaxed)
    }

    /// Whether it is built with the named secret.
    pub fn uses_secret(&self, name: &str) -> bool {
        self.common.secrets().any(|s| s.name == name)
    }

    /// The SDS secrets it names.
    pub fn dynamic_secrets(&self) -> impl Iterator<Item = &str> {
        self.common
            .secrets()
            .filter(|s| s.dynamic)
            .map(|s| s.name.as_str())
    }
}

/// A context's certificates: its own chains and the CAs it trusts, each with the
/// file it came from (or `<inline>`).
#[derive(Debug, Default)]
pub struct CertInventory {
    pub chains: Vec<(String, Vec<rustls::pki_types::CertificateDer<'static>>)>,
    pub cas: Vec<(String, rustls::pki_types::CertificateDer<'static>)>,
}

impl CertInventory {
    fn of(resolved: &Resolved) -> Self {
        CertInventory {
            chains: resolved
                .certificates
                .iter()
                .map(|c| (c.source.clone(), c.chain.clone()))
                .collect(),
            cas: resolved
                .validation
                .iter()
                .flat_map(|v| {
                    // With the SPIFFE validator, every bundle's CAs, each named
                    // `<trust domain>: <file>` as Envoy names them.
                    let spiffe = v.spiffe.iter().flat_map(|s| {
                        s.trust_domains.iter().flat_map(|d| {
                            let source = format!("{}: {}", d.name, d.source);
                            d.cas.iter().map(move |ca| (source.clone(), ca.clone()))
                        })
                    });
                    v.trusted_ca
                        .iter()
                        .map(|ca| (v.ca_source.clone(), ca.clone()))
                        .chain(spiffe)
                })
                .collect(),
        }
    }
}
