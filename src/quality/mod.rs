//! Judging models by what happened: outcome labels joined to decisions. Pure and tested: how a model's
//! output becomes a score, the join, the per-request losses of a labelled decision, and quality figures
//! from mergeable counts; around them the score stage, which runs on the stage driver like route and
//! merge. The quality guards in plans build on it (the mean guard is `rollout::guard::MeanGuard`).
//!
//! - [`score`]: output bytes → a score (plain number or a JSON field), per deployment.
//! - [`join`]: outcome labels joined to decisions and shadow answers within a window, scored.
//! - [`stage`]: the Kafka stage around the join, exactly once (inside `run`); [`changelog`]: its
//!   changelog records, a score per answer, never the answer's bytes.
//! - [`metrics`]: losses of one labelled decision, and quality per model and arm from counts that add
//!   up across instances (accuracy, Brier, log-loss, AUC, calibration error; MAE, RMSE, bias).

pub mod changelog;
pub mod join;
pub mod metrics;
pub mod score;
pub mod stage;
