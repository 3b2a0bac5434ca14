//! One accepted connection, from the listener's side (Envoy's
//! `ActiveTcpListener` / `ActiveTcpSocket`): the listener filters, the choice of a
//! filter chain, the chain's transport socket (TLS handshake or plaintext), then
//! the chain's network filter.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::StartHandshake;

use super::filter_chain::{ChainFilter, ConnectionFacts, FilterChain};
use super::inspect::{self, Inspected};
use super::{Listener, ListenerConnectionStats, ListenersByAddress};
use crate::tls::server::HandshakeFailure;
use crate::tls::{PeerTls, ServerTlsContext, TlsTransport};
use crate::upstream::WorkerPools;

pub type Served<H> = Either<H, Pin<Box<dyn Future<Output = ()>>>>;

/// The future that serves one accepted connection, and the drain signal whose
/// firing gives it `drain_time` to finish. A listener with one plaintext HTTP
/// chain and no listener filters (the common case) serves it directly, in an
/// unboxed future, and follows its chain's signal; every other takes the general
/// path, which follows the listener's signal until a chain is chosen and then
/// that chain's (inside: the returned signal never fires).
pub fn serve_connection(
    listener: &Arc<Listener>,
    listeners: &Arc<ListenersByAddress>,
    pools: Rc<WorkerPools>,
    stream: TcpStream,
    peer: SocketAddr,
    drain_time: Duration,
) -> (
    Served<impl Future<Output = ()> + 'static>,
    watch::Receiver<bool>,
) {
    if listener.listener_filters.is_empty()
        && let Some(chain) = listener.chains.single()
        && chain.tls.is_none()
        && let ChainFilter::Http(hcm) = &chain.filter
    {
        let drain = chain.drain.subscribe();
        let served = crate::http::serve_tcp(
            hcm.clone(),
            pools,
            stream,
            peer,
            None,
            Vec::new(),
            drain.clone(),
        );
        return (Either::Left(served), drain);
    }
    let hand_off = listener
        .hand_off_restored_destination
        .then(|| listeners.clone());
    let served = serve_general(listener.clone(), hand_off, pools, stream, peer, drain_time);
    (Either::Right(Box::pin(served)), NEVER.subscribe())
}

/// A drain signal that never fires (a receiver of a dropped sender would).
static NEVER: std::sync::LazyLock<watch::Sender<bool>> =
    std::sync::LazyLock::new(|| watch::channel(false).0);

/// Waits for `signal`, then for the drain time.
async fn drained(mut signal: watch::Receiver<bool>, drain_time: Duration) {
    let _ = signal.wait_for(|d| *d).await;
    tokio::time::sleep(drain_time).await;
}

/// `hand_off`: the listeners by address, when `listener` has `use_original_dst`.
async fn serve_general(
    listener: Arc<Listener>,
    hand_off: Option<Arc<ListenersByAddress>>,
    pools: Rc<WorkerPools>,
    stream: TcpStream,
    peer: SocketAddr,
    drain_time: Duration,
) {
    let Ok(accepted_on) = stream.local_addr() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let mut inspected = Inspected::default();
    let mut listener = listener;
    if !filters_until_drained(&listener, &stream, accepted_on, &mut inspected, drain_time).await {
        return;
    }
    // Envoy's `ActiveTcpSocket::newConnection`: a connection whose original
    // destination was restored goes to the listener on that address (a
    // `bind_to_port: false` one, typically), which runs its own listener filters
    // and chooses among its own chains; with none there, this listener's serve.
    if let Some(target) = hand_off
        .as_ref()
        .zip(inspected.original_dst)
        .and_then(|(listeners, original)| listeners.find(original))
    {
        listener = target;
        if !filters_until_drained(&listener, &stream, accepted_on, &mut inspected, drain_time).await
        {
            return;
        }
    }
    // Envoy's `restoreLocalAddress`: chains match on, and the connection reports,
    // the original destination.
    let local = inspected.original_dst.unwrap_or(accepted_on);
    let facts = ConnectionFacts {
        local,
        remote: peer,
        server_name: inspected.server_name.as_deref(),
        transport_protocol: inspected.transport_protocol(),
        application_protocols: &inspected.application_protocols,
    };
    let Some(chain) = listener.chains.select(&facts).cloned() else {
        listener.stats.no_filter_chain_match.inc();
        return;
    };
    // A connection a hand-off listener accepted counts on the listener that
    // serves it (the others counted when accepted).
    let _stats = hand_off
        .is_some()
        .then(|| ListenerConnectionStats::open(&listener));
    // From here the chain's drain signal rules: it gets the drain time too.
    tokio::select! {
        _ = serve_on_chain(&listener, &chain, pools, stream, peer, local, inspected) => {}
        _ = drained(chain.drain.subscribe(), drain_time) => {}
    }
}

