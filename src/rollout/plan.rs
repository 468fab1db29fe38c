//! A rollout plan: ordered ramp steps, the false-alarm budget of its guards, and what to do when a
//! guard fires and when the last step is done. Pure: the controller gives it the time and the evidence,
//! [`judge`] says what to do next.
//!
//! Rules:
//! - ramps are nested: each step's canary share is above the one before, so (the cohort hash being
//!   monotone in the share) every user in the candidate cohort at one step stays in it at the next;
//! - no data, no evidence: a step advances only when both arms have their minimum sample and the bake
//!   time has passed, and pauses when its maximum duration passes first;
//! - a guard at or above its share of the budget fires, whatever the step's progress.

use serde::{Deserialize, Serialize};

use super::guard::Budget;
use crate::codec::Millis;
use crate::routing::hash::threshold;

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

fn default_alpha() -> f64 {
    0.05
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// False-alarm budget of the whole rollout, split over its guards and steps.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub on_alarm: OnAlarm,
    #[serde(default)]
    pub on_end: OnEnd,
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
            before = step.canary_percent;
        }
        Ok(())
    }

    /// The budget of `guards` guards over this plan's steps.
    pub fn budget(&self, guards: usize) -> Budget {
        Budget { alpha: self.alpha, guards, steps: self.steps.len() }
    }
}

/// Where the current step stands.
#[derive(Debug, Clone, PartialEq)]
pub struct StepState {
    /// Index into the plan's steps.
    pub index: usize,
    pub started_at: Millis,
    /// Observations so far in this step: (control, candidate).
    pub samples: (u64, u64),
}

/// One guard's evidence in the current step.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub guard: String,
    pub log_e: f64,
}

/// What the plan does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Keep the current step.
    Hold,
    /// Go to the step with this index.
    Advance(usize),
    /// The last step is done: apply [`Plan::on_end`].
    Complete,
    /// A guard fired: apply [`Plan::on_alarm`]. The reason names the guard and its evidence.
    Alarm(String),
    /// No decision can be reached: hold for an operator.
    Pause(String),
}

/// Judges the current step at `now` from the guards' readings.
pub fn judge(plan: &Plan, state: &StepState, readings: &[Reading], now: Millis) -> Verdict {
    let log_threshold = plan.budget(readings.len()).log_threshold();
    if let Some(fired) = readings.iter().find(|r| r.log_e >= log_threshold) {
        return Verdict::Alarm(format!(
            "guard {} fired in step {}: e-value {:.1} reached {:.1} (alpha {} over {} guards and {} steps)",
            fired.guard,
            state.index + 1,
            fired.log_e.exp(),
            log_threshold.exp(),
            plan.alpha,
            readings.len(),
            plan.steps.len()
        ));
    }
    let step = &plan.steps[state.index];
    let elapsed = (now - state.started_at).max(0) as u64;
    let (control, candidate) = state.samples;
    if control >= step.min_sample && candidate >= step.min_sample && elapsed >= step.bake_ms {
        return if state.index + 1 == plan.steps.len() { Verdict::Complete } else { Verdict::Advance(state.index + 1) };
    }
    if elapsed >= step.max_ms {
        return Verdict::Pause(format!(
            "step {} ran its maximum of {} ms with {control} control and {candidate} candidate observations \
             of the {} each needs: no evidence either way",
            state.index + 1,
            step.max_ms,
            step.min_sample
        ));
    }
    Verdict::Hold
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::hash::bucket;

    fn plan(json: &str) -> Plan {
        serde_json::from_str(json).unwrap()
    }

    fn ramp() -> Plan {
        plan(
            r#"{"steps":[{"canary_percent":1,"bake_ms":1000,"min_sample":100,"max_ms":5000},
                         {"canary_percent":10,"bake_ms":1000,"min_sample":100,"max_ms":5000},
                         {"canary_percent":50,"bake_ms":1000,"min_sample":100,"max_ms":5000}]}"#,
        )
    }

    fn state(index: usize, samples: (u64, u64)) -> StepState {
        StepState { index, started_at: 10_000, samples }
    }

    #[test]
    fn a_step_advances_only_with_its_sample_and_bake_time() {
        let p = ramp();
        p.validate().unwrap();
        assert_eq!((p.alpha, p.on_alarm, p.on_end), (0.05, OnAlarm::Rollback, OnEnd::Promote));
        assert_eq!(judge(&p, &state(0, (5000, 99)), &[], 14_000), Verdict::Hold, "the candidate arm lacks data");
        assert_eq!(judge(&p, &state(0, (5000, 100)), &[], 10_999), Verdict::Hold, "still baking");
        assert_eq!(judge(&p, &state(0, (5000, 100)), &[], 11_000), Verdict::Advance(1));
        assert_eq!(judge(&p, &state(2, (5000, 100)), &[], 11_000), Verdict::Complete);
    }

    #[test]
    fn no_data_pauses_at_the_maximum_duration() {
        let p = ramp();
        assert_eq!(judge(&p, &state(1, (0, 0)), &[], 14_999), Verdict::Hold);
        assert!(matches!(judge(&p, &state(1, (0, 0)), &[], 15_000), Verdict::Pause(r) if r.contains("no evidence")));
    }

    #[test]
    fn a_fired_guard_wins_over_progress() {
        let p = ramp();
        // Two guards over three steps at alpha 0.05: each fires at e = 120.
        let quiet = Reading { guard: "error_rate".into(), log_e: 119f64.ln() };
        let loud = Reading { guard: "timeout_rate".into(), log_e: 121f64.ln() };
        assert_eq!(judge(&p, &state(0, (5000, 100)), &[quiet.clone(), quiet.clone()], 11_000), Verdict::Advance(1));
        let verdict = judge(&p, &state(0, (5000, 100)), &[quiet, loud], 11_000);
        assert!(
            matches!(&verdict, Verdict::Alarm(r) if r.contains("timeout_rate") && r.contains("step 1")),
            "{verdict:?}"
        );
    }

    #[test]
    fn ramps_are_nested() {
        let p = ramp();
        let users: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        let cohort = |percent: f64| -> Vec<&String> {
            users.iter().filter(|u| bucket("fraud", u) < threshold(percent)).collect()
        };
        for pair in p.steps.windows(2) {
            let (before, after) = (cohort(pair[0].canary_percent), cohort(pair[1].canary_percent));
            assert!(before.len() < after.len());
            assert!(before.iter().all(|u| after.contains(u)), "a user left the cohort between steps");
        }
    }

    #[test]
    fn broken_plans_are_refused() {
        let step = |percent: f64, bake: u64, sample: u64, max: u64| Step {
            canary_percent: percent,
            bake_ms: bake,
            min_sample: sample,
            max_ms: max,
        };
        let with = |steps: Vec<Step>, alpha: f64| Plan { steps, alpha, on_alarm: OnAlarm::Pause, on_end: OnEnd::Hold };
        let cases = [
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
