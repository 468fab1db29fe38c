//! What a step's evidence means for a rollout plan: [`judge`] says what to do next. Pure: the controller
//! gives it the time and the evidence. The plan itself, as the deployment record carries it, and its
//! validation are `record::plan`.
//!
//! Rules:
//! - no data, no evidence: a step advances only when both arms have their minimum sample and the bake
//!   time has passed, and pauses when its maximum duration passes first;
//! - a guard at or above its share of the budget fires, whatever the step's progress;
//! - a bandit plan neither advances nor completes: its share moves (`rollout::bandit`) until its step's
//!   maximum duration, when it pauses with the split where it is.

use super::guard::Budget;
use crate::codec::Millis;
use crate::record::plan::{GuardKind, Plan};

// The budget is the guards' arithmetic (`rollout::guard`), so it is defined here, next to its
// reader, and not in the record: the record knows nothing of e-processes.
impl Plan {
    /// The budget of this plan's guards over its steps (and candidates: a validated A/B/n record's plan
    /// always counts them).
    pub fn budget(&self) -> Budget {
        Budget {
            alpha: self.alpha,
            guards: self.guards.len(),
            steps: self.steps.len(),
            candidates: self.candidates.unwrap_or(1),
        }
    }
}

/// One guard's evidence in the current step.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub guard: GuardKind,
    pub log_e: f64,
    /// Whether the guard lets the step pass: rate guards do once the sample is there (no alarm); the
    /// quality guard only once its confidence sequence puts the candidate within its margin (the
    /// absence of an alarm on a few labels is not evidence of safety).
    pub cleared: bool,
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
    Alarm { guard: GuardKind, reason: String },
    /// No decision can be reached: hold for an operator.
    Pause(String),
}

/// Judges the plan's current step at `now` from its observations per arm, (control, candidate) users,
/// and the guards' readings.
pub fn judge(plan: &Plan, samples: (u64, u64), readings: &[Reading], now: Millis) -> Verdict {
    let budget = plan.budget();
    let log_threshold = budget.log_threshold();
    if let Some(fired) = readings.iter().find(|r| r.log_e >= log_threshold) {
        let split = match budget.candidates {
            1 => format!("{} guards and {} steps", plan.guards.len(), plan.steps.len()),
            k => format!(
                "{} tests: {} guards x {k} candidates x {} steps",
                budget.tests(),
                plan.guards.len(),
                plan.steps.len() + k - 1
            ),
        };
        return Verdict::Alarm {
            guard: fired.guard,
            reason: format!(
                "guard {} fired in step {}: e-value {:.1} reached {:.1} (alpha {} over {split})",
                fired.guard.as_str(),
                plan.step + 1,
                fired.log_e.exp(),
                log_threshold.exp(),
                plan.alpha,
            ),
        };
    }
    let step = plan.current();
    let elapsed = (now - plan.step_started_at).max(0) as u64;
    let (control, candidate) = samples;
    if plan.bandit.is_some() {
        if elapsed >= step.max_ms {
            return Verdict::Pause(format!(
                "the bandit ran its maximum of {} ms ({control} control, {candidate} candidate users; no guard fired): \
                 split held",
                step.max_ms
            ));
        }
        return Verdict::Hold;
    }
    let sampled = control >= step.min_sample && candidate >= step.min_sample;
    let uncleared: Vec<&str> = readings.iter().filter(|r| !r.cleared).map(|r| r.guard.as_str()).collect();
    if sampled && elapsed >= step.bake_ms && uncleared.is_empty() {
        return if plan.step + 1 == plan.steps.len() { Verdict::Complete } else { Verdict::Advance(plan.step + 1) };
    }
    if elapsed >= step.max_ms && sampled {
        return Verdict::Pause(format!(
            "step {} ran its maximum of {} ms: no guard fired, but {} has not shown the candidate within its \
             margin",
            plan.step + 1,
            step.max_ms,
            uncleared.join(", ")
        ));
    }
    if elapsed >= step.max_ms {
        return Verdict::Pause(format!(
            "step {} ran its maximum of {} ms with {control} control and {candidate} candidate users \
             of the {} each needs: no evidence either way",
            plan.step + 1,
            step.max_ms,
            step.min_sample
        ));
    }
    Verdict::Hold
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cohort::hash::bucket;
    use crate::record::deployment::threshold;

    fn plan(json: &str) -> Plan {
        serde_json::from_str(json).unwrap()
    }

    fn ramp() -> Plan {
        plan(
            r#"{"steps":[{"canary_percent":1,"bake_ms":1000,"min_sample":100,"max_ms":5000},
                         {"canary_percent":10,"bake_ms":1000,"min_sample":100,"max_ms":5000},
                         {"canary_percent":50,"bake_ms":1000,"min_sample":100,"max_ms":5000}],
                "step_started_at":10000}"#,
        )
    }

    fn at(step: usize) -> Plan {
        Plan { step, ..ramp() }
    }

    #[test]
    fn a_step_advances_only_with_its_sample_and_bake_time() {
        let p = ramp();
        p.validate().unwrap();
        assert_eq!(judge(&p, (5000, 99), &[], 14_000), Verdict::Hold, "the candidate arm lacks data");
        assert_eq!(judge(&p, (5000, 100), &[], 10_999), Verdict::Hold, "still baking");
        assert_eq!(judge(&p, (5000, 100), &[], 11_000), Verdict::Advance(1));
        assert_eq!(judge(&at(2), (5000, 100), &[], 11_000), Verdict::Complete);
    }

    #[test]
    fn a_guard_that_has_not_cleared_holds_the_step_and_pauses_it_at_its_maximum() {
        let p = ramp();
        let open = Reading { guard: GuardKind::Quality, log_e: 0.0, cleared: false };
        assert_eq!(judge(&p, (5000, 100), std::slice::from_ref(&open), 11_000), Verdict::Hold);
        let cleared = Reading { cleared: true, ..open.clone() };
        assert_eq!(judge(&p, (5000, 100), &[cleared], 11_000), Verdict::Advance(1));
        assert!(
            matches!(judge(&p, (5000, 100), &[open], 15_000), Verdict::Pause(r) if r.contains("quality has not shown"))
        );
    }

    #[test]
    fn no_data_pauses_at_the_maximum_duration() {
        let p = at(1);
        assert_eq!(judge(&p, (0, 0), &[], 14_999), Verdict::Hold);
        assert!(matches!(judge(&p, (0, 0), &[], 15_000), Verdict::Pause(r) if r.contains("no evidence")));
    }

    #[test]
    fn a_fired_guard_wins_over_progress() {
        let p = Plan { guards: vec![GuardKind::ErrorRate, GuardKind::TimeoutRate], ..ramp() };
        // Two guards over three steps at alpha 0.05: each fires at e = 120.
        let quiet = Reading { guard: GuardKind::ErrorRate, log_e: 119f64.ln(), cleared: true };
        let loud = Reading { guard: GuardKind::TimeoutRate, log_e: 121f64.ln(), cleared: true };
        assert_eq!(judge(&p, (5000, 100), &[quiet.clone(), quiet.clone()], 11_000), Verdict::Advance(1));
        let verdict = judge(&p, (5000, 100), &[quiet, loud], 11_000);
        assert!(
            matches!(&verdict, Verdict::Alarm { guard: GuardKind::TimeoutRate, reason } if reason.contains("step 1")),
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
}
