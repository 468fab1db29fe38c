//! How far merge has read each predictions partition, in the time the answers were written. An answer
//! counts if it was *written* by its request's deadline, so a request may time out only once merge has
//! read its serving model's partition past that deadline, or to its end: after a restart merge reads
//! its routed and predictions partitions at different paces, and judging by the wall clock alone timed
//! out requests whose answers had been written in time but not read yet.

use std::collections::HashMap;

use crate::codec::Millis;
use crate::kafka::SourcePos;

/// Per model (its predictions topic), per partition. Keyed by name so that a look-up allocates nothing:
/// `read` runs for every prediction merge reads.
#[derive(Debug, Default)]
pub struct Reads {
    models: HashMap<String, HashMap<i32, Read>>,
}

#[derive(Debug, Clone, Copy)]
struct Read {
    /// Next offset merge will read.
    next: i64,
    /// Latest write time of a record read (answers are written in about that order).
    written: Millis,
}

impl Reads {
    /// Where reading `partition` of `model`'s predictions starts (its committed offset) after an
    /// assignment.
    pub fn starts(&mut self, model: &str, partition: i32, offset: i64) {
        let read = Read { next: offset, written: Millis::MIN };
        self.models.entry(model.to_string()).or_default().insert(partition, read);
    }

    /// A prediction of `model` written at `written_at` was read at `pos`.
    pub fn read(&mut self, model: &str, pos: &SourcePos, written_at: Millis) {
        let read = match self.models.get_mut(model) {
            Some(partitions) => partitions.entry(pos.partition),
            None => self.models.entry(model.to_string()).or_default().entry(pos.partition),
        }
        .or_insert(Read { next: pos.offset, written: Millis::MIN });
        read.next = read.next.max(pos.offset + 1);
        read.written = read.written.max(written_at);
    }

    /// Whether every prediction `model` wrote to `partition` by `t` has been read: one written later
    /// has been, or merge has read up to `end` (where the partition ended as last seen, with the
    /// first offset it still holds; asked only then). False for a partition not assigned.
    pub fn past(&self, model: &str, partition: i32, t: Millis, end: impl FnOnce() -> Option<(i64, i64)>) -> bool {
        let Some(read) = self.models.get(model).and_then(|partitions| partitions.get(&partition)) else {
            return false;
        };
        read.written > t || end().is_some_and(|(low, high)| read.next.max(low) >= high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(offset: i64) -> SourcePos {
        SourcePos { topic: "model.p.predictions".into(), partition: 0, offset }
    }

    #[test]
    fn past_a_time_once_a_later_record_or_the_end_is_read() {
        let mut reads = Reads::default();
        assert!(!reads.past("p", 0, 1000, || Some((0, 0))), "not assigned");
        reads.starts("p", 0, 10);
        assert!(!reads.past("p", 0, 1000, || Some((0, 12))), "two records still to read");
        assert!(!reads.past("p", 0, 1000, || None), "end unknown");
        assert!(reads.past("p", 0, 1000, || Some((0, 10))), "at its end");
        assert!(reads.past("p", 0, 1000, || Some((12, 12))), "the rest was deleted");
        reads.read("p", &pos(10), 900);
        assert!(!reads.past("p", 0, 1000, || Some((0, 12))));
        reads.read("p", &pos(11), 1001);
        assert!(reads.past("p", 0, 1000, || None), "read a record written after it");
        assert!(!reads.past("p", 0, 1001, || Some((0, 13))));
        assert!(!reads.past("p", 1, 0, || Some((0, 0))), "another partition");
    }
}
