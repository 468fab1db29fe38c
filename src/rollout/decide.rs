//! What the controller writes next for one deployment: the plan's verdict on its step's evidence,
//! turned into the next deployment record with its actor, reason and figures. Pure.

use super::bandit;
use super::evidence::StepEvidence;
use super::plan::{Verdict, judge};
use super::probation::{self, ProbationEvidence};
use crate::codec::Millis;
use crate::record::deployment::threshold;
use crate::record::moves;
use crate::record::plan::{Bandit, BanditReward, GuardKind, OnAlarm, OnEnd, PlanState};
use crate::record::{Change, Deployment, DeploymentSpec};

/// The record the controller writes next for `deployment` (as `version`), or None to wait.
pub fn next_record(
    deployment: &Deployment,
    evidence: &StepEvidence,
    now: Millis,
    version: u64,
) -> Option<DeploymentSpec> {
    let plan = deployment.spec.plan.as_ref().filter(|p| p.state == PlanState::Running)?;
    if !evidence.covers(deployment) {
        return None;
    }
    let figures = evidence.figures(plan.step);
    let (control, candidate) = evidence.scored();
    let spec = &deployment.spec;
    let (next, actor, reason) = match judge(plan, (control, candidate), &evidence.readings(), now) {
        Verdict::Hold => match &plan.bandit {
            Some(bandit) => reallocation(deployment, bandit, evidence, now, version)?,
            None => return None,
        },
        Verdict::Advance(index) => (
            moves::advance(spec, version, index, now).ok().map(|mut next| {
                // Later steps judge latency against the threshold this step fixed.
                let plan = next.plan.as_mut().expect("advanced");
                plan.latency_threshold_ms =
                    plan.latency_threshold_ms.or(evidence.latency_threshold().map(|ms| ms.max(1) as u64));
                next
            })?,
            "plan".to_string(),
            format!(
                "step {} passed ({control} control, {candidate} candidate users scored by every guard; none fired): canary to {}%",
                plan.step + 1,
                plan.steps[index].canary_percent
            ),
        ),
        Verdict::Complete => match plan.on_end {
            OnEnd::Promote => (
                moves::promote(spec, version).ok()?,
                "plan".to_string(),
                format!(
                    "last step passed ({control} control, {candidate} candidate users scored by every guard; none fired): candidate \
                     promoted"
                ),
            ),
            OnEnd::Hold => (
                moves::finish(spec, version).ok()?,
                "plan".to_string(),
                format!("last step passed ({control} control, {candidate} candidate users): plan done, split held"),
            ),
        },
        Verdict::Alarm { guard, reason } => {
            let next = match plan.on_alarm {
                OnAlarm::Rollback => moves::rollback(spec, version),
                OnAlarm::Pause => moves::pause(spec, version),
            };
            let action = match plan.on_alarm {
                OnAlarm::Rollback => "rolled back",
                OnAlarm::Pause => "paused",
            };
            (next.ok()?, format!("guard:{}", guard.as_str()), format!("{reason}: {action}"))
        }
        Verdict::Pause(reason) => (moves::pause(spec, version).ok()?, "plan".to_string(), format!("{reason}: paused")),
    };
    let mut next = next;
    next.change = Some(Change { actor, reason, figures: Some(figures) });
    Some(next)
}

/// A bandit's next move, once its interval has passed since the last: the canary's share toward the
/// probability that the candidate is better ([`bandit::next_share`]); None when it would not change.
fn reallocation(
    deployment: &Deployment,
    spec: &Bandit,
    evidence: &StepEvidence,
    now: Millis,
    version: u64,
) -> Option<(DeploymentSpec, String, String)> {
    let plan = deployment.spec.plan.as_ref()?;
    if now - plan.allocated_at.unwrap_or(plan.step_started_at) < spec.interval_ms as i64 {
        return None;
    }
    let (control, candidate) = evidence.bandit_counts(spec.reward);
    let limits = bandit::Limits { floor: spec.floor_percent / 100.0, max_change: spec.max_change_percent / 100.0 };
    let current = deployment.spec.canary_percent / 100.0;
    let share = bandit::next_share(current, control, candidate, limits);
    if threshold(share * 100.0) == deployment.canary_threshold {
        return None;
    }
    let percent = (share * 10_000.0).round() / 100.0;
    let reason = format!(
        "bandit ({} reward): P(candidate better) = {:.3} from {}/{} control and {}/{} candidate users good: canary {}% -> {percent}%",
        match spec.reward {
            BanditReward::Errors => "errors",
            BanditReward::Quality => "quality",
        },
        bandit::p_candidate_better(control, candidate),
        control.good,
        control.good + control.bad,
        candidate.good,
        candidate.good + candidate.bad,
        deployment.spec.canary_percent
    );
    Some((moves::reallocate(&deployment.spec, version, percent, now).ok()?, "plan".to_string(), reason))
}

