//! The stage every consuming service runs on — route, merge and the score stage — and the one loop that
//! drives them ([`TxnStage::drive`]): consume a batch, notice a rebalance under it, feed it to the stage,
//! produce what it turned into and commit that with the input offsets — in one transaction (merge, the
//! score stage), or after every record is acknowledged (route: see [`Output`]) — or rewind, rebuild the
//! stage's state and read again. A stage supplies only its hooks ([`Stage`]): it
//! never consumes, commits or rewinds itself (arroyo's operator shape: the engine owns the loop).
//!
//! One record the broker refuses for what it is (too large for its topic, invalid) fails its whole
//! transaction, and would fail every retry of it: the partition would stall for good. So the input it
//! was made from ([`OutRecord::origin`]) is remembered across the rewind, and when that input is read
//! again the driver dead-letters it instead of feeding it to the stage; the rest of the batch goes
//! through. If the dead letter is refused too (larger than the dead-letter topic allows), it goes out
//! without its value, naming where the original still is. A record made from no single input (a
//! deadline passing) has no input to dead-letter: its transaction is retried.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerGroupMetadata, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{Offset, TopicPartitionList};

use super::batch::{self, GroupWatch, SourcePos};
use super::idempotent::IdempotentProducer;
use super::txn::TxnProducer;
use super::{OutRecord, Placed, subscribed};
use crate::clock::now_millis;
use crate::config::Config;
use crate::error::{During, Result};
use crate::shutdown::Shutdown;
use crate::telemetry::{self, Event};

/// Why the broker refused what an input record turned into, and how often.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: String,
    /// 1: its outputs were refused (dead-letter it); 2: its dead letter was refused too (dead-letter it
    /// without the value); more: not even that could be written (skip it, logged).
    pub strikes: u32,
}

/// Makes the dead letter of an input whose outputs the broker refused, for the dead-letter topic given
/// (`dead_letter::Letter::refused`; passed in, because kafka sits below the modules that name dead
/// letters). None: nothing can be written for it any more.
pub type RefusedLetter = fn(&OwnedMessage, &Refusal, &str) -> Option<(OutRecord, Event)>;

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

    /// Adds a record made from the input at `index` of the batch: if the broker refuses it, that input
    /// is dead-lettered when it is read again (a dead letter: its next one goes without its value).
    pub fn push_from(&mut self, index: usize, item: Option<(OutRecord, Event)>) {
        if let Some((mut record, event)) = item {
            record.origin = Some(index);
            self.push((record, event));
        }
    }
}

/// What a stage supplies to [`TxnStage::drive`]. Every hook but [`Stage::restore`] and [`Stage::feed`]
/// has a default that does nothing (or, for [`Stage::offsets`], commits the batch's own ends).
pub trait Stage {
    /// Rebuilds what the stage keeps in memory: on a new assignment, and after a failed transaction
    /// (whose effects are gone). The driver has just moved every assigned partition back to its
    /// committed offset, and reads from there once this returns. An error is logged and the restore
    /// tried again a second later.
    fn restore(&mut self, consumer: &StreamConsumer<GroupWatch>) -> impl Future<Output = Result<()>> + Send;

    /// Before each batch's inputs are fed (also before an empty one), with the time it is fed at and
    /// the batch (a stage may read ahead what its records will need).
    fn begin(&mut self, _now: i64, _batch: &[OwnedMessage]) {}

    /// One input record, at `index` of its batch. Records made from it carry `origin: Some(index)`
    /// ([`Outbox::push_from`]): the driver then dead-letters this input if the broker refuses them.
    fn feed(&mut self, index: usize, message: &OwnedMessage, out: &mut Outbox);

    /// An input the driver dead-lettered instead of feeding it (the broker refused what it turned into
    /// before): it is consumed. For stages that keep track of which offsets they may commit.
    fn skipped(&mut self, _message: &OwnedMessage) {}

