//! The deployment record: what is written to the compacted deployments topic, and its validation. No
//! I/O, and no import of the parts that read it (routing, route, merge, quality, rollout, control): they
//! all build on this one vocabulary, so a change to the record's format starts here and a change of a
//! reader never has to.
//!
//! - [`deployment`]: the record itself ([`DeploymentSpec`] as written, [`Deployment`] validated), the
//!   strategies and sides, attribute rules, who changed it and why; a share of users as a bucket
//!   threshold.
//! - [`arms`]: an A/B/n canary's candidates and the buckets each owns; how buckets move when shares
//!   change (sticky: only a shrinking arm's users move).
//! - [`moves`]: the common moves (promote, rollback, a plan's advance, pause, resume, a probation's
//!   end) as the next version of a record, and why a move is refused.
//! - [`plan`]: a rollout plan as the record carries it (steps, guards, budget, actions, where it stands).
//! - [`probation`]: a blue/green switch on probation.
//! - [`figures`]: the controller's evidence carried by a change (guards' e-values and counts per arm).
//! - [`quality`]: how a deployment's model outputs are scored against outcome labels.

pub mod arms;
pub mod deployment;
pub mod figures;
pub mod moves;
pub mod plan;
pub mod probation;
pub mod quality;

pub use deployment::{Change, Deployment, DeploymentSpec, InvalidDeployment, Rule, Side, Strategy};
