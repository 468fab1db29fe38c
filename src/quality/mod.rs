//! Judging models by what happened: outcome labels joined to decisions and shadow answers, scored, and
//! quality figures from mergeable counts. The rollout guards build on the scored outcomes (the mean
//! guard is `rollout::guard::MeanGuard`). How a deployment's outputs are scored — the quality spec and
//! the output's score — is part of the deployment record (`record::quality`).
//!
//! Pure:
//! - [`join`]: outcome labels joined to decisions and shadow answers within a window, scored.
//! - [`metrics`]: losses of one labelled decision, and quality per model and arm from counts that add
//!   up across instances (accuracy, Brier, log-loss, AUC, calibration error; MAE, RMSE, bias).
//!
//! Kafka:
//! - [`stage`]: the stage around the join, exactly once, with its changelog (inside `run`).

pub mod join;
pub mod metrics;
pub mod stage;
