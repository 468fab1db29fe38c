//! What `switchyard status` shows of a plan (its step, and the evidence rebuilt from the step's
//! decisions, exactly as the controller builds it) and what `switchyard history` reads.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;

use super::evidence::{Observation, PlanEvidence, StepEvidence};
use super::feed::{Feed, Progress};
use super::history::{self, Entry};
use super::probation::ProbationEvidence;
use super::settle::Settled;
use crate::clock;
use crate::codec::{Codec, Decision, ScoredOutcome, ShadowComparison};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kafka;
use crate::record::Deployment;
use crate::record::plan::{GuardKind, Plan, PlanState};
use crate::record::quality::QualitySpec;

/// How long `status` reads decisions before it reports what it has.
const READ_LIMIT: Duration = Duration::from_secs(60);

/// Which instance leads the rollout controller (the member of `<group_id>-controller` holding the
/// deployments topic's partition), in words.
pub fn controller_status(config: &Config) -> String {
    let group = format!("{}-controller", config.service.group_id);
    match kafka::holders(config, &group, &config.topics.deployments, 0) {
        Ok(holders) if holders.is_empty() => "rollout controller: no instance leads (none running?)".to_string(),
        Ok(holders) => format!("rollout controller: led by instance {}", holders.join(", ")),
        Err(error) => format!("rollout controller: unknown ({error})"),
    }
}

/// The plan of `d` and its current evidence, in words; empty without a plan.
pub async fn plan_status(config: &Config, codec: &Codec, d: &Deployment) -> Result<String> {
    let mut out = String::new();
    if let Some(change) = &d.spec.change {
        let _ = writeln!(out, "  last change by {}: {}", change.actor, change.reason);
    }
    let Some(plan) = &d.spec.plan else { return Ok(out) };
    out.push_str(&describe_plan(plan, clock::now_millis()));
    if let Some(b) = &plan.bandit {
        let _ = writeln!(
            out,
            "  bandit: canary now {}% (started at {}%), moved every {} s by at most {} points toward P(candidate better), each arm at least {}%; reward {:?}",
            d.spec.canary_percent,
            plan.current().canary_percent,
            b.interval_ms / 1000,
            b.max_change_percent,
            b.floor_percent,
            b.reward
        );
    }
    if let Some(line) = maturity_line(plan, d.spec.quality.as_ref(), clock::now_millis()) {
        out.push_str(&line);
    }
    if plan.state != PlanState::Running {
        return Ok(out);
    }
    let (evidence, settled) = step_evidence(config, codec, d).await?;
    if !settled {
        let _ = writeln!(
            out,
            "  the pipeline has not settled within {} s (route or merge behind, or an instance's transaction \
             left open): the evidence below leaves out the blocks not known to be complete",
            READ_LIMIT.as_secs()
        );
    }
    out.push_str(&describe_evidence(plan, &evidence));
    Ok(out)
}

/// The plan's line: state, step, its share and its limits.
fn describe_plan(plan: &Plan, now: i64) -> String {
    let step = plan.current();
    format!(
        "  plan: {} at step {}/{} (canary {}%), {:.0} s in step; bake {} s, {} users per arm, at most {} s; on alarm {:?}, at the end {:?}\n",
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
    )
}

/// When a step judged on labels of a deployment with a maturity gets its first quality evidence: its
/// users count once their decisions mature, so nothing comes before `maturity_ms` into the step. None
/// when the plan does not judge labels or the labels need no maturity.
fn maturity_line(plan: &Plan, quality: Option<&QualitySpec>, now: i64) -> Option<String> {
    let maturity = quality?.maturity_ms? as i64;
    if !plan.guards.iter().any(|g| matches!(g, GuardKind::Quality | GuardKind::Coverage)) {
        return None;
    }
    let first = plan.step_started_at + maturity;
    let when = if first > now {
        format!("in {:.0} s", (first - now) as f64 / 1000.0)
    } else {
        format!("{:.0} s ago", (now - first) as f64 / 1000.0)
    };
    let mut line = format!(
        "  labels mature {:.0} s after each decision: this step's first matured users {when}; the quality guard judges only those\n",
        maturity as f64 / 1000.0
    );
    if plan.current().max_ms < maturity as u64 {
        let _ = writeln!(
            line,
            "  warning: the step's max_ms ({} s) ends before any of its decisions matures: it will pause without quality evidence",
            plan.current().max_ms / 1000
        );
    }
    Some(line)
}