/// The record the controller writes next for a deployment on probation (as `version`), or None to wait:
/// the switch back when the paired guard fires, the end of the probation when its time is up.
pub fn probation_record(
    deployment: &Deployment,
    evidence: &ProbationEvidence,
    now: Millis,
    version: u64,
) -> Option<DeploymentSpec> {
    let probation = deployment.spec.probation.as_ref()?;
    if evidence.version != deployment.version() {
        return None;
    }
    let (next, actor, reason) = match probation::judge(probation, evidence, now) {
        probation::Verdict::Hold => return None,
        probation::Verdict::SwitchBack(reason) => (
            moves::rollback(&deployment.spec, version).ok()?,
            format!("guard:{}", GuardKind::PairedQuality.as_str()),
            format!("{reason}: switched back"),
        ),
        probation::Verdict::End(reason) => {
            (moves::end_probation(&deployment.spec, version).ok()?, "plan".to_string(), reason)
        }
    };
    let mut next = next;
    next.change = Some(Change { actor, reason, figures: Some(evidence.figures()) });
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::DecisionStatus;
    use crate::record::{Side, Strategy};
    use crate::rollout::evidence::{GRACE_MS, Observation};

    fn deployment(json: &str) -> Deployment {
        DeploymentSpec::from_json(json.as_bytes()).unwrap().validate("fraud").unwrap()
    }

    const TWO_STEPS: &str = r#"{"version":4,"strategy":"canary","control":"a","candidate":"b","canary_percent":10,
        "plan":{"steps":[{"canary_percent":10,"bake_ms":1000,"min_sample":50,"max_ms":600000},
                         {"canary_percent":50,"bake_ms":1000,"min_sample":50,"max_ms":600000}],
                "step_started_at":1000000, "on_alarm":"rollback"}}"#;

    /// Evidence with `users` users, one request each, the configured share of them in the candidate arm,
    /// which errs at `candidate_error_every` (0: never).
    fn evidence(d: &Deployment, users: i64, candidate_error_every: i64) -> StepEvidence {
        let mut e = StepEvidence::new(d).unwrap();
        let start = d.spec.plan.as_ref().unwrap().step_started_at;
        let percent = d.spec.canary_percent as i64;
        for i in 0..users {
            let arm = if i % 100 < percent { Side::Candidate } else { Side::Control };
            let status = if arm == Side::Candidate && candidate_error_every > 0 && i % candidate_error_every == 0 {
                DecisionStatus::ModelError
            } else {
                DecisionStatus::Ok
            };
            e.add(Observation {
                request_id: format!("r{i}"),
                user: format!("u{i}"),
                arm,
                status,
                latency_ms: 4,
                sent_at: start + i * 10,
            });
        }
        e.score_until(start + users * 10 + 1_000 + GRACE_MS);
        e
    }

    /// A bandit between a control failing one user in ten and a candidate that never fails: every
    /// interval the share moves up by at most its maximum change, in one step whose evidence the next
    /// versions continue; it never advances or completes, and pauses at its maximum duration.
    #[test]
    fn a_bandit_moves_the_share_each_interval_and_its_versions_continue_the_step() {
        let d = deployment(
            r#"{"version":4,"strategy":"canary","control":"a","candidate":"b","canary_percent":10,
                "plan":{"steps":[{"canary_percent":10,"bake_ms":0,"min_sample":1,"max_ms":600000}],
                        "guards":["error_rate","timeout_rate"],"step_started_at":1000000,
                        "bandit":{"interval_ms":1000,"floor_percent":5,"max_change_percent":20}}}"#,
        );
        let mut e = StepEvidence::new(&d).unwrap();
        for i in 0..1000 {
            let arm = if i % 10 == 0 { Side::Candidate } else { Side::Control };
            let failed = arm == Side::Control && i % 7 == 0;
            e.add(Observation {
                request_id: format!("r{i}"),
                user: format!("u{i}"),
                arm,
                status: if failed { DecisionStatus::ModelError } else { DecisionStatus::Ok },
                latency_ms: 4,
                sent_at: 1_000_000 + i * 10,
            });
        }
        e.score_until(1_000_000 + 10_000 + 1_000 + GRACE_MS);
        assert_eq!(next_record(&d, &e, 1_000_999, 5), None, "the interval has not passed");
        let next = next_record(&d, &e, 1_001_000 + 20_000, 5).unwrap();
        let plan = next.plan.as_ref().unwrap();
        assert_eq!(
            (next.canary_percent, plan.step, plan.step_version, plan.allocated_at),
            (30.0, 0, Some(4), Some(1_021_000))
        );
        let change = next.change.as_ref().unwrap();
        assert!(change.actor == "plan" && change.reason.contains("canary 10% -> 30%"), "{}", change.reason);
        let d = next.validate("fraud").unwrap();
        assert!(e.covers(&d) && e.accepts(5) && !e.accepts(3), "version 5 continues the step of version 4");
        assert_eq!(next_record(&d, &e, 1_021_500, 6), None, "the next interval has not passed");
        let again = next_record(&d, &e, 1_022_000, 6).unwrap();
        assert_eq!((again.canary_percent, again.plan.as_ref().unwrap().step_version), (50.0, Some(4)));
        let end = next_record(&d, &e, 1_000_000 + 600_000, 6).unwrap();
        assert_eq!(end.plan.as_ref().unwrap().state, PlanState::Paused, "{:?}", end.change);
        assert_eq!(end.canary_percent, 30.0, "the split held where the bandit left it");
        // A fresh leader builds the evidence from the step's first version.
        assert_eq!(StepEvidence::new(&d).unwrap().version, 4);
    }

    #[test]
    fn a_healthy_step_advances_with_figures_and_the_last_one_promotes() {
        let d = deployment(TWO_STEPS);
        assert_eq!(next_record(&d, &evidence(&d, 100, 0), 1_100_000, 5), None, "49 candidate users < 50");
        let next = next_record(&d, &evidence(&d, 1000, 0), 1_100_000, 5).unwrap();
        assert_eq!((next.version, next.canary_percent), (5, 50.0));
        let change = next.change.as_ref().unwrap();
        assert_eq!(change.actor, "plan");
        assert!(
            change.reason.contains("step 1 passed (690 control, 70 candidate users scored by every guard"),
            "{}",
            change.reason
        );
        let threshold = next.plan.as_ref().unwrap().latency_threshold_ms;
        assert_eq!(threshold, Some(4), "the next step starts with the latency threshold this one fixed");
        // The latency guard scored only users after its burn-in (the chunks up to 200 control users): 690 + 70,
        // not 900 + 100.
        assert_eq!(change.figures.as_ref().unwrap().guards.len(), 4);
        let step2 = next.validate("fraud").unwrap();
        let promoted = next_record(&step2, &evidence(&step2, 1000, 0), 1_200_000, 6).unwrap();
        assert_eq!(
            (promoted.strategy, promoted.control.as_str(), promoted.plan.is_none()),
            (Strategy::Single, "b", true)
        );
    }

    #[test]
    fn a_failing_candidate_is_rolled_back_by_its_guard() {
        let d = deployment(TWO_STEPS);
        let next = next_record(&d, &evidence(&d, 20_000, 3), 1_100_000, 5).unwrap();
        assert_eq!((next.canary_percent, next.plan.is_none()), (0.0, true));
        let change = next.change.unwrap();
        assert_eq!(change.actor, "guard:error_rate");
        assert!(change.reason.contains("rolled back"), "{}", change.reason);
        let error = &change.figures.unwrap().guards[0];
        assert!(error.e_value >= error.threshold && error.candidate.bad > 600, "{error:?}");
    }

    #[test]
    fn evidence_of_another_version_or_a_paused_plan_does_nothing() {
        let d = deployment(TWO_STEPS);
        let e = evidence(&d, 1000, 0);
        let later = deployment(&TWO_STEPS.replace(r#""version":4"#, r#""version":9"#));
        assert_eq!(next_record(&later, &e, 1_100_000, 10), None, "evidence of version 4 says nothing of 9");
        let paused = deployment(&TWO_STEPS.replace(r#""on_alarm":"rollback""#, r#""state":"paused""#));
        assert_eq!(next_record(&paused, &evidence(&paused, 20_000, 3), 1_100_000, 5), None);
    }
}
