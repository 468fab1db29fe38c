//! Which routed records merge keeps: the first routing of each request, and no later copy.
//!
//! route commits its input offsets after its records, not in a transaction with them, so a crash or a
//! rebalance makes it route some requests again — maybe differently, if the deployment changed between
//! the attempts. Each routed record names the request it was made from (requests partition, offset).
//! Routed records go to the partition of their key (the user id), whatever requests partition they come
//! from, so all routings of one request land on one routed partition; and whatever one producer writes
//! to a partition arrives in order and without a gap ([`crate::kafka::gapless_producer`]), from the
//! committed offset on. Hence, on one routed partition, per requests partition: a routed record is a
//! copy exactly when its request offset is not above the highest one kept so far. Every request offset
//! up to that mark that routes to this partition has been kept once; a routed record above it is the
//! first routing of its request.
//!
//! The marks are merge's state: those of the routed records before each committed routed offset are
//! committed with it, as offset-commit metadata ([`METADATA_PREFIX`]), and a restore starts from them.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// Prefix of the commit-metadata token with a routed partition's marks: `firsts:<p>=<offset>,...`, the
/// highest request offset kept per requests partition among the routed records before the committed
/// offset. About 14 bytes per requests partition, within the group coordinator's 4,096-byte default
/// limit for up to about 250 requests partitions.
pub const METADATA_PREFIX: &str = "firsts:";

/// Highest request offset kept, per requests partition.
pub type Marks = BTreeMap<i32, i64>;

/// The marks of each routed partition.
#[derive(Debug, Default)]
pub struct Firsts {
    partitions: HashMap<i32, Partition>,
}

#[derive(Debug, Default)]
struct Partition {
    /// The marks as of `commit`'s last offset: of every routed record kept before it.
    committed: Marks,
    /// Routed records kept at or after it: (routed offset, requests partition, request offset), in
    /// reading order.
    since: VecDeque<(i64, i32, i64)>,
    /// The marks of every routed record kept so far.
    read: HashMap<i32, i64>,
}

impl Firsts {
    /// Starting from the committed marks of each routed partition.
    pub fn restored(committed: HashMap<i32, Marks>) -> Self {
        let partitions = committed
            .into_iter()
            .map(|(p, committed)| {
                let read = committed.iter().map(|(k, v)| (*k, *v)).collect();
                (p, Partition { committed, since: VecDeque::new(), read })
            })
            .collect();
        Firsts { partitions }
    }

    /// Whether the routed record at `offset` of routed partition `partition`, made from the request at
    /// `source` (requests partition, offset), is its request's first routing (then it is kept), or a
    /// copy of one kept before. Routed records must be given in the order of each routed partition.
    pub fn first(&mut self, partition: i32, offset: i64, source: (i32, i64)) -> bool {
        let p = self.partitions.entry(partition).or_default();
        let (from, request) = source;
        if p.read.get(&from).is_some_and(|mark| request <= *mark) {
            return false;
        }
        p.read.insert(from, request);
        p.since.push_back((offset, from, request));
        true
    }

    /// The metadata token for committing routed offset `offset` of `partition`: the marks of the routed
    /// records before it. Offsets committed must not go backwards (merge's never do).
    pub fn at(&mut self, partition: i32, offset: i64) -> String {
        let p = self.partitions.entry(partition).or_default();
        while p.since.front().is_some_and(|(at, ..)| *at < offset) {
            let (_, from, request) = p.since.pop_front().expect("front exists");
            p.committed.insert(from, request);
        }
        encode(&p.committed)
    }
}

/// `firsts:<p>=<offset>,...`.
pub fn encode(marks: &Marks) -> String {
    let pairs: Vec<String> = marks.iter().map(|(p, o)| format!("{p}={o}")).collect();
    format!("{METADATA_PREFIX}{}", pairs.join(","))
}

/// The marks in commit metadata (space-separated tokens); none if it has no `firsts:` token (a commit
/// of an earlier version, whose route wrote each request once) or an unreadable one.
pub fn decode(metadata: &str) -> Marks {
    let Some(token) = metadata.split(' ').find_map(|t| t.strip_prefix(METADATA_PREFIX)) else {
        return Marks::new();
    };
    let parsed: Option<Marks> = token
        .split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (p, o) = pair.split_once('=')?;
            Some((p.parse().ok()?, o.parse().ok()?))
        })
        .collect();
    parsed.unwrap_or_else(|| {
        tracing::error!(%metadata, "unreadable routing marks in the committed metadata; routed copies before them may be decided again");
        Marks::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routing_is_kept_once_whatever_copies_follow_and_wherever_they_interleave() {
        let mut firsts = Firsts::default();
        // Requests 10..=14 of requests partition 3 routed to routed partition 0 (offsets 0..5); route
        // dies, and its successor routes 12..=16 again from its committed offset 12.
        let mut kept = Vec::new();
        for (offset, request) in [10, 11, 12, 13, 14, 12, 13, 14, 15, 16].into_iter().enumerate() {
            if firsts.first(0, offset as i64, (3, request)) {
                kept.push(request);
            }
        }
        assert_eq!(kept, vec![10, 11, 12, 13, 14, 15, 16]);
        // A zombie's late copies interleaved with the successor's: each request still once.
        let mut kept = Vec::new();
        for (offset, request) in [17, 18, 17, 18, 19, 19, 20].into_iter().enumerate() {
            if firsts.first(0, 100 + offset as i64, (3, request)) {
                kept.push(request);
            }
        }
        assert_eq!(kept, vec![17, 18, 19, 20]);
        // Other requests partitions and other routed partitions have their own marks.
        assert!(firsts.first(0, 200, (4, 1)));
        assert!(firsts.first(1, 0, (3, 1)));
        assert!(!firsts.first(1, 1, (3, 1)));
    }

    #[test]
    fn a_commit_carries_the_marks_of_the_records_before_it_and_a_restore_decides_the_same() {
        let mut firsts = Firsts::default();
        let routed = [(3, 10), (4, 7), (3, 11), (3, 10), (4, 8)]; // (requests partition, offset)
        let kept: Vec<bool> = routed.iter().enumerate().map(|(i, s)| firsts.first(0, i as i64, *s)).collect();
        assert_eq!(kept, vec![true, true, true, false, true]);
        assert_eq!(firsts.at(0, 0), "firsts:", "nothing before offset 0");
        assert_eq!(firsts.at(0, 2), "firsts:3=10,4=7");
        let committed = firsts.at(0, 4);
        assert_eq!(committed, "firsts:3=11,4=7", "the copy at 3 changed nothing");
        // A restart reads routed offsets 4.. again from the committed marks: same verdicts.
        let mut restored = Firsts::restored(HashMap::from([(0, decode(&format!("changelog:9 {committed}")))]));
        assert!(restored.first(0, 4, (4, 8)));
        assert!(!restored.first(0, 5, (3, 11)), "a copy after the restart");
        assert_eq!(restored.at(0, 6), "firsts:3=11,4=8");
    }

    #[test]
    fn metadata_without_marks_or_with_unreadable_ones_gives_none() {
        assert_eq!(decode("changelog:12"), Marks::new());
        assert_eq!(decode("changelog:12 firsts:"), Marks::new());
        assert_eq!(decode("firsts:1=x"), Marks::new());
        assert_eq!(decode("changelog:1 firsts:0=5,12=7"), Marks::from([(0, 5), (12, 7)]));
    }
}
