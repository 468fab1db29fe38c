//! merge: routed records and model predictions in, decisions and shadow comparisons out.
//!
//! The consumer reads the routed topic and every per-model predictions topic (by regex) in one group
//! with the range assignor. All of them are keyed by user id and have the same partition count, so a
//! request's routed record and its predictions land in the same partition number and thus on the same
//! instance. The [`join::Join`] decides; this loop feeds it and commits its outputs, its changelog
//! records and the input offsets below the oldest record it still needs in one transaction.

pub mod join;
pub mod restore;

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};

use crate::codec::{Codec, Prediction, Routed};
use crate::config::Config;
use crate::dead_letter::{self, Kind};
use crate::error::Result;
use crate::kafka::txn::TxnProducer;
use crate::kafka::{self, GroupWatch, OutRecord, Progress, SourcePos};
use crate::shutdown::Shutdown;
use crate::telemetry;
use join::{Effects, Join, JoinConfig, Output};

/// How often deadlines are checked when no record arrives.
const TICK: Duration = Duration::from_millis(50);

/// The model a predictions topic belongs to, from the configured pattern.
pub fn model_of_topic(pattern: &str, topic: &str) -> Option<String> {
    let (before, after) = pattern.split_once("{model}")?;
    let model = topic.strip_prefix(before)?.strip_suffix(after)?;
    (!model.is_empty()).then(|| model.to_string())
}

/// Turns the join's outputs into records.
pub fn records(outputs: Vec<Output>, config: &Config, codec: &Codec) -> Vec<OutRecord> {
    outputs
        .into_iter()
        .map(|output| match output {
            Output::Decision(d) => {
                OutRecord::new(config.topics.decisions.clone(), d.user_id.as_bytes(), codec.encode(&d))
                    .header("model", d.model.as_str())
                    .header("cohort", d.cohort.as_str())
                    .header("status", d.status.as_str())
                    .header("deployment", d.deployment.as_str())
            }
            Output::Comparison { user_id, comparison } => OutRecord::new(
                config.topics.shadow_comparisons.clone(),
                user_id.into_bytes(),
                codec.encode(&comparison),
            )
            .header("shadow_model", comparison.shadow_model.as_str())
            .header("agreed", if comparison.agreed { "true" } else { "false" }),
            Output::State { user_id, partition, state } => {
                let mut record =
                    OutRecord::new(config.topics.merge_changelog.clone(), user_id.into_bytes(), codec.encode(&state));
                record.partition = Some(partition);
                record
            }
        })
        .collect()
}

/// merge's working state; all of it can be rebuilt from committed offsets and the changelog.
struct Stage {
    join: Join,
    progress: Progress,
    /// Consumer-group generation the state was built for.
    generation: Option<u64>,
    /// Offsets committed by the last transaction, to skip empty ones.
    committed: Option<TopicPartitionList>,
    /// Topics of the assignment the state was built for (it changes only with the generation).
    assigned: HashSet<String>,
}

impl Stage {
    fn new(config: &Config) -> Self {
        let join = Join::new(JoinConfig {
            orphan_ttl_ms: config.service.orphan_ttl_ms as i64,
            max_remembered: config.service.max_pending,
            max_orphans: config.service.max_pending * 4,
        });
        Stage { join, progress: Progress::default(), generation: None, committed: None, assigned: HashSet::new() }
    }

    /// Drops everything in memory, rewinds to the committed offsets and restores the changelog: after a
    /// rebalance (partitions may have moved) or a failed transaction (its effects are gone).
    async fn rebuild(
        &mut self,
        consumer: &StreamConsumer<GroupWatch>,
        config: &Config,
        codec: &Codec,
        shutdown: &Shutdown,
    ) -> Result<()> {
        let generation = consumer.context().generation();
        *self = Stage::new(config);
        if !kafka::rewind(consumer, shutdown).await {
            return Ok(());
        }
        let committed = kafka::batch::committed(consumer)?;
        self.assigned = committed.elements().iter().map(|e| e.topic().to_string()).collect();
        let states = restore::load(config, codec, &committed).await?;
        self.join.restore(states, kafka::now_millis());
        self.generation = Some(generation);
        Ok(())
    }
}

/// Feeds one input record to the join, or dead-letters it.
fn feed(
    message: &OwnedMessage,
    config: &Config,
    codec: &Codec,
    stage: &mut Stage,
    fx: &mut Effects,
    letters: &mut Vec<OutRecord>,
) {
    let source = SourcePos::of(message);
    stage.progress.seen(&source);
    let now = kafka::now_millis();
    let mut reject = |kind, reason: String| {
        letters.push(dead_letter::letter(
            &config.topics.dead_letter,
            &source,
            message.key(),
            message.payload(),
            kind,
            &reason,
        ));
    };
    if message.topic() == config.topics.routed {
        match codec.decode::<Routed>(message.payload().unwrap_or_default()) {
            Ok(routed) => {
                stage.progress.hold(&source);
                stage.join.on_routed(routed, source.clone(), now, fx);
            }
            Err(e) => reject(Kind::Undecodable, format!("routed record: {e}")),
        }
        return;
    }
    let Some(topic_model) = model_of_topic(&config.topics.model_predictions, message.topic()) else {
        return reject(Kind::Invalid, format!("topic {} matches no configured input", message.topic()));
    };
    match codec.decode::<Prediction>(message.payload().unwrap_or_default()) {
        Ok(prediction) if prediction.model != topic_model => reject(
            Kind::Invalid,
            format!("prediction names model {:?} but came from the topic of {topic_model:?}", prediction.model),
        ),
        Ok(prediction) => {
            stage.progress.hold(&source);
            let written_at = message.timestamp().to_millis().unwrap_or(prediction.produced_at);
            stage.join.on_prediction(prediction, source.clone(), written_at, now, fx);
        }
        Err(e) => reject(Kind::Undecodable, format!("prediction: {e}")),
    }
}