/// The step's evidence rebuilt as the controller builds it — its scored outcomes, then its decisions,
/// scored as far as route and merge have settled — and whether they settled within [`READ_LIMIT`] (a
/// stalled stage is reported rather than waited for).
async fn step_evidence(config: &Config, codec: &Codec, d: &Deployment) -> Result<(PlanEvidence, bool)> {
    let plan = d.spec.plan.as_ref().expect("a plan");
    let mut evidence = PlanEvidence::new(d).expect("a plan");
    // The step's versions: its first (a bandit's moves continue it) through the one in force.
    let first = d.spec.plan.as_ref().map_or(d.version(), |p| p.evidence_from(d.version()));
    let ours =
        |deployment: &str, version: i64| deployment == d.name && (first..=d.version()).contains(&(version as u64));
    if plan.guards.iter().any(|g| matches!(g, GuardKind::Quality | GuardKind::Coverage)) {
        let topic = &config.topics.scored_outcomes;
        read_all(
            config,
            codec,
            topic,
            plan.step_started_at,
            |s: &ScoredOutcome| s.observed_at,
            |s| {
                if ours(&s.deployment, s.config_version) {
                    evidence.add_scored(&s);
                }
            },
        )
        .await?;
    }
    if plan.guards.contains(&GuardKind::Disagreement) {
        let topic = &config.topics.shadow_comparisons;
        read_all(
            config,
            codec,
            topic,
            plan.step_started_at,
            |c: &ShadowComparison| c.compared_at,
            |c| {
                if c.deployment == d.name {
                    evidence.add_comparison(&c);
                }
            },
        )
        .await?;
    }
    let mut feed = Feed::open(config, codec.clone(), &config.topics.decisions, Some(plan.step_started_at))?;
    let (mut progress, mut settled) = (Progress::new(config)?, Settled::default());
    let started = Instant::now();
    loop {
        feed.drain(
            Duration::from_millis(50),
            100_000,
            |d: &Decision| d.decided_at,
            |decision| {
                if ours(&decision.deployment, decision.config_version)
                    && let Some(o) = Observation::of(&decision)
                {
                    evidence.add(o);
                }
            },
        )
        .await?;
        let through = settled.advance(clock::now_millis(), &mut progress.with(&feed))?;
        if through.is_some() || started.elapsed() > READ_LIMIT {
            break;
        }
    }
    if let Some(through) = settled.through() {
        evidence.score_until(through);
    }
    // The scored outcomes were read to their end: labels are in up to now.
    evidence.score_coverage_until(clock::now_millis(), d.spec.timeout_ms);
    Ok((evidence, settled.through().is_some()))
}

/// The observed split, each arm's rates and each guard against its threshold; for an A/B/n canary, each
/// candidate against control.
fn describe_evidence(plan: &Plan, evidence: &PlanEvidence) -> String {
    let mut out = String::new();
    let budget = plan.budget();
    let _ = writeln!(
        out,
        "  guards: alpha {} over {} guards and {} steps{}: each fires at e-value {:.1}",
        plan.alpha,
        plan.guards.len(),
        plan.steps.len(),
        match budget.candidates {
            1 => String::new(),
            k => format!(
                ", for each of {k} candidates (up to {} steps each, counting restarts after a cut)",
                plan.steps.len() + k - 1
            ),
        },
        budget.log_threshold().exp()
    );
    for arm in &evidence.arms {
        if let Some(model) = &arm.judged {
            let _ = writeln!(out, "  candidate {model} against control:");
        }
        out.push_str(&describe_arm(plan, arm));
    }
    out
}

