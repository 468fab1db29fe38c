//! The one place that builds Kafka clients and creates topics.
//!
//! Every client gets the bootstrap servers and the pass-through `[kafka.options]`; switchyard then sets
//! the options its guarantees depend on (see `config::MANAGED_OPTIONS`).
//!
//! - [`batch`]: consuming in batches, rebalances, rewinding.
//! - [`txn`]: transactional output — records and input offsets committed together.
//! - [`idempotent`]: output without a transaction — records acknowledged first, input offsets after.
//! - [`stage`]: the one consume → produce → commit-or-rewind loop that drives route, merge and the score
//!   stage through their hooks, and what to do with a record the broker refuses.
//! - [`partitioner`]: Kafka's default partitioner, to tell where a keyed record belongs.

pub mod batch;
pub(crate) mod idempotent;
pub(crate) mod partitioner;
pub(crate) mod stage;
pub mod txn;

pub use batch::{GroupWatch, SourcePos, batch_offsets};
pub use partitioner::partition_for_key;
pub use stage::{Outbox, Output, Stage, TxnStage};

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{Config, RECORD_LIMIT};

/// How long a metadata or admin call may take before the caller reports the broker as unreachable.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// `max.message.bytes` of the topics switchyard creates: the producers' default limit
/// ([`crate::config::RECORD_LIMIT`]) plus room for batch headers.
pub const TOPIC_RECORD_LIMIT: usize = RECORD_LIMIT + 64 * 1024;

fn base(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.bootstrap_servers);
    for (key, value) in &config.kafka.options {
        client.set(key, value);
    }
    client
}

/// Settings shared by every producer: idempotent, acks=all, and the murmur2 partitioner of the Java
/// client, so that a key lands on the same partition whichever client wrote it (model workers in any
/// language must agree with switchyard for merge's co-partitioned join).
fn producer_settings(config: &Config) -> ClientConfig {
    let mut settings = base(config);
    settings
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        // Batches are handed over whole, and a transaction waits for its records before it commits:
        // waiting for more would only add latency (under load the records queued behind a request in
        // flight go together anyway).
        .set_if_absent("linger.ms", "0")
        .set_if_absent("compression.type", "lz4")
        .set_if_absent("message.max.bytes", &RECORD_LIMIT.to_string())
        // Bounds what a stalled broker can make us buffer.
        .set_if_absent("queue.buffering.max.kbytes", "65536");
    settings
}

/// A producer for records that must not be lost or reordered (tools and control-plane writes).
pub fn producer(config: &Config) -> Result<FutureProducer, KafkaError> {
    producer_settings(config).create()
}

/// A producer for a stage's output without a transaction (see [`idempotent`]): it never gives up on a
/// record (no message timeout: it retries until the broker takes it) and never leaves a gap in what it
/// writes to a partition — a failure that could (a batch refused while later ones succeed) stops it
/// with a fatal error instead (`enable.gapless.guarantee`). So within one producer, what reaches a
/// partition is an unbroken prefix of what was sent to it, in order: what merge's replay detection
/// relies on.
pub fn gapless_producer(config: &Config) -> Result<FutureProducer<Gapless>, KafkaError> {
    producer_settings(config)
        .set("enable.gapless.guarantee", "true")
        .set("message.timeout.ms", "0")
        .create_with_context(Gapless)
}

/// librdkafka's log as usual, less its warning that `enable.gapless.guarantee` is experimental: set on
/// purpose, it would otherwise greet every start.
pub struct Gapless;

impl rdkafka::ClientContext for Gapless {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        if !(fac == "CONFWARN" && log_message.contains("enable.gapless.guarantee")) {
            DefaultClientContext.log(level, fac, log_message);
        }
    }
}

/// A producer for transactions (see [`txn`]): a stable transactional id and a short transaction
/// timeout — an instance that dies with a transaction open blocks read_committed readers of its output
/// partitions until then, unless it comes back first.
pub fn transactional_producer(config: &Config, transactional_id: &str) -> Result<FutureProducer, KafkaError> {
    producer_settings(config)
        .set("transactional.id", transactional_id)
        .set_if_absent("transaction.timeout.ms", "20000")
        .create()
}

