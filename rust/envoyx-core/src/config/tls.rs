//! Mapping TLS configuration: transport sockets (`envoy.transport_sockets.tls` with a
//! `DownstreamTlsContext` or `UpstreamTlsContext`), SDS secrets, and the files and
//! inline data they name. Certificates and keys are read here, when the
//! configuration is mapped, as Envoy reads them: a missing file or a bad PEM block
//! is an error naming its field.

use std::sync::Arc;

use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use super::matcher::map_string_matcher;
use super::model::*;
use super::reader::Obj;

pub const TLS_SOCKET_TYPE: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
pub const UPSTREAM_TLS_TYPE: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
pub const RAW_BUFFER_TYPE: &str = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
pub const SPIFFE_VALIDATOR_TYPE: &str =
    "envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";

/// The cipher suites envoyx (rustls) offers for TLS 1.2, by their OpenSSL names as
/// Envoy's `cipher_suites` takes them. TLS 1.3 suites are not configurable in Envoy
/// either. Any other name (CBC and RSA-key-exchange suites, which rustls does not
/// implement) is refused by name.
pub const CIPHER_SUITES: &[&str] = &[
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
];

/// `ecdh_curves` envoyx offers (ring's key exchange groups).
pub const ECDH_CURVES: &[&str] = &["X25519", "P-256", "P-384"];

/// A `transport_socket` of a listener's filter chain: `Some(None)` for plaintext.
pub fn map_downstream_socket(ts: &Obj<'_>) -> Option<Option<DownstreamTlsConfig>> {
    let tc = socket_config(ts)?;
    match tc.any_type() {
        Some(RAW_BUFFER_TYPE) => Some(None),
        Some(TLS_SOCKET_TYPE) => map_downstream_context(&tc).map(Some),
        Some(other) => {
            tc.error(
                "@type",
                format!("transport socket {other} is not supported on listeners by envoyx"),
            );
            None
        }
        None => None,
    }
}

/// A cluster's `transport_socket`: `Some(None)` for plaintext.
pub fn map_upstream_socket(ts: &Obj<'_>) -> Option<Option<UpstreamTlsConfig>> {
    let tc = socket_config(ts)?;
    match tc.any_type() {
        Some(RAW_BUFFER_TYPE) => Some(None),
        Some(UPSTREAM_TLS_TYPE) => map_upstream_context(&tc).map(Some),
        Some(other) => {
            tc.error(
                "@type",
                format!("transport socket {other} is not supported on clusters by envoyx"),
            );
            None
        }
        None => None,
    }
}

fn socket_config<'a>(ts: &Obj<'a>) -> Option<Obj<'a>> {
    ts.str("name");
    let tc = ts.obj("typed_config");
    if tc.is_none() {
        ts.error("typed_config", "is required by envoyx");
    }
    tc
}

pub fn map_downstream_context(tc: &Obj<'_>) -> Option<DownstreamTlsConfig> {
    let (common, declared) = match tc.obj("common_tls_context") {
        Some(c) => {
            let declared = c.has("tls_certificates") || c.has("tls_certificate_sds_secret_configs");
            (map_common(&c)?, declared)
        }
        None => (CommonTlsConfig::default(), false),
    };
    let require_client_certificate = tc.bool("require_client_certificate").unwrap_or(false);
    if require_client_certificate
        && common.validation.is_none()
        && common.validation_secret.is_none()
    {
        tc.error(
            "require_client_certificate",
            "requires a validation context (trusted_ca) to verify client certificates with",
        );
    }
    // (Certificates declared but unreadable are reported where they are.)
    if !declared {
        tc.errors().push(
            &tc.field_path("common_tls_context"),
            "no certificates: a server TLS context needs tls_certificates or \
             tls_certificate_sds_secret_configs",
        );
    }
    for field in [
        "require_sni",
        "session_ticket_keys",
        "session_ticket_keys_sds_secret_config",
        "session_timeout",
        "ocsp_staple_policy",
        "prefer_client_ciphers",
    ] {
        if tc.has(field) {
            tc.raw(field);
            tc.error(
                field,
                match field {
                    "session_ticket_keys" | "session_ticket_keys_sds_secret_config" => {
                        "not supported by envoyx: session tickets are encrypted with rustls' \
                         rotating ticketer (keys made in memory, renewed every 6 hours)"
                    }
                    _ => "not supported by envoyx",
                },
            );
        }
    }
    // Envoy chooses a certificate by SNI across all of them when the first does not
    // match; envoyx always scans them all, so either setting gives that behaviour.
    tc.bool("full_scan_certs_on_sni_mismatch");
    Some(DownstreamTlsConfig {
        common,
        require_client_certificate,
        disable_tickets: tc
            .bool("disable_stateless_session_resumption")
            .unwrap_or(false),
        disable_session_cache: tc
            .bool("disable_stateful_session_resumption")
            .unwrap_or(false),
        path: tc.path().to_string(),
    })
}

