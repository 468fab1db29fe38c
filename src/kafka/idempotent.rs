//! Output without a transaction, for route: a batch's records are written by a gapless idempotent
//! producer ([`super::gapless_producer`]) and its input offsets committed only once the broker has
//! acknowledged every record. Nothing waits for a transaction: the records are visible to their readers
//! at once, and a stage that dies never leaves an open transaction holding read_committed readers back.
//!
//! The price is at-least-once: a batch whose records were written but whose offsets were not committed
//! (a crash, a rebalance, a failed send) is read and written again, maybe differently (a deployment
//! changed in between). Exactly once is restored downstream: each routed record names the request
//! offset it was made from, and merge keeps only the first routing of each request (see
//! `merge::firsts`).

use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};

use super::batch::GroupWatch;
use super::txn::{TxnFailure, outcomes};
use super::{Gapless, OutRecord, Placed, find_culprit, gapless_producer, largest, send_each};
use crate::config::Config;
use crate::shutdown::Shutdown;

/// How long a batch's records may still take to be acknowledged once shutdown has been asked for (a
/// broker away); past it, the batch is left uncommitted and written again after the restart.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A gapless idempotent producer, replaced when it stops.
pub struct IdempotentProducer {
    config: Config,
    producer: FutureProducer<Gapless>,
    /// The topics whose records are written only once all others of their batch are acknowledged.
    last: Vec<String>,
    shutdown: Shutdown,
}

impl IdempotentProducer {
    pub fn new(config: &Config, last: Vec<String>, shutdown: Shutdown) -> Result<Self, KafkaError> {
        Ok(IdempotentProducer { config: config.clone(), producer: gapless_producer(config)?, last, shutdown })
    }

    /// Produces `records` — those for the `last` topics once all the others are acknowledged — waits
    /// until each is acknowledged, then commits `offsets` for the consumer group (asynchronously: a
    /// commit lost with a crash only means more is written again). Returns where each record was placed.
    /// On error nothing is committed: the caller rewinds, and what was written already is written again.
    pub async fn commit(
        &mut self,
        records: &[OutRecord],
        offsets: &TopicPartitionList,
        consumer: &StreamConsumer<GroupWatch>,
    ) -> Result<Vec<Placed>, TxnFailure> {
        let mut shutdown = self.shutdown.clone();
        let given_up = async {
            shutdown.recv().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let (first, last): (Vec<usize>, Vec<usize>) =
            (0..records.len()).partition(|i| !self.last.contains(&records[*i].topic));
        let waves = async {
            let mut results: Vec<Option<Result<Placed, KafkaError>>> = (0..records.len()).map(|_| None).collect();
            for wave in [first, last] {
                let sent = send_each(&self.producer, wave.iter().map(|i| &records[*i])).await;
                let failed = sent.iter().any(Result::is_err);
                for (i, result) in wave.into_iter().zip(sent) {
                    results[i] = Some(result);
                }
                if failed {
                    break;
                }
            }
            results
        };
        let results = tokio::select! {
            results = waves => results,
            () = given_up => return Err(TxnFailure { error: KafkaError::Canceled, refused: Vec::new() }),
        };
        let results = results.into_iter().map(|r| r.unwrap_or(Err(KafkaError::Canceled)));
        let placed = match outcomes(results) {
            Ok(placed) => placed,
            Err(mut failure) => {
                if let Some((code, reason)) = self.producer.client().fatal_error() {
                    // A refused batch among acknowledged ones (the gapless guarantee) or a lost producer id.
                    tracing::warn!(?code, %reason, "the producer stopped; a new one writes the batch again");
                    self.replace().await;
                }
                if failure.refused.len() > 1 {
                    // Records batched with a refused one are refused with it: find the one refused alone
                    // (the others it writes are copies, which their readers drop).
                    let suspects = std::mem::take(&mut failure.refused);
                    let culprit = find_culprit(&self.producer, records, &suspects).await;
                    if culprit.is_some() && self.producer.client().fatal_error().is_some() {
                        self.replace().await;
                    }
                    failure.refused = vec![culprit.unwrap_or_else(|| largest(records, suspects))];
                }
                return Err(failure);
            }
        };
        if offsets.count() > 0 {
            consumer.commit(offsets, CommitMode::Async).map_err(|error| TxnFailure { error, refused: Vec::new() })?;
        }
        Ok(placed)
    }

    /// A new producer. It starts where the group's committed offsets are (the caller rewinds), so what
    /// it writes to a partition continues or repeats what the old one wrote there, without a gap.
    async fn replace(&mut self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match gapless_producer(&self.config) {
                Ok(producer) => {
                    self.producer = producer;
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot create the producer; retrying");
                    if self.shutdown.is_triggered() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
