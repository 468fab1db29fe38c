//! What `switchyard status` shows of a plan (its step, and the evidence rebuilt from the step's
//! decisions, exactly as the controller builds it) and what `switchyard history` reads.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::evidence::{Observation, StepEvidence};
use super::feed::Feed;
use super::history::{self, Entry};
use super::plan::{GuardKind, PlanState};
use crate::codec::{Codec, Decision, ScoredOutcome};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kafka::{self, ADMIN_TIMEOUT};
use crate::routing::Deployment;

/// How long `status` reads decisions before it reports what it has.
const READ_LIMIT: Duration = Duration::from_secs(60);

/// The plan of `d` and its current evidence, in words; empty without a plan.
pub async fn plan_status(config: &Config, codec: &Codec, d: &Deployment) -> Result<String> {
    let mut out = String::new();
    if let Some(change) = &d.spec.change {
        let _ = writeln!(out, "  last change by {}: {}", change.actor, change.reason);
    }
    let Some(plan) = &d.spec.plan else { return Ok(out) };
    let now = kafka::now_millis();
    let step = plan.current();
    let _ = writeln!(
        out,
        "  plan: {} at step {}/{} (canary {}%), {:.0} s in step; bake {} s, {} users per arm, at most {} s; on alarm {:?}, at the end {:?}",
        plan.state.as_str(),
        plan.step + 1,
        plan.steps.len(),
        step.canary_percent,
        (now - plan.step_started_at) as f64 / 1000.0,
        step.bake_ms / 1000,
        step.min_sample,
        step.max_ms / 1000,
        plan.on_alarm,
        plan.on_end
    );
    if plan.state != PlanState::Running {
        return Ok(out);
    }
    let mut evidence = StepEvidence::new(d).expect("a plan");
    if plan.guards.contains(&GuardKind::Quality) {
        let mut scored = Feed::open(config, codec.clone(), &config.topics.scored_outcomes, Some(plan.step_started_at))?;
        let started = Instant::now();
        while !scored.read_what_was_there() && started.elapsed() < READ_LIMIT {
            scored
                .drain(
                    Duration::from_millis(50),
                    100_000,
                    |s: &ScoredOutcome| s.observed_at,
                    |s| {
                        if s.deployment == d.name && s.config_version as u64 == d.version() {
                            evidence.add_scored(&s);
                        }
                    },
                )
                .await?;
        }
    }
    let mut feed = Feed::open(config, codec.clone(), &config.topics.decisions, Some(plan.step_started_at))?;
    let started = Instant::now();
    let read_through = loop {
        feed.drain(
            Duration::from_millis(50),
            100_000,
            |d: &Decision| d.decided_at,
            |decision| {
                if decision.deployment == d.name && decision.config_version as u64 == d.version() {
                    if let Some(o) = Observation::of(&decision) {
                        evidence.add(o);
                    }
                }
            },
        )
        .await?;
        if feed.read_what_was_there() || started.elapsed() > READ_LIMIT {
            break feed.read_through(kafka::now_millis());
        }
    };
    evidence.score_until(read_through, d.spec.timeout_ms);
    let (control, candidate) = evidence.arms();
    let share = |n: u64| 100.0 * n as f64 / (control.users + candidate.users).max(1) as f64;
    let _ = writeln!(
        out,
        "  observed split (users scored so far): control {} ({:.2}%), candidate {} ({:.2}%)",
        control.users,
        share(control.users),
        candidate.users,
        share(candidate.users)
    );
    for (arm, a) in [("control", control), ("candidate", candidate)] {
        let rate = |n: u64| 100.0 * n as f64 / a.users.max(1) as f64;
        let _ = writeln!(
            out,
            "    {arm:<9} errors {:.2}%  timeouts {:.2}%  mean latency {:.1} ms",
            rate(a.errors),
            rate(a.timeouts),
            a.mean_latency_ms()
        );
    }
    let _ = writeln!(
        out,
        "  guards (alpha {} over {} guards and {} steps):",
        plan.alpha,
        plan.guards.len(),
        plan.steps.len()
    );
    for g in &evidence.figures(plan.step).guards {
        let _ = writeln!(out, "    {}", super::describe_guard(g));
    }
    Ok(out)
}

/// How far back `status` reads scored outcomes for a deployment's quality.
const QUALITY_LOOKBACK_MS: i64 = 3_600_000;

