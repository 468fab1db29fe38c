//! A rollout plan as the deployment record carries it: ordered ramp steps, the guards and their
//! false-alarm budget, what to do when a guard fires and when the last step is done, and where the
//! controller has got to. Its validation is here; what a step's evidence means for the plan (`judge`)
//! is `rollout::plan`.
//!
//! Rules checked here:
//! - ramps are nested: each step's canary share is above the one before, so (the cohort hash being
//!   monotone in the share) every user in the candidate cohort at one step stays in it at the next;
//! - the last step holds back some control traffic (promotion takes the candidate to 100%).

use serde::{Deserialize, Serialize};

use super::deployment::threshold;
use crate::codec::Millis;

/// One ramp step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The candidate's share of users during the step, 0–100 in steps of 0.01.
    pub canary_percent: f64,
    /// The least time the step lasts.
    pub bake_ms: u64,
    /// Observations (users) each arm needs before the step may end.
    pub min_sample: u64,
    /// The longest the step may last without its minimum sample; then the plan pauses.
    pub max_ms: u64,
}

/// What a fired guard does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAlarm {
    /// Traffic back to control.
    #[default]
    Rollback,
    /// Hold the step for an operator.
    Pause,
}

/// What happens after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnEnd {
    /// The candidate becomes control.
    #[default]
    Promote,
    /// Stay at the last step.
    Hold,
}

/// Where a plan stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanState {
    /// The controller judges the current step.
    #[default]
    Running,
    /// Held at the current step (by an operator, a guard with `on_alarm: pause`, or a step that ran out
    /// of time); `resume` restarts the step.
    Paused,
    /// The last step is done and `on_end` is `hold`: the split stays, nothing is judged any more.
    Done,
}

impl PlanState {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanState::Running => "running",
            PlanState::Paused => "paused",
            PlanState::Done => "done",
        }
    }
}

/// A guard a plan can use: each tests the candidate arm against the control arm of the same step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardKind {
    /// Share of users whose decision is MODEL_ERROR.
    ErrorRate,
    /// Share of users whose decision is TIMEOUT or FALLBACK.
    TimeoutRate,
    /// Share of users answered slower than the step's latency threshold.
    Latency,
    /// The observed share of users in the candidate arm against the configured share (two-sided).
    SampleRatio,
    /// The candidate's mean loss against outcome labels, no worse than control's by more than a margin
    /// (`quality_guard`); needs the deployment's `quality` spec and labels on the outcomes topic.
    Quality,
    /// Share of users whose first decision in the step got no scored label (a label joined to the serving
    /// model's answer) within `quality_guard.coverage_wait_ms` of being sent: a candidate that fails
    /// on the hard requests, or whose answers change which outcomes are observed, loses labels.
    Coverage,
    /// Blue/green probation only: the new side's loss against the old side's on the same labelled
    /// requests (see `rollout::probation`).
    PairedQuality,
    /// Share of shadow pairs on which the candidate's answer differs from control's, above
    /// `disagreement_guard.max_rate`: judged before any label comes. While a plan has this guard, route
    /// copies the shadow sample's requests to the model not serving them (the candidate on control's
    /// users, control on the candidate's), and each user's first request in the step is a pair.
    Disagreement,
}

impl GuardKind {
    pub const ALL: [GuardKind; 4] =
        [GuardKind::ErrorRate, GuardKind::TimeoutRate, GuardKind::Latency, GuardKind::SampleRatio];

    pub fn as_str(self) -> &'static str {
        match self {
            GuardKind::ErrorRate => "error_rate",
            GuardKind::TimeoutRate => "timeout_rate",
            GuardKind::Latency => "latency",
            GuardKind::SampleRatio => "sample_ratio",
            GuardKind::Quality => "quality",
            GuardKind::Coverage => "coverage",
            GuardKind::PairedQuality => "paired_quality",
            GuardKind::Disagreement => "disagreement",
        }
    }
}

fn default_alpha() -> f64 {
    0.05
}

/// The loss a quality guard compares (see `ScoredOutcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Wrong at the deployment's threshold (1 − accuracy).
    #[default]
    ZeroOne,
    Brier,
    LogLoss,
    Absolute,
    Squared,
}