pub fn map_upstream_context(tc: &Obj<'_>) -> Option<UpstreamTlsConfig> {
    let common = match tc.obj("common_tls_context") {
        Some(c) => map_common(&c)?,
        None => CommonTlsConfig::default(),
    };
    if tc.bool("allow_renegotiation") == Some(true) {
        tc.error(
            "allow_renegotiation",
            "not supported by envoyx (rustls never renegotiates)",
        );
    }
    for field in ["max_session_keys", "enforce_rsa_key_usage"] {
        if tc.has(field) {
            tc.raw(field);
            tc.error(field, "not supported by envoyx");
        }
    }
    let sni = tc.str("sni").filter(|s| !s.is_empty()).map(str::to_string);
    if let Some(s) = &sni
        && rustls_pki_types::ServerName::try_from(s.as_str()).is_err()
    {
        tc.error("sni", format!("{s:?} is not a valid server name"));
    }
    Some(UpstreamTlsConfig {
        common,
        sni,
        auto_sni: false,
        auto_san_validation: false,
        path: tc.path().to_string(),
    })
}

fn map_common(c: &Obj<'_>) -> Option<CommonTlsConfig> {
    let mut common = CommonTlsConfig::default();
    if let Some(p) = c.obj("tls_params") {
        map_tls_params(&p, &mut common);
    }
    for cert in c.list("tls_certificates") {
        if let Some(cert) = map_tls_certificate(&cert) {
            common.certificates.push(cert);
        }
    }
    for s in c.list("tls_certificate_sds_secret_configs") {
        common.certificate_secrets.extend(map_secret_ref(&s));
    }
    if let Some(v) = c.obj("validation_context") {
        common.validation = map_validation(&v);
    }
    if let Some(s) = c.obj("validation_context_sds_secret_config") {
        common.validation_secret = map_secret_ref(&s);
    }
    if let Some(combined) = c.obj("combined_validation_context") {
        if let Some(v) = combined.obj("default_validation_context") {
            common.validation = map_validation(&v);
        }
        match combined.obj("validation_context_sds_secret_config") {
            Some(s) => common.validation_secret = map_secret_ref(&s),
            None => combined.error("validation_context_sds_secret_config", "is required"),
        }
    }
    common.alpn = c
        .strings("alpn_protocols")
        .into_iter()
        .map(str::to_string)
        .collect();
    Some(common)
}

fn map_tls_params(p: &Obj<'_>, common: &mut CommonTlsConfig) {
    let version = |field: &'static str| -> Option<TlsVersion> {
        match p.str(field)? {
            "TLS_AUTO" => None,
            "TLSv1_2" => Some(TlsVersion::V1_2),
            "TLSv1_3" => Some(TlsVersion::V1_3),
            other => {
                p.error(
                    field,
                    format!(
                        "{other} is not supported by envoyx (rustls implements TLS 1.2 and 1.3 only)"
                    ),
                );
                None
            }
        }
    };
    common.min_version = version("tls_minimum_protocol_version");
    common.max_version = version("tls_maximum_protocol_version");
    if let (Some(min), Some(max)) = (common.min_version, common.max_version)
        && min > max
    {
        p.error(
            "tls_maximum_protocol_version",
            "is lower than tls_minimum_protocol_version",
        );
    }
    for (i, spec) in p.strings("cipher_suites").into_iter().enumerate() {
        // OpenSSL's equal-preference groups: `[A|B]`.
        let names = spec.trim_start_matches('[').trim_end_matches(']');
        for name in names.split('|').filter(|n| !n.is_empty()) {
            if CIPHER_SUITES.contains(&name) {
                common.cipher_suites.push(name.to_string());
            } else {
                p.errors().push(
                    &format!("{}[{i}]", p.field_path("cipher_suites")),
                    format!(
                        "cipher suite {name} is not supported by envoyx (it offers {})",
                        CIPHER_SUITES.join(", ")
                    ),
                );
            }
        }
    }
    for (i, name) in p.strings("ecdh_curves").into_iter().enumerate() {
        if ECDH_CURVES.contains(&name) {
            common.ecdh_curves.push(name.to_string());
        } else {
            p.errors().push(
                &format!("{}[{i}]", p.field_path("ecdh_curves")),
                format!(
                    "curve {name} is not supported by envoyx (it offers {})",
                    ECDH_CURVES.join(", ")
                ),
            );
        }
    }
    if p.has("signature_algorithms") {
        p.raw("signature_algorithms");
        p.error("signature_algorithms", "not supported by envoyx");
    }
}

