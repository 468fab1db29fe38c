//! switchyard: a Kafka-native router for shadow, canary and blue/green rollouts of ML models.
//!
//! ```text
//! requests ──► route ──► model.<m>.requests ──► (model worker) ──► model.<m>.predictions ──┐
//!               │  └───► switchyard.routed ─────────────────────────────────────────────► merge ──► decisions
//!               └──────► requests.dlq                                                        └───► shadow.comparisons
//!     decisions, outcomes ──► quality (score stage) ──► scored.outcomes ──► rollout (controller)
//!     switchyard.deployments (compacted) ──► control::watcher ──► route, score stage, controller
//! ```
//!
//! Where things live (docs/architecture.md has the layering, bottom to top, that
//! tests/architecture.rs checks):
//! - [`clock`] — the wall clock in milliseconds; [`shutdown`] — signal handling.
//! - [`codec`] — Avro records and schemas (schemas/), plain or Confluent-framed.
//! - [`config`] — layered configuration (defaults, file, environment, flags).
//! - [`record`] — the deployment record: what may be written to the deployments topic (plan,
//!   probation, quality spec, change figures), its validation and the moves between versions. No I/O.
//! - [`error`] — the library's error type.
//! - [`telemetry`] — metrics and the /metrics, /healthz, /readyz endpoint.
//! - [`cohort`] — who goes where: the cohort hash and the pure split of a deployment's users (the
//!   routing decision; the route stage applies it).
//! - [`kafka`] — the one place Kafka clients are built; the one stage driver route, merge and the score
//!   stage run on through their hooks (batches, rebalances, commit or rewind and restore, records the
//!   broker refuses), Kafka's partitioner.
//! - [`dead_letter`] — dead letters with a reason.
//! - [`control`] — the control plane: the deployments topic, the registry in force, deploy/promote/rollback.
//! - [`route`] — the route service: requests to per-model topics and routing records.
//! - [`merge`] — the merge service: predictions joined to routing records, decisions and comparisons.
//! - [`quality`] — judging models by outcomes: the join, losses, mergeable quality figures, the score stage.
//! - [`rollout`] — rollouts that drive themselves: anytime-valid guards, step evidence, the controller, history.
//! - [`service`] — `switchyard run`: the pieces wired together.
//! - [`tools`] — demo model worker, load generator, labeller, decisions viewer.
//! - [`cli`] — the command line.

pub mod cli;
pub mod clock;
pub mod codec;
pub mod cohort;
pub mod config;
pub mod control;
pub(crate) mod dead_letter;
pub mod error;
pub mod kafka;
pub mod merge;
pub mod quality;
pub mod record;
pub mod rollout;
pub(crate) mod route;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tools;
