//! Telemetry: metric names and the events that move them (one function per event, so each metric is
//! named in exactly one place), and the HTTP endpoint serving /metrics, /healthz and /readyz.

pub mod http;

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Latency buckets (seconds) for the per-model prediction histogram.
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .expect("static bucket list is not empty")
                .install_recorder()
                .expect("the metrics recorder is installed once")
        })
        .clone()
}

/// A request was published to a model's input topic.
pub fn routed(deployment: &str, model: &str, role: &'static str) {
    counter!("switchyard_requests_routed_total", "deployment" => deployment.to_string(), "model" => model.to_string(), "role" => role)
        .increment(1);
}

/// A record went to the dead-letter topic.
pub fn dead_lettered(reason: &'static str) {
    counter!("switchyard_dead_letters_total", "reason" => reason).increment(1);
}

/// A decision was published.
pub fn decided(deployment: &str, model: &str, cohort: &str, status: &'static str) {
    counter!("switchyard_decisions_total", "deployment" => deployment.to_string(), "model" => model.to_string(),
        "cohort" => cohort.to_string(), "status" => status)
    .increment(1);
}

/// A model answered, `seconds` after the request was routed.
pub fn prediction_latency(model: &str, seconds: f64) {
    histogram!("switchyard_prediction_latency_seconds", "model" => model.to_string()).record(seconds);
}

/// A shadow answer was compared with the served one.
pub fn shadow_compared(deployment: &str, shadow_model: &str, agreed: bool) {
    counter!("switchyard_shadow_comparisons_total", "deployment" => deployment.to_string(),
        "shadow_model" => shadow_model.to_string(), "agreed" => if agreed { "true" } else { "false" })
    .increment(1);
}

/// A shadow model did not answer before the deadline.
pub fn shadow_missing(deployment: &str, shadow_model: &str) {
    counter!("switchyard_shadow_missing_total", "deployment" => deployment.to_string(), "shadow_model" => shadow_model.to_string())
        .increment(1);
}

/// A prediction arrived for a request already decided or unknown; it is counted, never served.
pub fn prediction_discarded(model: &str, reason: &'static str) {
    counter!("switchyard_predictions_discarded_total", "model" => model.to_string(), "reason" => reason).increment(1);
}

/// Requests waiting for their serving model (merge's join state).
pub fn pending(count: usize) {
    gauge!("switchyard_pending_requests").set(count as f64);
}

/// A deployment record was put in force.
pub fn config_applied(deployment: &str, version: u64) {
    gauge!("switchyard_config_version", "deployment" => deployment.to_string()).set(version as f64);
}

/// A deployment was deleted by a tombstone.
pub fn config_deleted(deployment: &str) {
    gauge!("switchyard_config_version", "deployment" => deployment.to_string()).set(0.0);
}

/// A deployment record was rejected; the last good config stays in force.
pub fn config_rejected(deployment: &str) {
    counter!("switchyard_config_rejected_total", "deployment" => deployment.to_string()).increment(1);
}

/// Consumer lag of one input partition.
pub fn consumer_lag(topic: &str, partition: i32, lag: i64) {
    gauge!("switchyard_consumer_lag_records", "topic" => topic.to_string(), "partition" => partition.to_string())
        .set(lag as f64);
}