/// Flow control that keeps memory bounded: the routed topic pauses while `max_pending` requests are
/// open (they drain by answer or deadline) and resumes below 90%; the backlog waits in Kafka.
/// Predictions are never paused: an answer held back could turn into a false TIMEOUT. Those that arrive
/// before their routed record (which the pause makes more likely) wait in memory, bounded by
/// answer rate × pause time, which the deadlines bound; a hard cap of 4 × `max_pending` guards the rest.
#[derive(Debug, Default)]
struct FlowControl {
    routed_paused: bool,
}

impl FlowControl {
    fn apply(&mut self, consumer: &StreamConsumer<GroupWatch>, config: &Config, join: &Join) {
        let (count, max) = (join.pending(), config.service.max_pending);
        let pause = count >= max;
        let resume = self.routed_paused && count < max * 9 / 10;
        if !(pause || resume) {
            return;
        }
        let Ok(assignment) = consumer.assignment() else { return };
        let mut routed = TopicPartitionList::new();
        for element in assignment.elements().iter().filter(|e| e.topic() == config.topics.routed) {
            let _ = routed.add_partition(element.topic(), element.partition());
        }
        if pause {
            if !self.routed_paused {
                tracing::warn!(pending = count, max, "pending limit reached: pausing intake");
            }
            let _ = consumer.pause(&routed);
            self.routed_paused = true;
        } else {
            tracing::info!(pending = count, "pending below limit: resuming intake");
            let _ = consumer.resume(&routed);
            self.routed_paused = false;
        }
    }
}

/// Runs merge until shutdown.
///
/// Each batch is one transaction: decisions, comparisons, changelog records, dead letters and the input
/// offsets that are safe to commit (never past a request still open). After a rebalance or a failed
/// transaction the state is rebuilt from committed offsets and the changelog.
pub async fn run(config: Config, codec: Codec, shutdown: Shutdown) -> Result<()> {
    let group = format!("{}-merge", config.service.group_id);
    let consumer = kafka::group_consumer(&config, &group)?;
    let predictions = config.topics.model_predictions_regex();
    consumer.subscribe(&[config.topics.routed.as_str(), predictions.as_str()])?;
    let mut producer = TxnProducer::new(&config, config.service.transactional_id("merge"), shutdown.clone())?;
    let mut stage = Stage::new(&config);
    let mut flow = FlowControl::default();
    tracing::info!(routed = %config.topics.routed, %predictions, %group, "merge consuming");
    let wait = Duration::from_millis(config.service.batch_wait_ms);
    while !shutdown.is_triggered() {
        let generation = consumer.context().generation();
        if stage.generation != Some(generation) {
            flow = FlowControl::default(); // a new assignment starts unpaused
            if let Err(error) = stage.rebuild(&consumer, &config, &codec, &shutdown).await {
                tracing::warn!(%error, "cannot rebuild merge state yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            continue;
        }
        let batch = kafka::next_batch(&consumer, config.service.batch_size, wait, TICK).await;
        if consumer.context().generation() != generation {
            continue; // rebuilt at the top of the loop
        }
        let mut fx = Effects::default();
        let mut letters = Vec::new();
        for message in &batch {
            feed(message, &config, &codec, &mut stage, &mut fx, &mut letters);
        }
        let now = kafka::now_millis();
        if consumer.context().settled(now, join::REPLAY_GRACE_MS) {
            let visible = |model: &str| stage.assigned.contains(&config.topics.model_predictions(model));
            stage.join.expire(now, visible, !flow.routed_paused, &mut fx);
        }
        for pos in &fx.released {
            stage.progress.release(pos);
        }
        let mut out = records(std::mem::take(&mut fx.outputs), &config, &codec);
        out.extend(letters);
        let offsets = stage.progress.offsets();
        let unchanged = stage.committed.as_ref().is_some_and(|c| c.to_topic_map() == offsets.to_topic_map());
        if !out.is_empty() || !unchanged {
            match producer.commit(&out, &offsets, consumer.group_metadata()).await {
                Ok(()) => stage.committed = Some(offsets),
                Err(_) => {
                    stage.generation = None; // rebuild: this batch's effects were discarded
                    continue;
                }
            }
        }
        telemetry::pending(stage.join.pending());
        flow.apply(&consumer, &config, &stage.join);
    }
    tracing::info!(pending = stage.join.pending(), "merge stopped; open requests resume from the committed offsets");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_of_topic_inverts_the_pattern() {
        assert_eq!(
            model_of_topic("model.{model}.predictions", "model.fraud-v2.predictions").as_deref(),
            Some("fraud-v2")
        );
        assert_eq!(model_of_topic("model.{model}.predictions", "model.a.b.predictions").as_deref(), Some("a.b"));
        assert_eq!(model_of_topic("model.{model}.predictions", "switchyard.routed"), None);
        assert_eq!(model_of_topic("{model}-out", "x-out").as_deref(), Some("x"));
    }
}