    /// After the batch's inputs, also when none arrived within the idle wait: what time makes due
    /// (deadlines, expiry). Records written here have no origin.
    fn tick(&mut self, _now: i64, _consumer: &StreamConsumer<GroupWatch>, _out: &mut Outbox) {}

    /// The input offsets the batch's transaction commits (with any metadata): by default the next
    /// offset of every partition in the batch. A transaction is skipped when it would write no record
    /// and commit no offset other than the last one committed.
    fn offsets(&mut self, batch: &[OwnedMessage]) -> TopicPartitionList {
        batch::batch_offsets(batch)
    }

    /// The batch's transaction committed: `placed[i]` is where `records[i]` was written.
    fn committed(&mut self, _records: &[OutRecord], _placed: &[Placed]) {}

    /// After every batch whose transaction did not fail: gauges, flow control.
    fn after(&mut self, _consumer: &StreamConsumer<GroupWatch>) {}
}

/// The inputs whose outputs the broker refused, by where they were read.
#[derive(Debug, Default)]
struct Refused(HashMap<SourcePos, Refusal>);

impl Refused {
    fn of(&self, message: &OwnedMessage) -> Option<&Refusal> {
        if self.0.is_empty() { None } else { self.0.get(&SourcePos::of(message)) }
    }

    /// Remembers the inputs of `records` the broker refused (`(index, reason)` into `records`); a record
    /// made from no single input is only logged: its transaction is retried as it is.
    fn note(&mut self, batch: &[OwnedMessage], records: &[OutRecord], refused: &[(usize, String)]) {
        for (index, reason) in refused {
            let record = &records[*index];
            match record.origin.and_then(|i| batch.get(i)) {
                Some(message) => {
                    let pos = SourcePos::of(message);
                    tracing::warn!(topic = %pos.topic, partition = pos.partition, offset = pos.offset,
                        output_topic = %record.topic, %reason, "the broker refused a record made from this input; it will be dead-lettered");
                    let refusal = self.0.entry(pos).or_insert(Refusal { reason: String::new(), strikes: 0 });
                    refusal.strikes += 1;
                    if refusal.reason.is_empty() {
                        refusal.reason = format!("its output to {} could not be written: {reason}", record.topic);
                    }
                }
                None => tracing::error!(topic = %record.topic, %reason,
                    "the broker refused a record not made from a single input; retrying"),
            }
        }
    }

    /// The batch committed: its refused inputs were dead-lettered in it.
    fn forget(&mut self, batch: &[OwnedMessage]) {
        if !self.0.is_empty() {
            for message in batch {
                self.0.remove(&SourcePos::of(message));
            }
        }
    }
}

/// Feeds `batch` to `stage`; an input whose outputs the broker refused before is dead-lettered instead
/// (`letter`, to `dead_letter_topic`) and the stage only told ([`Stage::skipped`]).
fn feed_batch<S: Stage>(
    stage: &mut S,
    batch: &[OwnedMessage],
    refused: &Refused,
    letter: RefusedLetter,
    dead_letter_topic: &str,
    out: &mut Outbox,
) {
    for (index, message) in batch.iter().enumerate() {
        match refused.of(message) {
            Some(refusal) => {
                out.push_from(index, letter(message, refusal, dead_letter_topic));
                stage.skipped(message);
            }
            None => stage.feed(index, message, out),
        }
    }
}

