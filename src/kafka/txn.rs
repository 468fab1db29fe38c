//! Transactional output: the records a batch produced and the input offsets it consumed are committed
//! in one Kafka transaction (consume-transform-produce). Consumers reading with read_committed see
//! either all of a batch's records, exactly once, or none.
//!
//! The transactional id is stable per instance (`<group>-<stage>-<instance_id>`): when an instance
//! restarts, its new producer fences the old one and settles its open transaction at once, instead of
//! leaving read_committed consumers blocked until the transaction times out. A zombie instance (paused
//! past its session timeout) is fenced by the consumer-group generation in `send_offsets_to_transaction`
//! (KIP-447): its commit fails and its records stay invisible.

use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use tokio::task::block_in_place;

use super::{OutRecord, Placed, refuses_record, send_each, transactional_producer};
use crate::config::Config;
use crate::shutdown::Shutdown;

/// Bound on each transactional call (init, send offsets, commit, abort).
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a commit that failed with a retriable error is retried before giving up on it.
const COMMIT_RETRIES: usize = 3;

/// Why a transaction did not commit. It has been aborted (or the producer replaced): nothing of it is
/// visible to read_committed consumers.
#[derive(Debug)]
pub struct TxnFailure {
    pub error: KafkaError,
    /// Records the broker refused for what they are (see [`super::refuses_record`]): (index, reason).
    pub refused: Vec<(usize, String)>,
}

/// A producer that commits batches transactionally, and recovers from failed transactions.
pub struct TxnProducer {
    config: Config,
    id: String,
    producer: FutureProducer,
    shutdown: Shutdown,
}

fn create(config: &Config, id: &str) -> Result<FutureProducer, KafkaError> {
    let producer = transactional_producer(config, id)?;
    block_in_place(|| producer.init_transactions(TXN_CALL_TIMEOUT))?;
    Ok(producer)
}

/// Fences another instance's transactional id (`<group>-<stage>-<instance>`): a transaction it left open
/// (it died mid-batch) is aborted now, instead of hiding from read_committed readers everything written
/// after it on the same partitions until `transaction.timeout.ms` runs out at the broker's next check
/// (up to about 20 s: seen as TIMEOUTs of one model whose input partition the dead transaction held).
/// Blocking.
pub fn fence(config: &Config, id: &str) -> Result<(), KafkaError> {
    create(config, id).map(drop)
}

impl TxnProducer {
    /// Creates the producer and registers its transactional id (fencing any earlier incarnation).
    pub fn new(config: &Config, id: String, shutdown: Shutdown) -> Result<Self, KafkaError> {
        let producer = create(config, &id)?;
        tracing::info!(transactional_id = %id, "transactional producer ready");
        Ok(TxnProducer { config: config.clone(), id, producer, shutdown })
    }

    /// Produces `records` and commits them together with `offsets` for the consumer group; returns where
    /// each record was placed. On error the transaction has been aborted, or the producer replaced (which
    /// settles it): nothing of it is visible to read_committed consumers and the caller must rewind its
    /// inputs to the committed offsets.
    pub async fn commit(
        &mut self,
        records: &[OutRecord],
        offsets: &TopicPartitionList,
        group: Option<&ConsumerGroupMetadata>,
    ) -> Result<Vec<Placed>, TxnFailure> {
        let mut result = match group {
            Some(group) => self.try_commit(records, offsets, group).await,
            None => Err(TxnFailure { error: KafkaError::Canceled, refused: Vec::new() }),
        };
        if let Err(failure) = &mut result {
            tracing::warn!(error = %failure.error, records = records.len(), refused = failure.refused.len(),
                "transaction failed; its records are discarded and inputs rewound");
            self.recover(&failure.error, !failure.refused.is_empty()).await;
            if failure.refused.len() > 1 {
                failure.refused = self.probe(records, std::mem::take(&mut failure.refused)).await;
            }
        }
        result
    }

