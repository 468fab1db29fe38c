//! Probation after a blue/green switch, as the deployment record carries it: when the switch happened,
//! how long the side switched away from stays warm, and the paired quality guard's loss, margin and
//! false-alarm chance. What the controller does with it (the paired evidence, `judge`) is
//! `rollout::probation`.

use serde::{Deserialize, Serialize};

use super::plan::QualityGuard;
use crate::codec::Millis;

/// The chance of switching back when the new side is no worse, unless the record says otherwise.
pub const DEFAULT_ALPHA: f64 = 0.05;

fn default_alpha() -> f64 {
    DEFAULT_ALPHA
}

/// A blue/green switch on probation (the deployment record's `probation`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probation {
    /// When the switch happened (ms since the epoch); `promote --probation` sets it.
    pub started_at: Millis,
    /// How long the old side stays warm and the guard watches.
    pub duration_ms: u64,
    /// The loss compared, the margin of harm and the mixing scale, as for a plan's quality guard.
    #[serde(default)]
    pub quality_guard: QualityGuard,
    /// The chance of switching back when the new side is no worse.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidProbation {
    #[error(
        "probation needs strategy blue_green with the candidate active (`promote --probation` switches and sets it)"
    )]
    NotASwitch,
    #[error("probation compares answers against labels: the deployment needs a `quality` spec")]
    NoQuality,
    #[error("probation: duration_ms must be above 0, started_at set, alpha in (0, 0.5], margin ≥ 0 and tau > 0")]
    Fields,
}

impl Probation {
    pub fn validate(&self) -> Result<(), InvalidProbation> {
        let q = &self.quality_guard;
        let fine = self.duration_ms > 0
            && self.started_at > 0
            && self.alpha > 0.0
            && self.alpha <= 0.5
            && q.margin >= 0.0
            && q.margin.is_finite()
            && q.tau > 0.0
            && q.tau.is_finite();
        if fine { Ok(()) } else { Err(InvalidProbation::Fields) }
    }

    pub fn ends_at(&self) -> Millis {
        self.started_at.saturating_add(self.duration_ms as i64)
    }
}