impl Loss {
    pub fn as_str(self) -> &'static str {
        match self {
            Loss::ZeroOne => "zero_one",
            Loss::Brier => "brier",
            Loss::LogLoss => "log_loss",
            Loss::Absolute => "absolute",
            Loss::Squared => "squared",
        }
    }

    /// This loss of a scored answer, if it has one.
    pub fn of(self, s: &crate::codec::ScoredOutcome) -> Option<f64> {
        match self {
            Loss::ZeroOne => s.zero_one,
            Loss::Brier => s.brier,
            Loss::LogLoss => s.log_loss,
            Loss::Absolute => s.absolute_error,
            Loss::Squared => s.squared_error,
        }
    }
}

fn default_tau() -> f64 {
    0.02
}

/// The quality guard's test: candidate − control mean loss above `margin`, judged by the mixture SPRT
/// with mixing scale `tau` (about the smallest harm worth catching).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityGuard {
    #[serde(default)]
    pub loss: Loss,
    #[serde(default)]
    pub margin: f64,
    #[serde(default = "default_tau")]
    pub tau: f64,
    /// The coverage guard: how long after a request is sent its label may take to be scored.
    #[serde(default = "default_coverage_wait_ms")]
    pub coverage_wait_ms: u64,
}

fn default_coverage_wait_ms() -> u64 {
    60_000
}

impl Default for QualityGuard {
    fn default() -> Self {
        QualityGuard {
            loss: Loss::default(),
            margin: 0.0,
            tau: default_tau(),
            coverage_wait_ms: default_coverage_wait_ms(),
        }
    }
}

/// The disagreement guard's bound: it fires once the share of shadow pairs whose answers differ is
/// shown to be above `max_rate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisagreementGuard {
    pub max_rate: f64,
}

impl Default for DisagreementGuard {
    fn default() -> Self {
        DisagreementGuard { max_rate: 0.05 }
    }
}

/// Adaptive allocation (`rollout::bandit`): instead of walking steps, the controller moves the canary's
/// share every `interval_ms` toward the probability that the candidate is the better arm (Thompson
/// sampling's probability matching), keeping each arm at least `floor_percent` and moving at most
/// `max_change_percent` per interval. The plan's one step gives the starting share and, in `max_ms`,
/// how long the bandit runs before the plan pauses with the split where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bandit {
    #[serde(default = "default_bandit_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_floor_percent")]
    pub floor_percent: f64,
    #[serde(default = "default_max_change_percent")]
    pub max_change_percent: f64,
    /// What makes an arm better: `errors` (fewer decisions not OK: errors, timeouts, fallbacks, hedged),
    /// or `quality` (a lower mean loss of `quality_guard.loss` on scored labels, a loss within 0..1).
    #[serde(default)]
    pub reward: BanditReward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BanditReward {
    #[default]
    Errors,
    Quality,
}

fn default_bandit_interval_ms() -> u64 {
    60_000
}

fn default_floor_percent() -> f64 {
    5.0
}

fn default_max_change_percent() -> f64 {
    10.0
}

impl Default for Bandit {
    fn default() -> Self {
        Bandit {
            interval_ms: default_bandit_interval_ms(),
            floor_percent: default_floor_percent(),
            max_change_percent: default_max_change_percent(),
            reward: BanditReward::default(),
        }
    }
}

fn default_guards() -> Vec<GuardKind> {
    GuardKind::ALL.to_vec()
}

/// A rollout plan as it travels in the deployment record: what the operator asked for (steps, guards,
/// budget, actions) and where the controller has got to (`step`, `step_started_at`, `state`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Guards judged in every step (default: all).
    #[serde(default = "default_guards")]
    pub guards: Vec<GuardKind>,
    /// False-alarm budget of the whole rollout, split over its guards and steps.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// The quality guard's loss, margin and scale (used when `guards` has `quality`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality_guard: Option<QualityGuard>,
    /// The disagreement guard's bound (used when `guards` has `disagreement`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disagreement_guard: Option<DisagreementGuard>,
    /// The latency guard's threshold; without it each step fixes one from its first control
    /// observations (see `rollout::evidence`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_threshold_ms: Option<u64>,
    #[serde(default)]
    pub on_alarm: OnAlarm,
    #[serde(default)]
    pub on_end: OnEnd,
    /// Index of the current step.
    #[serde(default)]
    pub step: usize,
    /// When the current step started (ms since the epoch); `deploy --plan` sets it.
    #[serde(default)]
    pub step_started_at: Millis,
    #[serde(default)]
    pub state: PlanState,
    /// Adaptive allocation instead of fixed steps (see [`Bandit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandit: Option<Bandit>,
    /// A bandit's last move of the share (ms since the epoch); the step's start before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_at: Option<Millis>,
    /// The record version that started the current step, when later versions continue it (a bandit's
    /// moves): the step's evidence is the decisions of that version and after. None: this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_version: Option<u64>,
    /// A/B/n: how many candidates the plan started with (α is split over them and over the steps they
    /// may restart when one is cut). None: as many as the record has; the controller's first cut sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<usize>,
}

