//! The control plane: deployment records on the compacted deployments topic.
//!
//! - [`registry`]: the deployments in force and the rejected records (pure).
//! - [`watcher`]: reads the whole topic at start and follows it live (Kafka).
//! - [`ops`]: what the `deploy`, `promote`, `rollback` and `status` commands do (Kafka).

pub mod ops;
pub(crate) mod registry;
pub mod watcher;

pub use registry::{Registry, SharedRegistry};

use crate::codec::{Codec, RecordKind, RegistryError};
use crate::config::Config;
use crate::kafka;
use crate::record::Deployment;

/// Creates the per-model topics of `deployments` (when `topics.create` is on).
pub async fn ensure_model_topics<'a>(
    config: &Config,
    deployments: impl IntoIterator<Item = &'a Deployment>,
) -> crate::error::Result<()> {
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

/// Registers the schemas of the per-model topics of `deployments` under those topics' own subjects
/// (`<topic>-value`), when the codec has a schema registry; the records keep the ids registered at start.
pub async fn register_model_subjects<'a>(
    config: &Config,
    codec: &Codec,
    deployments: impl IntoIterator<Item = &'a Deployment>,
) -> Result<(), RegistryError> {
    if !codec.has_registry() {
        return Ok(());
    }
    let subjects: Vec<(RecordKind, String)> = deployments
        .into_iter()
        .flat_map(|d| {
            d.models().into_iter().flat_map(|m| {
                [
                    (RecordKind::ModelRequest, format!("{}-value", config.topics.model_requests(m))),
                    (RecordKind::Prediction, format!("{}-value", config.topics.model_predictions(m))),
                ]
            })
        })
        .collect();
    let codec = codec.clone();
    tokio::task::spawn_blocking(move || {
        subjects.iter().try_for_each(|(kind, subject)| codec.register_subject(*kind, subject))
    })
    .await
    .expect("registering does not panic")
}