/// A consumer in `group` that commits offsets only when told to, reads only committed transactional
/// data, and assigns partition N of every subscribed topic to the same member (range assignor), which
/// is what lets merge join co-partitioned topics locally.
///
/// With `instance` it is a static member (KIP-345) named by the instance id: an instance that crashes and restarts
/// under the same id gets its partitions back at once, without waiting for the group to time the old
/// member out. A static member does not leave the group when it closes, so a graceful stop must leave
/// explicitly ([`TxnStage::close`]). An instance that dies for good is removed after the session
/// timeout (20 s by default, 6 s at least on a broker with default settings).
/// Its [`GroupWatch`] context sees rebalances and reports consumer lag.
pub fn group_consumer(
    config: &Config,
    group: &str,
    instance: Option<&str>,
) -> Result<StreamConsumer<GroupWatch>, KafkaError> {
    let mut settings = base(config);
    if let Some(instance) = instance {
        settings.set("group.instance.id", instance);
    }
    settings
        .set("group.id", group)
        .set_if_absent("session.timeout.ms", "20000")
        .set_if_absent("heartbeat.interval.ms", "3000")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "range")
        // Regex subscriptions pick up new per-model topics at the next metadata refresh.
        .set_if_absent("topic.metadata.refresh.interval.ms", "1000")
        // Bounds what the consumer prefetches while merge applies backpressure.
        .set_if_absent("queued.max.messages.kbytes", "16384")
        // Statistics feed the consumer-lag gauge.
        .set_if_absent("statistics.interval.ms", "5000")
        .create_with_context(GroupWatch::default())
}

/// This instance's member of `group`, subscribed to `topics` (names or `^regex`).
pub fn subscribed(config: &Config, group: &str, topics: &[&str]) -> Result<StreamConsumer<GroupWatch>, KafkaError> {
    let consumer = group_consumer(config, group, Some(&config.service.instance()))?;
    consumer.subscribe(topics)?;
    Ok(consumer)
}

/// Appends `partition` of `topic` at `offset`, with `metadata`, to `list`. rdkafka's
/// `add_partition_offset` and `find_partition` scan the list comparing topic names, so a list of P
/// partitions built or matched entry by entry costs P² string comparisons, for every transaction: with
/// merge reading 800 predictions partitions (100 deployments), 10–30% of switchyard's CPU in profiles.
pub fn push_offset(list: &mut TopicPartitionList, topic: &str, partition: i32, offset: Offset, metadata: &str) {
    let mut entry = list.add_partition(topic, partition);
    entry.set_offset(offset).expect("an offset an entry can hold");
    if !metadata.is_empty() {
        entry.set_metadata(metadata);
    }
}

/// Puts a new member of `group` under this instance's id, subscribed to `topics`, in the place of
/// `consumer`, which became unusable (librdkafka's fatal errors: seen, fenced by its own instance id
/// after the group coordinator's broker died). The old one is closed off the caller's task: closing may
/// wait on the broker.
pub fn rejoin(
    config: &Config,
    group: &str,
    topics: &[&str],
    consumer: &mut StreamConsumer<GroupWatch>,
) -> Result<(), KafkaError> {
    let fresh = subscribed(config, group, topics)?;
    let old = std::mem::replace(consumer, fresh);
    tokio::task::spawn_blocking(move || drop(old));
    Ok(())
}

