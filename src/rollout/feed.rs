//! Reads every partition of a topic (decisions, scored outcomes; read_committed, outside any group)
//! from a point in time, and says up to when every partition has been read; and follows route's and
//! merge's progress ([`Progress`]), which tells when every decision of a block of routing time is in
//! (see [`super::settle`]).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::block_in_place;

use super::settle::{Leg, Pipeline};
use crate::codec::{AvroRecord, Codec, Millis};
use crate::config::Config;
use crate::error::{During, Error};
use crate::kafka::{self, ADMIN_TIMEOUT, GapReader, GroupOffsets, LogEnds};

/// Decisions are looked for from this long before the earliest step start (clocks of other hosts).
const CLOCK_SKEW_MARGIN_MS: Millis = 60_000;
/// A partition read to its end counts as read through its newest record, or through this long ago,
/// whichever is later, so that an idle partition does not hold label coverage back for ever. (Decisions
/// do not depend on it: their blocks wait for the pipeline to settle, see `settle`.)
pub const IDLE_MS: Millis = 10_000;

pub struct Feed {
    consumer: StreamConsumer,
    topic: String,
    codec: Codec,
    /// Per partition: where reading started (a position before the first record is read).
    start: HashMap<i32, i64>,
    /// Per partition: its end when the feed opened.
    end_at_open: HashMap<i32, i64>,
    /// Per partition: the newest `decided_at` read.
    newest: HashMap<i32, Millis>,
    /// The time up to which every partition has been read.
    read_through: Millis,
}

impl Feed {
    /// Opens a reader on every partition of `topic` at the first record written at or after `from`
    /// (less a margin for clock skew); `None`: at the end.
    pub fn open(config: &Config, codec: Codec, topic: &str, from: Option<Millis>) -> Result<Feed, Error> {
        let topic = topic.to_string();
        let consumer = kafka::reader(config)?;
        let partitions =
            kafka::partition_count(&consumer, &topic)?.ok_or_else(|| Error::MissingTopic(topic.clone()))? as i32;
        let mut by_time = TopicPartitionList::new();
        for p in 0..partitions {
            let at = from.map_or(Offset::End, |t| Offset::Offset(t - CLOCK_SKEW_MARGIN_MS));
            by_time.add_partition_offset(&topic, p, at)?;
        }
        let found = match from {
            Some(_) => block_in_place(|| consumer.offsets_for_times(by_time, ADMIN_TIMEOUT))
                .during(format!("finding where {topic} was at the step's start"))?,
            None => by_time,
        };
        let mut assignment = TopicPartitionList::new();
        let (mut start, mut end_at_open) = (HashMap::new(), HashMap::new());
        for e in found.elements() {
            let (low, high) = block_in_place(|| kafka::watermarks(&consumer, &topic, e.partition()))
                .during(format!("finding where {topic} ends"))?;
            let at = match (from, e.offset()) {
                (Some(_), Offset::Offset(n)) => n.max(low),
                _ => high,
            };
            assignment.add_partition_offset(&topic, e.partition(), Offset::Offset(at))?;
            start.insert(e.partition(), at);
            end_at_open.insert(e.partition(), high);
        }
        consumer.assign(&assignment)?;
        Ok(Feed { consumer, topic, codec, start, end_at_open, newest: HashMap::new(), read_through: 0 })
    }

    /// Hands every record available now to `f`, waiting at most `wait` for the first; at most `max`.
    /// `time` says when a record was written, for [`Feed::read_through`]. Undecodable records are
    /// skipped (switchyard wrote them; a reader of another version may not know them).
    pub async fn drain<T: AvroRecord>(
        &mut self,
        wait: Duration,
        max: usize,
        time: impl Fn(&T) -> Millis,
        mut f: impl FnMut(T),
    ) -> Result<usize, Error> {
        let mut n = 0;
        let mut wait = wait;
        while n < max {
            let Ok(received) = tokio::time::timeout(wait, self.consumer.recv()).await else { break };
            let message = received?;
            wait = Duration::from_millis(1);
            n += 1;
            if let Ok(record) = self.codec.decode::<T>(message.payload().unwrap_or_default()) {
                let newest = self.newest.entry(message.partition()).or_default();
                *newest = (*newest).max(time(&record));
                f(record);
            }
        }
        Ok(n)
    }

    /// Whether everything before `end` in `partition` has been read.
    fn read_past(&self, partition: i32, end: i64) -> bool {
        self.positions().iter().any(|(p, at)| *p == partition && *at >= end)
            || self.start.get(&partition).is_some_and(|start| *start >= end)
    }