/// The entries of `offsets` that differ (offset or metadata) from what the last transaction committed:
/// all of them after a restore. Merge's offsets name every partition it has read since its assignment —
/// hundreds of predictions partitions with many deployments — and each committed offset is a record the
/// group coordinator writes: sending only those that moved keeps a transaction's cost to what it read.
/// When records are written but no offset moved (merge's deadlines passing), one entry still goes with
/// them: a transaction's offsets carry the group generation that fences an instance which lost its
/// partitions.
fn to_commit(
    records: &[OutRecord],
    offsets: &TopicPartitionList,
    last: Option<&TopicPartitionList>,
) -> TopicPartitionList {
    let last = last.map(TopicPartitionList::elements).unwrap_or_default();
    let committed: HashMap<(&str, i32), (Offset, &str)> =
        last.iter().map(|e| ((e.topic(), e.partition()), (e.offset(), e.metadata()))).collect();
    let mut changed = TopicPartitionList::new();
    for e in offsets.elements() {
        if committed.get(&(e.topic(), e.partition())) != Some(&(e.offset(), e.metadata())) {
            super::push_offset(&mut changed, e.topic(), e.partition(), e.offset(), e.metadata());
        }
    }
    if changed.count() == 0
        && !records.is_empty()
        && let Some(e) = offsets.elements().first()
    {
        super::push_offset(&mut changed, e.topic(), e.partition(), e.offset(), e.metadata());
    }
    changed
}

/// The outcome of [`TxnStage::commit`].
#[derive(Debug)]
enum Commit {
    /// Committed; where each record was placed, in the order given.
    Done(Vec<Placed>),
    /// Nothing of the batch is visible; its inputs must be read again (rewind and rebuild).
    Failed,
}

/// How a stage's batches become durable.
pub enum Output {
    /// Records and input offsets in one transaction: readers with read_committed see a batch exactly
    /// once or not at all.
    Transactional,
    /// Records acknowledged first, input offsets committed after (see [`super::idempotent`]): visible at
    /// once, written again after a crash. Only for a stage whose readers drop the copies (route: merge).
    /// The records for the topics in `last` are written only once all the others are acknowledged.
    Idempotent { last: Vec<String> },
}

enum Producer {
    Transactional(TxnProducer),
    Idempotent(IdempotentProducer),
}