/// A consumer outside any group, for reading whole topics (the deployments topic, tests, status): it is
/// only assigned partitions and commits nothing, but librdkafka's assign needs a `group.id`, whose
/// coordinator it looks up (Describe on the group, on a cluster with ACLs): `<service.group_id>-reader`,
/// under the same prefix as the service's groups.
pub fn reader(config: &Config) -> Result<StreamConsumer, KafkaError> {
    base(config)
        .set("group.id", format!("{}-reader", config.service.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .create()
}

/// Where partitions end, *including* records of transactions not resolved yet (the high watermark). A
/// read_committed client's own query answers the last stable offset instead, which stops short of a
/// transaction that has already committed but whose markers are not all written yet: the group
/// coordinator may already return that transaction's offsets (it completes its own marker on its own)
/// while the output partitions still end before its records. A restore that read only to the stable
/// offset would miss the last transaction's records and do its work again (seen: decisions made twice
/// after a rebalance). A read_committed reader that reads to the high watermark waits for such
/// transactions to resolve, and gets their records if they committed.
pub struct LogEnds(BaseConsumer);

impl LogEnds {
    pub fn new(config: &Config) -> Result<Self, KafkaError> {
        Ok(LogEnds(base(config).set("isolation.level", "read_uncommitted").create()?))
    }

    /// The first offset `partition` of `topic` still holds, and its high watermark. A topic created a
    /// moment ago may not be known yet to the broker asked (on a cluster, brokers learn new topics from
    /// the controller one after another: seen as `UnknownPartition` right after creation), and a leader
    /// may be moving: those answers are asked again until [`ADMIN_TIMEOUT`].
    pub fn of(&self, topic: &str, partition: i32) -> Result<(i64, i64), KafkaError> {
        watermarks(&self.0, topic, partition)
    }
}

/// How long one watermark query may wait for a partition's leader before it is asked again: a leader
/// that died does not answer, and a query given the whole [`ADMIN_TIMEOUT`] waited for it that long
/// (seen: merge's restore stalled 30 s after the node leading a changelog partition was killed) while
/// the partition had a new leader within seconds.
const WATERMARK_ATTEMPT: Duration = Duration::from_secs(2);

/// `consumer`'s watermarks of `partition` of `topic` (for a read_committed consumer the high one is the
/// last stable offset). A topic created a moment ago may not be known yet to the broker asked (on a
/// cluster, brokers learn new topics from the controller one after another: seen as `UnknownPartition`
/// right after creation), and a leader may be moving or gone: those answers, and a query that timed out,
/// are asked again (librdkafka refreshes the leader meanwhile) until [`ADMIN_TIMEOUT`]. Blocking.
pub fn watermarks<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    topic: &str,
    partition: i32,
) -> Result<(i64, i64), KafkaError> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
    loop {
        match consumer.fetch_watermarks(topic, partition, WATERMARK_ATTEMPT) {
            Err(KafkaError::MetadataFetch(
                Code::UnknownPartition
                | Code::UnknownTopicOrPartition
                | Code::UnknownTopic
                | Code::LeaderNotAvailable
                | Code::NotLeaderForPartition
                | Code::OperationTimedOut
                | Code::BrokerTransportFailure
                | Code::AllBrokersDown,
            )) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            answer => return answer,
        }
    }
}

/// The first offset `partition` of `topic` holds and its high watermark, as the last fetch response
/// `consumer` got for it reported them: local, no request to the broker (librdkafka's
/// `rd_kafka_get_watermark_offsets`, which rust-rdkafka does not wrap). None until a fetch answered.
pub fn fetched_watermarks<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; librdkafka reads the NUL-terminated
    // topic name during the call only, writes the two offsets, and takes its own locks.
    let error = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (error == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && low >= 0 && high >= 0)
        .then_some((low, high))
}

/// [`LogEnds`] of `partitions` of `topic`, asked once.
pub fn log_ends(
    config: &Config,
    topic: &str,
    partitions: impl IntoIterator<Item = i32>,
) -> Result<HashMap<i32, (i64, i64)>, KafkaError> {
    let ends = LogEnds::new(config)?;
    partitions.into_iter().map(|p| Ok((p, ends.of(topic, p)?))).collect()
}

/// The committed offsets of a consumer group, read without joining it (the rollout controller follows
/// route's and merge's progress this way; on a cluster with ACLs it needs Describe on those groups).
pub struct GroupOffsets {
    consumer: BaseConsumer,
}

impl GroupOffsets {
    pub fn new(config: &Config, group: &str) -> Result<Self, KafkaError> {
        let consumer = base(config)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Waits for transactional offset commits in flight to settle (KIP-447 require_stable).
            .set("isolation.level", "read_committed")
            .create()?;
        Ok(GroupOffsets { consumer })
    }

    /// The group's committed offset of each of `partitions` of `topic` (None: none committed).
    pub fn of(&self, topic: &str, partitions: &[i32]) -> Result<HashMap<i32, Option<i64>>, KafkaError> {
        let mut asked = TopicPartitionList::new();
        for p in partitions {
            asked.add_partition(topic, *p);
        }
        let committed = self.consumer.committed_offsets(asked, ADMIN_TIMEOUT)?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| (e.partition(), if let Offset::Offset(n) = e.offset() { Some(n) } else { None }))
            .collect())
    }
}

