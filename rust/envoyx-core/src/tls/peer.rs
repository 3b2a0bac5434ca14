//! What a downstream TLS session says about the peer and itself: negotiated
//! parameters at once, certificate details (SANs, subject, digest) computed on
//! first use and kept for the connection — for Python filters, access logs and
//! `x-forwarded-client-cert`.

use std::sync::{Arc, OnceLock};

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};

/// The facts of one downstream TLS session.
#[derive(Debug, Default)]
pub struct PeerTls {
    /// The SNI the client sent.
    pub sni: Option<Arc<str>>,
    /// The SNI as a tls_inspector found it (`%REQUESTED_SERVER_NAME%`): Envoy
    /// records it only through that listener filter.
    pub requested_server_name: Option<Arc<str>>,
    /// The protocol ALPN negotiated.
    pub alpn: Option<Arc<str>>,
    /// `TLSv1.2` / `TLSv1.3`.
    pub version: Option<&'static str>,
    /// The cipher suite's OpenSSL name.
    pub cipher: Option<&'static str>,
    /// The client's certificate chain (leaf first), if it presented one.
    pub peer_chain: Vec<CertificateDer<'static>>,
    /// The client's certificate was validated (chain, SPIFFE or SAN checks):
    /// Envoy's `peerCertificateValidated` (route `tls_context.validated`).
    pub peer_validated: bool,
    /// The certificate this side served (approximated when several are
    /// configured: the one for the SNI, else the first); shared, not copied.
    pub local_cert: Option<Arc<rustls::sign::CertifiedKey>>,
    peer: OnceLock<Option<CertInfo>>,
    local: OnceLock<Option<CertInfo>>,
}

/// A certificate's details as Envoy's `Ssl::ConnectionInfo` gives them.
#[derive(Debug, Default)]
pub struct CertInfo {
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    /// RFC 2253 form, as Envoy prints it (`CN=web,O=example`).
    pub subject: String,
    pub issuer: String,
    /// Lower-case hex, no separators.
    pub serial: String,
    /// SHA-256 of the DER, lower-case hex.
    pub sha256: String,
    /// Validity, seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl PeerTls {
    pub fn new(
        sni: Option<Arc<str>>,
        alpn: Option<Arc<str>>,
        version: Option<&'static str>,
        cipher: Option<&'static str>,
        peer_chain: Vec<CertificateDer<'static>>,
        local_cert: Option<Arc<rustls::sign::CertifiedKey>>,
    ) -> Self {
        PeerTls {
            sni,
            requested_server_name: None,
            alpn,
            version,
            cipher,
            peer_chain,
            peer_validated: false,
            local_cert,
            peer: OnceLock::new(),
            local: OnceLock::new(),
        }
    }

    /// Whether the client presented a certificate (mutual TLS).
    pub fn peer_presented(&self) -> bool {
        !self.peer_chain.is_empty()
    }

    pub fn peer(&self) -> Option<&CertInfo> {
        self.peer
            .get_or_init(|| self.peer_chain.first().and_then(|c| cert_info(c)))
            .as_ref()
    }

    pub fn local(&self) -> Option<&CertInfo> {
        self.local
            .get_or_init(|| {
                let leaf = self.local_cert.as_ref()?.cert.first()?;
                cert_info(leaf)
            })
            .as_ref()
    }

    /// The peer's identity for Python filters: its first URI SAN (a SPIFFE ID in
    /// a mesh).
    pub fn peer_identity(&self) -> Option<&str> {
        self.peer()?.uri_sans.first().map(String::as_str)
    }
}

pub fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut info = CertInfo {
        subject: rfc2253(cert.subject()),
        issuer: rfc2253(cert.issuer()),
        serial: cert.raw_serial_as_string().replace(':', ""),
        sha256: hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        ..Default::default()
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => info.uri_sans.push(u.to_string()),
                GeneralName::DNSName(d) => info.dns_sans.push(d.to_string()),
                _ => {}
            }
        }
    }
    Some(info)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A distinguished name as OpenSSL's `XN_FLAG_RFC2253` prints it: the last RDN
/// first, `,` between them, special characters escaped.
fn rfc2253(name: &X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut parts = Vec::new();
    for rdn in name.iter_rdn() {
        let attrs: Vec<String> = rdn
            .iter()
            .map(|attr| {
                let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                    .map(str::to_string)
                    .unwrap_or_else(|_| attr.attr_type().to_id_string());
                let value = attr.as_str().map(escape).unwrap_or_default();
                format!("{key}={value}")
            })
            .collect();
        parts.push(attrs.join("+"));
    }
    parts.reverse();
    parts.join(",")
}

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.chars().count() && c == ' ');
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
