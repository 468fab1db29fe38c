//! What the controller writes next for one deployment: the plan's verdict on its step's evidence,
//! turned into the next deployment record with its actor, reason and figures. Pure.

use super::bandit;
use super::evidence::{PlanEvidence, StepEvidence};
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
    evidence: &PlanEvidence,
    now: Millis,
    version: u64,
) -> Option<DeploymentSpec> {
    deployment.spec.plan.as_ref().filter(|p| p.state == PlanState::Running)?;
    if !evidence.covers(deployment) {
        return None;
    }
    match evidence.arms.as_slice() {
        [two_arm] if deployment.arms.is_empty() => two_arm_record(deployment, two_arm, now, version),
        _ => abn_record(deployment, evidence, now, version),
    }
}

/// A two-arm canary's next record.
fn two_arm_record(
    deployment: &Deployment,
    evidence: &StepEvidence,
    now: Millis,
    version: u64,
) -> Option<DeploymentSpec> {
    let plan = deployment.spec.plan.as_ref()?;
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
    next.change = Some(Change { actor, reason, figures: Some(figures), arms: Vec::new() });
    Some(next)
}

/// An A/B/n canary's next record: each candidate judged against control by the plan. A guard that fires
/// cuts its candidate (on_alarm rollback: its users go back to control, the others' step starts again;
/// the last one's cut is a rollback) or pauses the plan; the step advances, every candidate to the next
/// step's share, only once every candidate passed it; at the end the one candidate left is promoted
/// (on_end promote), or, with several left, the split holds for the operator to choose.
fn abn_record(deployment: &Deployment, evidence: &PlanEvidence, now: Millis, version: u64) -> Option<DeploymentSpec> {
    let spec = &deployment.spec;
    let plan = spec.plan.as_ref()?;
    let verdicts: Vec<(&str, Verdict, (u64, u64))> = evidence
        .arms
        .iter()
        .map(|e| {
            let model = e.judged.as_deref().expect("an A/B/n arm judges a candidate");
            let scored = e.scored();
            (model, judge(plan, scored, &e.readings(), now), scored)
        })
        .collect();
    let passed = || {
        verdicts
            .iter()
            .map(|(m, _, (c, k))| format!("{m}: {c} control, {k} candidate users"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let alarm = verdicts.iter().find_map(|(m, v, _)| match v {
        Verdict::Alarm { guard, reason } => Some((*m, *guard, reason)),
        _ => None,
    });
    let pause = verdicts.iter().find_map(|(m, v, _)| match v {
        Verdict::Pause(reason) => Some((*m, reason)),
        _ => None,
    });
    let all = |want: fn(&Verdict) -> bool| verdicts.iter().all(|(_, v, _)| want(v));
    let (next, actor, reason) = if let Some((model, guard, reason)) = alarm {
        let actor = format!("guard:{}", guard.as_str());
        match plan.on_alarm {
            OnAlarm::Rollback if spec.candidates.len() > 1 => (
                moves::cut(spec, version, model, now).ok()?,
                actor,
                format!(
                    "candidate {model}: {reason}: cut, its users back to control; step {} starts again for {}",
                    plan.step + 1,
                    spec.candidates
                        .iter()
                        .filter(|c| c.model != model)
                        .map(|c| c.model.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            OnAlarm::Rollback => {
                (moves::rollback(spec, version).ok()?, actor, format!("candidate {model}: {reason}: rolled back"))
            }
            OnAlarm::Pause => {
                (moves::pause(spec, version).ok()?, actor, format!("candidate {model}: {reason}: paused"))
            }
        }
    } else if let Some((model, reason)) = pause {
        (moves::pause(spec, version).ok()?, "plan".to_string(), format!("candidate {model}: {reason}: paused"))
    } else if let Some(bandit) = &plan.bandit {
        abn_reallocation(deployment, bandit, evidence, now, version)?
    } else if all(|v| matches!(v, Verdict::Advance(_))) {
        let index = plan.step + 1;
        let mut next = moves::advance(spec, version, index, now).ok()?;
        // Later steps judge latency against the threshold this step fixed (control's: the same in every arm).
        let threshold = evidence.arms.first().and_then(StepEvidence::latency_threshold);
        let next_plan = next.plan.as_mut().expect("advanced");
        next_plan.latency_threshold_ms = next_plan.latency_threshold_ms.or(threshold.map(|ms| ms.max(1) as u64));
        (
            next,
            "plan".to_string(),
            format!(
                "step {} passed for every candidate ({}; scored by every guard, none fired): each candidate to {}%",
                plan.step + 1,
                passed(),
                plan.steps[index].canary_percent
            ),
        )
    } else if all(|v| *v == Verdict::Complete) {
        match (plan.on_end, spec.candidates.as_slice()) {
            (OnEnd::Promote, [one]) => (
                moves::promote(spec, version).ok()?,
                "plan".to_string(),
                format!("last step passed ({}; none fired): {} promoted", passed(), one.model),
            ),
            _ => (
                moves::finish(spec, version).ok()?,
                "plan".to_string(),
                format!(
                    "last step passed for every candidate ({}): plan done, split held{}",
                    passed(),
                    if spec.candidates.len() > 1 {
                        " (several candidates passed: choose one with `switchyard promote --candidate`)"
                    } else {
                        ""
                    }
                ),
            ),
        }
    } else {
        return None;
    };
    let mut next = next;
    next.change = Some(Change { actor, reason, figures: None, arms: evidence.figures(plan.step) });
    Some(next)
}

/// Whether a bandit's interval has passed since its last move (its step's start before the first).
fn bandit_due(deployment: &Deployment, spec: &Bandit, now: Millis) -> bool {
    deployment
        .spec
        .plan
        .as_ref()
        .is_some_and(|plan| now - plan.allocated_at.unwrap_or(plan.step_started_at) >= spec.interval_ms as i64)
}

/// A bandit's limits as fractions, and the name of its reward.
fn bandit_terms(spec: &Bandit) -> (bandit::Limits, &'static str) {
    let limits = bandit::Limits { floor: spec.floor_percent / 100.0, max_change: spec.max_change_percent / 100.0 };
    let reward = match spec.reward {
        BanditReward::Errors => "errors",
        BanditReward::Quality => "quality",
    };
    (limits, reward)
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
    if !bandit_due(deployment, spec, now) {
        return None;
    }
    let (control, candidate) = evidence.bandit_counts(spec.reward);
    let (limits, reward) = bandit_terms(spec);
    let current = deployment.spec.canary_percent / 100.0;
    let share = bandit::next_share(current, control, candidate, limits);
    if threshold(share * 100.0) == deployment.canary_threshold {
        return None;
    }
    let percent = (share * 10_000.0).round() / 100.0;
    let reason = format!(
        "bandit ({reward} reward): P(candidate better) = {:.3} from {}/{} control and {}/{} candidate users good: canary {}% -> {percent}%",
        bandit::p_candidate_better(control, candidate),
        control.good,
        control.good + control.bad,
        candidate.good,
        candidate.good + candidate.bad,
        deployment.spec.canary_percent
    );
    Some((moves::reallocate(&deployment.spec, version, percent, now).ok()?, "plan".to_string(), reason))
}

/// An A/B/n bandit's next move, once its interval has passed since the last: every arm's share toward
/// the probability that it is the best ([`bandit::next_shares`]); None when none would move.
fn abn_reallocation(
    deployment: &Deployment,
    spec: &Bandit,
    evidence: &PlanEvidence,
    now: Millis,
    version: u64,
) -> Option<(DeploymentSpec, String, String)> {
    if !bandit_due(deployment, spec, now) {
        return None;
    }
    // Control first (every arm's evidence holds the same control users), then each candidate.
    let mut counts = vec![evidence.arms.first()?.bandit_counts(spec.reward).0];
    counts.extend(evidence.arms.iter().map(|e| e.bandit_counts(spec.reward).1));
    let candidates = &deployment.spec.candidates;
    let mut current: Vec<f64> = candidates.iter().map(|c| c.percent / 100.0).collect();
    current.insert(0, 1.0 - current.iter().sum::<f64>());
    let (limits, reward) = bandit_terms(spec);
    let next = bandit::next_shares(&current, &counts, limits)?;
    let percents: Vec<f64> = next[1..].iter().map(|s| (s * 10_000.0).round() / 100.0).collect();
    let names: Vec<&str> =
        std::iter::once(deployment.spec.control.as_str()).chain(candidates.iter().map(|c| c.model.as_str())).collect();
    let p_best = bandit::p_best(&counts);
    let evidence = names
        .iter()
        .zip(&counts)
        .zip(&p_best)
        .map(|((name, c), p)| format!("{name} {}/{} good, P(best) {p:.3}", c.good, c.good + c.bad))
        .collect::<Vec<_>>()
        .join("; ");
    let moved = candidates
        .iter()
        .zip(&percents)
        .map(|(c, p)| format!("{} {}% -> {p}%", c.model, c.percent))
        .collect::<Vec<_>>()
        .join(", ");
    let reason = format!("bandit ({reward} reward): {evidence}: {moved}");
    Some((moves::reallocate_candidates(&deployment.spec, version, &percents, now).ok()?, "plan".to_string(), reason))
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
    next.change = Some(Change { actor, reason, figures: Some(evidence.figures()), arms: Vec::new() });
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::DecisionStatus;
    use crate::record::{Side, Strategy};
    use crate::rollout::evidence::{GRACE_MS, Observation};

    /// A two-arm step's evidence as the controller keeps it.
    fn one(e: &StepEvidence) -> PlanEvidence {
        PlanEvidence { arms: vec![e.clone()] }
    }

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
                candidate: None,
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
                candidate: None,
                status: if failed { DecisionStatus::ModelError } else { DecisionStatus::Ok },
                latency_ms: 4,
                sent_at: 1_000_000 + i * 10,
            });
        }
        e.score_until(1_000_000 + 10_000 + 1_000 + GRACE_MS);
        assert_eq!(next_record(&d, &one(&e), 1_000_999, 5), None, "the interval has not passed");
        let next = next_record(&d, &one(&e), 1_001_000 + 20_000, 5).unwrap();
        let plan = next.plan.as_ref().unwrap();
        assert_eq!(
            (next.canary_percent, plan.step, plan.step_version, plan.allocated_at),
            (30.0, 0, Some(4), Some(1_021_000))
        );
        let change = next.change.as_ref().unwrap();
        assert!(change.actor == "plan" && change.reason.contains("canary 10% -> 30%"), "{}", change.reason);
        let d = next.validate("fraud").unwrap();
        assert!(e.covers(&d) && e.accepts(5) && !e.accepts(3), "version 5 continues the step of version 4");
        assert_eq!(next_record(&d, &one(&e), 1_021_500, 6), None, "the next interval has not passed");
        let again = next_record(&d, &one(&e), 1_022_000, 6).unwrap();
        assert_eq!((again.canary_percent, again.plan.as_ref().unwrap().step_version), (50.0, Some(4)));
        let end = next_record(&d, &one(&e), 1_000_000 + 600_000, 6).unwrap();
        assert_eq!(end.plan.as_ref().unwrap().state, PlanState::Paused, "{:?}", end.change);
        assert_eq!(end.canary_percent, 30.0, "the split held where the bandit left it");
        // A fresh leader builds the evidence from the step's first version.
        assert_eq!(StepEvidence::new(&d).unwrap().version, 4);
    }

    #[test]
    fn a_healthy_step_advances_with_figures_and_the_last_one_promotes() {
        let d = deployment(TWO_STEPS);
        assert_eq!(next_record(&d, &one(&evidence(&d, 100, 0)), 1_100_000, 5), None, "49 candidate users < 50");
        let next = next_record(&d, &one(&evidence(&d, 1000, 0)), 1_100_000, 5).unwrap();
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
        let promoted = next_record(&step2, &one(&evidence(&step2, 1000, 0)), 1_200_000, 6).unwrap();
        assert_eq!(
            (promoted.strategy, promoted.control.as_str(), promoted.plan.is_none()),
            (Strategy::Single, "b", true)
        );
    }

    #[test]
    fn a_failing_candidate_is_rolled_back_by_its_guard() {
        let d = deployment(TWO_STEPS);
        let next = next_record(&d, &one(&evidence(&d, 20_000, 3)), 1_100_000, 5).unwrap();
        assert_eq!((next.canary_percent, next.plan.is_none()), (0.0, true));
        let change = next.change.unwrap();
        assert_eq!(change.actor, "guard:error_rate");
        assert!(change.reason.contains("rolled back"), "{}", change.reason);
        let error = &change.figures.unwrap().guards[0];
        assert!(error.e_value >= error.threshold && error.candidate.bad > 600, "{error:?}");
    }

    /// Three candidates at 10% each against control, `failing` erring for one user in three: its guard
    /// cuts it (its buckets back to control, the others' step restarts); the others, healthy, advance
    /// together, and with two left at the end the split holds.
    #[test]
    fn an_abn_plan_cuts_the_failing_candidate_and_the_others_go_on() {
        let d = deployment(
            r#"{"version":4,"strategy":"canary","control":"a",
                "candidates":[{"model":"b","percent":10},{"model":"c","percent":10},{"model":"d","percent":10}],
                "plan":{"steps":[{"canary_percent":10,"bake_ms":1000,"min_sample":50,"max_ms":600000},
                                 {"canary_percent":20,"bake_ms":1000,"min_sample":50,"max_ms":600000}],
                        "guards":["error_rate","timeout_rate","sample_ratio"],"step_started_at":1000000}}"#,
        );
        let abn = |d: &Deployment, users: i64, failing: Option<&str>| {
            let mut e = PlanEvidence::new(d).unwrap();
            let start = d.spec.plan.as_ref().unwrap().step_started_at;
            for i in 0..users {
                let bucket = crate::cohort::hash::bucket(&d.salt, &format!("u{i}"));
                let arm = crate::record::arms::arm_of(&d.arms, bucket);
                let candidate = arm.map(|k| d.spec.candidates[k].model.clone());
                let fails = candidate.is_some() && candidate.as_deref() == failing && i % 3 == 0;
                e.add(Observation {
                    request_id: format!("r{i}"),
                    user: format!("u{i}"),
                    arm: if arm.is_some() { Side::Candidate } else { Side::Control },
                    candidate,
                    status: if fails { DecisionStatus::ModelError } else { DecisionStatus::Ok },
                    latency_ms: 4,
                    sent_at: start + i * 10,
                });
            }
            e.score_until(start + users * 10 + 1_000 + GRACE_MS);
            e
        };
        let cut = next_record(&d, &abn(&d, 20_000, Some("c")), 1_100_000, 5).unwrap();
        let change = cut.change.as_ref().unwrap();
        assert_eq!(change.actor, "guard:error_rate");
        assert!(change.reason.starts_with("candidate c: guard error_rate fired"), "{}", change.reason);
        assert!(
            change.reason.contains("alpha 0.05 over 36 tests: 3 guards x 3 candidates x 4 steps"),
            "{}",
            change.reason
        );
        assert!(change.reason.contains("step 1 starts again for b, d"), "{}", change.reason);
        assert_eq!(change.arms.iter().map(|f| f.candidate.clone().unwrap()).collect::<Vec<_>>(), ["b", "c", "d"]);
        let kept: Vec<_> = cut.candidates.iter().map(|c| (c.model.as_str(), c.buckets.clone())).collect();
        assert_eq!(kept, [("b", vec![[0, 1000]]), ("d", vec![[2000, 3000]])], "b and d keep their users");
        let plan = cut.plan.as_ref().unwrap();
        assert_eq!((plan.step, plan.step_started_at, plan.candidates), (0, 1_100_000, Some(3)));
        let d = cut.validate("fraud").unwrap();
        assert_eq!(d.canary_threshold, 2000);
        // The healthy two: the step passes for both, then the last one holds with two left.
        let next = next_record(&d, &abn(&d, 20_000, None), 1_400_000, 6).unwrap();
        assert!(
            next.change.as_ref().unwrap().reason.contains("step 1 passed for every candidate"),
            "{:?}",
            next.change
        );
        assert_eq!(next.candidates.iter().map(|c| c.percent).collect::<Vec<_>>(), [20.0, 20.0]);
        let d = next.validate("fraud").unwrap();
        let end = next_record(&d, &abn(&d, 20_000, None), 1_700_000, 7).unwrap();
        assert_eq!((end.plan.as_ref().unwrap().state, end.candidates.len()), (PlanState::Done, 2));
        assert!(end.change.unwrap().reason.contains("several candidates passed"));
        // One healthy candidate failing to reach its sample holds the others.
        let waiting = next_record(&d, &abn(&d, 150, None), 1_700_000, 7);
        assert_eq!(waiting, None);
    }

    /// An A/B/n bandit over control and two candidates, one of them failing one user in five: each
    /// interval every share moves toward the arm likelier to be best, the failing one's down to its floor,
    /// users stay on arms that grow, and the versions continue one step.
    #[test]
    fn an_abn_bandit_moves_the_shares_away_from_the_failing_candidate() {
        let d = deployment(
            r#"{"version":4,"strategy":"canary","control":"a",
                "candidates":[{"model":"b","percent":10},{"model":"c","percent":10}],
                "plan":{"steps":[{"canary_percent":10,"bake_ms":0,"min_sample":1,"max_ms":600000}],
                        "guards":["timeout_rate"],"step_started_at":1000000,
                        "bandit":{"interval_ms":1000,"floor_percent":5,"max_change_percent":20}}}"#,
        );
        let mut e = PlanEvidence::new(&d).unwrap();
        for i in 0..3000 {
            let bucket = crate::cohort::hash::bucket(&d.salt, &format!("u{i}"));
            let arm = crate::record::arms::arm_of(&d.arms, bucket);
            let candidate = arm.map(|k| d.spec.candidates[k].model.clone());
            let fails = candidate.as_deref() == Some("c") && i % 5 == 0;
            e.add(Observation {
                request_id: format!("r{i}"),
                user: format!("u{i}"),
                arm: if arm.is_some() { Side::Candidate } else { Side::Control },
                candidate,
                status: if fails { DecisionStatus::ModelError } else { DecisionStatus::Ok },
                latency_ms: 4,
                sent_at: 1_000_000 + i * 10,
            });
        }
        e.score_until(1_000_000 + 30_000 + 1_000 + GRACE_MS);
        assert_eq!(next_record(&d, &e, 1_000_999, 5), None, "the interval has not passed");
        let next = next_record(&d, &e, 1_040_000, 5).unwrap();
        let shares: Vec<f64> = next.candidates.iter().map(|c| c.percent).collect();
        assert!(shares[0] > 10.0 && shares[1] < 10.0, "{shares:?}: {:?}", next.change);
        let change = next.change.as_ref().unwrap();
        assert!(
            change.reason.starts_with("bandit (errors reward): a ") && change.reason.contains("b 10% -> 30%"),
            "{}",
            change.reason
        );
        assert_eq!(next.candidates[0].buckets[0], [0, 1000], "b keeps its users as it grows");
        let plan = next.plan.as_ref().unwrap();
        assert_eq!((plan.step_version, plan.allocated_at), (Some(4), Some(1_040_000)));
        let d5 = next.validate("fraud").unwrap();
        assert!(e.covers(&d5), "version 5 continues the step of version 4");
        assert_eq!(next_record(&d5, &e, 1_040_500, 6), None, "the next interval has not passed");
    }

    #[test]
    fn evidence_of_another_version_or_a_paused_plan_does_nothing() {
        let d = deployment(TWO_STEPS);
        let e = evidence(&d, 1000, 0);
        let later = deployment(&TWO_STEPS.replace(r#""version":4"#, r#""version":9"#));
        assert_eq!(next_record(&later, &one(&e), 1_100_000, 10), None, "evidence of version 4 says nothing of 9");
        let paused = deployment(&TWO_STEPS.replace(r#""on_alarm":"rollback""#, r#""state":"paused""#));
        assert_eq!(next_record(&paused, &one(&evidence(&paused, 20_000, 3)), 1_100_000, 5), None);
    }
}
