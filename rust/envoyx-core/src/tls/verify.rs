//! Peer certificate checks as Envoy's `CertificateValidationContext` makes them:
//! the chain against `trusted_ca` (and `crl`) by webpki through rustls, then the
//! subject alternative names against `match_typed_subject_alt_names`. Each failure
//! is counted (`ssl.fail_verify_error`, `ssl.fail_verify_san`).
//!
//! Envoy verifies a peer only when a validation context says how: a server
//! without one asks for no client certificate, and a client without one accepts
//! any upstream certificate (as Envoy does; a `trusted_ca` turns checking on).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};
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

/// Verifies client certificates (the server side of mutual TLS).
pub struct ClientVerifier {
    /// webpki's chain (and CRL) check; None without `trusted_ca`.
    pub chain: Option<Arc<dyn ClientCertVerifier>>,
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
        self.chain.as_ref().map_or(&[], |c| c.root_hint_subjects())
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        if let Some(chain) = &self.chain
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
}

/// Verifies upstream certificates (the client side).
pub struct ServerVerifier {
    /// `trusted_ca`; None: the chain is not checked (Envoy's default).
    pub roots: Option<Arc<RootCertStore>>,
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
        if let Some(roots) = &self.roots {
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
        if self.check_name {
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
}
