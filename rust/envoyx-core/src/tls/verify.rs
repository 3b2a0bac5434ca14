//! Peer certificate checks as Envoy's `CertificateValidationContext` makes them:
//! the chain against `trusted_ca` (and `crl`) by webpki through rustls, then the
//! subject alternative names against `match_typed_subject_alt_names`. Each failure
//! is counted (`ssl.fail_verify_error`, `ssl.fail_verify_san`).
//!
//! With Envoy's SPIFFE validator (`custom_validator_config`
//! `envoy.tls.cert_validator.spiffe`) the chain is verified against the bundle of
//! the trust domain the leaf's SPIFFE ID names, and only URI SAN matchers apply.
//!
//! Envoy verifies a peer only when a validation context says how: a server
//! without one asks for no client certificate, and a client without one accepts
//! any upstream certificate (as Envoy does; a `trusted_ca` turns checking on).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::stats::SslStats;
use crate::config::{SanMatcher, SanType};

/// The subject alternative names of a DER certificate, as (type, text).
pub fn subject_alt_names(der: &[u8]) -> Vec<(SanType, String)> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(s) => Some((SanType::Dns, s.to_string())),
            GeneralName::URI(s) => Some((SanType::Uri, s.to_string())),
            GeneralName::RFC822Name(s) => Some((SanType::Email, s.to_string())),
            GeneralName::IPAddress(b) => ip_text(b).map(|ip| (SanType::IpAddress, ip)),
            _ => None,
        })
        .collect()
}

fn ip_text(b: &[u8]) -> Option<String> {
    let ip: IpAddr = match b.len() {
        4 => <[u8; 4]>::try_from(b).ok()?.into(),
        16 => <[u8; 16]>::try_from(b).ok()?.into(),
        _ => return None,
    };
    Some(ip.to_string())
}

/// Whether one of the certificate's SANs matches one of the matchers (Envoy: any).
pub fn sans_match(der: &[u8], matchers: &[SanMatcher]) -> bool {
    if matchers.is_empty() {
        return true;
    }
    let sans = subject_alt_names(der);
    matchers.iter().any(|m| {
        sans.iter()
            .any(|(kind, value)| *kind == m.kind && m.matcher.matches(value))
    })
}

/// The trust domain a leaf certificate belongs to, as Envoy's SPIFFE validator
/// finds it: the leaf must not be a CA, must have a key usage extension that does
/// not allow signing certificates or CRLs, and its
/// first URI SAN must be a SPIFFE ID, `spiffe://<trust domain>/<path>`. None when
/// it is not such a certificate (Envoy counts `ssl.fail_verify_error`).
pub fn spiffe_trust_domain(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    // X509-SVID leaf validation (Envoy's certificatePrecheck).
    if cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca)
    {
        return None;
    }
    // A key usage extension is required (BoringSSL takes a missing one as every
    // usage), and it must not allow signing certificates or CRLs.
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() && !ku.value.crl_sign() => {}
        _ => return None,
    }
    let san = cert.subject_alternative_name().ok().flatten()?;
    // Envoy takes the first URI SAN (a valid SVID has exactly one).
    let uri = san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    })?;
    let rest = uri.strip_prefix("spiffe://")?;
    let (domain, _) = rest.split_once('/')?;
    (!domain.is_empty()).then(|| domain.to_string())
}

/// How a client certificate's chain is verified.
pub enum ClientChain {
    /// No `trusted_ca`: not verified (only SANs, if any matcher).
    Unchecked,
    /// webpki's chain (and CRL) check against `trusted_ca`.
    WebPki(Arc<dyn ClientCertVerifier>),
    /// Envoy's SPIFFE validator: one webpki verifier per trust domain, chosen by
    /// the leaf's SPIFFE ID; `hints` are every bundle's CA subjects.
    Spiffe {
        domains: HashMap<String, Arc<dyn ClientCertVerifier>>,
        hints: Vec<DistinguishedName>,
    },
}

/// The handshake-signature half of a certificate verifier: the same for clients and
/// servers, by the provider's webpki algorithms (`self.algorithms`).
macro_rules! handshake_signatures_by_webpki {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

/// Verifies client certificates (the server side of mutual TLS).
pub struct ClientVerifier {
    pub chain: ClientChain,
    pub sans: Vec<SanMatcher>,
    pub mandatory: bool,
    pub algorithms: WebPkiSupportedAlgorithms,
    pub stats: SslStats,
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("mandatory", &self.mandatory)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        match &self.chain {
            ClientChain::Unchecked => &[],
            ClientChain::WebPki(c) => c.root_hint_subjects(),
            ClientChain::Spiffe { hints, .. } => hints,
        }
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verifier = match &self.chain {
            ClientChain::Unchecked => None,
            ClientChain::WebPki(c) => Some(c),
            ClientChain::Spiffe { domains, .. } => {
                let Some(v) = spiffe_trust_domain(end_entity).and_then(|d| domains.get(&d)) else {
                    self.stats.fail_verify_error.inc();
                    return Err(Error::InvalidCertificate(CertificateError::UnknownIssuer));
                };
                Some(v)
            }
        };
        if let Some(chain) = verifier
            && let Err(e) = chain.verify_client_cert(end_entity, intermediates, now)
        {
            self.stats.fail_verify_error.inc();
            return Err(e);
        }
        if !sans_match(end_entity, &self.sans) {
            self.stats.fail_verify_san.inc();
            return Err(Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures_by_webpki!();
}

/// Verifies upstream certificates (the client side).
pub struct ServerVerifier {
    /// `trusted_ca`; None: the chain is not checked (Envoy's default).
    pub roots: Option<Arc<RootCertStore>>,
    /// Envoy's SPIFFE validator: the roots of each trust domain, chosen by the
    /// leaf's SPIFFE ID (instead of `roots`; no name check).
    pub spiffe: Option<HashMap<String, Arc<RootCertStore>>>,
    pub sans: Vec<SanMatcher>,
    /// `auto_san_validation`: the certificate must be valid for the name the
    /// connection was made for (the request's host).
    pub check_name: bool,
    pub algorithms: WebPkiSupportedAlgorithms,
    pub stats: SslStats,
}

impl fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerVerifier")
            .field("check_name", &self.check_name)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity);
        let roots = match &self.spiffe {
            None => self.roots.as_ref(),
            Some(domains) => {
                let Some(roots) = spiffe_trust_domain(end_entity).and_then(|d| domains.get(&d))
                else {
                    self.stats.fail_verify_error.inc();
                    return Err(Error::InvalidCertificate(CertificateError::UnknownIssuer));
                };
                Some(roots)
            }
        };
        if let Some(roots) = roots {
            let checked = parsed.as_ref().map_err(Clone::clone).and_then(|cert| {
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    cert,
                    roots,
                    intermediates,
                    now,
                    self.algorithms.all,
                )
            });
            if let Err(e) = checked {
                self.stats.fail_verify_error.inc();
                return Err(e);
            }
        }
        // (Envoy's SPIFFE validator ignores the name the connection was made for.)
        if self.check_name && self.spiffe.is_none() {
            let named = parsed
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|cert| rustls::client::verify_server_name(cert, server_name));
            if let Err(e) = named {
                self.stats.fail_verify_san.inc();
                return Err(e);
            }
        }
        if !sans_match(end_entity, &self.sans) {
            self.stats.fail_verify_san.inc();
            return Err(Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_by_webpki!();
}
