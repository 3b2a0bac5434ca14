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

use super::Listener;
use super::filter_chain::{ChainFilter, ConnectionFacts, FilterChain};
use super::inspect::{self, Inspected};
use crate::tls::server::HandshakeFailure;
use crate::tls::{PeerTls, ServerTlsContext, TlsTransport};
use crate::upstream::WorkerPools;

pub type Served<H> = Either<H, Pin<Box<dyn Future<Output = ()>>>>;

/// The future that serves one accepted connection, and the drain signal whose
/// firing gives it `drain_time` to finish. A listener with one plaintext HTTP
/// chain and no listener filters (the common case) serves it directly, in an
/// unboxed future, and follows its chain's signal; every other takes the general
/// path, which follows the listener's signal until a chain is chosen and then
/// that chain's.
pub fn serve_connection(
    listener: &Arc<Listener>,
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
    let served = serve_general(listener.clone(), pools, stream, peer, drain_time);
    (Either::Right(Box::pin(served)), listener.drain.subscribe())
}

async fn serve_general(
    listener: Arc<Listener>,
    pools: Rc<WorkerPools>,
    stream: TcpStream,
    peer: SocketAddr,
    drain_time: Duration,
) {
    let Ok(mut local) = stream.local_addr() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let mut inspected = Inspected::default();
    if !listener.listener_filters.is_empty() {
        // Boxed: its state is needed only until a chain is chosen.
        let run = Box::pin(inspect::run(
            &stream,
            &listener.listener_filters,
            &listener.inspector_stats,
            &mut inspected,
        ));
        let outcome = match listener.listener_filters_timeout {
            Some(t) => tokio::time::timeout(t, run).await.ok(),
            None => Some(run.await),
        };
        match outcome {
            Some(Ok(())) => {}
            Some(Err(_)) => return,
            None => {
                listener.stats.downstream_pre_cx_timeout.inc();
                if !listener.continue_on_listener_filters_timeout {
                    return;
                }
            }
        }
    }
    // Envoy's `restoreLocalAddress`: chains match on, and the connection reports,
    // the original destination.
    if let Some(original) = inspected.original_dst {
        local = original;
    }
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
    // From here the chain's drain signal rules: it gets the drain time too.
    let mut deadline = chain.drain.subscribe();
    let drained = async move {
        let _ = deadline.wait_for(|d| *d).await;
        tokio::time::sleep(drain_time).await;
    };
    tokio::select! {
        _ = serve_on_chain(&listener, &chain, pools, stream, peer, local, inspected) => {}
        _ = drained => {}
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
        .contains(&crate::config::ListenerFilterKind::TlsInspector)
    {
        peer_tls.requested_server_name = inspected.server_name.as_deref().map(Arc::from);
    }
    Some((transport, peer_tls))
}
