//! The transactional stage route and merge are built on: consume a batch, notice a rebalance under it,
//! produce what the batch turned into and commit it with the input offsets in one transaction, or
//! rewind and read again.
//!
//! One record the broker refuses for what it is (too large for its topic, invalid) fails its whole
//! transaction, and would fail every retry of it: the partition would stall for good. So the input it
//! was made from is remembered across the rewind, and when that input is read again the caller
//! dead-letters it instead of processing it ([`TxnStage::refusal`]); the rest of the batch goes through.
//! If the dead letter is refused too (larger than the dead-letter topic allows), it goes out without
//! its value, naming where the original still is.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{Consumer, ConsumerGroupMetadata, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;

use super::batch::{self, GroupWatch, SourcePos};
use super::txn::TxnProducer;
use super::{OutRecord, Placed, group_consumer};
use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::telemetry::{self, Event};

/// Why the broker refused what an input record turned into, and how often.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: String,
    /// 1: its outputs were refused (dead-letter it); 2: its dead letter was refused too (dead-letter it
    /// without the value); more: not even that could be written (skip it, logged).
    pub strikes: u32,
}

/// What a batch turned into: records to write and the events that count them once written.
#[derive(Debug, Default)]
pub struct Outbox {
    pub records: Vec<OutRecord>,
    pub events: Vec<Event>,
}

impl Outbox {
    pub fn push(&mut self, (record, event): (OutRecord, Event)) {
        self.records.push(record);
        self.events.push(event);
    }

    /// Adds a record made from the input at `index` of the batch (a dead letter, say): if the broker
    /// refuses it, that input's next dead letter goes without its value.
    pub fn push_from(&mut self, index: usize, item: Option<(OutRecord, Event)>) {
        if let Some((mut record, event)) = item {
            record.origin = Some(index);
            self.push((record, event));
        }
    }
}

/// The outcome of [`TxnStage::commit`].
#[derive(Debug)]
pub enum Commit {
    /// Committed; where each record was placed, in the order given.
    Done(Vec<Placed>),
    /// Nothing of the batch is visible; the caller must read its inputs again (rewind or rebuild).
    Failed,
}

/// A consumer in the stage's group and a transactional producer, with what the broker refused.
pub struct TxnStage {
    /// `route` or `merge`, for metrics.
    name: &'static str,
    consumer: StreamConsumer<GroupWatch>,
    /// Added to the consumer's generation, so that generations keep growing across a new consumer.
    generation_base: u64,
    /// What a new consumer needs (see [`TxnStage::next_batch`]).
    config: Config,
    group: String,
    topics: Vec<String>,
    /// When consumers became unusable lately.
    lost_consumers: Vec<std::time::Instant>,
    producer: TxnProducer,
    refused: HashMap<SourcePos, Refusal>,
    /// Failed transactions in a row, for backing off when the cause is not a refused record.
    failures: u32,
    /// The group's metadata (generation, member) from before the current batch was read. Its commit
    /// carries it, so that the broker refuses the commit (KIP-447) if the group has moved on since —
    /// metadata read at commit time would be the *new* generation's, and a batch of partitions already
    /// handed to another instance would commit under it (seen: requests decided by both instances).
    batch_group: Option<ConsumerGroupMetadata>,
    shutdown: Shutdown,
}

impl TxnStage {
    /// Joins the group `<group_id>-<stage>` as this instance, subscribed to `topics` (names or `^regex`),
    /// and registers the transactional id `<group_id>-<stage>-<instance_id>`, fencing any earlier
    /// incarnation of this instance.
    pub fn new(config: &Config, stage: &'static str, topics: &[&str], shutdown: Shutdown) -> Result<Self, KafkaError> {
        let group = format!("{}-{stage}", config.service.group_id);
        let consumer = group_consumer(config, &group, Some(&config.service.instance()))?;
        consumer.subscribe(topics)?;
        let producer = TxnProducer::new(config, config.service.transactional_id(stage), shutdown.clone())?;
        tracing::info!(%group, ?topics, instance = %config.service.instance(), "{stage} consuming");
        Ok(TxnStage {
            name: stage,
            consumer,
            generation_base: 0,
            config: config.clone(),
            group,
            topics: topics.iter().map(|t| t.to_string()).collect(),
            lost_consumers: Vec::new(),
            producer,
            refused: HashMap::new(),
            failures: 0,
            batch_group: None,
            shutdown,
        })
    }

    pub fn consumer(&self) -> &StreamConsumer<GroupWatch> {
        &self.consumer
    }

    /// Changes at every rebalance: a batch read across a change may hold records of lost partitions.
    pub fn generation(&self) -> u64 {
        self.generation_base + self.consumer.context().generation()
    }

