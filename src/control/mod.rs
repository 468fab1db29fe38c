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

use crate::config::Config;
use crate::kafka;
use crate::routing::Deployment;

/// Creates the per-model topics of `deployments` (when `topics.create` is on).
pub async fn ensure_model_topics<'a>(
    config: &Config,
    deployments: impl IntoIterator<Item = &'a Deployment>,
) -> Result<(), rdkafka::error::KafkaError> {
    if !config.topics.create {
        return Ok(());
    }
    let topics: Vec<String> = deployments
        .into_iter()
        .flat_map(|d| {
            d.models().into_iter().flat_map(|m| [config.topics.model_requests(m), config.topics.model_predictions(m)])
        })
        .collect();
    kafka::ensure_topics(config, &topics, kafka::TopicKind::Stream).await
}
