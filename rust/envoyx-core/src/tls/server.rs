//! A listener filter chain's TLS context (Envoy's `ServerContextImpl`): the rustls
//! configuration built from a `DownstreamTlsContext`, rebuilt when one of its SDS
//! secrets changes, and the handshake of a downstream connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::StartHandshake;

use super::params::{Side, provider, suite_name, version_name, versions};
use super::peer::PeerTls;
use super::secrets::{Resolved, SecretBound, SecretStore};
use super::stats::SslStats;
use super::transport::TlsTransport;
use super::verify::{ClientChain, ClientVerifier, subject_alt_names};
use crate::config::{DownstreamTlsConfig, SanType, TlsCertificate};

pub struct ServerTlsContext {
    source: DownstreamTlsConfig,
    /// The rustls configuration, with the secrets it names.
    pub config: SecretBound<Built>,
    pub stats: SslStats,
}

/// Why a handshake did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// `transport_socket_connect_timeout` passed.
    TimedOut,
    /// Counted in `ssl.*` already.
    Failed,
}

/// A built configuration and its certificates (to tell which one was served).
pub struct Built {
    config: Arc<ServerConfig>,
    resolver: Arc<CertResolver>,
    /// A presented client certificate has been checked (a chain against
    /// `trusted_ca` or SPIFFE bundles, or SAN matchers): Envoy's
    /// `peerCertificateValidated`.
    validates: bool,
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
    /// the session and what it says of the peer.
    pub async fn handshake(
        &self,
        start: StartHandshake<TcpStream>,
        timeout: Option<Duration>,
    ) -> Result<(TlsTransport, PeerTls), HandshakeFailure> {
        let Some(built) = self.config.current() else {
            self.stats.connection_error.inc();
            return Err(HandshakeFailure::Failed);
        };
        let sni = start.client_hello().server_name().map(Arc::from);
        let accept = start.into_stream(built.config.clone());
        let done = match timeout {
            Some(t) => match tokio::time::timeout(t, accept).await {
                Ok(r) => r,
                // Counted by the listener (downstream_cx_transport_socket_connect_timeout).
                Err(_) => return Err(HandshakeFailure::TimedOut),
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
                return Err(HandshakeFailure::Failed);
            }
        };
        let (tcp, conn) = stream.into_inner();
        let peer_chain = conn
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        self.stats.handshake_done(&conn, !peer_chain.is_empty());
        let presented = !peer_chain.is_empty();
        let mut peer = PeerTls::new(
            sni.clone(),
            conn.alpn_protocol()
                .map(|p| Arc::from(String::from_utf8_lossy(p).as_ref())),
            conn.protocol_version().and_then(version_name),
            conn.negotiated_cipher_suite()
                .and_then(|s| suite_name(s.suite())),
            peer_chain,
            built.resolver.served_leaf(sni.as_deref()),
        );
        // The verifier refuses a certificate it cannot validate: one that got
        // through was validated, when the context checks anything.
        peer.peer_validated = presented && built.validates;
        Ok((TlsTransport::new(tcp, conn), peer))
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
) -> Result<Built, String> {
    let path = &source.path;
    let provider = provider(&source.common);
    let versions = versions(&source.common, Side::Server);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("{path}: {e}"))?;
    let mut validates = false;
    let builder = match resolved.validation {
        None => builder.with_no_client_auth(),
        Some(v) => {
            let mut sans = v.san_matchers;
            let (chain, mandatory) = match v.spiffe {
                // Envoy's SPIFFE validator always asks for, and requires, a
                // client certificate; only its URI SAN matchers apply.
                Some(spiffe) => {
                    sans.retain(|m| m.kind == SanType::Uri);
                    let mut domains = HashMap::new();
                    let mut hints: Vec<rustls::DistinguishedName> = Vec::new();
                    for d in spiffe.trust_domains {
                        let verifier = webpki_client_verifier(d.cas, d.crls, &provider)
                            .map_err(|e| format!("{}: trust domain {}: {e}", v.path, d.name))?;
                        for h in verifier.root_hint_subjects() {
                            if !hints.iter().any(|k| k.as_ref() == h.as_ref()) {
                                hints.push(h.clone());
                            }
                        }
                        domains.insert(d.name, verifier);
                    }
                    (ClientChain::Spiffe { domains, hints }, true)
                }
                None if v.trusted_ca.is_empty() => {
                    (ClientChain::Unchecked, source.require_client_certificate)
                }
                None => {
                    let verifier = webpki_client_verifier(v.trusted_ca, v.crls, &provider)
                        .map_err(|e| format!("{}.trusted_ca: {e}", v.path))?;
                    (
                        ClientChain::WebPki(verifier),
                        source.require_client_certificate,
                    )
                }
            };
            validates = !matches!(chain, ClientChain::Unchecked) || !sans.is_empty();
            builder.with_client_cert_verifier(Arc::new(ClientVerifier {
                chain,
                sans,
                mandatory,
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
    let resolver = Arc::new(CertResolver { keys });
    let mut config = builder.with_cert_resolver(resolver.clone());
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
    Ok(Built {
        config: Arc::new(config),
        resolver,
        validates,
    })
}

/// webpki's check of a client certificate's chain against `cas` (and `crls`); a
/// missing certificate is left to [`ClientVerifier`].
fn webpki_client_verifier(
    cas: Vec<rustls::pki_types::CertificateDer<'static>>,
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| e.to_string())?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())?;
    Ok(verifier)
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

impl CertResolver {
    /// The leaf most likely served for an SNI (rustls does not say which it
    /// chose): the first valid for the name, else the first.
    fn served_leaf(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let sni = sni.map(str::to_ascii_lowercase);
        let by_name = self.keys.iter().find(|(_, names)| {
            sni.as_deref()
                .is_some_and(|s| names.iter().any(|n| dns_name_matches(n, s)))
        });
        by_name.or(self.keys.first()).map(|(k, _)| k.clone())
    }
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
