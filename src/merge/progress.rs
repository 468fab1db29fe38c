//! Which input offsets merge may commit: never past a record whose effects are not yet durable.

use std::collections::{BTreeMap, HashMap};

use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::SourcePos;

/// Tracks, per input partition, what has been processed and which records are still needed (held), so
/// that the committed offset never passes a record whose effects are not yet durable.
#[derive(Debug, Default)]
pub struct Progress {
    partitions: HashMap<(String, i32), PartitionProgress>,
}

#[derive(Debug, Default)]
struct PartitionProgress {
    /// Next offset not yet processed.
    next: i64,
    /// Offsets whose effects are not durable yet, with a count of holders.
    held: BTreeMap<i64, usize>,
}

impl Progress {
    /// Marks a record processed.
    pub fn seen(&mut self, pos: &SourcePos) {
        let p = self.partitions.entry((pos.topic.clone(), pos.partition)).or_default();
        p.next = p.next.max(pos.offset + 1);
    }

    /// Keeps the committed offset at or below `pos` until [`Progress::release`].
    pub fn hold(&mut self, pos: &SourcePos) {
        let p = self.partitions.entry((pos.topic.clone(), pos.partition)).or_default();
        *p.held.entry(pos.offset).or_default() += 1;
    }

    pub fn release(&mut self, pos: &SourcePos) {
        if let Some(p) = self.partitions.get_mut(&(pos.topic.clone(), pos.partition))
            && let Some(count) = p.held.get_mut(&pos.offset)
        {
            *count -= 1;
            if *count == 0 {
                p.held.remove(&pos.offset);
            }
        }
    }

    /// The offset safe to commit for every partition seen: the oldest held record, or the next one.
    pub fn offsets(&self) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for ((topic, partition), p) in &self.partitions {
            let safe = p.held.keys().next().copied().unwrap_or(p.next);
            crate::kafka::push_offset(&mut list, topic, *partition, Offset::Offset(safe), "");
        }
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(offset: i64) -> SourcePos {
        SourcePos { topic: "t".into(), partition: 0, offset }
    }

    fn offset_of(list: &TopicPartitionList) -> Offset {
        list.elements()[0].offset()
    }

    #[test]
    fn progress_never_commits_past_a_held_record() {
        let mut p = Progress::default();
        for o in 0..5 {
            p.seen(&pos(o));
        }
        p.hold(&pos(2));
        p.hold(&pos(2));
        p.hold(&pos(4));
        assert_eq!(offset_of(&p.offsets()), Offset::Offset(2));
        p.release(&pos(2));
        assert_eq!(offset_of(&p.offsets()), Offset::Offset(2), "still held once");
        p.release(&pos(2));
        assert_eq!(offset_of(&p.offsets()), Offset::Offset(4));
        p.release(&pos(4));
        assert_eq!(offset_of(&p.offsets()), Offset::Offset(5));
    }
}