/// `TlsCertificate`: `certificate_chain` and `private_key`.
pub fn map_tls_certificate(c: &Obj<'_>) -> Option<TlsCertificate> {
    // Honoured for SDS secrets (see `tls::files`), which re-read it from the
    // resource; elsewhere Envoy reads the files once, as envoyx does.
    if let Some(w) = c.obj("watched_directory") {
        map_watched_directory(&w);
    }
    let chain_data = c
        .obj("certificate_chain")
        .and_then(|d| read_data_source(&d));
    let key_data = c.obj("private_key").and_then(|d| read_data_source(&d));
    let (Some(chain_data), Some(key_data)) = (chain_data, key_data) else {
        if !c.has("certificate_chain") || !c.has("private_key") {
            c.errors().push(
                c.path(),
                "certificate_chain and private_key are required by envoyx",
            );
        }
        return None;
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_data)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        c.error("certificate_chain", "no PEM certificate found");
        return None;
    }
    let key = match PrivateKeyDer::from_pem_slice(&key_data) {
        Ok(k) => k,
        Err(e) => {
            c.error("private_key", format!("no PEM private key found: {e}"));
            return None;
        }
    };
    Some(TlsCertificate {
        chain,
        key: Arc::new(key),
        path: c.path().to_string(),
        source: source_name(c, "certificate_chain"),
    })
}

fn map_validation(v: &Obj<'_>) -> Option<ValidationConfig> {
    let mut out = ValidationConfig {
        path: v.path().to_string(),
        ..Default::default()
    };
    if let Some(w) = v.obj("watched_directory") {
        map_watched_directory(&w);
    }
    if let Some(custom) = v.obj("custom_validator_config") {
        out.spiffe = map_custom_validator(&custom);
        for field in ["trusted_ca", "crl"] {
            if v.has(field) {
                v.raw(field);
                v.error(
                    field,
                    "not supported by envoyx beside the SPIFFE validator (its trust \
                     bundles are the trust anchors)",
                );
            }
        }
    }
    if let Some(ca) = v.obj("trusted_ca") {
        out.ca_source = ca.str("filename").unwrap_or("<inline>").to_string();
        let data = read_data_source(&ca)?;
        out.trusted_ca = CertificateDer::pem_slice_iter(&data)
            .filter_map(Result::ok)
            .collect();
        if out.trusted_ca.is_empty() {
            v.error("trusted_ca", "no PEM certificate found");
        }
    }
    if let Some(crl) = v.obj("crl") {
        let data = read_data_source(&crl)?;
        out.crls = CertificateRevocationListDer::pem_slice_iter(&data)
            .filter_map(Result::ok)
            .collect();
        if out.crls.is_empty() {
            v.error("crl", "no PEM certificate revocation list found");
        }
    }
    for m in v.list("match_typed_subject_alt_names") {
        let kind = match m.str("san_type").unwrap_or("SAN_TYPE_UNSPECIFIED") {
            "DNS" => SanType::Dns,
            "URI" => SanType::Uri,
            "IP_ADDRESS" => SanType::IpAddress,
            "EMAIL" => SanType::Email,
            other => {
                m.error("san_type", format!("{other} is not supported by envoyx"));
                continue;
            }
        };
        if let Some(sm) = m.obj("matcher").and_then(|sm| map_string_matcher(&sm)) {
            out.san_matchers.push(SanMatcher { kind, matcher: sm });
        }
    }
    if v.bool("allow_expired_certificate") == Some(true) {
        v.error("allow_expired_certificate", "not supported by envoyx");
    }
    if v.bool("only_verify_leaf_cert_crl") == Some(true) {
        v.error("only_verify_leaf_cert_crl", "not supported by envoyx");
    }
    if let Some(t) = v.str("trust_chain_verification")
        && t != "VERIFY_TRUST_CHAIN"
    {
        v.error(
            "trust_chain_verification",
            format!("{t} is not supported by envoyx"),
        );
    }
    // Everything else (SPKI and hash pins, system roots, CT) is refused by the
    // reader as "not supported by envoyx".
    Some(out)
}

