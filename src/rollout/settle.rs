//! How far the pipeline has settled: the time before which every request sent has been routed, decided
//! and read back by the controller. Pure; the Kafka side answers the questions of [`Pipeline`].
//!
//! A step's evidence must be a function of its decisions alone, not of when they happened to be read:
//! a block of routing time is scored only once *every* decision of it is in. Waiting a fixed time after
//! the deadline is not enough — a dead instance's partitions are not routed until the session timeout
//! moves them, a restored merge decides a backlog late, a transaction left open hides the decisions
//! behind it — and a decision that came after its block was scored would be left out, by a rule that
//! depends on which model's partitions were held up (seen: a sample-ratio guard fired on equal models
//! after a controller failover). So completeness is established from the pipeline's own progress, in
//! three legs, each against a snapshot of where its input ended:
//!
//! 1. **routed**: route's group has committed past the end the requests topic had when the probe
//!    started — every request produced before then has been routed (or dead-lettered);
//! 2. **merged**: merge's group has committed past the end the routed topic had once leg 1 held — every
//!    one of those requests has its decision (merge commits a routed record only with its decision, in
//!    the same transaction);
//! 3. **read**: the controller's own reader of the decisions has read past the end the decisions topic
//!    had once leg 2 held.
//!
//! Then every request produced before the probe started is decided and read: the probe's start is the
//! new settled time, and the next probe starts. A stalled stage holds the guards back (it never makes
//! them see less), and in steady traffic a probe takes about the time a request spends in the pipeline.

use std::collections::HashMap;

use crate::codec::Millis;

/// The legs of a probe, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// Route's committed offsets on the requests topic.
    Routed,
    /// Merge's committed offsets on the routed topic.
    Merged,
    /// The controller's read position on the decisions topic.
    Read,
}

impl Leg {
    /// The stage whose progress the leg follows.
    pub fn stage(self) -> &'static str {
        match self {
            Leg::Routed => "route",
            Leg::Merged => "merge",
            Leg::Read => "the controller's reader",
        }
    }
}

/// What a probe asks of Kafka.
pub trait Pipeline {
    type Error;
    /// Where the leg's input topic ends now, per partition (partitions holding nothing may be left out).
    fn ends(&mut self, leg: Leg) -> Result<HashMap<i32, i64>, Self::Error>;
    /// Whether the leg's consumer has passed everything before `end` in `partition`.
    fn passed(&mut self, leg: Leg, partition: i32, end: i64) -> Result<bool, Self::Error>;
}

#[derive(Debug, Clone)]
struct Probe {
    started_at: Millis,
    leg: Leg,
    /// Partitions not passed yet, with their ends.
    waiting: HashMap<i32, i64>,
}

/// The settled time, and the probe under way.
#[derive(Debug, Clone, Default)]
pub struct Settled {
    through: Option<Millis>,
    probe: Option<Probe>,
}

impl Settled {
    /// The time before which every request produced has been decided and read, once a probe has
    /// completed.
    pub fn through(&self) -> Option<Millis> {
        self.through
    }

