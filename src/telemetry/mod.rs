//! Telemetry: metric names and the events that move them (one function per event, so each metric is
//! named in exactly one place), and the HTTP endpoint serving /metrics, /healthz and /readyz.

pub(crate) mod http;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Latency buckets (seconds) of every histogram: predictions, hops, commits.
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

/// Something the data path did that counters count. Events are collected with a batch and recorded
/// only once its transaction has committed ([`record`]): a batch that is aborted and read again must
/// not count twice.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A request was published to a model's input topic.
    Routed { deployment: String, model: String, role: &'static str },
    /// merge dropped a routed record that repeats a request's routing (route wrote a batch again after a
    /// crash or rebalance); the first routing stands.
    RoutedCopyDropped,
    /// A request passed a hop of the data path, which began at `since` (its producer's `sent_at`): the
    /// histogram `switchyard_hop_seconds{hop}` takes the time from then to when the hop's records were
    /// durable — `route`: its model requests and routed record acknowledged; `end_to_end`: its decision
    /// committed. Measured against the producer's clock: a skew between hosts shifts it.
    Hop { hop: &'static str, since: i64 },
    /// A record went to the dead-letter topic.
    DeadLettered { kind: &'static str },
    /// A decision was published.
    Decided { deployment: String, model: String, cohort: String, status: &'static str },
    /// A model answered, `seconds` after the request was routed.
    PredictionLatency { model: String, seconds: f64 },
    /// A shadow answer was compared with the served one.
    ShadowCompared { deployment: String, shadow_model: String, agreed: bool },
    /// A shadow model did not answer before the deadline.
    ShadowMissing { deployment: String, shadow_model: String },
    /// A prediction arrived for a request already decided or unknown; it is counted, never served.
    PredictionDiscarded { model: String, reason: &'static str },
    /// A prediction arrived on a partition other than its key's (its worker does not use the murmur2
    /// partitioner) and was forwarded to the partition its request is joined on.
    PredictionForwarded { model: String },
    /// A labelled answer was scored.
    Scored(Box<crate::codec::ScoredOutcome>),
    /// A decision's window ended without a label (or it was dropped to bound memory).
    Unlabelled { deployment: String, model: String, cohort: String, evicted: bool },
}

/// Records committed events: each metric is named here, and only here.
pub fn record(events: impl IntoIterator<Item = Event>) {
    for event in events {
        match event {
            Event::Routed { deployment, model, role } => {
                counter!("switchyard_requests_routed_total", "deployment" => deployment, "model" => model, "role" => role)
                    .increment(1)
            }
            Event::RoutedCopyDropped => counter!("switchyard_routed_copies_dropped_total").increment(1),
            Event::Hop { hop, since } => {
                let seconds = (crate::clock::now_millis() - since).max(0) as f64 / 1000.0;
                histogram!("switchyard_hop_seconds", "hop" => hop).record(seconds)
            }
            Event::DeadLettered { kind } => counter!("switchyard_dead_letters_total", "reason" => kind).increment(1),
            Event::Decided { deployment, model, cohort, status } => counter!("switchyard_decisions_total",
                "deployment" => deployment, "model" => model, "cohort" => cohort, "status" => status)
            .increment(1),
            Event::PredictionLatency { model, seconds } => {
                histogram!("switchyard_prediction_latency_seconds", "model" => model).record(seconds)
            }
            Event::ShadowCompared { deployment, shadow_model, agreed } => counter!("switchyard_shadow_comparisons_total",
                "deployment" => deployment, "shadow_model" => shadow_model, "agreed" => if agreed { "true" } else { "false" })
            .increment(1),
            Event::ShadowMissing { deployment, shadow_model } => {
                counter!("switchyard_shadow_missing_total", "deployment" => deployment, "shadow_model" => shadow_model)
                    .increment(1)
            }
            Event::PredictionDiscarded { model, reason } => {
                counter!("switchyard_predictions_discarded_total", "model" => model, "reason" => reason).increment(1)
            }
            Event::PredictionForwarded { model } => {
                counter!("switchyard_predictions_forwarded_total", "model" => model).increment(1)
            }
            Event::Scored(s) => scored(&s),
            Event::Unlabelled { deployment, model, cohort, evicted } => counter!("switchyard_quality_unlabelled_total",
                "deployment" => deployment, "model" => model, "cohort" => cohort, "evicted" => if evicted { "true" } else { "false" })
            .increment(1),
        }
    }
}

/// merge runs: its count of dropped routed copies is exported from 0 on (copies are rare; a dashboard
/// shows the series before the first one).
pub fn routed_copies_watched() {
    counter!("switchyard_routed_copies_dropped_total").increment(0);
}

/// A stage made a batch durable (a transaction committed, or route's records acknowledged and its
/// offsets committed) in `seconds`.
pub fn batch_committed(stage: &str, seconds: f64) {
    histogram!("switchyard_commit_seconds", "stage" => stage.to_string()).record(seconds);
}

/// One step of a stage's transaction took `seconds`: `produce` (its records sent and acknowledged),
/// `send_offsets` (the input offsets registered with the group), `commit` (EndTxn) — where a commit's
/// time goes ([`batch_committed`] is their sum with the batch's own work).
pub fn transaction_step(stage: &'static str, step: &'static str, seconds: f64) {
    histogram!("switchyard_transaction_step_seconds", "stage" => stage, "step" => step).record(seconds);
}

/// A stage's transaction failed: its records were discarded and its inputs are read again.
pub fn transaction_failed(stage: &str) {
    counter!("switchyard_transactions_failed_total", "stage" => stage.to_string()).increment(1);
}

/// When each stage's loop last went round: a stage that stops going round (blocked in a call that does
/// not return, or retrying one that keeps failing) is stalled ([`stalled_stages`]).
fn beats() -> &'static Mutex<HashMap<&'static str, Instant>> {
    static BEATS: OnceLock<Mutex<HashMap<&'static str, Instant>>> = OnceLock::new();
    BEATS.get_or_init(Default::default)
}

/// `stage` (route, merge, score, controller) went round its loop once more.
pub fn stage_alive(stage: &'static str) {
    beats().lock().expect("beats lock").insert(stage, Instant::now());
}

/// For tests: `stage` last went round `ago`.
#[cfg(test)]
pub fn backdate_beat(stage: &'static str, ago: Duration) {
    beats().lock().expect("beats lock").insert(stage, Instant::now() - ago);
}

/// `stage` stopped (shutdown): it is no longer watched.
pub fn stage_stopped(stage: &'static str) {
    beats().lock().expect("beats lock").remove(stage);
    gauge!("switchyard_stage_stalled", "stage" => stage).set(0.0);
}

/// The stages whose loop has not gone round for `after` or longer, with how long, and the
/// `switchyard_stage_stalled` gauge of every watched stage set to match.
pub fn stalled_stages(after: Duration) -> Vec<(&'static str, Duration)> {
    let beats = beats().lock().expect("beats lock");
    let stalled = overdue(&beats, Instant::now(), after);
    for stage in beats.keys() {
        let is = stalled.iter().any(|(s, _)| s == stage);
        gauge!("switchyard_stage_stalled", "stage" => *stage).set(if is { 1.0 } else { 0.0 });
    }
    stalled
}

/// The entries of `beats` at least `after` old at `now`, oldest first.
fn overdue(beats: &HashMap<&'static str, Instant>, now: Instant, after: Duration) -> Vec<(&'static str, Duration)> {
    let mut late: Vec<(&'static str, Duration)> = beats
        .iter()
        .map(|(stage, at)| (*stage, now.saturating_duration_since(*at)))
        .filter(|(_, since)| *since >= after)
        .collect();
    late.sort_by_key(|(_, since)| std::cmp::Reverse(*since));
    late
}

/// The transactional calls that are watched for overrunning ([`transactional_call_stuck`]), exported at 0
/// from the start, so that dashboards and alerts see the series before the first one.
pub fn transactional_calls_watched() {
    for call in ["begin_transaction", "send_offsets_to_transaction", "commit_transaction", "abort_transaction"] {
        counter!("switchyard_transactional_calls_stuck_total", "call" => call).increment(0);
    }
}

/// A transactional call overran its timeout and its producer was abandoned for a new one.
pub fn transactional_call_stuck(call: &'static str) {
    counter!("switchyard_transactional_calls_stuck_total", "call" => call).increment(1);
}

/// Requests waiting for their serving model (merge's join state).
pub fn pending(count: usize) {
    gauge!("switchyard_pending_requests").set(count as f64);
}

/// A deployment record was put in force.
pub fn config_applied(deployment: &str, version: u64, candidate_percent: f64) {
    gauge!("switchyard_config_version", "deployment" => deployment.to_string()).set(version as f64);
    gauge!("switchyard_candidate_percent", "deployment" => deployment.to_string()).set(candidate_percent);
}

/// A deployment was deleted by a tombstone.
pub fn config_deleted(deployment: &str) {
    gauge!("switchyard_config_version", "deployment" => deployment.to_string()).set(0.0);
    gauge!("switchyard_candidate_percent", "deployment" => deployment.to_string()).set(0.0);
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

/// A running plan's step and evidence, as the controller last judged it: one set of figures per
/// candidate judged, each labelled with its candidate model (`candidate`, the deployment's for two arms);
/// an A/B/n candidate's arm is `candidate:<model>`.
pub fn rollout(deployment: &str, candidate: &str, step: usize, arms: &[crate::record::figures::Figures], late: u64) {
    let d = deployment.to_string();
    gauge!("switchyard_rollout_step", "deployment" => d.clone()).set((step + 1) as f64);
    gauge!("switchyard_rollout_late_decisions", "deployment" => d.clone()).set(late as f64);
    for figures in arms {
        let arm = figures.candidate.as_ref().map_or("candidate".to_string(), |m| format!("candidate:{m}"));
        let model = figures.candidate.as_deref().unwrap_or(candidate);
        let labels = [("deployment", d.clone()), ("candidate", model.to_string())];
        let with = |extra: &[(&'static str, String)]| {
            labels.iter().chain(extra).map(|(k, v)| metrics::Label::new(*k, v.clone())).collect::<Vec<_>>()
        };
        gauge!("switchyard_rollout_users", with(&[("arm", "control".into())])).set(figures.users.0 as f64);
        gauge!("switchyard_rollout_users", with(&[("arm", arm.clone())])).set(figures.users.1 as f64);
        for g in &figures.guards {
            let guard = ("guard", g.guard.as_str().to_string());
            gauge!("switchyard_rollout_guard_e_value", with(std::slice::from_ref(&guard))).set(g.e_value);
            gauge!("switchyard_rollout_guard_threshold", with(std::slice::from_ref(&guard))).set(g.threshold);
            for (side, counts) in [("control".to_string(), g.control), (arm.clone(), g.candidate)] {
                gauge!("switchyard_rollout_guard_bad_ratio", with(&[guard.clone(), ("arm", side)]))
                    .set(counts.bad as f64 / counts.n.max(1) as f64);
            }
        }
    }
}

/// A plan or probation ended (promoted, rolled back, switched back, ended): the step reads 0, "none
/// running"; the other rollout gauges keep the last judgement's figures.
pub fn rollout_ended(deployment: &str) {
    gauge!("switchyard_rollout_step", "deployment" => deployment.to_string()).set(0.0);
}

/// The controller wrote a change of a plan.
pub fn rollout_change(deployment: &str, actor: &str) {
    counter!("switchyard_rollout_changes_total", "deployment" => deployment.to_string(), "actor" => actor.to_string())
        .increment(1);
}

/// Score bins of the quality counters (AUC and calibration error are computed from them).
pub const QUALITY_BINS: usize = 20;

/// Counts a scored answer: counters that add up across instances (sums of losses, score bins by label).
fn scored(s: &crate::codec::ScoredOutcome) {
    let labels = [
        ("deployment", s.deployment.clone()),
        ("model", s.model.clone()),
        ("role", s.role.clone()),
        ("cohort", s.cohort.clone()),
    ];
    counter!("switchyard_quality_labelled_total", &labels).increment(1);
    if s.source == crate::record::quality::IMPLICIT {
        // Labels by absence (a decision matured without one): also counted apart.
        counter!("switchyard_quality_implicit_total", &labels).increment(1);
    }
    histogram!("switchyard_quality_label_delay_seconds", &labels).record(s.label_delay_ms as f64 / 1000.0);
    let Some(score) = s.score else {
        counter!("switchyard_quality_unscored_total", &labels).increment(1);
        return;
    };
    for (loss, value) in [
        ("zero_one", s.zero_one),
        ("brier", s.brier),
        ("log_loss", s.log_loss),
        ("absolute", s.absolute_error),
        ("squared", s.squared_error),
    ] {
        if let Some(v) = value {
            let mut with_loss = labels.to_vec();
            with_loss.push(("loss", loss.to_string()));
            counter!("switchyard_quality_loss_micros_total", &with_loss).increment((v * 1e6).round() as u64);
        }
    }
    if s.zero_one.is_some() {
        let bin = ((score * QUALITY_BINS as f64) as usize).min(QUALITY_BINS - 1);
        let mut binned = labels.to_vec();
        binned.push(("bin", bin.to_string()));
        binned.push(("label", (s.label as u8).to_string()));
        counter!("switchyard_quality_score_bin_total", &binned).increment(1);
    }
}

/// Decisions waiting for their labels on this instance.
pub fn open_decisions(count: u64) {
    gauge!("switchyard_quality_open_decisions").set(count as f64);
}

#[cfg(test)]
mod stall_tests {
    use super::*;

    #[test]
    fn a_stage_is_stalled_once_its_loop_has_not_gone_round_for_the_limit() {
        let now = Instant::now();
        let beats = HashMap::from([
            ("route", now - Duration::from_secs(75)),
            ("merge", now - Duration::from_secs(1)),
            ("score", now - Duration::from_secs(60)),
        ]);
        let late = overdue(&beats, now, Duration::from_secs(60));
        assert_eq!(late, vec![("route", Duration::from_secs(75)), ("score", Duration::from_secs(60))]);
        assert!(overdue(&beats, now, Duration::from_secs(80)).is_empty());
        assert!(overdue(&HashMap::new(), now, Duration::ZERO).is_empty(), "nothing watched: nothing stalled");
    }
}