/// A consumer in the stage's group and its producer, with what the broker refused.
pub struct TxnStage {
    /// `route`, `merge` or `score`, for metrics and logs.
    name: &'static str,
    consumer: StreamConsumer<GroupWatch>,
    /// Added to the consumer's generation, so that generations keep growing across a new consumer.
    generation_base: u64,
    /// What a new consumer needs (see [`TxnStage::next_batch`]), and the batch settings.
    config: Config,
    group: String,
    topics: Vec<String>,
    /// When consumers became unusable lately.
    lost_consumers: Vec<std::time::Instant>,
    producer: Producer,
    refused: Refused,
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
    /// Joins the group `<group_id>-<stage>` as this instance, subscribed to `topics` (names or `^regex`).
    /// A transactional stage registers the transactional id `<group_id>-<stage>-<instance_id>`, fencing
    /// any earlier incarnation of this instance.
    pub fn new(
        config: &Config,
        stage: &'static str,
        topics: &[&str],
        output: Output,
        shutdown: Shutdown,
    ) -> Result<Self> {
        let group = format!("{}-{stage}", config.service.group_id);
        let consumer = subscribed(config, &group, topics)
            .during(format!("joining group {group}, subscribed to {}", topics.join(", ")))?;
        let producer = match output {
            Output::Transactional => {
                let id = config.service.transactional_id(stage);
                Producer::Transactional(
                    TxnProducer::new(config, stage, id.clone(), shutdown.clone())
                        .during(format!("registering the transactional id {id}"))?,
                )
            }
            Output::Idempotent { last } => Producer::Idempotent(
                IdempotentProducer::new(config, last, shutdown.clone()).during("creating the idempotent producer")?,
            ),
        };
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
            refused: Refused::default(),
            failures: 0,
            batch_group: None,
            shutdown,
        })
    }

    /// The stage's consumer, for what a stage needs to know before it is driven (partition counts).
    pub fn consumer(&self) -> &StreamConsumer<GroupWatch> {
        &self.consumer
    }

    /// Changes at every rebalance: a batch read across a change may hold records of lost partitions.
    fn generation(&self) -> u64 {
        self.generation_base + self.consumer.context().generation()
    }

    /// Runs `stage` until shutdown: the one consume → feed → produce + commit → rewind loop.
    ///
    /// Each batch (up to `service.batch_size` records within `service.batch_wait_ms`; an empty one after
    /// `idle` without input, so that [`Stage::tick`] runs) is one transaction: the records its inputs and
    /// the tick turned into, and [`Stage::offsets`], fenced by the group generation from before the batch
    /// was read; its events are recorded only once it committed. A batch read across a rebalance is
    /// dropped. After a rebalance and after a failed transaction the partitions are rewound to their
    /// committed offsets and the stage restored ([`Stage::restore`]) before anything is read again.
    /// Inputs whose outputs the broker refused are dead-lettered with `letter` (see the module docs).
    pub async fn drive<S: Stage>(&mut self, stage: &mut S, idle: Duration, letter: RefusedLetter) -> Result<()> {
        let (max, wait) = (self.config.service.batch_size, Duration::from_millis(self.config.service.batch_wait_ms));
        let dead_letter_topic = self.config.topics.dead_letter.clone();
        // The generation the stage's state was restored for, and what its last transaction committed.
        let mut restored: Option<u64> = None;
        // The generation whose previous owners were fenced.
        let mut fenced: Option<u64> = None;
        let mut last_offsets: Option<TopicPartitionList> = None;
        while !self.shutdown.is_triggered() {
            telemetry::stage_alive(self.name);
            let generation = self.generation();
            if restored != Some(generation) {
                if !self.rewind().await {
                    continue; // shutting down
                }
                if fenced != Some(generation) {
                    self.fence_previous_owners();
                    fenced = Some(generation);
                }
                last_offsets = None;
                match stage.restore(&self.consumer).await {
                    Ok(()) => restored = Some(generation),
                    Err(error) => {
                        tracing::warn!(%error, stage = self.name, "cannot restore the stage's state yet; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                continue;
            }
            let batch =
                self.next_batch(max, wait, idle).await.during(format!("consuming {}", self.topics.join(", ")))?;
            if self.generation() != generation {
                continue; // part of the batch may belong to partitions lost since: restored above
            }
            let mut out = Outbox::default();
            stage.begin(now_millis(), &batch);
            feed_batch(stage, &batch, &self.refused, letter, &dead_letter_topic, &mut out);
            stage.tick(now_millis(), &self.consumer, &mut out);
            let offsets = stage.offsets(&batch);
            let changed = to_commit(&out.records, &offsets, last_offsets.as_ref());
            if !out.records.is_empty() || changed.count() > 0 {
                match self.commit(&batch, &mut out, &changed).await {
                    Commit::Done(placed) => {
                        stage.committed(&out.records, &placed);
                        last_offsets = Some(offsets);
                    }
                    Commit::Failed => {
                        restored = None; // the batch's effects are gone: rewind and restore
                        continue;
                    }
                }
            }
            stage.after(&self.consumer);
        }
        telemetry::stage_stopped(self.name);
        Ok(())
    }

    /// The next batch (see [`batch::next_batch`]).
    ///
    /// A consumer that became unusable (librdkafka's fatal errors: e.g. `FENCED_INSTANCE_ID`, seen
    /// after the group coordinator restarted) is replaced by a new one that joins again under the same
    /// instance id; its first batch starts from the committed offsets. Three such losses within five
    /// minutes mean another process runs under this instance id: that error is returned.
    async fn next_batch(
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
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        let base = self.generation() + 2;
        super::rejoin(&self.config, &self.group, &topics, &mut self.consumer)?;
        self.generation_base = base;
        Ok(Vec::new())
    }

    /// Produces the outbox's records (made from `batch`) and commits them with `offsets`, fenced by the
    /// group generation from before the batch was read; then, and only then, records (and takes) its
    /// events. On failure, the inputs of records the broker refused are remembered (see the module docs).
    async fn commit(&mut self, batch: &[OwnedMessage], outbox: &mut Outbox, offsets: &TopicPartitionList) -> Commit {
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
        let offsets = &signed(offsets, &self.config.service.instance());
        let began = std::time::Instant::now();
        let result = match &mut self.producer {
            Producer::Transactional(producer) => producer.commit(records, offsets, self.batch_group.take()).await,
            Producer::Idempotent(producer) => producer.commit(records, offsets, &self.consumer).await,
        };
        match result {
            Ok(placed) => {
                telemetry::batch_committed(self.name, began.elapsed().as_secs_f64());
                telemetry::record(std::mem::take(&mut outbox.events));
                self.refused.forget(batch);
                self.failures = 0;
                Commit::Done(placed)
            }
            Err(failure) => {
                telemetry::transaction_failed(self.name);
                self.refused.note(batch, records, &failure.refused);
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

    /// Fences the transactional ids of the instances that committed last on partitions this one now holds
    /// and that are no longer in the group (see [`super::txn::fence`]): a dead instance's open
    /// transaction stops hiding the outputs written after it at once. An instance still in the group
    /// gave its partitions up in the rebalance, with nothing open; it is left alone. In the background:
    /// the stage goes on meanwhile.
    fn fence_previous_owners(&self) {
        if !matches!(self.producer, Producer::Transactional(_)) {
            return; // no transactional ids: nothing left open
        }
        let Ok(committed) = batch::committed(&self.consumer) else { return };
        let me = self.config.service.instance();
        let owners: std::collections::BTreeSet<String> = committed
            .elements()
            .iter()
            .filter_map(|e| owner_of(e.metadata()).map(str::to_string))
            .filter(|owner| *owner != me)
            .collect();
        if owners.is_empty() {
            return;
        }
        let (config, group, stage) = (self.config.clone(), self.group.clone(), self.name);
        tokio::task::spawn_blocking(move || {
            let members = match super::group_instances(&config, &group) {
                Ok(members) => members,
                Err(error) => return tracing::warn!(%error, %group, "cannot list the group's members; fencing no one"),
            };
            for owner in owners.into_iter().filter(|o| !members.contains(o)) {
                let id = config.service.transactional_id_of(stage, &owner);
                match super::txn::fence(&config, &id) {
                    Ok(()) => tracing::info!(transactional_id = %id,
                        "fenced the transactional id of a previous owner of these partitions that left the group: a transaction it left open is aborted"),
                    Err(error) => {
                        tracing::warn!(transactional_id = %id, %error, "cannot fence a previous owner's transactional id")
                    }
                }
            }
        });
    }

    /// Moves every assigned partition back to its committed offset (see [`batch::rewind`]).
    async fn rewind(&self) -> bool {
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

/// Offset-commit metadata ends with the committing instance (`by=<instance>`, after the stage's own
/// metadata, if any): who to fence when its partitions move (see [`TxnStage::fence_previous_owners`]).
const OWNER_TAG: &str = "by=";

/// `offsets` with each partition's metadata signed by `instance`.
fn signed(offsets: &TopicPartitionList, instance: &str) -> TopicPartitionList {
    let mut signed = TopicPartitionList::with_capacity(offsets.count());
    for e in offsets.elements() {
        let own = without_owner(e.metadata());
        let metadata =
            if own.is_empty() { format!("{OWNER_TAG}{instance}") } else { format!("{own} {OWNER_TAG}{instance}") };
        super::push_offset(&mut signed, e.topic(), e.partition(), e.offset(), &metadata);
    }
    signed
}

/// The instance that signed commit metadata, if one did.
fn owner_of(metadata: &str) -> Option<&str> {
    metadata.split(' ').next_back()?.strip_prefix(OWNER_TAG).filter(|o| !o.is_empty())
}

/// Commit metadata without its signature: what the stage itself wrote.
pub fn without_owner(metadata: &str) -> &str {
    match metadata.rsplit_once(' ') {
        Some((own, last)) if last.starts_with(OWNER_TAG) => own,
        _ if metadata.starts_with(OWNER_TAG) => "",
        _ => metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Offset;
    use rdkafka::message::{Message, Timestamp};

    #[test]
    fn commits_are_signed_by_their_instance_and_the_stages_own_metadata_kept() {
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset("routed", 0, Offset::Offset(7)).unwrap();
        offsets.add_partition_offset("predictions", 1, Offset::Offset(9)).unwrap();
        offsets.find_partition("routed", 0).unwrap().set_metadata("changelog:42");
        let once = signed(&offsets, "i0");
        let metadata = |tpl: &TopicPartitionList, t: &str, p| tpl.find_partition(t, p).unwrap().metadata().to_string();
        assert_eq!(metadata(&once, "routed", 0), "changelog:42 by=i0");
        assert_eq!(metadata(&once, "predictions", 1), "by=i0");
        // A standing offset committed again by another instance is signed by it, not twice.
        let again = signed(&once, "i1");
        assert_eq!(metadata(&again, "routed", 0), "changelog:42 by=i1");
        assert_eq!(metadata(&again, "predictions", 1), "by=i1");
        assert_eq!(owner_of("changelog:42 by=i1"), Some("i1"));
        assert_eq!(owner_of("by=pod-3"), Some("pod-3"));
        assert_eq!(owner_of("changelog:42"), None, "written before commits were signed");
        assert_eq!(owner_of(""), None);
        assert_eq!(without_owner("changelog:42 by=i1"), "changelog:42");
        assert_eq!(without_owner("by=i1"), "");
        assert_eq!(without_owner("changelog:42"), "changelog:42");
    }

    fn message(offset: i64) -> OwnedMessage {
        OwnedMessage::new(Some(vec![offset as u8]), None, "in".into(), Timestamp::NotAvailable, 0, offset, None)
    }

    /// A stage that only notes what it was given.
    #[derive(Default)]
    struct Noting {
        fed: Vec<usize>,
        skipped: Vec<i64>,
    }

    impl Stage for Noting {
        async fn restore(&mut self, _: &StreamConsumer<GroupWatch>) -> Result<()> {
            Ok(())
        }

        fn feed(&mut self, index: usize, _: &OwnedMessage, out: &mut Outbox) {
            self.fed.push(index);
            let record = OutRecord::new("out", b"k".to_vec(), vec![0; 10]);
            out.push_from(index, Some((record, Event::DeadLettered { kind: "test" })));
        }

        fn skipped(&mut self, message: &OwnedMessage) {
            self.skipped.push(message.offset());
        }
    }

    fn letter(message: &OwnedMessage, refusal: &Refusal, topic: &str) -> Option<(OutRecord, Event)> {
        let record = OutRecord::new(topic, Vec::new(), message.payload().unwrap_or_default().to_vec())
            .header("dlq.reason", refusal.reason.as_str());
        Some((record, Event::DeadLettered { kind: "unwritable" }))
    }

    #[test]
    fn an_input_whose_outputs_were_refused_is_dead_lettered_by_the_driver_not_fed_to_the_stage() {
        let batch = [message(7), message(8), message(9)];
        let records = vec![
            OutRecord { origin: Some(1), ..OutRecord::new("out", b"k".to_vec(), vec![0; 3_000_000]) },
            OutRecord::new("out", b"k".to_vec(), vec![0; 10]),
        ];
        let mut refused = Refused::default();
        refused.note(&batch, &records, &[(0, "Broker: Message size too large".into())]);
        let (mut stage, mut out) = (Noting::default(), Outbox::default());
        feed_batch(&mut stage, &batch, &refused, letter, "dlq", &mut out);
        assert_eq!((stage.fed, stage.skipped), (vec![0, 2], vec![8]), "the stage never sees the refused input");
        let dead: Vec<&OutRecord> = out.records.iter().filter(|r| r.topic == "dlq").collect();
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].origin, dead[0].payload.as_deref()), (Some(1), Some(&[8u8][..])), "the input, as read");
        let reason = String::from_utf8(dead[0].headers[0].1.clone()).unwrap();
        assert_eq!(reason, "its output to out could not be written: Broker: Message size too large");
        assert!(out.records.iter().filter(|r| r.topic == "out").all(|r| r.origin.is_some()));
        assert_eq!(out.events.len(), 3, "one event per record, recorded once they commit");
    }

    #[test]
    fn each_refusal_strikes_the_input_once_and_a_commit_forgets_it() {
        let batch = [message(1), message(2)];
        let records = vec![
            OutRecord { origin: Some(0), ..OutRecord::new("big", Vec::new(), Vec::new()) },
            OutRecord::new("no-origin", Vec::new(), Vec::new()),
        ];
        let mut refused = Refused::default();
        refused.note(&batch, &records, &[(0, "too large".into()), (1, "too large".into())]);
        assert_eq!(refused.0.len(), 1, "a record made from no single input strikes nothing");
        refused.note(&batch, &records, &[(0, "invalid".into())]);
        let refusal = refused.of(&batch[0]).unwrap();
        assert_eq!(
            (refusal.strikes, refusal.reason.as_str()),
            (2, "its output to big could not be written: too large")
        );
        assert!(refused.of(&batch[1]).is_none());
        refused.forget(&batch);
        assert!(refused.of(&batch[0]).is_none(), "its dead letter was committed");
    }

    #[test]
    fn a_transaction_commits_only_the_offsets_that_moved() {
        let list = |entries: &[(&str, i32, i64, &str)]| {
            let mut list = TopicPartitionList::new();
            for (topic, partition, offset, metadata) in entries {
                list.add_partition_offset(topic, *partition, Offset::Offset(*offset)).unwrap();
                list.find_partition(topic, *partition).unwrap().set_metadata(*metadata);
            }
            list
        };
        let entries = |l: &TopicPartitionList| {
            l.elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition(), e.offset(), e.metadata().to_string()))
                .collect::<Vec<_>>()
        };
        let record = [OutRecord::new("out", Vec::new(), Vec::new())];
        let last = list(&[("routed", 0, 5, "changelog:9"), ("p", 0, 3, ""), ("p", 1, 7, "")]);
        assert_eq!(to_commit(&[], &TopicPartitionList::new(), None).count(), 0, "an idle tick");
        assert_eq!(to_commit(&[], &last, Some(&last)).count(), 0, "nothing new since the last commit");
        assert_eq!(entries(&to_commit(&[], &last, None)), entries(&last), "everything after a restore");
        let moved = list(&[("routed", 0, 5, "changelog:9"), ("p", 0, 4, ""), ("p", 1, 7, "")]);
        assert_eq!(entries(&to_commit(&[], &moved, Some(&last))), entries(&list(&[("p", 0, 4, "")])));
        let marked = list(&[("routed", 0, 5, "changelog:12"), ("p", 0, 3, ""), ("p", 1, 7, "")]);
        assert_eq!(
            entries(&to_commit(&[], &marked, Some(&last))),
            entries(&list(&[("routed", 0, 5, "changelog:12")])),
            "a new changelog mark is committed"
        );
        let new_partition = list(&[("routed", 0, 5, "changelog:9"), ("p", 0, 3, ""), ("p", 1, 7, ""), ("p", 2, 1, "")]);
        assert_eq!(entries(&to_commit(&[], &new_partition, Some(&last))), entries(&list(&[("p", 2, 1, "")])));
        assert_eq!(
            to_commit(&record, &last, Some(&last)).count(),
            1,
            "records without a moved offset still carry one, for the group generation"
        );
        assert_eq!(to_commit(&record, &TopicPartitionList::new(), None).count(), 0, "a deadline passed, nothing read");
    }
}