    /// The next batch (see [`batch::next_batch`]).
    ///
    /// A consumer that became unusable (librdkafka's fatal errors: e.g. `FENCED_INSTANCE_ID`, seen
    /// after the group coordinator restarted) is replaced by a new one that joins again under the same
    /// instance id; its first batch starts from the committed offsets. Three such losses within five
    /// minutes mean another process runs under this instance id: that error is returned.
    pub async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
        idle: Duration,
    ) -> Result<Vec<OwnedMessage>, KafkaError> {
        self.batch_group = self.consumer.group_metadata();
        let error = match batch::next_batch(&self.consumer, max, wait, idle).await {
            Ok(batch) => return Ok(batch),
            Err(error) => error,
        };
        let now = std::time::Instant::now();
        self.lost_consumers.retain(|at| now.duration_since(*at) < Duration::from_secs(300));
        self.lost_consumers.push(now);
        if self.lost_consumers.len() >= 3 {
            tracing::error!(%error, "consumer lost three times in five minutes: is another process running with this instance id?");
            return Err(error);
        }
        tracing::error!(%error, group = %self.group, "the consumer cannot go on; joining the group again with a new one");
        let consumer = group_consumer(&self.config, &self.group, Some(&self.config.service.instance()))?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        self.generation_base = self.generation() + 2;
        let old = std::mem::replace(&mut self.consumer, consumer);
        // Closing an unusable consumer may wait on the broker; not on this task.
        tokio::task::spawn_blocking(move || drop(old));
        Ok(Vec::new())
    }

    /// Why the broker refused what this input turned into, if it did: the caller dead-letters it
    /// instead of processing it.
    pub fn refusal(&self, message: &OwnedMessage) -> Option<&Refusal> {
        if self.refused.is_empty() { None } else { self.refused.get(&SourcePos::of(message)) }
    }

    /// Produces the outbox's records (made from `batch`) and commits them with `offsets`, fenced by the
    /// group generation from before the batch was read; then, and only then, records its events. On failure, the inputs of records the broker refused are remembered
    /// (see the module docs).
    pub async fn commit(&mut self, batch: &[OwnedMessage], outbox: Outbox, offsets: &TopicPartitionList) -> Commit {
        let records = &outbox.records;
        // Records made without inputs (merge's deadlines passing) must be fenced too: a transaction
        // without offsets carries no group generation, and an instance that has just lost a partition
        // could still decide its requests (seen: TIMEOUT here, OK on the new owner). Commit the
        // offsets as they stand instead.
        let standing;
        let offsets = if offsets.count() == 0 && !records.is_empty() {
            standing = self.standing_offsets();
            &standing
        } else {
            offsets
        };
        match self.producer.commit(records, offsets, self.batch_group.as_ref()).await {
            Ok(placed) => {
                telemetry::record(outbox.events);
                if !self.refused.is_empty() {
                    // Their dead letters were in this batch.
                    for message in batch {
                        self.refused.remove(&SourcePos::of(message));
                    }
                }
                self.failures = 0;
                Commit::Done(placed)
            }
            Err(failure) => {
                telemetry::transaction_failed(self.name);
                for (index, reason) in &failure.refused {
                    let record = &records[*index];
                    match record.origin.and_then(|i| batch.get(i)) {
                        Some(message) => {
                            let pos = SourcePos::of(message);
                            tracing::warn!(topic = %pos.topic, partition = pos.partition, offset = pos.offset,
                                output_topic = %record.topic, %reason, "the broker refused a record made from this input; it will be dead-lettered");
                            let refusal =
                                self.refused.entry(pos).or_insert(Refusal { reason: String::new(), strikes: 0 });
                            refusal.strikes += 1;
                            if refusal.reason.is_empty() {
                                refusal.reason =
                                    format!("its output to {} could not be written: {reason}", record.topic);
                            }
                        }
                        None => tracing::error!(topic = %record.topic, %reason,
                            "the broker refused a record not made from a single input; retrying"),
                    }
                }
                if failure.refused.is_empty() {
                    // Not the data: the broker, the network or our rights. Back off instead of spinning.
                    self.failures += 1;
                    let backoff = Duration::from_millis(100 << self.failures.min(6)).min(Duration::from_secs(5));
                    if self.failures > 1 && !self.shutdown.is_triggered() {
                        tokio::time::sleep(backoff).await;
                    }
                }
                Commit::Failed
            }
        }
    }

    /// The committed offsets of the assignment (those that have one), with their metadata.
    fn standing_offsets(&self) -> TopicPartitionList {
        let mut standing = TopicPartitionList::new();
        if let Ok(committed) = batch::committed(&self.consumer) {
            for e in committed.elements() {
                if let rdkafka::Offset::Offset(n) = e.offset() {
                    let mut added = standing.add_partition(e.topic(), e.partition());
                    let _ = added.set_offset(rdkafka::Offset::Offset(n));
                    added.set_metadata(e.metadata());
                }
            }
        }
        standing
    }

    /// Moves every assigned partition back to its committed offset (see [`batch::rewind`]).
    pub async fn rewind(&self) -> bool {
        batch::rewind(&self.consumer, &self.shutdown).await
    }

    /// Leaves the group so that the partitions move to the other instances at once. A static member
    /// that just closes stays in the group until its session times out; one that unsubscribes first
    /// is revoked and sends LeaveGroup (librdkafka skips that only for a member that is terminating).
    pub async fn close(self) {
        let before = self.generation();
        self.consumer.unsubscribe();
        // The revocation is served by polling; LeaveGroup follows it on librdkafka's thread.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.generation() < before + 2 && tokio::time::Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(100), self.consumer.recv()).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        tracing::info!("left the consumer group");
    }
}
