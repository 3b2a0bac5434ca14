//! A listener filter chain's TLS context (Envoy's `ServerContextImpl`): the rustls
//! configuration built from a `DownstreamTlsContext`, rebuilt when one of its SDS
//! secrets changes, and the handshake of a downstream connection.

use std::sync::Arc;
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::StartHandshake;

use super::params::{Side, provider, versions};
use super::secrets::{Resolved, SecretBound, SecretStore};
use super::stats::SslStats;
use super::transport::TlsTransport;
use super::verify::{ClientVerifier, subject_alt_names};
use crate::config::{DownstreamTlsConfig, SanType, TlsCertificate};

pub struct ServerTlsContext {
    source: DownstreamTlsConfig,
    /// The rustls configuration, with the secrets it names.
    pub config: SecretBound<ServerConfig>,
    pub stats: SslStats,
}

/// What a completed handshake tells about the peer.
#[derive(Debug, Default, Clone)]
pub struct PeerTls {
    /// The first URI SAN of the client's certificate (a SPIFFE ID in a mesh).
    pub uri_san: Option<Arc<str>>,
    /// The SNI the client sent.
    pub sni: Option<Arc<str>>,
    /// Whether the client presented a (verified) certificate.
    pub has_certificate: bool,
    /// The protocol ALPN negotiated.
    pub alpn: Option<Arc<str>>,
}

impl ServerTlsContext {
    pub fn new(
        source: DownstreamTlsConfig,
        secrets: &SecretStore,
        stats: SslStats,
    ) -> Result<Self, String> {
        let ctx = ServerTlsContext {
            config: SecretBound::new(source.common.clone()),
            source,
            stats,
        };
        ctx.refresh(secrets)?;
        Ok(ctx)
    }

    /// (Re)builds the rustls configuration from the source and the secrets; an
    /// error leaves the previous one in place.
    pub fn refresh(&self, secrets: &SecretStore) -> Result<(), String> {
        self.config.refresh(secrets, |resolved| {
            build(&self.source, resolved, &self.stats)
        })
    }

    /// Runs the server side of the handshake whose ClientHello `start` holds;
    /// the session and what it says of the peer, or None (counted) on failure.
    pub async fn handshake(
        &self,
        start: StartHandshake<TcpStream>,
        timeout: Option<Duration>,
    ) -> Option<(TlsTransport, PeerTls)> {
        let Some(config) = self.config.current() else {
            self.stats.connection_error.inc();
            return None;
        };
        let sni = start.client_hello().server_name().map(Arc::from);
        let accept = start.into_stream(config);
        let done = match timeout {
            Some(t) => match tokio::time::timeout(t, accept).await {
                Ok(r) => r,
                Err(_) => {
                    self.stats.connection_error.inc();
                    return None;
                }
            },
            None => accept.await,
        };
        let stream = match done {
            Ok(s) => s,
            Err(e) => {
                // As Envoy counts them: a missing required certificate only as
                // fail_verify_no_cert, a certificate the verifier refused only as
                // its fail_verify_* (counted there), anything else as an error.
                match rustls_error(&e) {
                    Some(rustls::Error::NoCertificatesPresented) => {
                        self.stats.fail_verify_no_cert.inc()
                    }
                    Some(rustls::Error::InvalidCertificate(_)) => {}
                    _ => self.stats.connection_error.inc(),
                }
                return None;
            }
        };
        let (tcp, conn) = stream.into_inner();
        let leaf = conn.peer_certificates().and_then(|c| c.first());
        let peer = PeerTls {
            uri_san: leaf.and_then(|c| {
                subject_alt_names(c)
                    .into_iter()
                    .find(|(kind, _)| *kind == SanType::Uri)
                    .map(|(_, v)| Arc::from(v))
            }),
            sni,
            has_certificate: leaf.is_some(),
            alpn: conn
                .alpn_protocol()
                .map(|p| Arc::from(String::from_utf8_lossy(p).as_ref())),
        };
        self.stats.handshake_done(&conn, peer.has_certificate);
        Some((TlsTransport::new(tcp, conn), peer))
    }
}

fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

