//! Reading merge's changelog back after a restart or rebalance.
//!
//! For each routed partition this instance now owns, the routed records at and after the committed
//! offset will be read again, and their changelog records must be loaded first. merge commits, with
//! each routed offset, the changelog offset before which none of those records lie (see
//! [`METADATA_PREFIX`]), so a restore reads only what it needs, whatever the traffic rate. For a
//! commit without it (written by an older version), the changelog is read from the committed routed
//! record's timestamp, less a margin for clock skew between hosts.

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

/// What a restore found, per routed partition of the assignment.
#[derive(Debug, Default)]
pub struct Restored {
    /// Changelog states, in changelog order (the last state of a request wins).
    pub states: Vec<MergeState>,
    /// Changelog offset the states were read from: what the next commits must not pass while
    /// restored states may still be resumed.
    pub start: HashMap<i32, i64>,
    /// Changelog end at restore time: every changelog record written from now on lies at or after it.
    pub changelog_end: HashMap<i32, i64>,
    /// Routed end at restore time: once merge has read this far, every request with a restored state
    /// has been read again (its routed record existed before the restore).
    pub routed_end: HashMap<i32, i64>,
}

/// Prefix of the offset-commit metadata in which merge records, with each routed partition's committed
/// offset, where in the changelog a restore must start: no request at or after the committed offset
/// has a changelog record before it. Commits without it (older versions) are restored by timestamp.
pub const METADATA_PREFIX: &str = "changelog:";

/// The changelog states relevant to the routed partitions in `committed` (routed topic offsets and
/// their metadata).
pub async fn load(config: &Config, codec: &Codec, committed: &TopicPartitionList) -> Result<Restored> {
    let reader: StreamConsumer = kafka::reader(config)?;
    let mut restored = Restored::default();
    let mut start = TopicPartitionList::new();
    let mut by_time = TopicPartitionList::new();
    // The first offset each changelog partition still holds (compaction and retention remove the rest).
    let mut changelog_start: HashMap<i32, i64> = HashMap::new();
    let routed: Vec<(i32, Offset, Option<i64>)> = committed
        .elements_for_topic(&config.topics.routed)
        .iter()
        .map(|e| {
            let own = kafka::stage::without_owner(e.metadata());
            (e.partition(), e.offset(), own.strip_prefix(METADATA_PREFIX).and_then(|m| m.parse().ok()))
        })
        .collect();
    // The changelog's ends count records of transactions not resolved yet: the committed offsets may
    // already be the previous owner's last transaction's while its changelog records are not readable yet.
    let changelog_ends = kafka::log_ends(config, &config.topics.merge_changelog, routed.iter().map(|(p, ..)| *p))?;
    for (partition, committed_offset, from_metadata) in routed {
        // Routed records not readable yet were never read by anyone: their requests have no state.
        let (_, routed_high) = reader.fetch_watermarks(&config.topics.routed, partition, ADMIN_TIMEOUT)?;
        let (changelog_low, changelog_high) = changelog_ends[&partition];
        changelog_start.insert(partition, changelog_low);
        restored.routed_end.insert(partition, routed_high);
        restored.changelog_end.insert(partition, changelog_high);
        match (committed_offset, from_metadata) {
            (Offset::Offset(offset), _) if offset >= routed_high => {} // nothing will be read again
            (Offset::Offset(_), Some(changelog_offset)) => {
                start.add_partition_offset(
                    &config.topics.merge_changelog,
                    partition,
                    Offset::Offset(changelog_offset),
                )?;
            }
            (Offset::Offset(offset), None) => {
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
    for element in start.elements() {
        let end = restored.changelog_end[&element.partition()];
        let from = match element.offset() {
            Offset::Offset(n) => n.min(end),
            Offset::End => end,
            _ => 0,
        }
        .max(changelog_start[&element.partition()].min(end));
        restored.start.insert(element.partition(), from);
    }
    // Only partitions with something to read: a reader that reads nothing has no position, so waiting
    // for it to reach the end of an already-read partition would never end.
    let targets = read_targets(&restored.start, &restored.changelog_end);
    if targets.is_empty() {
        return Ok(restored);
    }
    let mut assignment = TopicPartitionList::new();
    for partition in targets.keys() {
        let from = Offset::Offset(restored.start[partition]);
        assignment.add_partition_offset(&config.topics.merge_changelog, *partition, from)?;
    }
    kafka::batch::locate(&reader, &config.topics.merge_changelog)?;
    reader.assign(&assignment)?;
    let begun = Instant::now();
    let mut last_report = Instant::now();
    let mut last_record = Instant::now();
    // Until the end: an open transaction of the previous owner holds read_committed readers back until
    // it is committed or aborted (at most transaction.timeout.ms, then the broker's next check).
    while !kafka::batch::caught_up(&reader, &config.topics.merge_changelog, &targets) {
        if last_report.elapsed() > Duration::from_secs(5) {
            tracing::info!(seconds = begun.elapsed().as_secs(), "still reading the merge changelog");
            last_report = Instant::now();
        }
        if last_record.elapsed() > STALL_LIMIT {
            // Give the caller a chance to see shutdown or a new assignment, and to start over.
            return Err(crate::error::Error::Stalled(format!(
                "no merge changelog record for {} s before its end ({targets:?})",
                STALL_LIMIT.as_secs()
            )));
        }
        let Ok(message) = tokio::time::timeout(Duration::from_millis(50), reader.recv()).await else { continue };
        let message = message?;
        last_record = Instant::now();
        match codec.decode::<MergeState>(message.payload().unwrap_or_default()) {
            Ok(state) => restored.states.push(state),
            Err(error) => {
                tracing::error!(offset = message.offset(), %error, "unreadable merge changelog record skipped")
            }
        }
    }
    tracing::info!(
        states = restored.states.len(),
        partitions = targets.len(),
        ms = begun.elapsed().as_millis() as u64,
        "merge changelog restored"
    );
    Ok(restored)
}

/// Longest a restore waits for the next changelog record before giving up and starting over: longer
/// than an open transaction of a previous owner can hold readers back (transaction.timeout.ms plus the
/// broker's check for timed-out transactions, 10 s each by default).
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// The changelog end to read to, for each partition whose restore starts before it.
fn read_targets(start: &HashMap<i32, i64>, end: &HashMap<i32, i64>) -> HashMap<i32, i64> {
    (start.iter()).filter(|(partition, from)| **from < end[*partition]).map(|(p, _)| (*p, end[p])).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_already_read_to_its_end_is_not_waited_for() {
        let start = HashMap::from([(0, 120), (1, 40), (2, 0)]);
        let end = HashMap::from([(0, 120), (1, 75), (2, 0)]);
        assert_eq!(read_targets(&start, &end), HashMap::from([(1, 75)]));
    }
}
