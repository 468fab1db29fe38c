//! Reads the whole deployments topic at start and follows it live.
//!
//! Every instance reads every partition of the topic outside any consumer group, so all instances apply
//! the same records in the same order. The watcher owns the authoritative [`Registry`] and publishes a
//! copy to the [`SharedRegistry`] once the topic is loaded and after each change later, once the
//! per-model topics of a new deployment exist — route never sees a deployment whose topics are missing.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use tokio::sync::oneshot;

use super::registry::{Outcome, Registry, SharedRegistry};
use crate::codec::Codec;
use crate::config::Config;
use crate::error::Error;
use crate::kafka::{self, OutRecord};
use crate::shutdown::Shutdown;
use crate::telemetry;

/// How often the catch-up loop re-checks positions when no record arrives (positions also move past
/// transaction markers, which are never delivered as records).
const POSITION_POLL: Duration = Duration::from_millis(200);

/// Opens a reader on every partition of the deployments topic, from the beginning. Creates the topic
/// (compacted) if it is missing and topic creation is enabled.
pub async fn open(config: &Config) -> Result<(StreamConsumer, HashMap<i32, i64>), Error> {
    let topic = &config.topics.deployments;
    let consumer = kafka::reader(config)?;
    if kafka::partition_count(&consumer, topic)?.is_none() {
        if !config.topics.create {
            return Err(Error::MissingTopic(topic.clone()));
        }
        kafka::ensure_topics(config, std::slice::from_ref(topic), kafka::TopicKind::Compacted).await?;
    }
    let partitions =
        kafka::wait_for_topic(&consumer, topic).await?.ok_or_else(|| Error::MissingTopic(topic.clone()))?;
    let (assignment, targets) = kafka::batch::whole(config, &consumer, topic, 0..partitions as i32)?;
    consumer.assign(&assignment)?;
    Ok((consumer, targets))
}

/// Reads records until every partition reached the end it had when `open` ran.
pub async fn catch_up(
    consumer: &StreamConsumer,
    topic: &str,
    targets: &HashMap<i32, i64>,
    registry: &mut Registry,
) -> Result<(), Error> {
    while !kafka::batch::caught_up(consumer, topic, targets) {
        if let Ok(message) = tokio::time::timeout(POSITION_POLL, consumer.recv()).await {
            let message = message?;
            registry.apply(message.key(), message.payload(), message.offset());
        }
    }
    Ok(())
}

/// Reads the deployments topic once to its end: what `status`, `deploy` and friends work from.
pub async fn snapshot(config: &Config) -> Result<Registry, Error> {
    let (consumer, targets) = open(config).await?;
    let mut registry = Registry::default();
    catch_up(&consumer, &config.topics.deployments, &targets, &mut registry).await?;
    Ok(registry)
}

/// Logs and counts an outcome.
fn report(outcome: &Outcome) {
    match outcome {
        Outcome::Installed(d) => {
            tracing::info!(deployment = %d.name, version = d.version(), strategy = %d.strategy(),
                control = %d.spec.control, candidate = ?d.spec.candidate, "deployment in force");
            telemetry::config_applied(&d.name, d.version(), d.candidate_percent());
        }
        Outcome::Deleted(name) => {
            tracing::info!(deployment = %name, "deployment deleted");
            telemetry::config_deleted(name);
        }
        Outcome::Rejected(r) => {
            tracing::warn!(deployment = %r.deployment, version = ?r.version, offset = r.offset, reason = %r.reason,
                "deployment record rejected; the last good config stays in force");
            telemetry::config_rejected(&r.deployment);
        }
        Outcome::Unchanged => {}
    }
}

/// Writes the config in force for each of `names` again (see [`Registry::record_in_force`]).
async fn write_back(
    config: &Config,
    producer: &FutureProducer,
    registry: &Registry,
    names: impl IntoIterator<Item = String>,
) {
    let records: Vec<OutRecord> = names
        .into_iter()
        .filter_map(|name| {
            let value = registry.record_in_force(&name)?;
            tracing::info!(deployment = %name, "writing the config in force again after a rejected record");
            Some(OutRecord::new(config.topics.deployments.clone(), name.into_bytes(), value))
        })
        .collect();
    if let Err(error) = kafka::send_all(producer, &records).await {
        tracing::error!(%error, "cannot write the config in force back to the deployments topic");
    }
}

/// Loads the topic, signals `loaded`, then follows it until shutdown. The per-model topics of what is
/// in force are created before route sees it: once for everything after the initial load, then for each
/// new deployment record. After a rejected record (during the load: where a deployment's last record
/// was rejected) the config in force is written again, so that the last record per key — all that
/// compaction keeps — is always the one in force.
pub async fn run(
    config: Config,
    codec: Codec,
    shared: SharedRegistry,
    loaded: oneshot::Sender<()>,
    mut shutdown: Shutdown,
) -> Result<(), Error> {
    let (consumer, targets) = open(&config).await?;
    let producer = kafka::producer(&config)?;
    let mut registry = Registry::default();
    let mut loaded = Some(loaded);
    // Deployments whose last record so far was rejected, during the initial load.
    let mut last_rejected = BTreeSet::new();
    loop {
        if loaded.is_some() && kafka::batch::caught_up(&consumer, &config.topics.deployments, &targets) {
            if let Err(error) = super::ensure_model_topics(&config, registry.deployments().map(|d| d.as_ref())).await {
                tracing::error!(%error, "cannot create per-model topics");
            }
            let installed = registry.deployments().map(|d| d.as_ref());
            if let Err(error) = super::register_model_subjects(&config, &codec, installed).await {
                tracing::error!(%error, "cannot register the per-model topics' subjects");
            }
            *shared.write().expect("registry lock is never poisoned") = registry.clone();
            tracing::info!(deployments = registry.deployments().count(), "deployments topic loaded");
            let _ = loaded.take().expect("checked").send(());
            write_back(&config, &producer, &registry, std::mem::take(&mut last_rejected)).await;
        }
        let message = tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            received = tokio::time::timeout(POSITION_POLL, consumer.recv()) => match received {
                Err(_) => continue,
                Ok(Ok(message)) => message,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "deployments topic read failed; retrying");
                    continue;
                }
            },
        };
        let outcome = registry.apply(message.key(), message.payload(), message.offset());
        report(&outcome);
        if let Some(name) = message.key().and_then(|k| std::str::from_utf8(k).ok()) {
            match (&outcome, loaded.is_some()) {
                (Outcome::Rejected(_), true) => {
                    last_rejected.insert(name.to_string());
                }
                (Outcome::Rejected(_), false) => write_back(&config, &producer, &registry, [name.to_string()]).await,
                (_, true) => {
                    last_rejected.remove(name);
                }
                (_, false) => {}
            }
        }
        if loaded.is_none() && !matches!(outcome, Outcome::Unchanged) {
            if let Outcome::Installed(d) = &outcome {
                if let Err(error) = super::ensure_model_topics(&config, [d.as_ref()]).await {
                    tracing::error!(deployment = %d.name, %error, "cannot create per-model topics");
                }
                if let Err(error) = super::register_model_subjects(&config, &codec, [d.as_ref()]).await {
                    tracing::error!(deployment = %d.name, %error, "cannot register the per-model topics' subjects");
                }
            }
            *shared.write().expect("registry lock is never poisoned") = registry.clone();
        }
    }
}