/// Answers whether a stretch of a partition holds any record a read_committed consumer would get: a
/// transactional writer's last offset is a commit marker, never delivered, so a consumer that has
/// processed everything commits one short of the partition's end. Asked again and again while the
/// answer is not known yet (it reads in the background).
///
/// Each stretch start gets a reader of its own, assigned once and dropped when answered: assigning one
/// consumer again and again races in librdkafka (seen: `rd_kafka_assignment_partition_stopped:
/// Assertion rktp->rktp_started failed` aborting the process; librdkafka issue 5573).
pub struct GapReader {
    config: Config,
    /// Per (topic, partition): the stretch's start, its reader, and the first offset it delivered.
    stretches: HashMap<(String, i32), (i64, BaseConsumer, Option<i64>)>,
}

impl GapReader {
    pub fn new(config: &Config) -> Self {
        GapReader { config: config.clone(), stretches: HashMap::new() }
    }

    /// Some(true) once [from, to) of the partition is known to hold no record, Some(false) once a record
    /// was found in it, None while unknown.
    pub fn empty(&mut self, topic: &str, partition: i32, from: i64, to: i64) -> Result<Option<bool>, KafkaError> {
        let key = (topic.to_string(), partition);
        if self.stretches.get(&key).is_none_or(|(start, _, _)| *start != from) {
            let consumer: BaseConsumer = base(&self.config)
                .set("group.id", format!("{}-reader", self.config.service.group_id))
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("isolation.level", "read_committed")
                .set("auto.offset.reset", "earliest")
                .create()?;
            let mut assignment = TopicPartitionList::new();
            assignment.add_partition_offset(topic, partition, Offset::Offset(from))?;
            consumer.assign(&assignment)?;
            self.stretches.insert(key, (from, consumer, None));
            return Ok(None);
        }
        let (_, consumer, first) = self.stretches.get_mut(&key).expect("checked above");
        while let Some(message) = consumer.poll(Duration::ZERO) {
            let offset = message?.offset();
            *first = Some(first.map_or(offset, |f| f.min(offset)));
        }
        let answer = if first.is_some_and(|f| f < to) {
            Some(false)
        } else {
            let position = consumer.position()?;
            position
                .find_partition(topic, partition)
                .is_some_and(|e| matches!(e.offset(), Offset::Offset(at) if at >= to))
                .then_some(true)
        };
        if answer.is_some() {
            self.stretches.remove(&key);
        }
        Ok(answer)
    }
}

/// The members of consumer group `group` that hold `partition` of `topic`, each named by its instance id
/// (a static member's id is its instance id followed by a UUID) and host.
pub fn holders(config: &Config, group: &str, topic: &str, partition: i32) -> Result<Vec<String>, KafkaError> {
    let client: BaseConsumer = base(config).create()?;
    let groups = client.fetch_group_list(Some(group), ADMIN_TIMEOUT)?;
    Ok(groups
        .groups()
        .iter()
        .flat_map(|g| g.members())
        .filter(|m| m.assignment().is_some_and(|a| assignment_holds(a, topic, partition)))
        .map(|m| format!("{} ({})", instance_of_member(m.id()), m.client_host().trim_start_matches('/')))
        .collect())
}

/// The instance ids of the members of consumer group `group` (static members; others by member id).
pub fn group_instances(config: &Config, group: &str) -> Result<std::collections::HashSet<String>, KafkaError> {
    let client: BaseConsumer = base(config).create()?;
    let groups = client.fetch_group_list(Some(group), ADMIN_TIMEOUT)?;
    Ok(groups.groups().iter().flat_map(|g| g.members()).map(|m| instance_of_member(m.id()).to_string()).collect())
}

/// A static member's instance id from its member id (`<group.instance.id>-<UUID>`), else the member id.
fn instance_of_member(member: &str) -> &str {
    match member.len().checked_sub(37) {
        Some(cut) if member.is_char_boundary(cut) && member[cut..].starts_with('-') => &member[..cut],
        _ => member,
    }
}

