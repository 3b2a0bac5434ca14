//! Envoy's `ssl.*` stats of a TLS context: `listener.<address>.ssl.*` for a
//! listener's contexts, `cluster.<name>.ssl.*` for a cluster's.

use std::sync::Arc;

use rustls::CommonState;

use super::params::{curve_name, suite_name, version_name};
use crate::stats::{Counter, StatStore};

#[derive(Clone)]
pub struct SslStats {
    /// `<prefix>ssl.` — per-version, cipher and curve counters are made on first use.
    prefix: String,
    store: Arc<StatStore>,
    pub handshake: Counter,
    pub connection_error: Counter,
    pub session_reused: Counter,
    pub no_certificate: Counter,
    pub fail_verify_no_cert: Counter,
    pub fail_verify_error: Counter,
    pub fail_verify_san: Counter,
    /// `<prefix><server|client>_ssl_socket_factory.ssl_context_update_by_sds`.
    pub context_update_by_sds: Counter,
}

impl SslStats {
    /// `prefix` ends with a dot (`listener.127.0.0.1_443.`); `factory` is
    /// `server` or `client` (Envoy's socket factory stats).
    pub fn new(store: &Arc<StatStore>, owner: &str, factory: &str) -> Self {
        let context_update_by_sds = store.counter(&format!(
            "{owner}{factory}_ssl_socket_factory.ssl_context_update_by_sds"
        ));
        let prefix = format!("{owner}ssl.");
        let c = |name: &str| store.counter(&format!("{prefix}{name}"));
        SslStats {
            handshake: c("handshake"),
            connection_error: c("connection_error"),
            session_reused: c("session_reused"),
            no_certificate: c("no_certificate"),
            fail_verify_no_cert: c("fail_verify_no_cert"),
            fail_verify_error: c("fail_verify_error"),
            fail_verify_san: c("fail_verify_san"),
            context_update_by_sds,
            store: store.clone(),
            prefix,
        }
    }

    /// A completed handshake: its version, cipher and curve (Envoy counts each),
    /// and whether it resumed a session.
    pub fn handshake_done(&self, state: &CommonState, peer_has_cert: bool) {
        self.handshake.inc();
        if state.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.session_reused.inc();
        }
        if !peer_has_cert {
            self.no_certificate.inc();
        }
        let extra = |kind: &str, name: Option<&str>| {
            if let Some(name) = name {
                self.store
                    .counter(&format!("{}{kind}.{name}", self.prefix))
                    .inc();
            }
        };
        extra("versions", state.protocol_version().and_then(version_name));
        extra(
            "ciphers",
            state
                .negotiated_cipher_suite()
                .and_then(|s| suite_name(s.suite())),
        );
        extra(
            "curves",
            state
                .negotiated_key_exchange_group()
                .and_then(|g| curve_name(g.name())),
        );
    }
}
