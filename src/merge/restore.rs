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
    /// The routing marks committed with each routed partition's offset (see [`super::firsts`]).
    pub firsts: HashMap<i32, super::firsts::Marks>,
}

/// Prefix of the offset-commit metadata in which merge records, with each routed partition's committed
/// offset, where in the changelog a restore must start: no request at or after the committed offset
/// has a changelog record before it. Commits without it (older versions) are restored by timestamp.
pub const METADATA_PREFIX: &str = "changelog:";

/// The changelog states relevant to the routed partitions in `committed` (routed topic offsets and
/// their metadata).
pub async fn load(config: &Config, codec: &Codec, committed: &TopicPartitionList) -> Result<Restored> {
    let reader: StreamConsumer = kafka::reader(config)?;
    let changelog = &config.topics.merge_changelog;
    let mut restored = Restored::default();
    let routed: Vec<(i32, Offset, Option<i64>)> = committed
        .elements_for_topic(&config.topics.routed)
        .iter()
        .map(|e| {
            let own = kafka::stage::without_owner(e.metadata());
            restored.firsts.insert(e.partition(), super::firsts::decode(own));
            (e.partition(), e.offset(), changelog_mark(own))
        })
        .collect();
    // The changelog's ends count records of transactions not resolved yet: the committed offsets may
    // already be the previous owner's last transaction's while its changelog records are not readable yet.
    let changelog_ends = kafka::log_ends(config, changelog, routed.iter().map(|(p, ..)| *p))?;
    let mut by_time = TopicPartitionList::new();
    for (partition, committed_offset, mark) in routed {
        // Routed records not readable yet were never read by anyone: their requests have no state.
        let (_, routed_high) = kafka::watermarks(&reader, &config.topics.routed, partition)?;
        let (low, end) = changelog_ends[&partition];
        restored.routed_end.insert(partition, routed_high);
        restored.changelog_end.insert(partition, end);
        let from = match start_of(committed_offset, mark, routed_high) {
            Start::Nowhere => continue,
            Start::At(offset) => Offset::Offset(offset),
            Start::Beginning => Offset::Beginning,
            Start::ByTimeOf(offset) => {
                let Some(timestamp) = record_timestamp(&reader, &config.topics.routed, partition, offset).await? else {
                    continue; // only aborted records or markers remain: nothing committed will be read again
                };
                by_time.add_partition_offset(changelog, partition, Offset::Offset(timestamp - CLOCK_SKEW_MARGIN_MS))?;
                continue;
            }
        };
        restored.start.insert(partition, clamp(from, low, end));
    }
    if by_time.count() > 0 {
        for e in reader.offsets_for_times(by_time, ADMIN_TIMEOUT)?.elements() {
            let from = if let Offset::Offset(n) = e.offset() { Offset::Offset(n) } else { Offset::End };
            let (low, end) = changelog_ends[&e.partition()];
            restored.start.insert(e.partition(), clamp(from, low, end));
        }
    }
    // Only partitions with something to read: a reader that reads nothing has no position, so waiting
    // for it to reach the end of an already-read partition would never end.
    let targets = read_targets(&restored.start, &restored.changelog_end);
    if !targets.is_empty() {
        restored.states = read_states(&reader, codec, changelog, &restored.start, &targets).await?;
    }
    Ok(restored)
}

/// The changelog mark in a routed partition's commit metadata (space-separated tokens), if it has one.
fn changelog_mark(metadata: &str) -> Option<i64> {
    metadata.split(' ').find_map(|t| t.strip_prefix(METADATA_PREFIX)).and_then(|m| m.parse().ok())
}

/// Where the restore of one routed partition starts reading the changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Nothing committed will be read again: no state is needed.
    Nowhere,
    /// At the changelog offset merge committed as metadata with the routed offset.
    At(i64),
    /// A commit without that metadata (an older version): from the time of the routed record at this
    /// offset, less a margin for clocks.
    ByTimeOf(i64),
    /// Nothing committed: every state may matter.
    Beginning,
}

fn start_of(committed: Offset, mark: Option<i64>, routed_high: i64) -> Start {
    match (committed, mark) {
        (Offset::Offset(offset), _) if offset >= routed_high => Start::Nowhere,
        (Offset::Offset(_), Some(changelog_offset)) => Start::At(changelog_offset),
        (Offset::Offset(offset), None) => Start::ByTimeOf(offset),
        _ => Start::Beginning,
    }
}

/// A start within what the changelog partition holds: from its first offset still held (`low`;
/// compaction and retention remove the rest) to its end.
fn clamp(from: Offset, low: i64, end: i64) -> i64 {
    let from = match from {
        Offset::Offset(n) => n.min(end),
        Offset::End => end,
        _ => 0,
    };
    from.max(low.min(end))
}

/// Reads the changelog partitions of `targets` from `start` to their targets.
async fn read_states(
    reader: &StreamConsumer,
    codec: &Codec,
    changelog: &str,
    start: &HashMap<i32, i64>,
    targets: &HashMap<i32, i64>,
) -> Result<Vec<MergeState>> {
    let mut assignment = TopicPartitionList::new();
    for partition in targets.keys() {
        assignment.add_partition_offset(changelog, *partition, Offset::Offset(start[partition]))?;
    }
    kafka::batch::locate(reader, changelog)?;
    reader.assign(&assignment)?;
    let (begun, mut last_report, mut last_record) = (Instant::now(), Instant::now(), Instant::now());
    let mut states = Vec::new();
    // Until the end: an open transaction of the previous owner holds read_committed readers back until
    // it is committed or aborted (at once when the new owner fences it, else at transaction.timeout.ms).
    while !kafka::batch::caught_up(reader, changelog, targets) {
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
    fn a_restore_starts_where_the_commit_says_within_what_the_changelog_holds() {
        assert_eq!(start_of(Offset::Offset(50), Some(7), 50), Start::Nowhere, "nothing will be read again");
        assert_eq!(start_of(Offset::Offset(40), Some(7), 50), Start::At(7));
        assert_eq!(start_of(Offset::Offset(40), None, 50), Start::ByTimeOf(40), "an older version's commit");
        assert_eq!(start_of(Offset::Invalid, None, 50), Start::Beginning);
        assert_eq!(clamp(Offset::Offset(7), 10, 100), 10, "compacted below 10");
        assert_eq!(clamp(Offset::Offset(70), 10, 60), 60, "not past the end");
        assert_eq!(clamp(Offset::End, 10, 60), 60);
        assert_eq!(clamp(Offset::Beginning, 10, 60), 10);
        assert_eq!(clamp(Offset::Beginning, 80, 60), 60, "a low watermark past the end is the end");
    }

    #[test]
    fn the_changelog_mark_is_read_beside_other_tokens() {
        assert_eq!(changelog_mark("changelog:12"), Some(12));
        assert_eq!(changelog_mark("changelog:12 firsts:3=4"), Some(12));
        assert_eq!(changelog_mark("firsts:3=4"), None);
        assert_eq!(changelog_mark(""), None);
    }

    #[test]
    fn a_partition_already_read_to_its_end_is_not_waited_for() {
        let start = HashMap::from([(0, 120), (1, 40), (2, 0)]);
        let end = HashMap::from([(0, 120), (1, 75), (2, 0)]);
        assert_eq!(read_targets(&start, &end), HashMap::from([(1, 75)]));
    }
}