/// Whether a consumer-protocol assignment (version, then [topic, [partition]]) holds `partition` of `topic`.
fn assignment_holds(mut bytes: &[u8], topic: &str, partition: i32) -> bool {
    fn take<const N: usize>(bytes: &mut &[u8]) -> Option<[u8; N]> {
        let (head, rest) = bytes.split_first_chunk::<N>()?;
        *bytes = rest;
        Some(*head)
    }
    let mut holds = || -> Option<bool> {
        take::<2>(&mut bytes)?;
        for _ in 0..i32::from_be_bytes(take(&mut bytes)?) {
            let len = i16::from_be_bytes(take(&mut bytes)?).max(0) as usize;
            let name = bytes.get(..len)?;
            bytes = &bytes[len..];
            for _ in 0..i32::from_be_bytes(take(&mut bytes)?) {
                if name == topic.as_bytes() && i32::from_be_bytes(take(&mut bytes)?) == partition {
                    return Some(true);
                }
            }
        }
        Some(false)
    };
    holds().unwrap_or(false)
}

trait SetIfAbsent {
    fn set_if_absent(&mut self, key: &str, value: &str) -> &mut Self;
}

impl SetIfAbsent for ClientConfig {
    fn set_if_absent(&mut self, key: &str, value: &str) -> &mut Self {
        if self.get(key).is_none() {
            self.set(key, value);
        }
        self
    }
}

/// One record to produce.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub topic: String,
    /// An explicit partition; None lets the murmur2 partitioner choose by key.
    pub partition: Option<i32>,
    pub key: Vec<u8>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
    /// An explicit record timestamp (ms); None lets the producer stamp it.
    pub timestamp: Option<i64>,
    /// Index of the input record (in its batch) this record was made from, if one was: when the broker
    /// refuses the record, that input is dead-lettered instead (see [`TxnStage`]).
    pub origin: Option<usize>,
}

impl OutRecord {
    pub fn new(topic: impl Into<String>, key: impl Into<Vec<u8>>, payload: Vec<u8>) -> Self {
        OutRecord {
            topic: topic.into(),
            partition: None,
            key: key.into(),
            payload: Some(payload),
            headers: Vec::new(),
            timestamp: None,
            origin: None,
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// Where the broker put a record: (partition, offset).
pub type Placed = (i32, i64);

/// Produces every record and waits for the broker's answer to each, in the order given. A full local
/// queue is waited out, not reported.
pub async fn send_each<'a, C: rdkafka::ClientContext + 'static>(
    producer: &FutureProducer<C>,
    records: impl IntoIterator<Item = &'a OutRecord>,
) -> Vec<Result<Placed, KafkaError>> {
    let sends = records.into_iter().map(|record| {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(rdkafka::message::Header { key: name, value: Some(value) });
        }
        let mut future = FutureRecord::<Vec<u8>, Vec<u8>>::to(&record.topic).key(&record.key).headers(headers);
        if let Some(payload) = &record.payload {
            future = future.payload(payload);
        }
        if let Some(partition) = record.partition {
            future = future.partition(partition);
        }
        if let Some(timestamp) = record.timestamp {
            future = future.timestamp(timestamp);
        }
        producer.send(future, Timeout::Never)
    });
    join_all(sends)
        .await
        .into_iter()
        .map(|result| result.map(|d| (d.partition, d.offset)).map_err(|(error, _)| error))
        .collect()
}

/// Produces every record and waits until the broker has acknowledged all of them; returns the first
/// error (the caller then must not commit the input offsets that produced these records).
pub async fn send_all(producer: &FutureProducer, records: &[OutRecord]) -> Result<(), KafkaError> {
    send_each(producer, records).await.into_iter().find_map(Result::err).map_or(Ok(()), Err)
}

/// Which of `suspects` (index into `records`, reason), all reported refused together, the broker refuses
/// on its own: it refuses a whole produce request when one record in it is too large, so every record
/// batched with the culprit reports the same error. Sends the suspects one at a time, largest first, and
/// returns the first one refused alone; None if none is (the batch as a whole was too large) or another
/// error came first. The records sent are written (a transactional caller aborts them).
pub async fn find_culprit<C: rdkafka::ClientContext + 'static>(
    producer: &FutureProducer<C>,
    records: &[OutRecord],
    suspects: &[(usize, String)],
) -> Option<(usize, String)> {
    let mut by_size: Vec<&(usize, String)> = suspects.iter().collect();
    by_size.sort_by_key(|(i, _)| std::cmp::Reverse(size(&records[*i])));
    for (index, reason) in by_size {
        match send_each(producer, [&records[*index]]).await.pop() {
            Some(Err(error)) if refuses_record(&error) => return Some((*index, reason.clone())),
            Some(Ok(_)) => {}
            _ => return None, // another error: not the record
        }
    }
    None
}

/// The largest of `suspects`: the culprit when none is refused alone.
pub fn largest(records: &[OutRecord], mut suspects: Vec<(usize, String)>) -> (usize, String) {
    suspects.sort_by_key(|(i, _)| std::cmp::Reverse(size(&records[*i])));
    suspects.swap_remove(0)
}

fn size(record: &OutRecord) -> usize {
    record.key.len() + record.payload.as_ref().map_or(0, Vec::len)
}

/// Whether the broker (or the client, before sending) refused this one record for what it is — too
/// large, invalid — so that sending it again can never succeed. Such a record's input is dead-lettered;
/// every other error (a broker away, a timeout, a fenced producer, missing rights) is retried as a whole.
pub fn refuses_record(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidTimestamp
                | RDKafkaErrorCode::InvalidMessage
        )
    )
}

