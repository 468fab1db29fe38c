//! The one place that builds Kafka clients and creates topics.
//!
//! Every client gets the bootstrap servers and the pass-through `[kafka.options]`; switchyard then sets
//! the options its guarantees depend on (see `config::MANAGED_OPTIONS`).

use std::time::Duration;

use futures::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, DefaultConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::config::Config;

/// How long a metadata or admin call may take before the caller reports the broker as unreachable.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

fn base(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.bootstrap_servers);
    for (key, value) in &config.kafka.options {
        client.set(key, value);
    }
    client
}

/// A producer for records that must not be lost or reordered: idempotent, acks=all, and the murmur2
/// partitioner of the Java client, so that a key lands on the same partition whichever client wrote it
/// (model workers in any language must agree with switchyard for merge's co-partitioned join).
pub fn producer(config: &Config) -> Result<FutureProducer, KafkaError> {
    base(config)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        // Bounds what a stalled broker can make us buffer.
        .set_if_absent("queue.buffering.max.kbytes", "65536")
        .create()
}

/// A consumer in `group` that commits offsets only when told to, reads only committed transactional
/// data, and assigns partition N of every subscribed topic to the same member (range assignor), which
/// is what lets merge join co-partitioned topics locally.
pub fn group_consumer(config: &Config, group: &str) -> Result<StreamConsumer, KafkaError> {
    group_consumer_with(config, group, DefaultConsumerContext)
}

/// [`group_consumer`] with a context that sees rebalances.
pub fn group_consumer_with<C: ConsumerContext + 'static>(config: &Config, group: &str, context: C) -> Result<StreamConsumer<C>, KafkaError> {
    base(config)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "range")
        // Regex subscriptions pick up new per-model topics at the next metadata refresh.
        .set_if_absent("topic.metadata.refresh.interval.ms", "1000")
        // Bounds what the consumer prefetches while merge applies backpressure.
        .set_if_absent("queued.max.messages.kbytes", "16384")
        .create_with_context(context)
}

/// A consumer outside any group, for reading whole topics (the deployments topic, tests, status).
pub fn reader(config: &Config) -> Result<StreamConsumer, KafkaError> {
    base(config)
        .set("group.id", "switchyard-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .create()
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
    pub key: Vec<u8>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

impl OutRecord {
    pub fn new(topic: impl Into<String>, key: impl Into<Vec<u8>>, payload: Vec<u8>) -> Self {
        OutRecord { topic: topic.into(), key: key.into(), payload: Some(payload), headers: Vec::new() }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// Produces every record and waits until the broker has acknowledged all of them. A full local queue is
/// waited out, not reported; the first delivery error is returned (the caller then must not commit the
/// input offsets that produced these records).
pub async fn send_all(producer: &FutureProducer, records: &[OutRecord]) -> Result<(), KafkaError> {
    let sends = records.iter().map(|record| {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(rdkafka::message::Header { key: name, value: Some(value) });
        }
        let mut future = FutureRecord::<Vec<u8>, Vec<u8>>::to(&record.topic).key(&record.key).headers(headers);
        if let Some(payload) = &record.payload {
            future = future.payload(payload);
        }
        producer.send(future, Timeout::Never)
    });
    for result in join_all(sends).await {
        result.map_err(|(error, _)| error)?;
    }
    Ok(())
}

/// Creates the topics that do not exist yet. `compacted` topics get `cleanup.policy=compact`.
pub async fn ensure_topics(config: &Config, names: &[String], compacted: bool) -> Result<(), KafkaError> {
    if names.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = base(config).create()?;
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|name| {
            let topic = NewTopic::new(
                name,
                if compacted { 1 } else { config.topics.partitions },
                TopicReplication::Fixed(config.topics.replication_factor),
            );
            if compacted { topic.set("cleanup.policy", "compact") } else { topic }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)).request_timeout(Some(ADMIN_TIMEOUT));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| tracing::error!(topic = %name, %code, "cannot create topic"));
            }
        }
    }
    Ok(())
}

/// Partition count of `topic`, or `None` if it does not exist.
pub fn partition_count(consumer: &StreamConsumer, topic: &str) -> Result<Option<usize>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), ADMIN_TIMEOUT)?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0))
}

