//! Consuming in batches: collecting a batch, tracking which input offsets are safe to commit, seeing
//! rebalances, and rewinding to the committed offsets after a failed transaction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use super::ADMIN_TIMEOUT;
use crate::clock::now_millis;
use crate::config::Config;
use crate::shutdown::Shutdown;

/// Most bytes of record values and keys in one batch, whatever the record count: a batch of
/// `batch_size` records near the size limit would otherwise hold gigabytes.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Waits up to `idle` for a first record, then takes what arrives within `wait` (with `wait` 0: what
/// has already arrived), up to `max` records or [`MAX_BATCH_BYTES`]. An empty
/// batch means nothing arrived; callers check for shutdown between batches. Consumer errors are logged
/// and waited out: librdkafka reconnects by itself, and a broken batch is never half-processed. A fatal
/// error (the consumer is unusable, e.g. another process joined the group under this instance id) is
/// returned.
pub async fn next_batch<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    max: usize,
    wait: Duration,
    idle: Duration,
) -> Result<Vec<OwnedMessage>, KafkaError> {
    let mut batch = Vec::new();
    let size = |m: &OwnedMessage| m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len);
    match tokio::time::timeout(idle, consumer.recv()).await {
        Err(_) => return Ok(batch),
        Ok(Ok(message)) => batch.push(message.detach()),
        Ok(Err(error)) => return consumer_error(error).map(|()| batch),
    }
    let mut bytes = size(&batch[0]);
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < max && bytes < MAX_BATCH_BYTES {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => {
                let message = message.detach();
                bytes += size(&message);
                batch.push(message);
            }
            Ok(Err(error)) => {
                consumer_error(error)?;
                break;
            }
            Err(_) => break,
        }
    }
    Ok(batch)
}

fn consumer_error(error: KafkaError) -> Result<(), KafkaError> {
    if let KafkaError::MessageConsumptionFatal(code) = error {
        tracing::error!(%code, "the consumer cannot go on");
        return Err(error);
    }
    tracing::warn!(%error, "consumer error");
    Ok(())
}

/// Where a record came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SourcePos {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl SourcePos {
    pub fn of(message: &OwnedMessage) -> Self {
        SourcePos { topic: message.topic().to_string(), partition: message.partition(), offset: message.offset() }
    }
}

/// Counts rebalances, so a loop can tell that a batch straddles one, remembers when partitions were
/// last assigned, so deadlines wait while the fetchers catch up, and reports consumer lag.
#[derive(Debug, Default)]
pub struct GroupWatch {
    generation: AtomicU64,
    rebalancing: AtomicBool,
    assigned_at: AtomicI64,
}

impl GroupWatch {
    /// Changes at every assignment and revocation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// True outside rebalances once `grace_ms` have passed since the last assignment.
    pub fn settled(&self, now: i64, grace_ms: i64) -> bool {
        !self.rebalancing.load(Ordering::SeqCst) && now >= self.assigned_at.load(Ordering::SeqCst) + grace_ms
    }
}

impl ClientContext for GroupWatch {
    /// librdkafka's periodic statistics (`statistics.interval.ms`) give each assigned partition's
    /// last stable offset and the next offset the application will get; their difference is the lag.
    /// (librdkafka's own `consumer_lag` is relative to offsets it committed, and switchyard commits
    /// offsets through transactions, which it does not track.)
    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<serde_json::Value>(statistics) else { return };
        let Some(topics) = stats.get("topics").and_then(|t| t.as_object()) else { return };
        for (topic, t) in topics {
            let Some(partitions) = t.get("partitions").and_then(|p| p.as_object()) else { continue };
            for (partition, p) in partitions {
                let offset = |name: &str| p.get(name).and_then(serde_json::Value::as_i64).unwrap_or(-1);
                let (end, next) = (offset("ls_offset"), offset("app_offset"));
                if let (Ok(partition), true) = (partition.parse::<i32>(), end >= 0 && next >= 0)
                    && partition >= 0
                {
                    crate::telemetry::consumer_lag(topic, partition, (end - next).max(0));
                }
            }
        }
    }
}

