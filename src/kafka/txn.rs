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
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use tokio::task::block_in_place;

use super::{OutRecord, Placed, find_culprit, largest, refuses_record, send_each, transactional_producer};
use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::telemetry;

/// Bound on each transactional call (init, commit, abort).
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on registering a batch's offsets: milliseconds when the coordinators answer, and the call that
/// librdkafka can leave blocked for ever (see [`TxnProducer::call`]), so it is given less.
const SEND_OFFSETS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long past its timeout a call may take before it is deemed stuck (see [`TxnProducer::call`]).
const STUCK_AFTER: Duration = Duration::from_secs(1);
/// How long registering a transactional id at start is retried while the coordinator is not ready.
const INIT_PATIENCE: Duration = Duration::from_secs(60);
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

/// Where each record was placed, or the first error with every record refused for what it is
/// ((index, reason): see [`super::refuses_record`]).
pub fn outcomes(results: impl IntoIterator<Item = Result<Placed, KafkaError>>) -> Result<Vec<Placed>, TxnFailure> {
    let (mut placed, mut first_error, mut refused) = (Vec::new(), None, Vec::new());
    for (index, result) in results.into_iter().enumerate() {
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
    match first_error {
        Some(error) => Err(TxnFailure { error, refused }),
        None => Ok(placed),
    }
}

/// A producer that commits batches transactionally, and recovers from failed transactions.
pub struct TxnProducer {
    config: Config,
    /// The stage it commits for, in metrics.
    stage: &'static str,
    id: String,
    producer: FutureProducer,
    /// A call of this producer overran its timeout and was abandoned: it must be replaced.
    stuck: bool,
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
    pub fn new(config: &Config, stage: &'static str, id: String, shutdown: Shutdown) -> Result<Self, KafkaError> {
        // The transaction coordinator may be loading or moving (a cluster just started, a node just
        // died): a retriable error is asked again, for up to a minute, instead of stopping the service.
        let deadline = std::time::Instant::now() + INIT_PATIENCE;
        let producer = loop {
            match create(config, &id) {
                Err(KafkaError::Transaction(e))
                    if e.is_retriable() && std::time::Instant::now() < deadline && !shutdown.is_triggered() =>
                {
                    tracing::warn!(transactional_id = %id, error = %e, "cannot register the transactional id yet; retrying");
                    block_in_place(|| std::thread::sleep(Duration::from_millis(500)));
                }
                result => break result?,
            }
        };
        telemetry::transactional_calls_watched();
        tracing::info!(transactional_id = %id, "transactional producer ready");
        Ok(TxnProducer { config: config.clone(), stage, id, producer, stuck: false, shutdown })
    }

    /// Produces `records` and commits them together with `offsets` for the consumer group; returns where
    /// each record was placed. On error the transaction has been aborted, or the producer replaced (which
    /// settles it): nothing of it is visible to read_committed consumers and the caller must rewind its
    /// inputs to the committed offsets.
    pub async fn commit(
        &mut self,
        records: &[OutRecord],
        offsets: &TopicPartitionList,
        group: Option<ConsumerGroupMetadata>,
    ) -> Result<Vec<Placed>, TxnFailure> {
        let mut result = match group {
            Some(group) => self.try_commit(records, offsets, group).await,
            None => Err(TxnFailure { error: KafkaError::Canceled, refused: Vec::new() }),
        };
        if let Err(failure) = &mut result {
            tracing::warn!(transactional_id = %self.id, error = %failure.error, records = records.len(), refused = failure.refused.len(),
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
    async fn probe(&mut self, records: &[OutRecord], suspects: Vec<(usize, String)>) -> Vec<(usize, String)> {
        let mut culprit = None;
        if self.call("begin_transaction", TXN_CALL_TIMEOUT, |p| p.begin_transaction()).await.is_ok() {
            culprit = find_culprit(&self.producer, records, &suspects).await;
            let aborted =
                self.call("abort_transaction", TXN_CALL_TIMEOUT, |p| p.abort_transaction(TXN_CALL_TIMEOUT)).await;
            if culprit.is_some() || aborted.is_err() {
                self.replace().await;
            }
        }
        vec![culprit.unwrap_or_else(|| largest(records, suspects))]
    }

    async fn try_commit(
        &mut self,
        records: &[OutRecord],
        offsets: &TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> Result<Vec<Placed>, TxnFailure> {
        let failed = |error| TxnFailure { error, refused: Vec::new() };
        self.call("begin_transaction", TXN_CALL_TIMEOUT, |p| p.begin_transaction()).await.map_err(failed)?;
        // Every record's outcome, not just the first error: one refused record fails the whole
        // transaction, and the caller needs to know all of them to redo the rest.
        let producing = std::time::Instant::now();
        let placed = outcomes(send_each(&self.producer, records).await)?;
        telemetry::transaction_step(self.stage, "produce", producing.elapsed().as_secs_f64());
        if offsets.count() > 0 {
            let registering = std::time::Instant::now();
            let offsets = offsets.clone();
            self.call("send_offsets_to_transaction", SEND_OFFSETS_TIMEOUT, move |p| {
                p.send_offsets_to_transaction(&offsets, &group, SEND_OFFSETS_TIMEOUT)
            })
            .await
            .map_err(failed)?;
            telemetry::transaction_step(self.stage, "send_offsets", registering.elapsed().as_secs_f64());
        }
        let committing = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            match self.call("commit_transaction", TXN_CALL_TIMEOUT, |p| p.commit_transaction(TXN_CALL_TIMEOUT)).await {
                Err(KafkaError::Transaction(e)) if e.is_retriable() && attempt < COMMIT_RETRIES => attempt += 1,
                Err(error) => return Err(failed(error)),
                Ok(()) => {
                    telemetry::transaction_step(self.stage, "commit", committing.elapsed().as_secs_f64());
                    return Ok(placed);
                }
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
        let fatal = self.stuck || matches!(error, KafkaError::Transaction(e) if e.is_fatal());
        let abort = |p: &FutureProducer| p.abort_transaction(TXN_CALL_TIMEOUT);
        if !fatal && !refused && self.call("abort_transaction", TXN_CALL_TIMEOUT, abort).await.is_ok() {
            return;
        }
        self.replace().await;
    }

    /// Runs one transactional call of the producer on a blocking thread. librdkafka bounds each call by
    /// the timeout it is given, but not always: `send_offsets_to_transaction` can block for ever once the
    /// broker that was its group coordinator is gone (librdkafka issues 5456 and 5511, open in 2.15;
    /// seen here when that broker of a three-broker cluster was killed: route stopped for good, without
    /// a word). A call still running [`STUCK_AFTER`] past the `timeout` it was given is abandoned with its
    /// producer (its thread stays blocked, holding it) and the producer marked for replacement: a new one
    /// under the same transactional id fences it and settles whatever it left open.
    async fn call<T: Send + 'static>(
        &mut self,
        what: &'static str,
        timeout: Duration,
        call: impl FnOnce(&FutureProducer) -> Result<T, KafkaError> + Send + 'static,
    ) -> Result<T, KafkaError> {
        if self.stuck {
            return Err(KafkaError::Global(RDKafkaErrorCode::OperationTimedOut));
        }
        let producer = self.producer.clone();
        match tokio::time::timeout(timeout + STUCK_AFTER, tokio::task::spawn_blocking(move || call(&producer))).await {
            Ok(Ok(result)) => result,
            Ok(Err(failed)) => std::panic::resume_unwind(failed.into_panic()),
            Err(_) => {
                self.stuck = true;
                telemetry::transactional_call_stuck(what);
                tracing::error!(transactional_id = %self.id, call = what, after_s = (timeout + STUCK_AFTER).as_secs(),
                    "a transactional call did not return within its timeout (librdkafka issues 5456, 5511): abandoning the producer for a new one");
                Err(KafkaError::Global(RDKafkaErrorCode::OperationTimedOut))
            }
        }
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
                    self.stuck = false;
                    return;
                }
                Err(error) if self.shutdown.is_triggered() => {
                    tracing::error!(transactional_id = %self.id, %error, "cannot re-create the transactional producer; shutting down");
                    return;
                }
                Err(error) => {
                    tracing::error!(transactional_id = %self.id, %error, "cannot re-create the transactional producer; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