/// How long a one-shot command waits for the broker before saying it cannot reach it.
pub const REACH_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks within [`REACH_TIMEOUT`] that a broker of `kafka.bootstrap_servers` answers, so that a wrong
/// address is named at once instead of after a 30 s metadata timeout.
/// Credentials the broker refused are named as such (librdkafka then only reports a transport failure to
/// the request).
pub async fn check_reachable(config: &Config) -> Result<(), crate::error::Error> {
    // A producer only for its poll, which serves librdkafka's error events to the context.
    use rdkafka::producer::Producer;
    let client: rdkafka::producer::BaseProducer<AuthWatch> =
        base(config).set("log_level", "2").create_with_context(AuthWatch::default())?;
    let outcome = tokio::task::spawn_blocking(move || {
        let result = client.client().fetch_metadata(None, REACH_TIMEOUT).map(|_| ());
        if result.is_err() {
            client.poll(Duration::from_millis(100));
        }
        (result, client.context().refused.lock().expect("not poisoned").take())
    })
    .await;
    let servers = config.kafka.bootstrap_servers.clone();
    let detail = match outcome {
        Ok((Ok(()), _)) => return Ok(()),
        Ok((Err(_), Some(reason))) => return Err(crate::error::Error::Authentication { servers, detail: reason }),
        Ok((Err(error), None)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    Err(crate::error::Error::Unreachable { servers, detail })
}

/// Remembers the first authentication failure librdkafka reports (SASL, or a TLS handshake).
#[derive(Default)]
struct AuthWatch {
    refused: std::sync::Mutex<Option<String>>,
}

impl rdkafka::producer::ProducerContext for AuthWatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

impl rdkafka::ClientContext for AuthWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::Authentication) {
            self.refused.lock().expect("not poisoned").get_or_insert_with(|| reason.to_string());
        }
    }
}

/// How a created topic keeps its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// `topics.partitions` partitions, the broker's retention.
    Stream,
    /// One partition, `cleanup.policy=compact`: the last record per key (the deployments topic).
    Compacted,
    /// One partition, kept without time or size limit (the history topic).
    Audit,
    /// `topics.partitions` partitions, `cleanup.policy=compact`: a stage's state by key.
    Changelog,
    /// `topics.partitions` partitions, kept at least this many ms (inputs of the score stage's window).
    KeptFor(u64),
}

/// `retention.ms` of each of `topics` (-1: kept for ever); topics that cannot be described are left out.
pub async fn topic_config_ms(config: &Config, topics: &[&str], name: &str) -> Result<Vec<(String, i64)>, KafkaError> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> = base(config).create()?;
    let specifiers: Vec<ResourceSpecifier> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    let mut out = Vec::new();
    for (topic, result) in topics.iter().zip(admin.describe_configs(&specifiers, &options).await?) {
        if let Some(ms) = result.ok().and_then(|r| r.get(name).and_then(|e| e.value.clone()))
            && let Ok(ms) = ms.parse()
        {
            out.push((topic.to_string(), ms));
        }
    }
    Ok(out)
}