/// Quality per model, role and cohort from the scored outcomes of the last hour; empty without a
/// `quality` spec.
pub async fn quality_status(config: &Config, codec: &Codec, d: &Deployment) -> Result<String> {
    use crate::quality::metrics::{BinaryCounts, DelayHistogram, RegressionCounts};
    use crate::quality::score::Task;
    use std::collections::BTreeMap;

    let Some(spec) = &d.spec.quality else { return Ok(String::new()) };
    #[derive(Default)]
    struct Figures {
        binary: BinaryCounts,
        regression: RegressionCounts,
        unscored: u64,
        delays: DelayHistogram,
    }
    let mut by: BTreeMap<(String, String, String), Figures> = BTreeMap::new();
    let now = kafka::now_millis();
    let mut feed = Feed::open(config, codec.clone(), &config.topics.scored_outcomes, Some(now - QUALITY_LOOKBACK_MS))?;
    let started = Instant::now();
    while !feed.read_what_was_there() && started.elapsed() < READ_LIMIT {
        feed.drain(
            Duration::from_millis(50),
            100_000,
            |s: &ScoredOutcome| s.observed_at,
            |s| {
                if s.deployment != d.name || s.observed_at < now - QUALITY_LOOKBACK_MS {
                    return;
                }
                let f = by.entry((s.model.clone(), s.role.clone(), s.cohort.clone())).or_default();
                f.delays.add(s.label_delay_ms);
                match (s.score, spec.task) {
                    (None, _) => f.unscored += 1,
                    (Some(score), Task::BinaryClassification) => f.binary.add(score, s.label == 1.0, spec.threshold),
                    (Some(score), Task::Regression) => f.regression.add(score, s.label),
                }
            },
        )
        .await?;
    }
    let mut out = String::new();
    if by.is_empty() {
        let _ = writeln!(out, "  quality: no labelled answers in the last hour");
        return Ok(out);
    }
    let _ = writeln!(out, "  quality (answers labelled in the last hour):");
    let show = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
    for ((model, role, cohort), f) in &by {
        let delays = format!(
            "label delay p50 <= {} s, p90 <= {} s",
            f.delays.quantile_ms(0.5).unwrap_or(0) / 1000,
            f.delays.quantile_ms(0.9).unwrap_or(0) / 1000
        );
        let figures = match spec.task {
            Task::BinaryClassification => format!(
                "{} scored, accuracy {}, Brier {}, log-loss {}, AUC {}, calibration error {}",
                f.binary.n(),
                show(f.binary.accuracy()),
                show(f.binary.brier()),
                show(f.binary.log_loss()),
                show(f.binary.auc()),
                show(f.binary.calibration_error())
            ),
            Task::Regression => format!(
                "{} scored, MAE {}, RMSE {}, bias {}",
                f.regression.n,
                show(f.regression.mae()),
                show(f.regression.rmse()),
                show(f.regression.bias())
            ),
        };
        let _ = writeln!(out, "    {model} ({role}, {cohort}): {figures}; {} without a score; {delays}", f.unscored);
    }
    Ok(out)
}

/// The history entries of `name` (all deployments: None), oldest first.
pub async fn read_history(config: &Config, name: Option<&str>) -> Result<Vec<Entry>> {
    let topic = &config.topics.history;
    let reader = kafka::reader(config)?;
    if kafka::partition_count(&reader, topic)?.is_none() {
        return Err(Error::MissingTopic(topic.clone()));
    }
    let (_, end) = reader.fetch_watermarks(topic, 0, ADMIN_TIMEOUT)?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    reader.assign(&assignment)?;
    let targets = std::collections::HashMap::from([(0, end)]);
    let mut entries = Vec::new();
    while !kafka::batch::caught_up(&reader, topic, &targets) {
        let Ok(message) = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await else { continue };
        let message = message?;
        if name.is_some_and(|n| message.key() != Some(n.as_bytes())) {
            continue;
        }
        match serde_json::from_slice::<Entry>(message.payload().unwrap_or_default()) {
            Ok(entry) => entries.push(entry),
            Err(error) => tracing::warn!(offset = message.offset(), %error, "unreadable history entry skipped"),
        }
    }
    Ok(entries)
}

/// `switchyard history`'s text.
pub fn render_history(entries: &[Entry]) -> String {
    if entries.is_empty() {
        return "no history\n".to_string();
    }
    history::render(entries)
}