/// `custom_validator_config`: Envoy's SPIFFE validator is the one envoyx has.
fn map_custom_validator(c: &Obj<'_>) -> Option<SpiffeConfig> {
    let name = c.str("name").unwrap_or_default();
    let Some(tc) = c.obj("typed_config") else {
        c.error("typed_config", "is required by envoyx");
        return None;
    };
    let type_name = tc.any_type();
    if name != SPIFFE_VALIDATOR && type_name != Some(SPIFFE_VALIDATOR_TYPE) {
        c.error(
            "name",
            format!(
                "certificate validator {name:?} is not supported by envoyx (it has \
                 {SPIFFE_VALIDATOR} only)"
            ),
        );
        tc.ignore(&["trust_domains", "trust_bundles"]);
        return None;
    }
    if type_name != Some(SPIFFE_VALIDATOR_TYPE) {
        tc.error(
            "@type",
            format!("{SPIFFE_VALIDATOR} takes a {SPIFFE_VALIDATOR_TYPE}"),
        );
        return None;
    }
    if tc.has("trust_bundles") {
        tc.raw("trust_bundles");
        tc.error(
            "trust_bundles",
            "not supported by envoyx (give each trust domain's bundle in trust_domains)",
        );
    }
    let mut out = SpiffeConfig::default();
    for d in tc.list("trust_domains") {
        let name = d.str("name").unwrap_or_default().to_string();
        if name.is_empty() {
            d.error("name", "is required");
            continue;
        }
        if out.trust_domains.iter().any(|t| t.name == name) {
            d.error(
                "name",
                format!("Multiple trust bundles are given for one trust domain for {name}"),
            );
            continue;
        }
        let Some(bundle) = d.obj("trust_bundle") else {
            d.error("trust_bundle", "is required");
            continue;
        };
        let Some(data) = read_data_source(&bundle) else {
            continue;
        };
        let cas: Vec<_> = CertificateDer::pem_slice_iter(&data)
            .filter_map(Result::ok)
            .collect();
        if cas.is_empty() {
            d.error(
                "trust_bundle",
                format!("Failed to load trusted CA certificate for {name}"),
            );
            continue;
        }
        let crls = CertificateRevocationListDer::pem_slice_iter(&data)
            .filter_map(Result::ok)
            .collect();
        out.trust_domains.push(SpiffeTrustDomain {
            source: bundle
                .to_value()
                .get("filename")
                .and_then(|f| f.as_str())
                .unwrap_or("<inline>")
                .to_string(),
            name,
            cas,
            crls,
        });
    }
    Some(out)
}

/// `envoy.config.core.v3.WatchedDirectory`.
fn map_watched_directory(w: &Obj<'_>) {
    if w.str("path").is_none_or(str::is_empty) {
        w.error("path", "is required");
    }
}

fn map_secret_ref(s: &Obj<'_>) -> Option<SecretRef> {
    let name = s.str("name").unwrap_or_default().to_string();
    if name.is_empty() {
        s.error("name", "is required");
        return None;
    }
    // The config source is the Python xDS client's business; it validates it.
    let dynamic = s.raw("sds_config").is_some();
    Some(SecretRef { name, dynamic })
}

/// A `Secret` (bootstrap `static_resources.secrets` or an SDS resource).
pub fn map_secret(s: &Obj<'_>) -> Option<(String, SecretConfig)> {
    let name = s.str("name").unwrap_or_default().to_string();
    if name.is_empty() {
        s.error("name", "is required");
    }
    let secret = if let Some(c) = s.obj("tls_certificate") {
        SecretConfig::TlsCertificate(map_tls_certificate(&c)?)
    } else if let Some(v) = s.obj("validation_context") {
        SecretConfig::ValidationContext(map_validation(&v)?)
    } else {
        s.errors().push(
            s.path(),
            "envoyx supports tls_certificate and validation_context secrets only",
        );
        return None;
    };
    Some((name, secret))
}

/// The file a DataSource field names, or `<inline>` (read again: the reader has
/// already checked the field).
fn source_name(c: &Obj<'_>, field: &str) -> String {
    c.to_value()
        .get(field)
        .and_then(|d| d.get("filename"))
        .and_then(|f| f.as_str())
        .unwrap_or("<inline>")
        .to_string()
}

/// `envoy.config.core.v3.DataSource`: the bytes of a file or of inline data.
fn read_data_source(d: &Obj<'_>) -> Option<Vec<u8>> {
    if let Some(f) = d.str("filename") {
        match std::fs::read(f) {
            Ok(b) => Some(b),
            Err(e) => {
                d.error("filename", format!("cannot read {f}: {e}"));
                None
            }
        }
    } else if let Some(s) = d.str("inline_string") {
        Some(s.as_bytes().to_vec())
    } else if let Some(b) = d.str("inline_bytes") {
        match base64::engine::general_purpose::STANDARD.decode(b) {
            Ok(b) => Some(b),
            Err(e) => {
                d.error("inline_bytes", format!("invalid base64: {e}"));
                None
            }
        }
    } else {
        d.errors().push(
            d.path(),
            "one of filename, inline_string or inline_bytes is required by envoyx",
        );
        None
    }
}