impl ConsumerContext for GroupWatch {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalancing.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Rebalance::Revoke(partitions) = rebalance {
            if consumer.assignment_lost() {
                // Evicted (e.g. paused past the session timeout): other instances own these partitions
                // now, and whatever this one had in flight is refused (KIP-447).
                tracing::warn!(
                    partitions = partitions.count(),
                    "partitions lost: this instance was out of the group; fenced"
                );
            } else {
                tracing::info!(partitions = partitions.count(), "partitions revoked");
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            tracing::info!(partitions = partitions.count(), "partitions assigned");
            self.assigned_at.store(now_millis(), Ordering::SeqCst);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.rebalancing.store(false, Ordering::SeqCst);
    }
}

/// The next offset of every partition in `batch`: what a transaction commits for a stateless stage.
pub fn batch_offsets(batch: &[OwnedMessage]) -> TopicPartitionList {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for message in batch {
        let entry = next.entry((message.topic(), message.partition())).or_default();
        *entry = (*entry).max(message.offset() + 1);
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        super::push_offset(&mut list, topic, partition, Offset::Offset(offset), "");
    }
    list
}

/// The committed offsets of the current assignment, as stored by the group coordinator (with
/// read_committed, librdkafka waits for pending transactional commits to settle).
pub fn committed<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>) -> Result<TopicPartitionList, KafkaError> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let assignment = consumer.assignment()?;
    // Asked in short attempts: a group coordinator that died does not answer, and one query given the
    // whole ADMIN_TIMEOUT waited that long (seen: merge's restore stalled 30 s when the node of its
    // group coordinator was killed) while the coordinator had moved within seconds.
    let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
    loop {
        match consumer.committed_offsets(assignment.clone(), Duration::from_secs(2)) {
            Err(KafkaError::MetadataFetch(
                Code::OperationTimedOut
                | Code::CoordinatorNotAvailable
                | Code::NotCoordinator
                | Code::CoordinatorLoadInProgress
                | Code::BrokerTransportFailure,
            )) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            answer => return answer,
        }
    }
}

fn try_rewind<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>) -> Result<(), KafkaError> {
    for element in committed(consumer)?.elements() {
        let offset = match element.offset() {
            Offset::Offset(n) => Offset::Offset(n),
            _ => Offset::Beginning,
        };
        consumer.seek(element.topic(), element.partition(), offset, ADMIN_TIMEOUT)?;
    }
    Ok(())
}

/// Moves every assigned partition back to its committed offset (or the start, if none), so that records
/// whose processing was not committed are read again. Retries while the broker cannot answer; gives up
/// only on shutdown (returning false).
pub async fn rewind<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>, shutdown: &Shutdown) -> bool {
    let mut backoff = Duration::from_millis(200);
    loop {
        match try_rewind(consumer) {
            Ok(()) => return true,
            Err(error) if shutdown.is_triggered() => {
                tracing::warn!(%error, "cannot rewind to the committed offsets during shutdown");
                return false;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot rewind to the committed offsets yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Where to read `partitions` of `topic` whole — from the first record each still holds to its end as of
/// now, records of transactions not resolved yet included (see [`super::log_ends`]) — as an assignment
/// (every partition: a reader may go on following them) and the targets for [`caught_up`]. A partition
/// with nothing left (empty, its records deleted by retention, or compaction removed even the tombstones)
/// has no target: a reader that reads nothing has no position, and would wait for that end for ever.
pub fn whole<C: ConsumerContext + 'static>(
    config: &Config,
    reader: &StreamConsumer<C>,
    topic: &str,
    partitions: impl IntoIterator<Item = i32>,
) -> Result<(TopicPartitionList, HashMap<i32, i64>), KafkaError> {
    locate(reader, topic)?;
    let mut assignment = TopicPartitionList::new();
    let mut targets = HashMap::new();
    for (partition, (low, high)) in super::log_ends(config, topic, partitions)? {
        assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
        if low < high {
            targets.insert(partition, high);
        }
    }
    Ok((assignment, targets))
}

/// Has `reader` learn where `topic`'s partitions are before it is assigned them: a reader assigned a topic
/// it has not looked up yet waits for its next metadata refresh before the first fetch (seen: about a
/// second added to every merge restore).
pub fn locate<C: ConsumerContext + 'static>(reader: &StreamConsumer<C>, topic: &str) -> Result<(), KafkaError> {
    reader.fetch_metadata(Some(topic), ADMIN_TIMEOUT).map(|_| ())
}

/// True once the consumer's position in every partition of `targets` reached the offset given there.
/// Positions also move past transaction markers, which are never delivered as records.
pub fn caught_up<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    topic: &str,
    targets: &HashMap<i32, i64>,
) -> bool {
    let Ok(positions) = consumer.position() else { return false };
    targets.iter().all(|(partition, target)| {
        *target <= 0
            || positions.elements().iter().any(|e| {
                e.topic() == topic
                    && e.partition() == *partition
                    && matches!(e.offset(), Offset::Offset(at) if at >= *target)
            })
    })
}
