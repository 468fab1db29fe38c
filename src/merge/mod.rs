//! merge: routed records and model predictions in, decisions and shadow comparisons out.
//!
//! The consumer reads the routed topic and every per-model predictions topic (by regex) in one group
//! with the range assignor. All of them are keyed by user id and have the same partition count, so a
//! request's routed record and its predictions land in the same partition number and thus on the same
//! instance. The [`join::Join`] decides; this loop feeds it, publishes its outputs and commits offsets
//! only below the oldest record the join still needs.

pub mod join;

use std::time::Duration;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::TopicPartitionList;

use crate::codec::{Codec, Millis, Prediction, Routed};
use crate::config::Config;
use crate::dead_letter::{self, Kind};
use crate::error::Result;
use crate::kafka::{self, OutRecord, Progress, SourcePos};
use crate::shutdown::Shutdown;
use crate::telemetry;
use join::{Effects, Join, JoinConfig, Output};

/// How often deadlines are checked when no record arrives.
const TICK: Duration = Duration::from_millis(50);

/// Sees rebalances: while one is under way, and for a grace period after each assignment (the fetchers
/// catch up from committed offsets), deadlines are not enforced — otherwise a rebalance would turn
/// answers that are merely not fetched yet into TIMEOUT decisions.
#[derive(Default)]
pub struct RebalanceWatch {
    rebalancing: AtomicBool,
    assigned_at: AtomicI64,
}

impl RebalanceWatch {
    fn deadlines_enforced(&self, now: Millis) -> bool {
        !self.rebalancing.load(Ordering::SeqCst) && now >= self.assigned_at.load(Ordering::SeqCst) + join::REPLAY_GRACE_MS
    }
}

impl ClientContext for RebalanceWatch {}

impl ConsumerContext for RebalanceWatch {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        tracing::info!(?rebalance, "merge rebalance starting");
        self.rebalancing.store(true, Ordering::SeqCst);
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            tracing::info!(partitions = partitions.count(), "merge partitions assigned");
            self.assigned_at.store(kafka::now_millis(), Ordering::SeqCst);
        }
        self.rebalancing.store(false, Ordering::SeqCst);
    }
}

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
            Output::Decision(d) => OutRecord::new(config.topics.decisions.clone(), d.user_id.as_bytes(), codec.encode(&d))
                .header("model", d.model.as_str())
                .header("cohort", d.cohort.as_str())
                .header("status", d.status.as_str())
                .header("deployment", d.deployment.as_str()),
            Output::Comparison { user_id, comparison } => {
                OutRecord::new(config.topics.shadow_comparisons.clone(), user_id.into_bytes(), codec.encode(&comparison))
                    .header("shadow_model", comparison.shadow_model.as_str())
                    .header("agreed", if comparison.agreed { "true" } else { "false" })
            }
        })
        .collect()
}

/// Feeds one input record to the join, or dead-letters it.
fn feed(message: &OwnedMessage, config: &Config, codec: &Codec, join: &mut Join, progress: &mut Progress, fx: &mut Effects, letters: &mut Vec<OutRecord>) {
    let source = SourcePos { topic: message.topic().to_string(), partition: message.partition(), offset: message.offset() };
    let now = kafka::now_millis();
    let mut reject = |kind, reason: String| {
        letters.push(dead_letter::letter(&config.topics.dead_letter, &source, message.key(), message.payload(), kind, &reason));
    };
    if message.topic() == config.topics.routed {
        match codec.decode::<Routed>(message.payload().unwrap_or_default()) {
            Ok(routed) => {
                progress.hold(&source);
                join.on_routed(routed, source.clone(), now, fx);
            }
            Err(e) => reject(Kind::Undecodable, format!("routed record: {e}")),
        }
        return;
    }
    let Some(topic_model) = model_of_topic(&config.topics.model_predictions, message.topic()) else {
        return reject(Kind::Invalid, format!("topic {} matches no configured input", message.topic()));
    };
    match codec.decode::<Prediction>(message.payload().unwrap_or_default()) {
        Ok(prediction) if prediction.model != topic_model => {
            reject(Kind::Invalid, format!("prediction names model {:?} but came from the topic of {topic_model:?}", prediction.model))
        }
        Ok(prediction) => {
            progress.hold(&source);
            let written_at = message.timestamp().to_millis().unwrap_or(prediction.produced_at);
            join.on_prediction(prediction, source.clone(), written_at, now, fx);
        }
        Err(e) => reject(Kind::Undecodable, format!("prediction: {e}")),
    }
}

