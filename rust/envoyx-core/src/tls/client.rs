//! A cluster's TLS context (Envoy's `ClientContextImpl`): the rustls client
//! configuration built from an `UpstreamTlsContext`, and the handshake of an
//! upstream connection through tokio-rustls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::params::{Side, provider, versions};
use super::secrets::{Resolved, SecretBound, SecretStore};
use super::stats::SslStats;
use super::verify::ServerVerifier;
use crate::config::{SanType, UpstreamTlsConfig};

pub struct ClientTlsContext {
    source: UpstreamTlsConfig,
    /// ALPN offered when the context names none: from the cluster's protocol.
    default_alpn: Vec<Vec<u8>>,
    /// `sni`, made once: requests share it rather than allocate their own.
    fixed_sni: Option<Arc<str>>,
    /// The rustls configuration, with the secrets it names.
    pub config: SecretBound<ClientConfig>,
    pub stats: SslStats,
}

impl ClientTlsContext {
    pub fn new(
        source: UpstreamTlsConfig,
        default_alpn: Vec<Vec<u8>>,
        secrets: &SecretStore,
        stats: SslStats,
    ) -> Result<Self, String> {
        let ctx = ClientTlsContext {
            config: SecretBound::new(source.common.clone()),
            fixed_sni: source.sni.as_deref().map(Arc::from),
            source,
            default_alpn,
            stats,
        };
        ctx.refresh(secrets)?;
        Ok(ctx)
    }

    pub fn refresh(&self, secrets: &SecretStore) -> Result<(), String> {
        self.config.refresh(secrets, |resolved| {
            build(&self.source, &self.default_alpn, resolved, &self.stats)
        })
    }

    /// The SNI a request's connection is made with: `sni`, or with `auto_sni` the
    /// request's host without its port. Connections are pooled by it.
    pub fn sni_for(&self, authority: Option<&str>) -> Option<Arc<str>> {
        if self.source.auto_sni
            && let Some(host) = authority.map(strip_port).filter(|h| !h.is_empty())
        {
            return Some(Arc::from(host));
        }
        self.fixed_sni.clone()
    }

    /// The client handshake on a connected socket; the error text is Envoy's
    /// transport failure reason.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        sni: Option<&str>,
        peer: SocketAddr,
    ) -> Result<TlsStream<TcpStream>, String> {
        let Some(config) = self.config.current() else {
            self.stats.connection_error.inc();
            return Err("TLS context not ready: its SDS secret has not arrived".into());
        };
        // Without a name rustls sends no SNI for an IP address, which is what
        // Envoy sends (none) when neither sni nor auto_sni is set.
        let name = sni
            .and_then(|s| ServerName::try_from(s.to_string()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(peer.ip().into()));
        match tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
        {
            Ok(s) => {
                let (_, conn) = s.get_ref();
                self.stats.handshake_done(conn, true);
                Ok(s)
            }
            Err(e) => {
                // A certificate the verifier refused is counted there.
                let refused = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
                if !refused {
                    self.stats.connection_error.inc();
                }
                Err(format!("TLS_error:|{}:TLS_error_end", failure_text(&e)))
            }
        }
    }
}

/// BoringSSL's words for the common failures (Envoy's transport failure reason
/// carries them), then rustls' own.
fn failure_text(e: &std::io::Error) -> String {
    use rustls::{AlertDescription, Error};
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<Error>());
    match inner {
        Some(Error::InvalidCertificate(_)) => format!("CERTIFICATE_VERIFY_FAILED ({e})"),
        Some(Error::AlertReceived(AlertDescription::HandshakeFailure)) => {
            format!("HANDSHAKE_FAILURE ({e})")
        }
        _ => e.to_string(),
    }
}

/// `host[:port]` or `[v6]:port` without the port.
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(authority, |(h, _)| h);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

fn build(
    source: &UpstreamTlsConfig,
    default_alpn: &[Vec<u8>],
    resolved: Resolved,
    stats: &SslStats,
) -> Result<ClientConfig, String> {
    let path = &source.path;
    let provider = provider(&source.common);
    let versions = versions(&source.common, Side::Client);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("{path}: {e}"))?;
    let mut spiffe = None;
    let (roots, sans) = match resolved.validation {
        Some(v) => {
            if !v.crls.is_empty() {
                return Err(format!(
                    "{}.crl: not supported by envoyx on upstream connections",
                    v.path
                ));
            }
            let mut sans = v.san_matchers;
            if let Some(s) = v.spiffe {
                // Envoy's SPIFFE validator: only URI SAN matchers apply.
                sans.retain(|m| m.kind == SanType::Uri);
                let mut domains = HashMap::new();
                for d in s.trust_domains {
                    if !d.crls.is_empty() {
                        return Err(format!(
                            "{}: trust domain {}: CRLs in a trust bundle are not supported by \
                             envoyx on upstream connections",
                            v.path, d.name
                        ));
                    }
                    let roots = root_store(d.cas)
                        .map_err(|e| format!("{}: trust domain {}: {e}", v.path, d.name))?;
                    domains.insert(d.name, roots);
                }
                spiffe = Some(domains);
            }
            let roots = if v.trusted_ca.is_empty() {
                None
            } else {
                Some(root_store(v.trusted_ca).map_err(|e| format!("{}.trusted_ca: {e}", v.path))?)
            };
            (roots, sans)
        }
        None => (None, Vec::new()),
    };
    let verifier = Arc::new(ServerVerifier {
        roots,
        spiffe,
        sans,
        check_name: source.auto_san_validation,
        algorithms: provider.signature_verification_algorithms,
        stats: stats.clone(),
    });
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match resolved.certificates.first() {
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
            .map_err(|e| format!("{}: {e}", c.path))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = if source.common.alpn.is_empty() {
        default_alpn.to_vec()
    } else {
        source
            .common
            .alpn
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect()
    };
    config.enable_sni = source.sni.is_some() || source.auto_sni;
    Ok(config)
}

fn root_store(cas: Vec<CertificateDer<'static>>) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| e.to_string())?;
    }
    Ok(Arc::new(roots))
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn authority_without_port() {
        assert_eq!(strip_port("a.example:8443"), "a.example");
        assert_eq!(strip_port("a.example"), "a.example");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
    }
}