/// [`run_listener_filters`], cut short (false) when the listener drains.
async fn filters_until_drained(
    listener: &Listener,
    stream: &TcpStream,
    accepted_on: SocketAddr,
    inspected: &mut Inspected,
    drain_time: Duration,
) -> bool {
    tokio::select! {
        go_on = run_listener_filters(listener, stream, accepted_on, inspected) => go_on,
        _ = drained(listener.drain.subscribe(), drain_time) => false,
    }
}

/// Runs `listener`'s listener filters; false when the connection is to close
/// (the peer left, or they timed out without `continue_on_listener_filters_timeout`).
async fn run_listener_filters(
    listener: &Listener,
    stream: &TcpStream,
    accepted_on: SocketAddr,
    inspected: &mut Inspected,
) -> bool {
    if listener.listener_filters.is_empty() {
        return true;
    }
    // Boxed: its state is needed only until a chain is chosen.
    let run = Box::pin(inspect::run(
        stream,
        accepted_on,
        &listener.listener_filters,
        &listener.inspector_stats,
        inspected,
    ));
    let outcome = match listener.listener_filters_timeout {
        Some(t) => tokio::time::timeout(t, run).await.ok(),
        None => Some(run.await),
    };
    match outcome {
        Some(Ok(())) => true,
        Some(Err(_)) => false,
        None => {
            listener.stats.downstream_pre_cx_timeout.inc();
            listener.continue_on_listener_filters_timeout
        }
    }
}
/// The chain's transport socket, then its network filter.
async fn serve_on_chain(
    listener: &Listener,
    chain: &Arc<FilterChain>,
    pools: Rc<WorkerPools>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    inspected: Inspected,
) {
    let drain = chain.drain.subscribe();
    let Some(tls) = &chain.tls else {
        match &chain.filter {
            ChainFilter::Http(hcm) => {
                crate::http::serve_tcp(
                    hcm.clone(),
                    pools,
                    stream,
                    peer,
                    inspected.original_dst,
                    inspected.prefix,
                    drain,
                )
                .await
            }
            ChainFilter::Tcp(tcp) => {
                tcp.clone()
                    .serve(
                        pools,
                        stream,
                        peer,
                        Some(local),
                        inspected.original_dst.is_some(),
                        inspected.prefix,
                        drain,
                    )
                    .await
            }
        }
        return;
    };
    // Boxed, and `inspected` dropped with it: the handshake's state (rustls'
    // handshake, the ClientHello bytes) is freed once it is done instead of
    // staying in every TLS connection's task.
    let local_restored = inspected.original_dst.is_some();
    let Some((transport, peer_tls)) =
        Box::pin(establish_tls(listener, chain, tls, stream, inspected)).await
    else {
        return;
    };
    match &chain.filter {
        ChainFilter::Http(hcm) => {
            crate::http::serve_tls(hcm.clone(), pools, transport, peer, peer_tls, drain).await
        }
        ChainFilter::Tcp(tcp) => {
            tcp.clone()
                .serve(
                    pools,
                    transport,
                    peer,
                    Some(local),
                    local_restored,
                    Vec::new(),
                    drain,
                )
                .await
        }
    }
}

/// The TLS handshake of a chain's connection, from the ClientHello the tls_inspector
/// read (or read now); None, counted, when it fails or times out.
async fn establish_tls(
    listener: &Listener,
    chain: &FilterChain,
    tls: &ServerTlsContext,
    stream: TcpStream,
    mut inspected: Inspected,
) -> Option<(TlsTransport, PeerTls)> {
    let timed_out = || {
        listener
            .stats
            .downstream_cx_transport_socket_connect_timeout
            .inc();
    };
    if inspected.client_hello.is_none() {
        let read = inspect::read_client_hello(&stream, None, &mut inspected);
        let read = match chain.handshake_timeout {
            Some(t) => tokio::time::timeout(t, read).await.ok(),
            None => Some(read.await),
        };
        match read {
            None => {
                timed_out();
                return None;
            }
            Some(Ok(())) if inspected.client_hello.is_some() => {}
            _ => {
                tls.stats.connection_error.inc();
                return None;
            }
        }
    }
    let accepted = inspected.client_hello.take()?;
    let start = StartHandshake::from_parts(accepted, stream);
    let (transport, mut peer_tls) = match tls.handshake(start, chain.handshake_timeout).await {
        Ok(done) => done,
        Err(HandshakeFailure::TimedOut) => {
            timed_out();
            return None;
        }
        Err(HandshakeFailure::Failed) => return None,
    };
    if listener
        .listener_filters
        .iter()
        .any(|f| f.kind == crate::config::ListenerFilterKind::TlsInspector)
    {
        peer_tls.requested_server_name = inspected.server_name.as_deref().map(Arc::from);
    }
    Some((transport, peer_tls))
}
