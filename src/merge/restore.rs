//! Reading merge's changelog back after a restart or rebalance.
//!
//! For each routed partition this instance now owns, the routed records at and after the committed
//! offset will be read again. Their changelog records were written after those routed records, so the
//! changelog is read from the committed routed record's timestamp (less a margin for clock skew between
//! hosts) to its end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::codec::{Codec, MergeState};
use crate::config::Config;
use crate::error::Result;
use crate::kafka::{self, ADMIN_TIMEOUT};

/// How long to wait for a committed routed record at the committed offset.
const RECORD_WAIT: Duration = Duration::from_secs(15);

/// Allowance for clocks of route and merge hosts that disagree.
const CLOCK_SKEW_MARGIN_MS: i64 = 5 * 60 * 1000;

/// The changelog states relevant to the routed partitions in `committed` (routed topic offsets).
pub async fn load(config: &Config, codec: &Codec, committed: &TopicPartitionList) -> Result<Vec<MergeState>> {
    let reader: StreamConsumer = kafka::reader(config)?;
    let mut start = TopicPartitionList::new();
    let mut by_time = TopicPartitionList::new();
    let routed: Vec<(i32, Offset)> =
        committed.elements_for_topic(&config.topics.routed).iter().map(|e| (e.partition(), e.offset())).collect();
    for (partition, committed_offset) in routed {
        match committed_offset {
            Offset::Offset(offset) => {
                let (_, high) = reader.fetch_watermarks(&config.topics.routed, partition, ADMIN_TIMEOUT)?;
                if offset >= high {
                    continue; // nothing will be read again from this partition
                }
                let Some(timestamp) = record_timestamp(&reader, &config.topics.routed, partition, offset).await? else {
                    continue; // only aborted records or markers remain: nothing committed will be read again
                };
                by_time.add_partition_offset(
                    &config.topics.merge_changelog,
                    partition,
                    Offset::Offset(timestamp - CLOCK_SKEW_MARGIN_MS),
                )?;
            }
            _ => start.add_partition_offset(&config.topics.merge_changelog, partition, Offset::Beginning)?,
        }
    }
    if by_time.count() > 0 {
        let found = reader.offsets_for_times(by_time, ADMIN_TIMEOUT)?;
        let found: Vec<(i32, Offset)> = found.elements().iter().map(|e| (e.partition(), e.offset())).collect();
        for (partition, offset) in found {
            let offset = match offset {
                Offset::Offset(n) => Offset::Offset(n),
                _ => Offset::End,
            };
            start.add_partition_offset(&config.topics.merge_changelog, partition, offset)?;
        }
    }
    if start.count() == 0 {
        return Ok(Vec::new());
    }
    let mut targets = HashMap::new();
    let partitions: Vec<i32> = start.elements().iter().map(|e| e.partition()).collect();
    for partition in partitions {
        let (_, high) = reader.fetch_watermarks(&config.topics.merge_changelog, partition, ADMIN_TIMEOUT)?;
        targets.insert(partition, high);
    }
    reader.assign(&start)?;
    let mut states = Vec::new();
    let begun = Instant::now();
    let mut last_report = Instant::now();
    // Until the end: an open transaction of the previous owner holds read_committed readers back until
    // it is committed or aborted (at most transaction.timeout.ms).
    while !kafka::batch::caught_up(&reader, &config.topics.merge_changelog, &targets) {
        if last_report.elapsed() > Duration::from_secs(5) {
            tracing::info!(seconds = begun.elapsed().as_secs(), "still reading the merge changelog");
            last_report = Instant::now();
        }
        let Ok(message) = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await else { continue };
        let message = message?;
        match codec.decode::<MergeState>(message.payload().unwrap_or_default()) {
            Ok(state) => states.push(state),
            Err(error) => {
                tracing::error!(offset = message.offset(), %error, "unreadable merge changelog record skipped")
            }
        }
    }
    tracing::info!(
        states = states.len(),
        partitions = targets.len(),
        ms = begun.elapsed().as_millis() as u64,
        "merge changelog restored"
    );
    Ok(states)
}

/// The timestamp of the first committed record at or after `offset`, if one arrives within
/// [`RECORD_WAIT`] (an open transaction of the previous owner resolves within its timeout).
async fn record_timestamp(reader: &StreamConsumer, topic: &str, partition: i32, offset: i64) -> Result<Option<i64>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    reader.assign(&tpl)?;
    match tokio::time::timeout(RECORD_WAIT, reader.recv()).await {
        Ok(message) => Ok(Some(message?.timestamp().to_millis().unwrap_or(0))),
        Err(_) => Ok(None),
    }
}
