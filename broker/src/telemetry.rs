//! Logs, metrics endpoint and the shutdown signal shared by both binaries.
//!
//! Each binary serves `GET /metrics` (Prometheus text), `GET /healthz` (the
//! process is alive) and `GET /readyz` (connected; for the replicator: holding
//! the slot) on its `metrics_listen` address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the `tracing` subscriber: `RUST_LOG` filters (default `info`),
/// text or JSON lines on stderr. Text has colour codes only when stderr is a
/// terminal, so log files and journald stay plain.
pub fn init_logging(format: LogFormat) {
    init_logging_with_default(format, "info");
}

/// [`init_logging`] with another filter when `RUST_LOG` is unset, e.g. `warn`
/// for one-shot commands (`status`, `verify`) whose output is the answer.
pub fn init_logging_with_default(format: LogFormat, default_directive: &str) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_directive));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Installs the global Prometheus recorder, every series labelled
/// `source="<source>"` (one process serves one source; several sources'
/// series stay apart in one Prometheus); returns the handle that renders it.
pub fn install_metrics(
    source: &str,
) -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let recorder = PrometheusBuilder::new()
        .add_global_label("source", source)
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 100.0,
            1000.0, 10_000.0, 100_000.0,
        ])?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(metrics_exporter_prometheus::BuildError::FailedToSetGlobalRecorder)?;
    Ok(handle)
}

/// Readiness flag flipped by the binary's main task.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Binds `listen` (failing fast with the address in the error) and serves the
/// endpoints until `shutdown` is cancelled.
pub async fn serve_metrics(
    listen: SocketAddr,
    handle: PrometheusHandle,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route(
            "/readyz",
            get(move || {
                let ready = readiness.get();
                std::future::ready(if ready {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                })
            }),
        );
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "metrics endpoint failed");
        }
    }))
}

/// A token cancelled on SIGINT or SIGTERM: the one shutdown signal every task
/// watches. The returned task ends once the token is cancelled (by a signal or
/// by the caller); join it on the way out.
pub fn shutdown_on_signals() -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = CancellationToken::new();
    let trigger = token.clone();
    let watcher = tokio::spawn(async move {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        let sigterm = async {
            match term {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops gracefully");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = sigterm => tracing::info!("SIGTERM: shutting down"),
            _ = trigger.cancelled() => return,
        }
        trigger.cancel();
    });
    (token, watcher)
}