fn describe_arm(plan: &Plan, evidence: &StepEvidence) -> String {
    let mut out = String::new();
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
    for g in &evidence.figures(plan.step).guards {
        let _ = writeln!(out, "    {}", super::describe_guard(g));
    }
    out
}

/// How far back `status` reads scored outcomes for a deployment's quality.
const QUALITY_LOOKBACK_MS: i64 = 3_600_000;

/// Quality per model, role and cohort from the scored outcomes of the last hour, and label coverage: of
/// the decisions of the last hour, how many have a scored label (so far). Empty without a `quality`
/// spec.
pub async fn quality_status(config: &Config, codec: &Codec, d: &Deployment) -> Result<String> {
    use crate::quality::metrics::QualityFigures;
    use std::collections::BTreeMap;

    let Some(spec) = &d.spec.quality else { return Ok(String::new()) };
    let since = clock::now_millis() - QUALITY_LOOKBACK_MS;
    let mut by: BTreeMap<(String, String, String), QualityFigures> = BTreeMap::new();
    // Per (model, cohort) of the serving answer: (decisions, with a scored label).
    let mut coverage: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    read_all(
        config,
        codec,
        &config.topics.scored_outcomes,
        since,
        |s: &ScoredOutcome| s.observed_at,
        |s| {
            if s.deployment != d.name {
                return;
            }
            if s.observed_at >= since {
                by.entry((s.model.clone(), s.role.clone(), s.cohort.clone())).or_default().add(&s, spec);
            }
            if s.role == "serving" && s.decided_at >= since && s.score.is_some() {
                coverage.entry((s.model, s.cohort)).or_default().1 += 1;
            }
        },
    )
    .await?;
    read_all(
        config,
        codec,
        &config.topics.decisions,
        since,
        |x: &Decision| x.decided_at,
        |x| {
            if x.deployment == d.name && x.decided_at >= since {
                coverage.entry((x.model, x.cohort)).or_default().0 += 1;
            }
        },
    )
    .await?;
    let mut out = String::new();
    if by.is_empty() {
        let _ = writeln!(out, "  quality: no labelled answers in the last hour");
        return Ok(out);
    }
    let _ = writeln!(out, "  quality (answers labelled in the last hour):");
    for ((model, role, cohort), f) in &by {
        let _ = writeln!(out, "    {model} ({role}, {cohort}): {}", f.describe(spec.task));
    }
    let _ = writeln!(out, "  label coverage (decisions of the last hour with a scored label so far):");
    for ((model, cohort), (decisions, labelled)) in &coverage {
        let share = 100.0 * *labelled as f64 / (*decisions).max(1) as f64;
        let _ = writeln!(out, "    {model} ({cohort}): {labelled} of {decisions} ({share:.1}%)");
    }
    Ok(out)
}

/// A blue/green probation in words, with its paired evidence read from the scored outcomes; empty
/// without one.
pub async fn probation_status(config: &Config, codec: &Codec, d: &Deployment) -> Result<String> {
    let (Some(p), Some(mut evidence)) = (&d.spec.probation, ProbationEvidence::new(d)) else {
        return Ok(String::new());
    };
    read_all(
        config,
        codec,
        &config.topics.scored_outcomes,
        p.started_at,
        |s: &ScoredOutcome| s.observed_at,
        |s| {
            if s.deployment == d.name && s.config_version as u64 == d.version() {
                evidence.add(&s);
            }
        },
    )
    .await?;
    let left = (p.ends_at() - clock::now_millis()).max(0) / 1000;
    let mut out = format!(
        "  probation: {left} s left; {} stays warm on copies; paired guard on {} labelled requests both answered (alpha {}):\n",
        d.spec.control,
        evidence.pairs(),
        p.alpha
    );
    let (difference, interval) = evidence.difference();
    for g in &evidence.figures().guards {
        let _ = writeln!(out, "    {}", super::describe_guard(g));
    }
    if let Some((low, high)) = interval {
        let _ = writeln!(out, "    new − old {difference:+.4}, confidence sequence [{low:+.4}, {high:+.4}]");
    }
    Ok(out)
}

