//! The common moves as new versions of a deployment record.
//!
//! - promote: the candidate takes over. Under blue/green with control active, the first promote flips
//!   `active` to the candidate (the switch); otherwise the candidate becomes the control of a `single`
//!   deployment. Mirrors stay.
//! - rollback: traffic back to control. canary → `canary_percent` 0; blue/green → `active` control;
//!   shadow → single (copies stop).
//!
//! Both end a rollout plan, and every move ends a blue/green probation (a rollback is the switch back).
//! A plan's own moves: advance to a step, pause, resume; a probation's: end it.
//!
//! Every move returns the next record without a `change`; whoever writes it says who and why.

use super::deployment::{DeploymentSpec, Side, Strategy};
use super::plan::PlanState;
use super::probation::Probation;
use crate::codec::Millis;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MoveError {
    #[error("deployment {0:?} is not in force")]
    Unknown(String),
    #[error("deployment uses strategy single: there is no candidate to {0}")]
    NothingToMove(&'static str),
    #[error("probation follows a blue/green switch: the deployment must be blue_green with control active")]
    NotASwitch,
    #[error("deployment is not on probation")]
    NoProbation,
    #[error("deployment has no rollout plan to {0}")]
    NoPlan(&'static str),
    #[error("the plan is {state}; only a {want} plan can be {verb}")]
    PlanState { state: &'static str, want: &'static str, verb: &'static str },
    #[error("an A/B/n canary with {0} candidates: name the one to promote (`promote --candidate MODEL`)")]
    SeveralCandidates(usize),
    #[error("{0:?} is not one of the candidates")]
    NotACandidate(String),
    #[error("{0}")]
    Buckets(String),
}

/// The A/B/n candidates with new shares (`share(model, percent)`; None drops one), their buckets moved
/// as little as the shares allow (`arms::reassign`).
fn reshare(
    current: &DeploymentSpec,
    share: impl Fn(&str, f64) -> Option<f64>,
) -> Result<Vec<super::deployment::Candidate>, MoveError> {
    let wanted: Vec<(String, f64)> =
        current.candidates.iter().filter_map(|c| share(&c.model, c.percent).map(|p| (c.model.clone(), p))).collect();
    super::arms::reassign(&current.candidates, &wanted).map_err(MoveError::Buckets)
}

/// The record as it stands, as the next version, before a move changes it.
fn next_of(current: &DeploymentSpec, version: u64) -> DeploymentSpec {
    let mut next = current.clone();
    next.version = version;
    next.change = None;
    next.probation = None;
    if let Some(plan) = next.plan.as_mut() {
        // A move starts the step's evidence afresh; only a bandit's reallocation continues it.
        plan.step_version = None;
        plan.allocated_at = None;
    }
    next
}

pub fn promote(current: &DeploymentSpec, version: u64) -> Result<DeploymentSpec, MoveError> {
    let candidate = match current.candidates.as_slice() {
        [] => current.candidate.clone().ok_or(MoveError::NothingToMove("promote"))?,
        [one] => one.model.clone(),
        several => return Err(MoveError::SeveralCandidates(several.len())),
    };
    let mut next = next_of(current, version);
    next.plan = None;
    if current.strategy == Strategy::BlueGreen && current.active == Side::Control {
        next.active = Side::Candidate;
    } else {
        next.strategy = Strategy::Single;
        next.hedge = false;
        next.control = candidate;
        next.candidate = None;
        next.candidates.clear();
        next.canary_percent = 0.0;
        next.active = Side::Control;
        next.overrides.clear();
    }
    Ok(next)
}

pub fn rollback(current: &DeploymentSpec, version: u64) -> Result<DeploymentSpec, MoveError> {
    let mut next = next_of(current, version);
    next.plan = None;
    match current.strategy {
        Strategy::Single => return Err(MoveError::NothingToMove("roll back")),
        Strategy::Canary => {
            next.canary_percent = 0.0;
            next.candidates = reshare(current, |_, _| Some(0.0))?;
        }
        Strategy::BlueGreen => next.active = Side::Control,
        Strategy::Shadow => {
            next.strategy = Strategy::Single;
            next.candidate = None;
        }
    }
    next.overrides.retain(|_, side| *side == Side::Control);
    Ok(next)
}

/// A bandit moves the canary to `percent` at `now` (its plan stays in its step).
pub fn reallocate(
    current: &DeploymentSpec,
    version: u64,
    percent: f64,
    now: Millis,
) -> Result<DeploymentSpec, MoveError> {
    let mut next = next_of(current, version);
    let plan = next.plan.as_mut().filter(|p| p.bandit.is_some()).ok_or(MoveError::NoPlan("reallocate"))?;
    plan.allocated_at = Some(now);
    plan.step_version = Some(current.plan.as_ref().and_then(|p| p.step_version).unwrap_or(current.version));
    next.canary_percent = percent;
    Ok(next)
}

/// An A/B/n bandit gives the candidates the shares `percents` (in list order) at `now`; their buckets
/// move as little as the shares allow, and the plan stays in its step.
pub fn reallocate_candidates(
    current: &DeploymentSpec,
    version: u64,
    percents: &[f64],
    now: Millis,
) -> Result<DeploymentSpec, MoveError> {
    let mut next = reallocate(current, version, 0.0, now)?;
    next.candidates = reshare(current, |model, _| {
        current.candidates.iter().position(|c| c.model == model).and_then(|i| percents.get(i).copied())
    })?;
    Ok(next)
}

/// The plan goes to step `index` (started `now`) and the canary to that step's share.
pub fn advance(current: &DeploymentSpec, version: u64, index: usize, now: Millis) -> Result<DeploymentSpec, MoveError> {
    let mut next = next_of(current, version);
    let plan = next.plan.as_mut().ok_or(MoveError::NoPlan("advance"))?;
    plan.step = index;
    plan.step_started_at = now;
    plan.state = PlanState::Running;
    let percent = plan.current().canary_percent;
    if current.candidates.is_empty() {
        next.canary_percent = percent;
    } else {
        next.candidates = reshare(current, |_, _| Some(percent))?;
    }
    Ok(next)
}

/// A/B/n: `model` takes over (becomes control of a `single` deployment); the other candidates stop.
pub fn promote_candidate(current: &DeploymentSpec, version: u64, model: &str) -> Result<DeploymentSpec, MoveError> {
    let chosen = current.candidates.iter().find(|c| c.model == model).ok_or(MoveError::NotACandidate(model.into()))?;
    let mut only = current.clone();
    only.candidates = vec![chosen.clone()];
    promote(&only, version)
}

/// An A/B/n candidate leaves (its guard fired): its buckets go back to control, the others keep theirs,
/// and a running plan's step starts again `now` for them (the split changed under its evidence).
pub fn cut(current: &DeploymentSpec, version: u64, model: &str, now: Millis) -> Result<DeploymentSpec, MoveError> {
    if !current.candidates.iter().any(|c| c.model == model) {
        return Err(MoveError::NotACandidate(model.to_string()));
    }
    let mut next = next_of(current, version);
    next.candidates = reshare(current, |m, percent| (m != model).then_some(percent))?;
    if next.candidates.is_empty() {
        return rollback(current, version);
    }
    if let Some(plan) = next.plan.as_mut() {
        plan.step_started_at = now;
    }
    Ok(next)
}

fn set_state(
    current: &DeploymentSpec,
    version: u64,
    want: PlanState,
    to: PlanState,
    verb: &'static str,
) -> Result<DeploymentSpec, MoveError> {
    let mut next = next_of(current, version);
    let plan = next.plan.as_mut().ok_or(MoveError::NoPlan(verb))?;
    if plan.state != want {
        return Err(MoveError::PlanState { state: plan.state.as_str(), want: want.as_str(), verb });
    }
    plan.state = to;
    Ok(next)
}

/// Holds a running plan at its step; the split stays.
pub fn pause(current: &DeploymentSpec, version: u64) -> Result<DeploymentSpec, MoveError> {
    set_state(current, version, PlanState::Running, PlanState::Paused, "paused")
}

/// Continues a paused plan: its step starts again `now`, with fresh evidence.
pub fn resume(current: &DeploymentSpec, version: u64, now: Millis) -> Result<DeploymentSpec, MoveError> {
    let mut next = set_state(current, version, PlanState::Paused, PlanState::Running, "resumed")?;
    next.plan.as_mut().expect("checked").step_started_at = now;
    Ok(next)
}

/// A blue/green switch to the candidate with the control side kept warm on probation.
pub fn promote_on_probation(
    current: &DeploymentSpec,
    version: u64,
    probation: Probation,
) -> Result<DeploymentSpec, MoveError> {
    if current.strategy != Strategy::BlueGreen || current.active != Side::Control {
        return Err(MoveError::NotASwitch);
    }
    let mut next = promote(current, version)?;
    next.probation = Some(probation);
    Ok(next)
}

/// The probation is over: the copies to the side switched away from stop.
pub fn end_probation(current: &DeploymentSpec, version: u64) -> Result<DeploymentSpec, MoveError> {
    if current.probation.is_none() {
        return Err(MoveError::NoProbation);
    }
    Ok(next_of(current, version))
}

/// The last step is done and the plan holds there.
pub fn finish(current: &DeploymentSpec, version: u64) -> Result<DeploymentSpec, MoveError> {
    set_state(current, version, PlanState::Running, PlanState::Done, "finished")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> DeploymentSpec {
        DeploymentSpec::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn blue_green_promote_switches_then_finalises_and_rollback_switches_back() {
        let blue = spec(r#"{"version":1,"strategy":"blue_green","control":"b","candidate":"g"}"#);
        let green = promote(&blue, 2).unwrap();
        assert_eq!((green.active, green.version), (Side::Candidate, 2));
        let back = rollback(&green, 3).unwrap();
        assert_eq!(back.active, Side::Control);
        let done = promote(&green, 4).unwrap();
        assert_eq!((done.strategy, done.control.as_str(), done.candidate.as_deref()), (Strategy::Single, "g", None));
        done.clone().validate("d").unwrap();
    }

    #[test]
    fn canary_moves() {
        let c = spec(
            r#"{"version":5,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":20,
                        "mirror":["v3"],"overrides":{"a":"candidate","b":"control"},"hedge":true}"#,
        );
        let rolled = rollback(&c, 6).unwrap();
        assert_eq!((rolled.canary_percent, rolled.hedge), (0.0, true));
        assert_eq!(rolled.overrides.len(), 1, "nobody stays pinned to the candidate");
        let promoted = promote(&c, 6).unwrap();
        assert_eq!(promoted.control, "v2");
        assert_eq!(promoted.mirror, vec!["v3".to_string()]);
        assert!(!promoted.hedge, "a single deployment has no canary to hedge");
        promoted.clone().validate("d").unwrap();
        rolled.clone().validate("d").unwrap();
    }

    #[test]
    fn plan_moves_walk_the_steps_and_operator_moves_end_the_plan() {
        let planned = spec(
            r#"{"version":3,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":1,
                "change":{"actor":"operator","reason":"start"},
                "plan":{"steps":[{"canary_percent":1,"bake_ms":0,"min_sample":1,"max_ms":10},
                                 {"canary_percent":20,"bake_ms":0,"min_sample":1,"max_ms":10}],
                        "step_started_at":5}}"#,
        );
        planned.clone().validate("d").unwrap();
        let next = advance(&planned, 4, 1, 99).unwrap();
        assert_eq!((next.canary_percent, next.change.as_ref()), (20.0, None), "a move carries no one's change");
        let plan = next.plan.as_ref().unwrap();
        assert_eq!((plan.step, plan.step_started_at), (1, 99));
        next.clone().validate("d").unwrap();
        let paused = pause(&next, 5).unwrap();
        assert_eq!(paused.plan.as_ref().unwrap().state, PlanState::Paused);
        assert!(pause(&paused, 6).unwrap_err().to_string().contains("plan is paused"));
        let resumed = resume(&paused, 6, 200).unwrap();
        let plan = resumed.plan.as_ref().unwrap();
        assert_eq!((plan.state, plan.step, plan.step_started_at), (PlanState::Running, 1, 200));
        assert!(resume(&resumed, 7, 1).is_err(), "only a paused plan resumes");
        assert_eq!(finish(&resumed, 7).unwrap().plan.unwrap().state, PlanState::Done);
        for ended in [promote(&resumed, 7).unwrap(), rollback(&resumed, 7).unwrap()] {
            assert_eq!(ended.plan, None, "an operator's move ends the plan");
            ended.clone().validate("d").unwrap();
        }
        let bare = spec(r#"{"version":1,"strategy":"canary","control":"v1","candidate":"v2"}"#);
        assert!(matches!(pause(&bare, 2), Err(MoveError::NoPlan(_))));
    }

    /// A/B/n: a plan's advance gives every candidate the step's share, keeping its buckets; a cut frees
    /// one candidate's buckets and restarts the step; a rollback takes every candidate to 0%; only the
    /// last candidate can be promoted.
    #[test]
    fn abn_moves_keep_each_candidates_buckets() {
        let abn = spec(
            r#"{"version":3,"strategy":"canary","control":"v1",
                "candidates":[{"model":"a","percent":5},{"model":"b","percent":5},{"model":"c","percent":5}],
                "plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":10},
                                 {"canary_percent":20,"bake_ms":0,"min_sample":1,"max_ms":10}],
                        "guards":["error_rate"],"step_started_at":5}}"#,
        );
        let validated = abn.clone().validate("d").unwrap().spec;
        assert_eq!(validated.plan.as_ref().unwrap().candidates, Some(3), "validation counts the candidates");
        let buckets = |s: &DeploymentSpec| s.candidates.iter().map(|c| c.buckets.clone()).collect::<Vec<_>>();
        let next = advance(&validated, 4, 1, 99).unwrap();
        assert_eq!(
            buckets(&next),
            [vec![[0, 500], [1500, 3000]], vec![[500, 1000], [3000, 4500]], vec![[1000, 1500], [4500, 6000]]]
        );
        next.clone().validate("d").unwrap();
        let cut_b = cut(&next, 5, "b", 200).unwrap();
        assert_eq!(buckets(&cut_b), [vec![[0, 500], [1500, 3000]], vec![[1000, 1500], [4500, 6000]]]);
        let plan = cut_b.plan.as_ref().unwrap();
        assert_eq!((plan.step, plan.step_started_at, plan.candidates), (1, 200, Some(3)));
        cut_b.clone().validate("d").unwrap();
        assert!(cut(&cut_b, 6, "b", 300).unwrap_err().to_string().contains("not one of the candidates"));
        assert!(promote(&cut_b, 6).unwrap_err().to_string().contains("2 candidates"));
        let rolled = rollback(&cut_b, 6).unwrap();
        assert!(rolled.candidates.iter().all(|c| c.percent == 0.0 && c.buckets.is_empty()));
        rolled.clone().validate("d").unwrap();
        let last = cut(&cut(&cut_b, 6, "a", 300).unwrap(), 7, "c", 400).unwrap();
        assert_eq!((last.plan, last.candidates.len()), (None, 1), "cutting the last candidate rolls back");
        let one = cut(&cut_b, 6, "a", 300).unwrap();
        assert_eq!(promote_candidate(&cut_b, 7, "c").unwrap(), promote(&one, 7).unwrap());
        assert!(promote_candidate(&cut_b, 7, "b").is_err(), "b was cut");
        let promoted = promote(&one, 7).unwrap();
        assert_eq!(
            (promoted.strategy, promoted.control.as_str(), promoted.candidates.len()),
            (Strategy::Single, "c", 0)
        );
        promoted.clone().validate("d").unwrap();
    }

    #[test]
    fn shadow_rollback_stops_copies_and_single_cannot_move() {
        let s = spec(r#"{"version":1,"strategy":"shadow","control":"v1","candidate":"v2"}"#);
        let r = rollback(&s, 2).unwrap();
        assert_eq!((r.strategy, r.candidate.as_deref()), (Strategy::Single, None));
        r.clone().validate("d").unwrap();
        assert!(promote(&r, 3).is_err());
        assert!(rollback(&r, 3).is_err());
    }
}
