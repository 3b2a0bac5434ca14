//! `envoy.filters.network.tcp_proxy`: bytes both ways, half-close preserved.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::access_log::{AccessLogOptions, AccessLogger, LogRecord};
use crate::config::TcpProxyConfig;
use crate::stats::{Counter, Gauge, StatStore};
use crate::upstream::{ClusterManager, WorkerPools};

/// `tcp.<stat_prefix>.*` with Envoy's meanings.
#[derive(Debug)]
pub struct TcpProxyStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_no_route: Counter,
    pub downstream_cx_rx_bytes_total: Counter,
    pub downstream_cx_tx_bytes_total: Counter,
    pub upstream_flush_total: Counter,
    pub upstream_flush_active: Gauge,
}

pub struct TcpProxy {
    cluster: Arc<str>,
    clusters: Arc<ClusterManager>,
    stats: TcpProxyStats,
    access_logs: Vec<Arc<AccessLogger>>,
}

impl TcpProxy {
    pub fn new(
        config: TcpProxyConfig,
        clusters: Arc<ClusterManager>,
        store: &StatStore,
        log_options: AccessLogOptions,
    ) -> std::io::Result<Arc<Self>> {
        let p = &config.stat_prefix;
        let c = |s: &str| store.counter(&format!("tcp.{p}.{s}"));
        let stats = TcpProxyStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_no_route: c("downstream_cx_no_route"),
            downstream_cx_rx_bytes_total: c("downstream_cx_rx_bytes_total"),
            downstream_cx_tx_bytes_total: c("downstream_cx_tx_bytes_total"),
            upstream_flush_total: c("upstream_flush_total"),
            upstream_flush_active: store.gauge(&format!("tcp.{p}.upstream_flush_active")),
        };
        let access_logs = config
            .access_logs
            .iter()
            .map(|c| {
                let grpc = crate::access_log::GrpcLogContext {
                    clusters: &clusters,
                    store,
                };
                AccessLogger::open(c, log_options, Some(grpc))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Arc::new(TcpProxy {
            cluster: config.cluster.as_str().into(),
            clusters,
            stats,
            access_logs,
        }))
    }

    /// Proxies one downstream connection until both directions have closed.
    /// `prefix`: bytes a listener filter already read, sent upstream first.
    #[allow(clippy::too_many_arguments)]
    pub async fn serve<D>(
        self: Arc<Self>,
        pools: Rc<WorkerPools>,
        mut downstream: D,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        // Whether `local` is the original destination the `original_dst`
        // listener filter restored (an ORIGINAL_DST cluster's host).
        local_restored: bool,
        prefix: Vec<u8>,
        mut drain: watch::Receiver<bool>,
    ) where
        D: AsyncRead + AsyncWrite + Unpin,
    {
        self.stats.downstream_cx_total.inc();
        let started = Instant::now();
        let start_time = SystemTime::now();
        let mut record = LogRecord {
            start: Some(start_time),
            downstream_remote: Some(peer),
            downstream_local: local,
            response_flags: "-",
            protocol: "-",
            upstream_cluster: Some(self.cluster.clone()),
            ..Default::default()
        };
        let Some(cluster) = self.clusters.get(&self.cluster) else {
            self.stats.downstream_cx_no_route.inc();
            record.response_flags = "NR";
            self.log(record, started);
            return;
        };
        cluster.record_in(&mut record);
        let context = crate::upstream::lb::LbContext {
            restored_local_address: local.filter(|_| local_restored),
            ..Default::default()
        };
        let Some(host) = pools.choose_host(&cluster, &context) else {
            cluster.stats.upstream_cx_none_healthy.inc();
            record.response_flags = "UH";
            self.log(record, started);
            return;
        };
        host.record_in(&mut record);
        let stats = &cluster.stats;
        // The connection is the whole transaction for outlier detection, as in
        // Envoy's TCP proxy (connect failure / "connect success final").
        use crate::upstream::outlier::{LocalOriginEvent, put_result};
        let mut upstream = match crate::upstream::connect(&cluster, host.shared(), None).await {
            Ok(s) => {
                put_result(
                    &cluster,
                    host.shared(),
                    LocalOriginEvent::ConnectSuccessFinal,
                );
                s
            }
            Err(_) => {
                put_result(&cluster, host.shared(), LocalOriginEvent::ConnectFailed);
                record.response_flags = "UF";
                self.log(record, started);
                return;
            }
        };
        if !prefix.is_empty() && upstream.write_all(&prefix).await.is_err() {
            record.response_flags = "UF";
            self.log(record, started);
            return;
        }
        stats.upstream_cx_active.inc();
        host.stats.cx_active().inc();
        // copy_bidirectional shuts down each write side when the other read side
        // ends, which is exactly TCP half-close.
        let copied = tokio::select! {
            r = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => r.ok(),
            _ = drain.wait_for(|d| *d) => {
                let _ = downstream.shutdown().await;
                None
            }
        };
        let (rx, tx) = copied.unwrap_or((0, 0));
        let rx = rx + prefix.len() as u64;
        self.stats.downstream_cx_rx_bytes_total.add(rx);
        self.stats.downstream_cx_tx_bytes_total.add(tx);
        stats.upstream_cx_tx_bytes_total.add(rx);
        stats.upstream_cx_rx_bytes_total.add(tx);
        stats.upstream_cx_active.dec();
        stats.upstream_cx_destroy.inc();
        host.stats.cx_active().dec();
        record.bytes_received = rx;
        record.bytes_sent = tx;
        self.log(record, started);
    }

    fn log(&self, mut record: LogRecord, started: Instant) {
        if self.access_logs.is_empty() {
            return;
        }
        record.duration = started.elapsed();
        for logger in &self.access_logs {
            logger.log(&record);
        }
    }
}