/// `switchyard evaluate`: what `split` (each arm's share) would have given over the decisions of `name`
/// since `since`, estimated from the splits that ran (see
/// [`super::offline`]): the failure rate (decisions not OK) from every decision with a propensity, and
/// the `loss` from those with a scored label.
pub async fn evaluate(
    config: &Config,
    codec: &Codec,
    name: &str,
    split: &super::offline::Split,
    since: crate::codec::Millis,
    loss: crate::record::plan::Loss,
) -> Result<String> {
    use super::offline::{self, Logged};
    use crate::codec::DecisionStatus;
    use std::collections::HashMap;

    let mut decisions: HashMap<String, (Logged, bool)> = HashMap::new();
    let mut not_randomised = 0u64;
    read_all(
        config,
        codec,
        &config.topics.decisions,
        since,
        |d: &Decision| d.decided_at,
        |d| {
            if d.deployment != name || d.decided_at < since {
                return;
            }
            // Randomised arms only: a cohort chosen by a rule is not (`candidate:rule:<attribute>`).
            let arm = super::evidence::arm_of(&d.cohort).map(|_| d.cohort.clone());
            match (arm, d.propensity.filter(|p| *p > 0.0)) {
                (Some(arm), Some(propensity)) => {
                    let failed = f64::from(u8::from(d.status != DecisionStatus::Ok));
                    let logged = Logged { user: d.user_id, arm, propensity, reward: failed };
                    decisions.insert(d.request_id, (logged, false));
                }
                _ => not_randomised += 1,
            }
        },
    )
    .await?;
    let mut losses = Vec::new();
    read_all(
        config,
        codec,
        &config.topics.scored_outcomes,
        since,
        |s: &ScoredOutcome| s.observed_at,
        |s| {
            if s.deployment != name || s.role != "serving" {
                return;
            }
            // One loss per decision: a label scored twice (a replay) counts once.
            if let (Some((logged, seen @ false)), Some(value)) = (decisions.get_mut(&s.request_id), loss.of(&s)) {
                *seen = true;
                losses.push(Logged { reward: value, ..logged.clone() });
            }
        },
    )
    .await?;
    let failures: Vec<Logged> = decisions.into_values().map(|(logged, _)| logged).collect();
    let mut out = format!(
        "{name}: {} decisions with a known propensity, {} left out (an override or a rule chose their side)\n",
        failures.len(),
        not_randomised
    );
    let shares: Vec<String> = split.iter().map(|(arm, share)| format!("{arm} {:.2}%", share * 100.0)).collect();
    let _ = writeln!(out, "  target split: {}", shares.join(", "));
    let estimate = |e: Option<offline::Estimate>| match e {
        Some(e) => format!("{:.4} [{:.4}, {:.4}]", e.value, e.low, e.high),
        None => "not estimable (an arm the split uses was never served)".to_string(),
    };
    let arms = |logs: &[Logged]| {
        let arms: Vec<String> =
            offline::arm_means(logs).iter().map(|(arm, mean, n)| format!("{arm} {mean:.4} (n={n})")).collect();
        if arms.is_empty() { "none".to_string() } else { arms.join(", ") }
    };
    let _ = writeln!(
        out,
        "  failure rate: DR {}; IPS {}; logged by arm: {}",
        estimate(offline::doubly_robust(&failures, split)),
        estimate(offline::ips(&failures, split)),
        arms(&failures)
    );
    // Only answered, labelled decisions have a loss: not a sample of decisions as logged, so no IPS.
    let _ = writeln!(
        out,
        "  {} loss of answered requests: DR {}; logged by arm: {}",
        loss.as_str(),
        estimate(offline::doubly_robust(&losses, split)),
        arms(&losses)
    );
    Ok(out)
}

