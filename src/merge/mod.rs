//! merge: routed records and model predictions in, decisions and shadow comparisons out.
//!
//! The consumer reads the routed topic and every per-model predictions topic (by regex) in one group
//! with the range assignor. All of them are keyed by user id and have the same partition count, so a
//! request's routed record and its predictions land in the same partition number and thus on the same
//! instance. The [`join::Join`] decides; merge's hooks feed it, and the stage driver
//! ([`TxnStage::drive`]) commits its outputs, its changelog records and the input offsets below the
//! oldest record it still needs in one transaction.

mod firsts;
pub(crate) mod join;
mod progress;
mod reads;
pub mod restore;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};

use crate::clock;
use crate::codec::{Codec, Prediction, ROUTED_SOURCE_HEADER, Routed, parse_routed_source};
use crate::config::Config;
use crate::dead_letter::{self, Kind, Letter};
use crate::error::Result;
use crate::kafka::partitioner::partition_for_key;
use crate::kafka::{self, GroupWatch, OutRecord, Outbox, Placed, SourcePos, Stage, TxnStage};
use crate::shutdown::Shutdown;
use crate::telemetry::{self, Event};
use firsts::Firsts;
use join::{Effects, Join, JoinConfig, Output};
use progress::Progress;
use reads::Reads;
use restore::Restored;

/// How often deadlines are checked when no record arrives.
const TICK: Duration = Duration::from_millis(50);

/// Header naming the model of a forwarded prediction (its original topic named it).
const MODEL_HEADER: &str = "model";

/// The model a predictions topic belongs to, from the configured pattern.
pub fn model_of_topic(pattern: &str, topic: &str) -> Option<String> {
    let (before, after) = pattern.split_once("{model}")?;
    let model = topic.strip_prefix(before)?.strip_suffix(after)?;
    (!model.is_empty()).then(|| model.to_string())
}

