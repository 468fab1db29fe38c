//! Judging models by what happened: outcome labels joined to decisions and shadow answers, scored, and
//! quality figures from mergeable counts. The rollout guards build on the scored outcomes (the mean
//! guard is `rollout::guard::MeanGuard`). How a deployment's outputs are scored — the quality spec and
//! the output's score — is part of the deployment record (`record::quality`).
//!
//! Pure:
//! - [`join`]: outcome labels joined to decisions and shadow answers within a window, scored (each
//!   answer's score read when it arrives, never its bytes kept).
//! - [`metrics`]: losses of one labelled decision, and quality per model and arm from counts that add
//!   up across instances (accuracy, Brier, log-loss, AUC, calibration error; MAE, RMSE, bias).
//! - [`changelog`]: the join's changelog records (Avro `ScoreState`), a score per answer.
//! - [`store`]: where the join keeps its requests' states: memory, or local disk (an embedded LSM tree
//!   that holds weeks of open decisions in bounded memory, with checkpoints of the changelog).
//!
//! Kafka:
//! - [`stage`]: the score stage around the join, exactly once, on the stage driver like route and merge
//!   (inside `run`).

pub mod changelog;
pub mod join;
pub mod metrics;
pub mod stage;
pub mod store;