    /// Per partition: (position, where reading started), from the consumer's positions.
    fn positions(&self) -> Vec<(i32, i64)> {
        let Ok(positions) = self.consumer.position() else { return Vec::new() };
        positions
            .elements()
            .iter()
            .map(|e| {
                let started = self.start.get(&e.partition()).copied().unwrap_or(0);
                (e.partition(), if let Offset::Offset(n) = e.offset() { n.max(started) } else { started })
            })
            .collect()
    }

    /// The time up to which every partition has been read, worked out at `now`: a partition counts as
    /// read through its newest decision, one at its end through [`IDLE_MS`] ago at least.
    pub fn read_through(&mut self, now: Millis) -> Millis {
        let mut through = now;
        for (partition, position) in self.positions() {
            let end = block_in_place(|| kafka::watermarks(&self.consumer, &self.topic, partition))
                .map_or(i64::MAX, |(_, high)| high);
            let newest = self.newest.get(&partition).copied().unwrap_or(0);
            through = through.min(if position < end { newest } else { newest.max(now - IDLE_MS) });
        }
        self.read_through = self.read_through.max(through);
        self.read_through
    }

    /// True once every partition has been read up to where it ended when the feed opened.
    pub fn read_what_was_there(&self) -> bool {
        let positions = self.positions();
        !positions.is_empty() && positions.iter().all(|(p, at)| *at >= self.end_at_open.get(p).copied().unwrap_or(0))
    }
}

/// Route's and merge's progress, as their consumer groups committed it, and where topics end: what a
/// [`super::settle::Settled`] probe asks, with the decisions feed's own position for its last leg.
pub struct Progress {
    route: GroupOffsets,
    merge: GroupOffsets,
    ends: LogEnds,
    gaps: GapReader,
    requests: String,
    routed: String,
    decisions: String,
}

impl Progress {
    pub fn new(config: &Config) -> Result<Progress, Error> {
        let (t, group) = (&config.topics, &config.service.group_id);
        Ok(Progress {
            route: GroupOffsets::new(config, &format!("{group}-route"))?,
            merge: GroupOffsets::new(config, &format!("{group}-merge"))?,
            ends: LogEnds::new(config)?,
            gaps: GapReader::new(config),
            requests: t.requests.clone(),
            routed: t.routed.clone(),
            decisions: t.decisions.clone(),
        })
    }

    /// The questions of a probe, answered with `feed` (the decisions) for its last leg.
    pub fn with<'a>(&'a mut self, feed: &'a Feed) -> impl Pipeline<Error = Error> + 'a {
        KafkaPipeline { progress: self, feed }
    }

    fn topic(&self, leg: Leg) -> &str {
        match leg {
            Leg::Routed => &self.requests,
            Leg::Merged => &self.routed,
            Leg::Read => &self.decisions,
        }
    }
}

struct KafkaPipeline<'a> {
    progress: &'a mut Progress,
    feed: &'a Feed,
}

impl Pipeline for KafkaPipeline<'_> {
    type Error = Error;

    fn ends(&mut self, leg: Leg) -> Result<HashMap<i32, i64>, Error> {
        let topic = self.progress.topic(leg).to_string();
        let consumer = &self.feed.consumer;
        let partitions = kafka::partition_count(consumer, &topic)?.ok_or_else(|| Error::MissingTopic(topic.clone()))?;
        let mut ends = HashMap::new();
        for p in 0..partitions as i32 {
            let (low, high) =
                block_in_place(|| self.progress.ends.of(&topic, p)).during(format!("finding where {topic} ends"))?;
            if low < high {
                ends.insert(p, high);
            }
        }
        Ok(ends)
    }

    fn passed(&mut self, leg: Leg, partition: i32, end: i64) -> Result<bool, Error> {
        let group = match leg {
            Leg::Read => return Ok(self.feed.read_past(partition, end)),
            Leg::Routed => &self.progress.route,
            Leg::Merged => &self.progress.merge,
        };
        let topic = self.progress.topic(leg).to_string();
        let committed = block_in_place(|| group.of(&topic, &[partition]))
            .during(format!("reading the committed offsets of {} on {topic}", leg.stage()))?
            .remove(&partition)
            .flatten();
        let from = match committed {
            Some(at) if at >= end => return Ok(true),
            Some(at) => at,
            None => {
                block_in_place(|| self.progress.ends.of(&topic, partition))
                    .during(format!("finding where {topic} starts"))?
                    .0
            }
        };
        // Committed short of the end: passed if nothing but markers (or aborted records) lies between.
        let gaps = &mut self.progress.gaps;
        let empty = block_in_place(|| gaps.empty(&topic, partition, from, end))
            .during(format!("reading {topic} past {from}"))?;
        Ok(empty == Some(true))
    }
}