/// Turns the join's outputs into records, and counts each decision once they are committed.
pub fn records(outputs: Vec<Output>, config: &Config, codec: &Codec, events: &mut Vec<Event>) -> Vec<OutRecord> {
    outputs
        .into_iter()
        .map(|output| match output {
            Output::Decision(d) => {
                events.push(Event::Hop { hop: "end_to_end", since: d.decided_at - d.latency_ms });
                events.push(Event::Decided {
                    deployment: d.deployment.clone(),
                    model: d.model.clone(),
                    cohort: d.cohort.clone(),
                    status: d.status.as_str(),
                });
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

/// Where in the changelog a restore must start, per routed partition: the offset before which no
/// changelog record of any request at or after the committed routed offset lies. Committed as offset
/// metadata (see [`restore::METADATA_PREFIX`]), it keeps a restart's re-reading proportional to the
/// requests still open, not to the traffic rate.
#[derive(Debug, Default)]
struct ChangelogMarks {
    /// Changelog end as far as known: every record written from now on lies at or after it.
    next: HashMap<i32, i64>,
    /// Where the last restore read from; binding while restored states may still be resumed.
    restored_from: HashMap<i32, i64>,
    /// Routed end at the last restore: once read this far, every restored state had its chance.
    routed_end: HashMap<i32, i64>,
    /// Open routed records per partition: routed offset -> changelog end when it was read. Both grow
    /// in reading order, so the first entry has the smallest mark.
    open: HashMap<i32, BTreeMap<i64, i64>>,
}

impl ChangelogMarks {
    fn new(restored: &Restored) -> Self {
        ChangelogMarks {
            next: restored.changelog_end.clone(),
            restored_from: restored.start.clone(),
            routed_end: restored.routed_end.clone(),
            open: HashMap::new(),
        }
    }

    /// A routed record was read and is held. One that may resume a restored state gets that state's
    /// (earlier) offset as its mark.
    fn opened(&mut self, pos: &SourcePos, restoring: bool) {
        let p = pos.partition;
        let next = self.next.get(&p).copied().unwrap_or(0);
        let mark = if restoring { self.restored_from.get(&p).map_or(next, |from| (*from).min(next)) } else { next };
        self.open.entry(p).or_default().insert(pos.offset, mark);
    }

    fn released(&mut self, pos: &SourcePos) {
        if let Some(open) = self.open.get_mut(&pos.partition) {
            open.remove(&pos.offset);
        }
    }

    fn written(&mut self, partition: i32, offset: i64) {
        let next = self.next.entry(partition).or_default();
        *next = (*next).max(offset + 1);
    }

    /// Writes each routed partition's mark into `offsets` as commit metadata.
    fn annotate(&self, offsets: &mut TopicPartitionList, routed: &str, restoring: bool) {
        for (partition, next) in &self.next {
            let mut mark = *next;
            if let Some((_, first)) = self.open.get(partition).and_then(|open| open.first_key_value()) {
                mark = mark.min(*first);
            }
            if restoring {
                mark = self.restored_from.get(partition).map_or(mark, |from| mark.min(*from));
            }
            if let Some(mut element) = offsets.find_partition(routed, *partition) {
                element.set_metadata(format!("{}{mark}", restore::METADATA_PREFIX));
            }
        }
    }
}

/// merge's working state; all of it can be rebuilt from committed offsets and the changelog.
struct State {
    join: Join,
    progress: Progress,
    marks: ChangelogMarks,
    /// Which routed records are first routings (the rest are copies route wrote again).
    firsts: Firsts,
    /// Topics of the assignment the state was built for (it changes only with the generation).
    assigned: HashSet<String>,
    /// How far each predictions partition has been read, in write time.
    reads: Reads,
}

impl State {
    fn new(config: &Config) -> Self {
        let join = Join::new(JoinConfig {
            orphan_ttl_ms: config.service.orphan_ttl_ms as i64,
            max_remembered: config.service.max_pending,
            max_orphans: config.service.max_pending * 4,
        });
        State {
            join,
            progress: Progress::default(),
            marks: ChangelogMarks::default(),
            firsts: Firsts::default(),
            assigned: HashSet::new(),
            reads: Reads::default(),
        }
    }
}

/// What merge knows about its topics' partitions: the join is by partition number.
struct Topology {
    /// Partition count of the routed topic (and of the changelog and forwarded-predictions topics).
    partitions: usize,
    /// Predictions topics already checked, and models already reported as writing to foreign partitions.
    checked: HashSet<String>,
    reported: HashSet<String>,
}

impl Topology {
    /// Reads the partition counts of the topics merge joins by partition, which must be equal.
    async fn load(consumer: &StreamConsumer<GroupWatch>, config: &Config) -> Result<Topology> {
        let t = &config.topics;
        let topics = [t.routed.as_str(), t.merge_changelog.as_str(), t.forwarded_predictions.as_str()];
        let partitions = kafka::same_partition_count(consumer, &topics, "merge").await?;
        Ok(Topology { partitions, checked: HashSet::new(), reported: HashSet::new() })
    }

    /// Reports, once per topic, an assigned predictions topic whose partition count differs from the
    /// routed topic's: its answers still reach their requests, forwarded (one extra hop). One metadata
    /// request for all topics not checked yet (merge may be assigned hundreds of predictions topics: a
    /// request per topic added seconds to each rebalance).
    fn check_predictions_topics(
        &mut self,
        consumer: &StreamConsumer<GroupWatch>,
        assigned: &HashSet<String>,
        config: &Config,
    ) {
        let unchecked: HashSet<&String> = assigned
            .iter()
            .filter(|t| model_of_topic(&config.topics.model_predictions, t).is_some() && !self.checked.contains(*t))
            .collect();
        if unchecked.is_empty() {
            return;
        }
        let metadata = match consumer.fetch_metadata(None, kafka::ADMIN_TIMEOUT) {
            Ok(metadata) => metadata,
            Err(error) => {
                tracing::warn!(%error, "cannot read the predictions topics' partition counts; checked at the next rebalance");
                return;
            }
        };
        for topic in
            metadata.topics().iter().filter(|t| t.error().is_none() && unchecked.contains(&t.name().to_string()))
        {
            let n = topic.partitions().len();
            if n != self.partitions {
                tracing::warn!(topic = %topic.name(), partitions = n, routed_partitions = self.partitions,
                    "predictions topic has another partition count than the routed topic; its answers are forwarded (one extra hop)");
            }
            self.checked.insert(topic.name().to_string());
        }
    }

    /// The partition a prediction with `key` is joined on.
    fn home(&self, key: &[u8]) -> i32 {
        partition_for_key(key, self.partitions)
    }

    /// Names a model whose worker writes predictions to other partitions than their keys' (once).
    fn report_foreign_partitioner(&mut self, model: &str, topic: &str) {
        if self.reported.insert(model.to_string()) {
            tracing::warn!(%model, %topic,
                "this model's worker writes predictions to other partitions than their keys' (its client's partitioner is not Kafka's murmur2); merge forwards them, one extra hop each — set partitioner=murmur2_random in the worker");
        }
    }
}

/// merge's hooks for the stage driver.
struct Merge {
    config: Config,
    codec: Codec,
    topology: Topology,
    state: State,
    flow: FlowControl,
    /// The current batch's join effects, turned into records at its end.
    fx: Effects,
}

impl Stage for Merge {
    /// Drops everything in memory and restores the changelog: after a rebalance (partitions may have
    /// moved) or a failed transaction (its effects are gone).
    async fn restore(&mut self, consumer: &StreamConsumer<GroupWatch>) -> Result<()> {
        let config = &self.config;
        self.flow = FlowControl::default(); // a new assignment starts unpaused
        self.fx = Effects::default();
        self.state = State::new(config);
        let committed = kafka::batch::committed(consumer)?;
        self.state.assigned = committed.elements().iter().map(|e| e.topic().to_string()).collect();
        for element in committed.elements() {
            if let Some(model) = model_of_topic(&config.topics.model_predictions, element.topic()) {
                let start = if let rdkafka::Offset::Offset(offset) = element.offset() { offset } else { 0 };
                self.state.reads.starts(&model, element.partition(), start);
            }
        }
        self.topology.check_predictions_topics(consumer, &self.state.assigned, config);
        let restored = restore::load(config, &self.codec, &committed).await?;
        self.state.marks = ChangelogMarks::new(&restored);
        self.state.firsts = Firsts::restored(restored.firsts);
        self.state.join.restore(restored.states, clock::now_millis());
        Ok(())
    }

    /// Feeds the input record at `index` of the batch to the join, forwards it, or dead-letters it.
    fn feed(&mut self, index: usize, message: &OwnedMessage, out: &mut Outbox) {
        let (config, codec, state, fx) = (&self.config, &self.codec, &mut self.state, &mut self.fx);
        let source = SourcePos::of(message);
        state.progress.seen(&source);
        let now = clock::now_millis();
        let mut reject = |kind, reason: String| {
            out.push_from(index, Some(Letter::of(message, kind, reason).record(&config.topics.dead_letter)));
        };
        let value = message.payload().unwrap_or_default();
        if message.topic() == config.topics.routed {
            match codec.decode::<Routed>(value) {
                Ok(routed) => {
                    if let Some(from) = routed_source(message)
                        && !state.firsts.first(source.partition, source.offset, from)
                    {
                        // route wrote this request's routing again (a crash or rebalance before
                        // its offsets were committed): the first one stands.
                        out.events.push(Event::RoutedCopyDropped);
                        return;
                    }
                    state.progress.hold(&source);
                    state.marks.opened(&source, state.join.restoring());
                    let first = fx.outputs.len();
                    state.join.on_routed(routed, source.clone(), now, fx);
                    mark_origin(fx, first, index);
                }
                Err(e) => reject(Kind::Undecodable, format!("routed record: {e}")),
            }
            return;
        }
        let forwarded = message.topic() == config.topics.forwarded_predictions;
        let topic_model = if forwarded {
            message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == MODEL_HEADER))
                .and_then(|h| h.value)
                .map(|m| String::from_utf8_lossy(m).into_owned())
        } else {
            model_of_topic(&config.topics.model_predictions, message.topic())
        };
        let Some(topic_model) = topic_model else {
            return reject(Kind::Invalid, format!("topic {} matches no configured input", message.topic()));
        };
        if let (false, Some(written_at)) = (forwarded, message.timestamp().to_millis()) {
            state.reads.read(&topic_model, &source, written_at);
        }
        if value.len() > config.service.max_prediction_bytes {
            let reason = format!(
                "prediction of {} bytes exceeds service.max_prediction_bytes = {}; its request is decided at its deadline",
                value.len(),
                config.service.max_prediction_bytes
            );
            return reject(Kind::Oversized, reason);
        }
        let prediction = match codec.decode::<Prediction>(value) {
            Ok(prediction) => prediction,
            Err(e) => return reject(Kind::Undecodable, format!("prediction: {e}")),
        };
        if prediction.model != topic_model {
            let reason =
                format!("prediction names model {:?} but came from the topic of {topic_model:?}", prediction.model);
            return reject(Kind::Invalid, reason);
        }
        let written_at = message.timestamp().to_millis().unwrap_or(prediction.produced_at);
        if let (false, Some(key)) = (forwarded, message.key()) {
            let home = self.topology.home(key);
            if home != message.partition() {
                // Not where its request is joined (nor, with range assignment, necessarily on this
                // instance): forward it there, keeping its timestamp, which its deadline is judged by.
                self.topology.report_foreign_partitioner(&topic_model, message.topic());
                out.events.push(Event::PredictionForwarded { model: topic_model.clone() });
                out.records.push(OutRecord {
                    topic: config.topics.forwarded_predictions.clone(),
                    partition: Some(home),
                    key: key.to_vec(),
                    payload: Some(value.to_vec()),
                    headers: vec![(MODEL_HEADER, topic_model.into_bytes())],
                    timestamp: Some(written_at),
                    origin: Some(index),
                });
                return;
            }
        }
        state.progress.hold(&source);
        let first = fx.outputs.len();
        state.join.on_prediction(prediction, source, written_at, now, fx);
        mark_origin(fx, first, index);
    }

    /// A refused input the driver dead-lettered: processed, never held.
    fn skipped(&mut self, message: &OwnedMessage) {
        self.state.progress.seen(&SourcePos::of(message));
    }

    /// Deadlines, held records released, the end of a restore; then the batch's join outputs become
    /// records (each made from the input that caused it, where one did).
    fn tick(&mut self, now: i64, consumer: &StreamConsumer<GroupWatch>, out: &mut Outbox) {
        let (config, state) = (&self.config, &mut self.state);
        let mut fx = std::mem::take(&mut self.fx);
        if consumer.context().settled(now, join::REPLAY_GRACE_MS) {
            let reads = &state.reads;
            let read_past = |model: &str, partition: i32, t: i64| {
                reads.past(model, partition, t, || {
                    kafka::fetched_watermarks(consumer, &config.topics.model_predictions(model), partition)
                })
            };
            state.join.expire(now, read_past, !self.flow.routed_paused, &mut fx);
        }
        for pos in &fx.released {
            state.progress.release(pos);
            if pos.topic == config.topics.routed {
                state.marks.released(pos);
            }
        }
        if state.join.restoring() && kafka::batch::caught_up(consumer, &config.topics.routed, &state.marks.routed_end) {
            state.join.end_restore();
        }
        fx.coalesce_states();
        out.events.extend(fx.events);
        let mut made = records(fx.outputs, config, &self.codec, &mut out.events);
        for (record, origin) in made.iter_mut().zip(fx.origins) {
            record.origin = origin;
        }
        out.records.extend(made);
    }

    /// Below the oldest record still needed, with each routed partition's changelog and routing marks.
    fn offsets(&mut self, _batch: &[OwnedMessage]) -> TopicPartitionList {
        let (routed, state) = (&self.config.topics.routed, &mut self.state);
        let mut offsets = state.progress.offsets();
        state.marks.annotate(&mut offsets, routed, state.join.restoring());
        for mut element in offsets.elements_for_topic(routed) {
            if let rdkafka::Offset::Offset(offset) = element.offset() {
                let firsts = state.firsts.at(element.partition(), offset);
                let metadata = [element.metadata(), firsts.as_str()].join(" ");
                element.set_metadata(metadata.trim_start());
            }
        }
        offsets
    }

    fn committed(&mut self, records: &[OutRecord], placed: &[Placed]) {
        for (record, (partition, offset)) in records.iter().zip(placed) {
            if record.topic == self.config.topics.merge_changelog {
                self.state.marks.written(*partition, *offset);
            }
        }
    }

    fn after(&mut self, consumer: &StreamConsumer<GroupWatch>) {
        telemetry::pending(self.state.join.pending());
        self.flow.apply(consumer, &self.config, &self.state.join);
    }
}

/// The request a routed record was made from (requests partition, offset), as route names it; None for
/// a routed record of an earlier version (written in a transaction with its offsets: never a copy).
fn routed_source(message: &OwnedMessage) -> Option<(i32, i64)> {
    let headers = message.headers()?;
    let header = headers.iter().find(|h| h.key == ROUTED_SOURCE_HEADER)?;
    parse_routed_source(header.value?)
}

/// The join's outputs from `first` on were made from input `index` (see [`OutRecord::origin`]).
fn mark_origin(fx: &mut Effects, first: usize, index: usize) {
    fx.origins.resize(first, None);
    fx.origins.resize(fx.outputs.len(), Some(index));
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
/// Each batch is one transaction (see [`TxnStage::drive`]): decisions, comparisons, changelog records,
/// dead letters, forwarded predictions and the input offsets that are safe to commit (never past a
/// request still open). After a rebalance or a failed transaction the state is rebuilt from committed
/// offsets and the changelog.
pub async fn run(config: Config, codec: Codec, shutdown: Shutdown) -> Result<()> {
    let predictions = config.topics.model_predictions_regex();
    let topics = [config.topics.routed.as_str(), config.topics.forwarded_predictions.as_str(), predictions.as_str()];
    let mut stage = TxnStage::new(&config, "merge", &topics, kafka::Output::Transactional, shutdown)?;
    telemetry::routed_copies_watched();
    let topology = Topology::load(stage.consumer(), &config).await?;
    let state = State::new(&config);
    let mut merge = Merge { config, codec, topology, state, flow: FlowControl::default(), fx: Effects::default() };
    stage.drive(&mut merge, TICK, dead_letter::refused).await?;
    tracing::info!(
        pending = merge.state.join.pending(),
        "merge stopped; open requests resume from the committed offsets"
    );
    stage.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(marks: &ChangelogMarks, restoring: bool) -> String {
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset("routed", 0, rdkafka::Offset::Offset(7)).unwrap();
        marks.annotate(&mut offsets, "routed", restoring);
        offsets.find_partition("routed", 0).unwrap().metadata().to_string()
    }

    #[test]
    fn the_changelog_mark_never_passes_an_open_request_or_a_restored_state() {
        let pos = |offset| SourcePos { topic: "routed".into(), partition: 0, offset };
        let restored = Restored {
            start: HashMap::from([(0, 100)]),
            changelog_end: HashMap::from([(0, 150)]),
            ..Restored::default()
        };
        let mut marks = ChangelogMarks::new(&restored);
        assert_eq!(mark(&marks, true), "changelog:100", "restored states may still be resumed");
        assert_eq!(mark(&marks, false), "changelog:150");
        marks.opened(&pos(7), true); // may resume a restored state: its records lie from 100 on
        marks.written(0, 170);
        assert_eq!(mark(&marks, false), "changelog:100", "an open request resumed from the restore");
        marks.opened(&pos(8), false);
        marks.released(&pos(7));
        assert_eq!(mark(&marks, false), "changelog:171", "opened after the last write");
        marks.written(0, 180);
        assert_eq!(mark(&marks, false), "changelog:171", "still open");
        marks.released(&pos(8));
        assert_eq!(mark(&marks, false), "changelog:181");
    }

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