fn build(
    source: &DownstreamTlsConfig,
    resolved: Resolved,
    stats: &SslStats,
) -> Result<ServerConfig, String> {
    let path = &source.path;
    let provider = provider(&source.common);
    let versions = versions(&source.common, Side::Server);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("{path}: {e}"))?;
    let builder = match resolved.validation {
        None => builder.with_no_client_auth(),
        Some(v) => {
            let chain = if v.trusted_ca.is_empty() {
                None
            } else {
                let mut roots = RootCertStore::empty();
                for ca in v.trusted_ca {
                    roots
                        .add(ca)
                        .map_err(|e| format!("{}.trusted_ca: {e}", v.path))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .with_crls(v.crls)
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| format!("{}: {e}", v.path))?;
                Some(verifier)
            };
            builder.with_client_cert_verifier(Arc::new(ClientVerifier {
                chain,
                sans: v.san_matchers,
                mandatory: source.require_client_certificate,
                algorithms: provider.signature_verification_algorithms,
                stats: stats.clone(),
            }))
        }
    };
    let keys = resolved
        .certificates
        .iter()
        .map(|c| certified_key(c, &provider))
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(format!("{path}: no certificate"));
    }
    let mut config = builder.with_cert_resolver(Arc::new(CertResolver { keys }));
    config.alpn_protocols = source
        .common
        .alpn
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    // BoringSSL as Envoy sets it up: the server's suite order wins.
    config.ignore_client_order = true;
    if source.disable_session_cache {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    if !source.disable_tickets {
        config.ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|e| format!("{path}: {e}"))?;
    } else {
        config.send_tls13_tickets = 0;
    }
    Ok(config)
}

/// A certificate with its signing key, and the DNS names it is for.
fn certified_key(
    c: &TlsCertificate,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(Arc<CertifiedKey>, Vec<String>), String> {
    let key = provider
        .key_provider
        .load_private_key(c.key.clone_key())
        .map_err(|e| format!("{}.private_key: {e}", c.path))?;
    let ck = CertifiedKey::new(c.chain.clone(), key);
    ck.keys_match().map_err(|e| {
        format!(
            "{}: the private key does not match the certificate ({e})",
            c.path
        )
    })?;
    let names = c
        .chain
        .first()
        .map(|leaf| {
            subject_alt_names(leaf)
                .into_iter()
                .filter(|(kind, _)| *kind == SanType::Dns)
                .map(|(_, n)| n.to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    Ok((Arc::new(ck), names))
}

/// Chooses the certificate for a ClientHello as Envoy does: among those whose key
/// the client can verify (by its signature algorithms), the first valid for the
/// SNI, else the first at all.
#[derive(Debug)]
struct CertResolver {
    keys: Vec<(Arc<CertifiedKey>, Vec<String>)>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let schemes = hello.signature_schemes();
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        // Envoy (BoringSSL) serves an ECDSA certificate to a client that can take
        // one, whatever the order of the certificates; a name match comes first.
        let rank = |k: &CertifiedKey, names: &[String]| {
            let name_ok = sni
                .as_deref()
                .is_some_and(|sni| names.iter().any(|n| dns_name_matches(n, sni)));
            let ecdsa = k.key.algorithm() != rustls::SignatureAlgorithm::RSA;
            (name_ok, ecdsa)
        };
        self.keys
            .iter()
            .filter(|(k, _)| k.key.choose_scheme(schemes).is_some())
            .enumerate()
            // max_by_key keeps the last of equals: rank earlier certificates higher.
            .max_by_key(|(i, (k, names))| (rank(k, names), std::cmp::Reverse(*i)))
            .map(|(_, (k, _))| k)
            .or_else(|| self.keys.first().map(|(k, _)| k))
            .cloned()
    }
}

/// A certificate's DNS name (`*.example.com` covers one label) against an SNI.
fn dns_name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::dns_name_matches;

    #[test]
    fn wildcard_names_cover_one_label() {
        assert!(dns_name_matches("*.example.com", "a.example.com"));
        assert!(!dns_name_matches("*.example.com", "a.b.example.com"));
        assert!(!dns_name_matches("*.example.com", "example.com"));
        assert!(dns_name_matches("example.com", "example.com"));
    }
}
