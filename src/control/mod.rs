//! The control plane: deployment records on the compacted deployments topic.
//!
//! - [`registry`]: the deployments in force and the rejected records (pure).
//! - [`moves`]: promote and rollback as new versions of a deployment record (pure).
//! - [`watcher`]: reads the whole topic at start and follows it live (Kafka).
//! - [`ops`]: what the `deploy`, `promote`, `rollback` and `status` commands do (Kafka).

pub mod moves;
pub mod ops;
pub mod registry;
pub mod watcher;

pub use registry::{Registry, SharedRegistry};