/// Reads every record of `topic` written from `from` on that was there when it opened (at most
/// [`READ_LIMIT`]), handing each to `f`.
async fn read_all<T: crate::codec::AvroRecord>(
    config: &Config,
    codec: &Codec,
    topic: &str,
    from: crate::codec::Millis,
    time: fn(&T) -> crate::codec::Millis,
    mut f: impl FnMut(T),
) -> Result<()> {
    let mut feed = Feed::open(config, codec.clone(), topic, Some(from))?;
    let started = Instant::now();
    while !feed.read_what_was_there() && started.elapsed() < READ_LIMIT {
        feed.drain(Duration::from_millis(50), 100_000, time, &mut f).await?;
    }
    Ok(())
}

/// The history entries of `name` (all deployments: None), oldest first.
pub async fn read_history(config: &Config, name: Option<&str>) -> Result<Vec<Entry>> {
    let topic = &config.topics.history;
    let reader = kafka::reader(config)?;
    if kafka::partition_count(&reader, topic)?.is_none() {
        return Err(Error::MissingTopic(topic.clone()));
    }
    let (assignment, targets) = kafka::batch::whole(config, &reader, topic, [0])?;
    reader.assign(&assignment)?;
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

#[cfg(test)]
mod plan_tests {
    use super::*;
    use crate::record::DeploymentSpec;

    #[test]
    fn status_counts_steps_from_one_and_shows_each_guard() {
        let d = DeploymentSpec::from_json(
            br#"{"version":4,"strategy":"canary","control":"a","candidate":"b","canary_percent":20,
                 "plan":{"steps":[{"canary_percent":5,"bake_ms":20000,"min_sample":100,"max_ms":600000},
                                  {"canary_percent":20,"bake_ms":20000,"min_sample":100,"max_ms":600000},
                                  {"canary_percent":50,"bake_ms":20000,"min_sample":100,"max_ms":600000}],
                         "step":1,"step_started_at":1000,"state":"running"}}"#,
        )
        .unwrap()
        .validate("d")
        .unwrap();
        let plan = d.spec.plan.as_ref().unwrap();
        let line = describe_plan(plan, 31_000);
        assert!(line.starts_with("  plan: running at step 2/3 (canary 20%), 30 s in step; bake 20 s"), "{line}");
        let text = describe_evidence(plan, &PlanEvidence::new(&d).unwrap());
        assert!(text.contains("control 0 (0.00%), candidate 0 (0.00%)"), "{text}");
        assert_eq!(text.lines().filter(|l| l.contains(" e = ")).count(), plan.guards.len(), "{text}");
        assert_eq!(maturity_line(plan, None, 31_000), None);
    }

    #[test]
    fn a_step_judged_on_matured_labels_says_when_its_first_users_mature() {
        let d = DeploymentSpec::from_json(
            br#"{"version":4,"strategy":"canary","control":"a","candidate":"b","canary_percent":5,
                 "quality":{"maturity_ms":30000,"default_label":0},
                 "plan":{"steps":[{"canary_percent":5,"bake_ms":20000,"min_sample":100,"max_ms":20000}],
                         "guards":["error_rate","quality"],"step":0,"step_started_at":1000,"state":"running"}}"#,
        )
        .unwrap()
        .validate("d")
        .unwrap();
        let plan = d.spec.plan.as_ref().unwrap();
        let line = maturity_line(plan, d.spec.quality.as_ref(), 11_000).unwrap();
        assert!(
            line.contains("labels mature 30 s after each decision: this step's first matured users in 20 s"),
            "{line}"
        );
        assert!(line.contains("warning: the step's max_ms (20 s) ends before any of its decisions matures"), "{line}");
        let later = maturity_line(plan, d.spec.quality.as_ref(), 41_000).unwrap();
        assert!(later.contains("first matured users 10 s ago"), "{later}");
    }
}