impl Plan {
    /// The first version whose decisions are the current step's evidence, for a record of `version`.
    pub fn evidence_from(&self, version: u64) -> u64 {
        self.step_version.unwrap_or(version)
    }
}

/// Most steps a plan may have.
pub const MAX_STEPS: usize = 100;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidPlan {
    #[error("a plan needs 1 to {MAX_STEPS} steps, got {0}")]
    StepCount(usize),
    #[error("step {step}: canary_percent must be above 0, at most 100, in steps of 0.01, got {value}")]
    Percent { step: usize, value: f64 },
    #[error("step {step}: canary_percent {value} is not above the step before ({before}); ramps only go up")]
    NotIncreasing { step: usize, value: f64, before: f64 },
    #[error("step {step}: bake_ms ({bake}) is longer than max_ms ({max})")]
    BakeLongerThanMax { step: usize, bake: u64, max: u64 },
    #[error("step {step}: min_sample must be at least 1")]
    NoSample { step: usize },
    #[error("alpha must be above 0 and at most 0.5, got {0}")]
    Alpha(f64),
    #[error(
        "step {step}: canary_percent {value} leaves no control arm; the last step must hold back some control traffic (promotion takes the candidate to 100%)"
    )]
    NoControl { step: usize, value: f64 },
    #[error(
        "guards must name each guard at most once, and at least one (paired_quality judges blue/green probation only)"
    )]
    Guards,
    #[error("step is {step} but the plan has {steps} steps (step counts from 0)")]
    StepOutOfRange { step: usize, steps: usize },
    #[error("step_started_at is required (ms since the epoch; `switchyard deploy --plan` sets it)")]
    NoStartTime,
    #[error("quality_guard: margin must be at least 0 and tau above 0")]
    QualityGuard,
    #[error("disagreement_guard: max_rate must be above 0 and below 1, got {0}")]
    DisagreementGuard(f64),
    #[error(
        "bandit: one step (its share is where allocation starts), interval_ms at least 1000, floor_percent \
         above 0 and below 50, max_change_percent above 0 and at most 100, and not the sample_ratio guard \
         (its null is a fixed share: list the guards without it); reward quality needs the quality guard"
    )]
    Bandit,
}