/// Creates the topics that do not exist yet, with `topics.replication_factor` replicas (-1: the
/// broker's `default.replication.factor`). Refuses a replication factor the cluster cannot give; warns
/// about each topic (created now or before) with fewer replicas than the cluster could give it
/// (`replicas_wanted`): a topic with one replica on a cluster of three is lost with its broker.
pub async fn ensure_topics(config: &Config, names: &[String], kind: TopicKind) -> Result<(), crate::error::Error> {
    use crate::error::{During, Error};
    // One request must not name a topic twice (two deployments sharing a model do): librdkafka then
    // returns fewer results than topics and rdkafka 0.39 reads past them (a segfault, seen here).
    let names: std::collections::BTreeSet<&String> = names.iter().collect();
    if names.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = base(config).create()?;
    let brokers =
        admin.inner().fetch_metadata(None, ADMIN_TIMEOUT).during("counting the cluster's brokers")?.brokers().len();
    if let Some(refusal) = replication_refused(config.topics.replication_factor, brokers) {
        return Err(Error::Replication(refusal));
    }
    let record_limit = TOPIC_RECORD_LIMIT.to_string();
    let kept_for = if let TopicKind::KeptFor(ms) = kind { ms.to_string() } else { String::new() };
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|name| {
            let topic = NewTopic::new(
                name,
                if matches!(kind, TopicKind::Stream | TopicKind::Changelog | TopicKind::KeptFor(_)) {
                    config.topics.partitions
                } else {
                    1
                },
                TopicReplication::Fixed(config.topics.replication_factor),
            );
            let topic = topic.set("max.message.bytes", &record_limit);
            match kind {
                TopicKind::Stream => topic,
                TopicKind::KeptFor(_) => topic.set("retention.ms", &kept_for),
                TopicKind::Compacted | TopicKind::Changelog => topic.set("cleanup.policy", "compact"),
                TopicKind::Audit => {
                    topic.set("cleanup.policy", "delete").set("retention.ms", "-1").set("retention.bytes", "-1")
                }
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)).request_timeout(Some(ADMIN_TIMEOUT));
    for result in admin.create_topics(&topics, &options).await.during("creating topics")? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).during(format!("creating topic {name}"));
            }
        }
    }
    let metadata = admin.inner().fetch_metadata(None, ADMIN_TIMEOUT).during("reading topic metadata")?;
    for topic in metadata.topics().iter().filter(|t| names.contains(&t.name().to_string())) {
        let (name, replicas) = (topic.name(), topic.partitions().first().map_or(0, |p| p.replicas().len()));
        if replicas > 0 && replicas < replicas_wanted(brokers) {
            tracing::warn!(
                topic = %name, replicas, brokers,
                "topic has fewer replicas than the cluster can give: it is lost or stops with one broker; raise its \
                 replication (kafka-reassign-partitions) and set topics.replication_factor or the brokers' \
                 default.replication.factor"
            );
        }
    }
    Ok(())
}

/// How many replicas a topic should have on a cluster of `brokers`: 3 (the usual production choice, one
/// broker may fail while writes need 2 in sync), or every broker of a smaller cluster.
pub fn replicas_wanted(brokers: usize) -> usize {
    brokers.min(3)
}

/// Why a cluster of `brokers` cannot give `replication_factor` replicas (-1: the broker's default).
pub fn replication_refused(replication_factor: i32, brokers: usize) -> Option<String> {
    (replication_factor > brokers as i32).then(|| {
        format!(
            "topics.replication_factor is {replication_factor} but the cluster has {brokers} broker(s): set it to at \
             most {brokers}, or to -1 for the brokers' default.replication.factor"
        )
    })
}

