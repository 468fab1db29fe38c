//! switchyard: a Kafka-native router for shadow, canary and blue/green rollouts of ML models.
//!
//! ```text
//! requests ──► route ──► model.<m>.requests ──► (model worker) ──► model.<m>.predictions ──┐
//!               │  └───► switchyard.routed ─────────────────────────────────────────────► merge ──► decisions
//!               └──────► requests.dlq                                                        └───► shadow.comparisons
//!     switchyard.deployments (compacted) ──► control::watcher ──► route
//! ```
//!
//! Where things live:
//! - [`routing`] — the pure routing decision: cohort hash, deployment record and its validation.
//! - [`route`] — the route service: requests to per-model topics and routing records.
//! - [`merge`] — the merge service: predictions joined to routing records, decisions and comparisons.
//! - [`rollout`] — rollouts that drive themselves: plans, anytime-valid guards, the controller, history.
//! - [`quality`] — judging models by outcomes: scores, losses, mergeable quality figures.
//! - [`control`] — the control plane: the deployments topic, the registry in force, deploy/promote/rollback.
//! - [`codec`] — Avro records and schemas (schemas/), plain or Confluent-framed.
//! - [`telemetry`] — metrics and the /metrics, /healthz, /readyz endpoint.
//! - [`kafka`] — the one place Kafka clients are built; the one stage driver route, merge and the score
//!   stage run on through their hooks (batches, rebalances, commit or rewind and restore, records the
//!   broker refuses), Kafka's partitioner.
//! - [`dead_letter`] — dead letters with a reason.
//! - [`config`] — layered configuration (defaults, file, environment, flags).
//! - [`service`] — `switchyard run`: the pieces wired together; [`shutdown`] — signal handling.
//! - [`tools`] — demo model worker, load generator, decisions viewer.
//! - [`cli`] — the command line.

pub mod cli;
pub mod codec;
pub mod config;
pub mod control;
pub mod dead_letter;
pub mod error;
pub mod kafka;
pub mod merge;
pub mod quality;
pub mod rollout;
pub mod route;
pub mod routing;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tools;