impl Plan {
    pub fn validate(&self) -> Result<(), InvalidPlan> {
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(InvalidPlan::StepCount(self.steps.len()));
        }
        if !(self.alpha > 0.0 && self.alpha <= 0.5) {
            return Err(InvalidPlan::Alpha(self.alpha));
        }
        let mut before = 0.0;
        for (i, step) in self.steps.iter().enumerate() {
            let n = i + 1;
            let scaled = step.canary_percent * 100.0;
            if !(step.canary_percent > 0.0 && step.canary_percent <= 100.0) || (scaled - scaled.round()).abs() > 1e-6 {
                return Err(InvalidPlan::Percent { step: n, value: step.canary_percent });
            }
            if threshold(step.canary_percent) <= threshold(before) {
                return Err(InvalidPlan::NotIncreasing { step: n, value: step.canary_percent, before });
            }
            if step.bake_ms > step.max_ms {
                return Err(InvalidPlan::BakeLongerThanMax { step: n, bake: step.bake_ms, max: step.max_ms });
            }
            if step.min_sample == 0 {
                return Err(InvalidPlan::NoSample { step: n });
            }
            if threshold(step.canary_percent) >= threshold(100.0) {
                return Err(InvalidPlan::NoControl { step: n, value: step.canary_percent });
            }
            before = step.canary_percent;
        }
        let mut guards = self.guards.clone();
        guards.sort_unstable();
        guards.dedup();
        if guards.is_empty() || guards.len() != self.guards.len() || guards.contains(&GuardKind::PairedQuality) {
            return Err(InvalidPlan::Guards);
        }
        if self.step >= self.steps.len() {
            return Err(InvalidPlan::StepOutOfRange { step: self.step, steps: self.steps.len() });
        }
        if self.step_started_at <= 0 {
            return Err(InvalidPlan::NoStartTime);
        }
        if let Some(q) = &self.quality_guard
            && !(q.margin >= 0.0 && q.tau > 0.0 && q.margin.is_finite() && q.tau.is_finite())
        {
            return Err(InvalidPlan::QualityGuard);
        }
        if let Some(g) = &self.disagreement_guard
            && !(g.max_rate > 0.0 && g.max_rate < 1.0)
        {
            return Err(InvalidPlan::DisagreementGuard(g.max_rate));
        }
        if let Some(b) = &self.bandit
            && !(self.steps.len() == 1
                && b.interval_ms >= 1_000
                && b.floor_percent > 0.0
                && b.floor_percent < 50.0
                && b.max_change_percent > 0.0
                && b.max_change_percent <= 100.0
                && !self.guards.contains(&GuardKind::SampleRatio)
                && (b.reward != BanditReward::Quality || self.guards.contains(&GuardKind::Quality)))
        {
            return Err(InvalidPlan::Bandit);
        }
        Ok(())
    }

    /// The current step.
    pub fn current(&self) -> &Step {
        &self.steps[self.step.min(self.steps.len() - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp() -> Plan {
        serde_json::from_str(
            r#"{"steps":[{"canary_percent":1,"bake_ms":1000,"min_sample":100,"max_ms":5000},
                         {"canary_percent":10,"bake_ms":1000,"min_sample":100,"max_ms":5000},
                         {"canary_percent":50,"bake_ms":1000,"min_sample":100,"max_ms":5000}],
                "step_started_at":10000}"#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_fill_in() {
        let p = ramp();
        p.validate().unwrap();
        assert_eq!(
            (p.alpha, p.on_alarm, p.on_end, p.state),
            (0.05, OnAlarm::Rollback, OnEnd::Promote, PlanState::Running)
        );
        assert_eq!(p.guards, GuardKind::ALL.to_vec(), "all guards by default");
    }

    #[test]
    fn broken_plans_are_refused() {
        let step = |percent: f64, bake: u64, sample: u64, max: u64| Step {
            canary_percent: percent,
            bake_ms: bake,
            min_sample: sample,
            max_ms: max,
        };
        let with = |steps: Vec<Step>, alpha: f64| Plan { steps, alpha, ..ramp() };
        let cases = [
            (with(vec![step(100.0, 1, 1, 1)], 0.05), "no control arm"),
            (Plan { guards: vec![], ..ramp() }, "at least one"),
            (Plan { guards: vec![GuardKind::Latency, GuardKind::Latency], ..ramp() }, "at most once"),
            (Plan { step: 3, ..ramp() }, "step counts from 0"),
            (Plan { step_started_at: 0, ..ramp() }, "step_started_at is required"),
            (with(vec![], 0.05), "1 to 100 steps"),
            (with(vec![step(0.0, 1, 1, 1)], 0.05), "above 0"),
            (with(vec![step(10.005, 1, 1, 1)], 0.05), "steps of 0.01"),
            (with(vec![step(10.0, 1, 1, 1), step(10.0, 1, 1, 1)], 0.05), "ramps only go up"),
            (with(vec![step(10.0, 5, 1, 1)], 0.05), "longer than max_ms"),
            (with(vec![step(10.0, 1, 0, 1)], 0.05), "min_sample"),
            (with(vec![step(10.0, 1, 1, 1)], 0.0), "alpha"),
        ];
        for (p, message) in cases {
            let error = p.validate().unwrap_err().to_string();
            assert!(error.contains(message), "{error} lacks {message:?}");
        }
        assert!(serde_json::from_str::<Plan>(r#"{"steps":[],"colour":1}"#).is_err(), "unknown fields are refused");
    }
}
