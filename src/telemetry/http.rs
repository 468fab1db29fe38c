//! A minimal HTTP/1.1 endpoint for /metrics, /healthz and /readyz. It answers GET requests only; a full
//! web framework would add build time and nothing this needs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// Readiness of this instance: set once the deployments topic has been read and the consumers run.
#[derive(Debug, Default, Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// A stage whose loop has not gone round for this long makes the instance not ready (/readyz 503): it
/// decides nothing meanwhile. The longest legitimate round — a transaction waiting out a broker's
/// failover, a restore — takes seconds to tens of seconds.
pub const NOT_READY_AFTER: Duration = Duration::from_secs(60);
/// ... and for this long, not live (/healthz 503): a supervisor (Kubernetes' liveness probe) restarts it.
pub const NOT_LIVE_AFTER: Duration = Duration::from_secs(180);

fn describe(stalled: &[(&str, Duration)]) -> String {
    let each: Vec<String> =
        stalled.iter().map(|(stage, since)| format!("{stage} ({} s without progress)", since.as_secs())).collect();
    format!("stalled: {}\n", each.join(", "))
}

/// Serves on `listener` until shutdown. The caller binds it, so that a taken port stops the service at start.
pub async fn serve(listener: TcpListener, metrics: PrometheusHandle, health: Health, mut shutdown: Shutdown) {
    loop {
        let (mut stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint accept failed");
                    continue;
                }
            },
            _ = shutdown.recv() => return,
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let unavailable = "503 Service Unavailable";
            let (status, content_type, body) = match path {
                "/metrics" => {
                    super::stalled_stages(NOT_READY_AFTER); // sets the stalled gauges
                    ("200 OK", "text/plain; version=0.0.4", metrics.render())
                }
                "/healthz" => match super::stalled_stages(NOT_LIVE_AFTER).as_slice() {
                    [] => ("200 OK", "text/plain", "ok\n".to_string()),
                    stalled => (unavailable, "text/plain", describe(stalled)),
                },
                "/readyz" if !health.is_ready() => (unavailable, "text/plain", "not ready\n".to_string()),
                "/readyz" => match super::stalled_stages(NOT_READY_AFTER).as_slice() {
                    [] => ("200 OK", "text/plain", "ready\n".to_string()),
                    stalled => (unavailable, "text/plain", describe(stalled)),
                },
                _ => ("404 Not Found", "text/plain", "try /metrics, /healthz or /readyz\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown::ShutdownTrigger;

    async fn get(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let metrics = crate::telemetry::install();
        crate::telemetry::record([crate::telemetry::Event::DeadLettered { kind: "undecodable" }]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let health = Health::default();
        let (trigger, shutdown) = ShutdownTrigger::new();
        let server = tokio::spawn(serve(listener, metrics, health.clone(), shutdown));
        assert!(get(address, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(address, "/readyz").await.starts_with("HTTP/1.1 503"));
        health.set_ready(true);
        assert!(get(address, "/readyz").await.starts_with("HTTP/1.1 200"));
        // A stage whose loop stopped going round long ago: not ready, then not live.
        crate::telemetry::stage_alive("test-stage");
        crate::telemetry::backdate_beat("test-stage", NOT_READY_AFTER + Duration::from_secs(5));
        let readyz = get(address, "/readyz").await;
        assert!(
            readyz.starts_with("HTTP/1.1 503") && readyz.contains("stalled: test-stage (65 s without progress)"),
            "{readyz}"
        );
        assert!(get(address, "/healthz").await.starts_with("HTTP/1.1 200"), "not yet for a restart");
        assert!(get(address, "/metrics").await.contains("switchyard_stage_stalled{stage=\"test-stage\"} 1"));
        crate::telemetry::backdate_beat("test-stage", NOT_LIVE_AFTER);
        assert!(get(address, "/healthz").await.starts_with("HTTP/1.1 503"));
        crate::telemetry::stage_alive("test-stage");
        assert!(get(address, "/readyz").await.starts_with("HTTP/1.1 200"), "going round again: ready again");
        assert!(get(address, "/healthz").await.starts_with("HTTP/1.1 200"));
        crate::telemetry::stage_stopped("test-stage");
        let body = get(address, "/metrics").await;
        assert!(body.contains("switchyard_dead_letters_total{reason=\"undecodable\"}"), "{body}");
        assert!(get(address, "/nope").await.starts_with("HTTP/1.1 404"));
        trigger.trigger();
        server.await.unwrap();
    }
}
