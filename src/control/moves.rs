//! The common moves as new versions of a deployment record.
//!
//! - promote: the candidate takes over. Under blue/green with control active, the first promote flips
//!   `active` to the candidate (the switch); otherwise the candidate becomes the control of a `single`
//!   deployment. Mirrors stay.
//! - rollback: traffic back to control. canary → `canary_percent` 0; blue/green → `active` control;
//!   shadow → single (copies stop).

use crate::routing::{DeploymentSpec, Side, Strategy};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MoveError {
    #[error("deployment {0:?} is not in force")]
    Unknown(String),
    #[error("deployment uses strategy single: there is no candidate to {0}")]
    NothingToMove(&'static str),
}

pub fn promote(current: &DeploymentSpec, version: u64) -> Result<DeploymentSpec, MoveError> {
    let candidate = current.candidate.clone().ok_or(MoveError::NothingToMove("promote"))?;
    let mut next = current.clone();
    next.version = version;
    if current.strategy == Strategy::BlueGreen && current.active == Side::Control {
        next.active = Side::Candidate;
    } else {
        next.strategy = Strategy::Single;
        next.control = candidate;
        next.candidate = None;
        next.canary_percent = 0.0;
        next.active = Side::Control;
        next.overrides.clear();
    }
    Ok(next)
}

pub fn rollback(current: &DeploymentSpec, version: u64) -> Result<DeploymentSpec, MoveError> {
    let mut next = current.clone();
    next.version = version;
    match current.strategy {
        Strategy::Single => return Err(MoveError::NothingToMove("roll back")),
        Strategy::Canary => next.canary_percent = 0.0,
        Strategy::BlueGreen => next.active = Side::Control,
        Strategy::Shadow => {
            next.strategy = Strategy::Single;
            next.candidate = None;
        }
    }
    next.overrides.retain(|_, side| *side == Side::Control);
    Ok(next)
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
                        "mirror":["v3"],"overrides":{"a":"candidate","b":"control"}}"#,
        );
        let rolled = rollback(&c, 6).unwrap();
        assert_eq!(rolled.canary_percent, 0.0);
        assert_eq!(rolled.overrides.len(), 1, "nobody stays pinned to the candidate");
        let promoted = promote(&c, 6).unwrap();
        assert_eq!(promoted.control, "v2");
        assert_eq!(promoted.mirror, vec!["v3".to_string()]);
        promoted.clone().validate("d").unwrap();
        rolled.clone().validate("d").unwrap();
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