    /// Moves the probe under way as far as Kafka's answers allow (starting one at `now` if none is), and
    /// returns the settled time.
    pub fn advance<P: Pipeline>(&mut self, now: Millis, pipeline: &mut P) -> Result<Option<Millis>, P::Error> {
        let mut probe = match self.probe.take() {
            Some(probe) => probe,
            None => Probe { started_at: now, leg: Leg::Routed, waiting: pipeline.ends(Leg::Routed)? },
        };
        loop {
            let mut behind = HashMap::new();
            for (&partition, &end) in &probe.waiting {
                if !pipeline.passed(probe.leg, partition, end)? {
                    behind.insert(partition, end);
                }
            }
            probe.waiting = behind;
            if !probe.waiting.is_empty() {
                self.probe = Some(probe);
                return Ok(self.through);
            }
            let next = match probe.leg {
                Leg::Routed => Leg::Merged,
                Leg::Merged => Leg::Read,
                Leg::Read => {
                    self.through = Some(self.through.map_or(probe.started_at, |t| t.max(probe.started_at)));
                    return Ok(self.through);
                }
            };
            probe = Probe { started_at: probe.started_at, leg: next, waiting: pipeline.ends(next)? };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline whose ends and positions the test sets.
    #[derive(Default)]
    struct Fake {
        ends: HashMap<(u8, i32), i64>,
        at: HashMap<(u8, i32), i64>,
        asked_ends: Vec<Leg>,
    }

    fn key(leg: Leg) -> u8 {
        leg as u8
    }

    impl Pipeline for Fake {
        type Error = ();
        fn ends(&mut self, leg: Leg) -> Result<HashMap<i32, i64>, ()> {
            self.asked_ends.push(leg);
            Ok(self.ends.iter().filter(|((l, _), _)| *l == key(leg)).map(|((_, p), e)| (*p, *e)).collect())
        }
        fn passed(&mut self, leg: Leg, partition: i32, end: i64) -> Result<bool, ()> {
            Ok(self.at.get(&(key(leg), partition)).copied().unwrap_or(0) >= end)
        }
    }

    #[test]
    fn settles_only_once_every_leg_has_passed_its_snapshot() {
        let mut kafka = Fake::default();
        kafka.ends.insert((key(Leg::Routed), 0), 10);
        kafka.ends.insert((key(Leg::Routed), 1), 5);
        let mut settled = Settled::default();
        assert_eq!(settled.advance(1_000, &mut kafka), Ok(None), "route has not passed its snapshot");
        kafka.at.insert((key(Leg::Routed), 0), 10);
        assert_eq!(settled.advance(2_000, &mut kafka), Ok(None), "partition 1 still behind");
        kafka.at.insert((key(Leg::Routed), 1), 7);
        // Routed passed: merge's snapshot is taken now, from what the routed topic holds now.
        kafka.ends.insert((key(Leg::Merged), 3), 40);
        assert_eq!(settled.advance(3_000, &mut kafka), Ok(None), "merge behind");
        kafka.at.insert((key(Leg::Merged), 3), 40);
        kafka.ends.insert((key(Leg::Read), 2), 9);
        assert_eq!(settled.advance(4_000, &mut kafka), Ok(None), "decisions not read");
        kafka.at.insert((key(Leg::Read), 2), 9);
        assert_eq!(settled.advance(5_000, &mut kafka), Ok(Some(1_000)), "settled through the probe's start");
        assert_eq!(kafka.asked_ends, vec![Leg::Routed, Leg::Merged, Leg::Read]);
        // The next probe starts at the next call, with fresh snapshots.
        kafka.ends.insert((key(Leg::Routed), 0), 11);
        assert_eq!(settled.advance(6_000, &mut kafka), Ok(Some(1_000)));
        kafka.at.insert((key(Leg::Routed), 0), 11);
        assert_eq!(settled.advance(7_000, &mut kafka), Ok(Some(6_000)));
    }

    #[test]
    fn an_idle_pipeline_settles_at_once() {
        let mut settled = Settled::default();
        assert_eq!(settled.advance(500, &mut Fake::default()), Ok(Some(500)));
        assert_eq!(settled.through(), Some(500));
    }

    #[test]
    fn a_stalled_stage_holds_the_settled_time() {
        // Merge's partition 1 stays behind (its instance died): whatever else moves, nothing settles.
        let mut kafka = Fake::default();
        kafka.ends.insert((key(Leg::Merged), 0), 5);
        kafka.ends.insert((key(Leg::Merged), 1), 5);
        kafka.at.insert((key(Leg::Merged), 0), 100);
        let mut settled = Settled::default();
        for now in (0..60_000).step_by(500) {
            assert_eq!(settled.advance(now, &mut kafka), Ok(None));
        }
        kafka.at.insert((key(Leg::Merged), 1), 5);
        assert_eq!(settled.advance(60_000, &mut kafka), Ok(Some(0)), "the first probe's start, not now");
    }
}