    /// Finds which of `suspects` the broker refuses on its own. The broker refuses a whole produce
    /// request when one record in it is too large, so every record batched with the culprit reports
    /// the same error. Sends the suspects one at a time, largest first, in a transaction that is always
    /// aborted, and returns the first one refused alone (or, if none is, the largest: the batch as a
    /// whole was too large). One culprit per failed transaction: the next attempt finds the next one.
    async fn probe(&mut self, records: &[OutRecord], mut suspects: Vec<(usize, String)>) -> Vec<(usize, String)> {
        let size = |r: &OutRecord| r.key.len() + r.payload.as_ref().map_or(0, Vec::len);
        suspects.sort_by_key(|(i, _)| std::cmp::Reverse(size(&records[*i])));
        let mut culprit = None;
        if block_in_place(|| self.producer.begin_transaction()).is_ok() {
            for (index, reason) in &suspects {
                match send_each(&self.producer, std::slice::from_ref(&records[*index])).await.pop() {
                    Some(Err(error)) if refuses_record(&error) => {
                        culprit = Some((*index, reason.clone()));
                        break;
                    }
                    Some(Ok(_)) => {}
                    _ => break, // another error: not the record; keep the largest as the suspect
                }
            }
            let aborted = block_in_place(|| self.producer.abort_transaction(TXN_CALL_TIMEOUT));
            if culprit.is_some() || aborted.is_err() {
                self.replace().await;
            }
        }
        vec![culprit.unwrap_or_else(|| suspects.swap_remove(0))]
    }

    async fn try_commit(
        &self,
        records: &[OutRecord],
        offsets: &TopicPartitionList,
        group: &ConsumerGroupMetadata,
    ) -> Result<Vec<Placed>, TxnFailure> {
        let failed = |error| TxnFailure { error, refused: Vec::new() };
        let producer = &self.producer;
        block_in_place(|| producer.begin_transaction()).map_err(failed)?;
        // Every record's outcome, not just the first error: one refused record fails the whole
        // transaction, and the caller needs to know all of them to redo the rest.
        let mut placed = Vec::with_capacity(records.len());
        let mut first_error = None;
        let mut refused = Vec::new();
        for (index, result) in send_each(producer, records).await.into_iter().enumerate() {
            match result {
                Ok(at) => placed.push(at),
                Err(error) => {
                    if refuses_record(&error) {
                        refused.push((index, error.to_string()));
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_error {
            return Err(TxnFailure { error, refused });
        }
        if offsets.count() > 0 {
            block_in_place(|| producer.send_offsets_to_transaction(offsets, group, TXN_CALL_TIMEOUT))
                .map_err(failed)?;
        }
        let mut attempt = 0;
        loop {
            match block_in_place(|| producer.commit_transaction(TXN_CALL_TIMEOUT)) {
                Err(KafkaError::Transaction(e)) if e.is_retriable() && attempt < COMMIT_RETRIES => attempt += 1,
                Err(error) => return Err(failed(error)),
                Ok(()) => return Ok(placed),
            }
        }
    }

    /// Aborts the open transaction, or — when the error is fatal, the producer was fenced, or the abort
    /// itself fails (e.g. the commit's outcome is unknown) — replaces the producer: re-initialising the same
    /// transactional id completes or aborts whatever the old one left open.
    ///
    /// A producer whose records the broker refused is always replaced: librdkafka's idempotence state
    /// for the partition of a refused batch can leave the next transaction's records waiting until they
    /// time out (seen here: 10 s), while a new producer starts clean.
    async fn recover(&mut self, error: &KafkaError, refused: bool) {
        let fatal = matches!(error, KafkaError::Transaction(e) if e.is_fatal());
        if !fatal && !refused && block_in_place(|| self.producer.abort_transaction(TXN_CALL_TIMEOUT)).is_ok() {
            return;
        }
        self.replace().await;
    }

    /// Replaces the producer; re-initialising the same transactional id settles whatever the old one
    /// left open. Retries until it works or shutdown is requested.
    async fn replace(&mut self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match create(&self.config, &self.id) {
                Ok(producer) => {
                    tracing::info!(transactional_id = %self.id, "transactional producer re-created");
                    self.producer = producer;
                    return;
                }
                Err(error) if self.shutdown.is_triggered() => {
                    tracing::error!(%error, "cannot re-create the transactional producer; shutting down");
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot re-create the transactional producer; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