/// Waits up to `idle` for a first record, then takes what arrives within `wait`, up to `max`. An empty
/// batch means nothing arrived; callers check for shutdown between batches. Consumer errors are logged
/// and waited out: librdkafka reconnects by itself, and a broken batch is never half-processed.
pub async fn next_batch<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>, max: usize, wait: Duration, idle: Duration) -> Vec<rdkafka::message::OwnedMessage> {
    let mut batch = Vec::new();
    match tokio::time::timeout(idle, consumer.recv()).await {
        Err(_) => return batch,
        Ok(Ok(message)) => batch.push(message.detach()),
        Ok(Err(error)) => {
            tracing::warn!(%error, "consumer error");
            return batch;
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => batch.push(message.detach()),
            Ok(Err(error)) => {
                tracing::warn!(%error, "consumer error");
                break;
            }
            Err(_) => break,
        }
    }
    batch
}

/// Tracks, per input partition, what has been processed and what is still needed (held), so that the
/// committed offset never passes a record whose effects are not yet durable, and so that records
/// redelivered after a rebalance rewinds the fetch position are recognised and skipped.
#[derive(Debug, Default)]
pub struct Progress {
    partitions: std::collections::HashMap<(String, i32), PartitionProgress>,
}

#[derive(Debug, Default)]
struct PartitionProgress {
    /// Next offset not yet processed.
    next: i64,
    /// Offsets whose effects are not durable yet, with a count of holders.
    held: std::collections::BTreeMap<i64, usize>,
    /// Last offset committed, to skip redundant commits.
    committed: i64,
}

/// Where a record came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourcePos {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl Progress {
    /// Marks a record processed; false if it was processed before (a redelivery to skip).
    pub fn accept(&mut self, pos: &SourcePos) -> bool {
        let p = self.partitions.entry((pos.topic.clone(), pos.partition)).or_default();
        if pos.offset < p.next {
            return false;
        }
        p.next = pos.offset + 1;
        true
    }

    /// Keeps the committed offset at or below `pos` until [`Progress::release`].
    pub fn hold(&mut self, pos: &SourcePos) {
        let p = self.partitions.entry((pos.topic.clone(), pos.partition)).or_default();
        *p.held.entry(pos.offset).or_default() += 1;
    }

    pub fn release(&mut self, pos: &SourcePos) {
        if let Some(p) = self.partitions.get_mut(&(pos.topic.clone(), pos.partition)) {
            if let Some(count) = p.held.get_mut(&pos.offset) {
                *count -= 1;
                if *count == 0 {
                    p.held.remove(&pos.offset);
                }
            }
        }
    }

    /// Offsets safe to commit that moved since the last call.
    pub fn to_commit(&mut self) -> Option<rdkafka::TopicPartitionList> {
        let mut list = rdkafka::TopicPartitionList::new();
        for ((topic, partition), p) in &mut self.partitions {
            let safe = p.held.keys().next().copied().unwrap_or(p.next);
            if safe > p.committed {
                p.committed = safe;
                list.add_partition_offset(topic, *partition, rdkafka::Offset::Offset(safe)).ok()?;
            }
        }
        (list.count() > 0).then_some(list)
    }
}

/// Commits what `progress` says is safe. A failed commit only means more redelivery after a crash.
pub fn commit<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>, progress: &mut Progress) {
    if let Some(list) = progress.to_commit() {
        if let Err(error) = consumer.commit(&list, rdkafka::consumer::CommitMode::Async) {
            tracing::warn!(%error, "offset commit failed; records since the last commit may be redelivered");
        }
    }
}

/// Sends `records`, retrying with backoff until the broker takes them or shutdown is requested.
/// Returns false if it gave up because of shutdown (the caller must then not commit).
pub async fn send_all_retrying(producer: &FutureProducer, records: &[OutRecord], shutdown: &crate::shutdown::Shutdown) -> bool {
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

/// Milliseconds since the Unix epoch, from the wall clock.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(offset: i64) -> SourcePos {
        SourcePos { topic: "t".into(), partition: 0, offset }
    }

    #[test]
    fn progress_commits_below_held_records_and_skips_redeliveries() {
        let mut p = Progress::default();
        for o in 0..5 {
            assert!(p.accept(&pos(o)));
        }
        p.hold(&pos(2));
        let list = p.to_commit().unwrap();
        assert_eq!(list.elements()[0].offset(), rdkafka::Offset::Offset(2));
        assert!(p.to_commit().is_none(), "nothing moved");
        assert!(!p.accept(&pos(3)), "redelivered record is skipped");
        p.release(&pos(2));
        assert_eq!(p.to_commit().unwrap().elements()[0].offset(), rdkafka::Offset::Offset(5));
    }
}
