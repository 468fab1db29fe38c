//! The figures behind a controller's change, as the deployment record's `change.figures` carries them
//! (and `status` and the metrics show them): per guard its e-value, threshold and each arm's counts.
//! `rollout::evidence` and `rollout::probation` compute them.

use serde::{Deserialize, Serialize};

use super::plan::GuardKind;

/// Users and bad outcomes of one arm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    pub n: u64,
    pub bad: u64,
}

/// One guard's figures, as `status`, the metrics and the deployment record's change carry them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardFigures {
    pub guard: GuardKind,
    /// The e-value so far in this step.
    pub e_value: f64,
    /// The e-value at which it fires.
    pub threshold: f64,
    pub control: Counts,
    pub candidate: Counts,
    /// The latency guard's threshold, once fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<i64>,
    /// The quality guard's mean loss per arm: (control, candidate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_loss: Option<(f64, f64)>,
}

/// What a plan's step has seen: the numbers behind a change of the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figures {
    /// A/B/n: the candidate these figures judge against control.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    /// The step, counting from 1.
    pub step: usize,
    /// Users observed: (control, candidate).
    pub users: (u64, u64),
    pub guards: Vec<GuardFigures>,
}

/// Rounds a figure to three decimals for the record; an infinite or undefined one (an e-value past any
/// bound) is written as the largest number instead, which JSON can carry.
pub(crate) fn round3(x: f64) -> f64 {
    if x.is_finite() { (x * 1000.0).round() / 1000.0 } else { f64::MAX }
}