/// Waits (up to [`ADMIN_TIMEOUT`]) until `topic` exists with a leader for every partition — a topic
/// created a moment ago may not be in the metadata yet — and returns its partition count.
pub async fn wait_for_topic<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    topic: &str,
) -> Result<Option<usize>, KafkaError> {
    let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
    loop {
        let metadata = consumer.fetch_metadata(Some(topic), ADMIN_TIMEOUT)?;
        let ready = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .filter(|t| {
                !t.partitions().is_empty() && t.partitions().iter().all(|p| p.leader() >= 0 && p.error().is_none())
            })
            .map(|t| t.partitions().len());
        if ready.is_some() || std::time::Instant::now() > deadline {
            return Ok(ready);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The one partition count of `topics`, which `stage` joins by partition: waits for each to exist, and
/// names them all with their counts when they differ.
pub async fn same_partition_count<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    topics: &[&str],
    stage: &str,
) -> Result<usize, crate::error::Error> {
    use crate::error::Error;
    let mut counts = Vec::new();
    for topic in topics {
        let n = wait_for_topic(consumer, topic).await?.ok_or_else(|| Error::MissingTopic(topic.to_string()))?;
        counts.push((topic, n));
    }
    if counts.iter().any(|(_, n)| *n != counts[0].1) {
        let list: Vec<String> = counts.iter().map(|(topic, n)| format!("{topic} has {n}")).collect();
        return Err(Error::PartitionMismatch(format!(
            "{stage} joins by partition, so these topics need the same partition count: {}",
            list.join(", ")
        )));
    }
    Ok(counts[0].1)
}

/// Partition count of `topic`, or `None` if it does not exist. A topic this principal may not describe
/// is an error (`TopicAuthorizationFailed`), not a missing topic.
pub fn partition_count<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    topic: &str,
) -> Result<Option<usize>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), ADMIN_TIMEOUT)?;
    let refused = rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
    if metadata.topics().iter().any(|t| t.name() == topic && t.error() == Some(refused)) {
        return Err(KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed));
    }
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0))
}

/// Sends `records`, retrying with backoff until the broker takes them or shutdown is requested.
/// Returns false if it gave up because of shutdown (the caller must then not commit).
pub async fn send_all_retrying(
    producer: &FutureProducer,
    records: &[OutRecord],
    shutdown: &crate::shutdown::Shutdown,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        match send_all(producer, records).await {
            Ok(()) => return true,
            Err(error) => {
                tracing::error!(%error, records = records.len(), "produce failed; retrying the batch");
                if shutdown.is_triggered() {
                    return false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod holder_tests {
    use super::*;

    #[test]
    fn the_member_holding_a_partition_is_found_in_its_assignment() {
        // version 1; topics: "deploy" -> [3, 0]; user data (null).
        let mut a = vec![0, 1, 0, 0, 0, 1, 0, 6];
        a.extend_from_slice(b"deploy");
        a.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert!(assignment_holds(&a, "deploy", 0));
        assert!(!assignment_holds(&a, "deploy", 1));
        assert!(!assignment_holds(&a, "other", 0));
        assert!(!assignment_holds(&a[..9], "deploy", 0), "truncated: holds nothing");
        assert!(!assignment_holds(&[0, 1, 0, 0, 0, 0], "deploy", 0), "empty assignment");
    }

    #[test]
    fn a_static_members_instance_id_is_its_member_id_without_the_uuid() {
        assert_eq!(instance_of_member("i1-6f1c8b4e-2f7a-4c55-9a43-0e2c5b9d1a77"), "i1");
        assert_eq!(instance_of_member("host-a-0-6f1c8b4e-2f7a-4c55-9a43-0e2c5b9d1a77"), "host-a-0");
        assert_eq!(instance_of_member("rdkafka"), "rdkafka");
    }
}

#[cfg(test)]
mod replication_tests {
    use super::*;

    #[test]
    fn a_replication_factor_above_the_broker_count_is_refused_with_what_to_set() {
        let refusal = replication_refused(3, 1).expect("refused");
        assert!(refusal.contains("is 3 but the cluster has 1 broker"), "{refusal}");
        assert!(refusal.contains("-1"), "names the broker default: {refusal}");
        assert_eq!(replication_refused(3, 3), None);
        assert_eq!(replication_refused(-1, 1), None, "the brokers' own default");
        assert_eq!(replication_refused(1, 5), None, "allowed; warned about per topic");
    }

    #[test]
    fn three_replicas_are_wanted_or_every_broker_of_a_smaller_cluster() {
        assert_eq!([1, 2, 3, 5, 9].map(replicas_wanted), [1, 2, 3, 3, 3]);
    }
}