/// Pauses the routed topic while too many requests are pending (predictions keep flowing, so the
/// pending set drains), and resumes below 90%.
fn apply_backpressure(consumer: &StreamConsumer<RebalanceWatch>, config: &Config, join: &Join, paused: &mut bool) {
    let pending = join.pending() + join.orphans();
    let over = pending >= config.service.max_pending;
    let under = pending < config.service.max_pending * 9 / 10;
    if !over && !(*paused && under) {
        return;
    }
    let Ok(assignment) = consumer.assignment() else { return };
    let mut routed = TopicPartitionList::new();
    for element in assignment.elements().iter().filter(|e| e.topic() == config.topics.routed) {
        let _ = routed.add_partition(element.topic(), element.partition());
    }
    if over {
        if !*paused {
            tracing::warn!(pending, max = config.service.max_pending, "pending limit reached: pausing intake");
        }
        let _ = consumer.pause(&routed);
        *paused = true;
    } else if *paused && under {
        tracing::info!(pending, "pending below limit: resuming intake");
        let _ = consumer.resume(&routed);
        *paused = false;
    }
}

/// Runs merge until shutdown.
pub async fn run(config: Config, codec: Codec, shutdown: Shutdown) -> Result<()> {
    let group = format!("{}-merge", config.service.group_id);
    let consumer = kafka::group_consumer_with(&config, &group, RebalanceWatch::default())?;
    let predictions = config.topics.model_predictions_regex();
    consumer.subscribe(&[config.topics.routed.as_str(), predictions.as_str()])?;
    let producer = kafka::producer(&config)?;
    let mut join = Join::new(JoinConfig {
        orphan_ttl_ms: config.service.orphan_ttl_ms as i64,
        max_remembered: config.service.max_pending,
    });
    let mut progress = Progress::default();
    let mut paused = false;
    tracing::info!(routed = %config.topics.routed, %predictions, %group, "merge consuming");
    let wait = Duration::from_millis(config.service.batch_wait_ms);
    while !shutdown.is_triggered() {
        let batch = kafka::next_batch(&consumer, config.service.batch_size, wait, TICK).await;
        let mut fx = Effects::default();
        let mut letters = Vec::new();
        for message in &batch {
            let source = SourcePos { topic: message.topic().to_string(), partition: message.partition(), offset: message.offset() };
            if progress.accept(&source) {
                feed(message, &config, &codec, &mut join, &mut progress, &mut fx, &mut letters);
            }
        }
        let now = kafka::now_millis();
        if consumer.context().deadlines_enforced(now) {
            let assigned: HashSet<String> = consumer.assignment().map(|a| a.elements().iter().map(|e| e.topic().to_string()).collect()).unwrap_or_default();
            join.expire(now, |model| assigned.contains(&config.topics.model_predictions(model)), &mut fx);
        }
        let mut out = records(std::mem::take(&mut fx.outputs), &config, &codec);
        out.extend(letters);
        if !kafka::send_all_retrying(&producer, &out, &shutdown).await {
            break;
        }
        for pos in &fx.released {
            progress.release(pos);
        }
        kafka::commit(&consumer, &mut progress);
        telemetry::pending(join.pending());
        apply_backpressure(&consumer, &config, &join, &mut paused);
    }
    if let Some(list) = progress.to_commit() {
        consumer.commit(&list, rdkafka::consumer::CommitMode::Sync)?;
    }
    tracing::info!(pending = join.pending(), "merge stopped; pending requests resume from committed offsets");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_of_topic_inverts_the_pattern() {
        assert_eq!(model_of_topic("model.{model}.predictions", "model.fraud-v2.predictions").as_deref(), Some("fraud-v2"));
        assert_eq!(model_of_topic("model.{model}.predictions", "model.a.b.predictions").as_deref(), Some("a.b"));
        assert_eq!(model_of_topic("model.{model}.predictions", "switchyard.routed"), None);
        assert_eq!(model_of_topic("{model}-out", "x-out").as_deref(), Some("x"));
    }
}
