//! TLS parameters: Envoy's names (OpenSSL's, as in `tls_params` and in the
//! `ssl.ciphers.*` / `ssl.versions.*` / `ssl.curves.*` stats) mapped to rustls'
//! suites, groups and versions, and the crypto provider a context is built with.

use std::sync::Arc;

use rustls::crypto::ring::{cipher_suite as cs, default_provider, kx_group};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::{CipherSuite, NamedGroup, ProtocolVersion, SupportedCipherSuite};

use crate::config::{CommonTlsConfig, TlsVersion};

/// OpenSSL's name of each suite envoyx offers, TLS 1.2 then TLS 1.3.
const SUITES: &[(&str, SupportedCipherSuite)] = &[
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-RSA-AES256-GCM-SHA384",
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "ECDHE-RSA-CHACHA20-POLY1305",
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    ("TLS_AES_128_GCM_SHA256", cs::TLS13_AES_128_GCM_SHA256),
    ("TLS_AES_256_GCM_SHA384", cs::TLS13_AES_256_GCM_SHA384),
    (
        "TLS_CHACHA20_POLY1305_SHA256",
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ),
];

/// The IANA id of a suite by its OpenSSL name (the access log's
/// `tls_cipher_suite`).
pub fn suite_id(name: &str) -> Option<u16> {
    SUITES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| u16::from(s.suite()))
}

const CURVES: &[(&str, &dyn SupportedKxGroup)] = &[
    ("X25519", kx_group::X25519),
    ("P-256", kx_group::SECP256R1),
    ("P-384", kx_group::SECP384R1),
];

/// Envoy's default `ecdh_curves`.
const DEFAULT_CURVES: &[&str] = &["X25519", "P-256"];

/// Which side a context is for: Envoy's version defaults differ.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// The crypto provider with the context's suites (configured TLS 1.2 suites in
/// their order, TLS 1.3 suites always) and curves.
pub fn provider(common: &CommonTlsConfig) -> Arc<CryptoProvider> {
    let mut p = default_provider();
    if !common.cipher_suites.is_empty() {
        let mut suites: Vec<SupportedCipherSuite> = common
            .cipher_suites
            .iter()
            .filter_map(|name| SUITES.iter().find(|(n, _)| n == name).map(|(_, s)| *s))
            .collect();
        suites.extend(
            p.cipher_suites
                .iter()
                .filter(|s| matches!(s, SupportedCipherSuite::Tls13(_))),
        );
        p.cipher_suites = suites;
    }
    let curves: Vec<&str> = if common.ecdh_curves.is_empty() {
        DEFAULT_CURVES.to_vec()
    } else {
        common.ecdh_curves.iter().map(String::as_str).collect()
    };
    p.kx_groups = curves
        .iter()
        .filter_map(|name| CURVES.iter().find(|(n, _)| n == name).map(|(_, g)| *g))
        .collect();
    Arc::new(p)
}

/// The protocol versions a context allows: Envoy's defaults are TLS 1.2–1.3 for
/// servers and TLS 1.2 only for clients.
pub fn versions(
    common: &CommonTlsConfig,
    side: Side,
) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let min = common.min_version.unwrap_or(TlsVersion::V1_2);
    let max = common.max_version.unwrap_or(match side {
        Side::Server => TlsVersion::V1_3,
        Side::Client => TlsVersion::V1_2,
    });
    let mut out = Vec::new();
    if min <= TlsVersion::V1_3 && max >= TlsVersion::V1_3 {
        out.push(&rustls::version::TLS13);
    }
    if min <= TlsVersion::V1_2 && max >= TlsVersion::V1_2 {
        out.push(&rustls::version::TLS12);
    }
    out
}

/// OpenSSL's name of a suite (Envoy's `ssl.ciphers.<name>` stat).
pub fn suite_name(suite: CipherSuite) -> Option<&'static str> {
    SUITES
        .iter()
        .find(|(_, s)| s.suite() == suite)
        .map(|(n, _)| *n)
}

/// Envoy's `ssl.versions.<name>`.
pub fn version_name(v: ProtocolVersion) -> Option<&'static str> {
    match v {
        ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
        ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
        _ => None,
    }
}

/// Envoy's `ssl.curves.<name>`.
pub fn curve_name(g: NamedGroup) -> Option<&'static str> {
    CURVES.iter().find(|(_, k)| k.name() == g).map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configurable_suite_and_curve_name_maps() {
        for name in crate::config::tls::CIPHER_SUITES {
            assert!(SUITES.iter().any(|(n, _)| n == name), "{name}");
        }
        for name in crate::config::tls::ECDH_CURVES {
            assert!(CURVES.iter().any(|(n, _)| n == name), "{name}");
        }
    }

    #[test]
    fn configured_suites_keep_tls13_and_their_order() {
        let common = CommonTlsConfig {
            cipher_suites: vec!["ECDHE-RSA-CHACHA20-POLY1305".into()],
            ecdh_curves: vec!["P-384".into()],
            ..Default::default()
        };
        let p = provider(&common);
        assert_eq!(
            p.cipher_suites[0].suite(),
            CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        );
        assert_eq!(p.cipher_suites.len(), 4);
        assert_eq!(p.kx_groups.len(), 1);
        assert_eq!(versions(&common, Side::Client).len(), 1);
        assert_eq!(versions(&common, Side::Server).len(), 2);
    }
}
