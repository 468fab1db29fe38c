//! The buckets of an A/B/n canary's arms: which cohort buckets each candidate owns, and how they move
//! when shares change. Pure.
//!
//! Stickiness: a user changes arm only when its own arm's share shrinks — control's included. A share
//! that shrinks gives up its highest buckets; a share that grows keeps its own and takes, lowest first,
//! the buckets given up in the same move, then control's. So a cut candidate's users go to control, a
//! step's growth takes control's users, and a bandit moving share from one candidate to another moves
//! only the shrinking one's users.

use super::deployment::{BUCKETS, Candidate, threshold};

/// `[start, end)` ranges of buckets, sorted, not touching.
pub type Ranges = Vec<[u16; 2]>;

/// The buckets of each candidate, in list order: their own `buckets`, or, when none has any, laid out
/// consecutively from bucket 0 in list order. Errors say what is wrong.
pub fn layout(candidates: &[Candidate]) -> Result<Vec<Ranges>, String> {
    let explicit = candidates.iter().filter(|c| !c.buckets.is_empty()).count();
    if explicit == 0 {
        let mut start = 0u16;
        return Ok(candidates
            .iter()
            .map(|c| {
                let end = start + threshold(c.percent);
                let ranges = if end > start { vec![[start, end]] } else { Vec::new() };
                start = end;
                ranges
            })
            .collect());
    }
    let mut taken = vec![false; BUCKETS as usize];
    let mut all = Vec::new();
    for c in candidates {
        let mut width = 0u32;
        for &[start, end] in &c.buckets {
            if start >= end || u32::from(end) > BUCKETS {
                return Err(format!(
                    "candidate {}: bucket range [{start}, {end}) is empty or beyond {BUCKETS}",
                    c.model
                ));
            }
            for b in start..end {
                if std::mem::replace(&mut taken[b as usize], true) {
                    return Err(format!("candidate {}: bucket {b} belongs to another range", c.model));
                }
            }
            width += u32::from(end - start);
        }
        if width != u32::from(threshold(c.percent)) {
            return Err(format!(
                "candidate {}: its buckets hold {width} of {BUCKETS}, not its percent {} (set buckets on every \
                 candidate or on none)",
                c.model, c.percent
            ));
        }
        all.push(normalise(c.buckets.clone()));
    }
    Ok(all)
}

/// Which candidate (index in list order) owns `bucket`, if any.
pub fn arm_of(ranges: &[Ranges], bucket: u16) -> Option<usize> {
    ranges.iter().position(|r| r.iter().any(|&[start, end]| (start..end).contains(&bucket)))
}

/// The candidates `wanted` (model, percent), in that order, with buckets moved from `current` as little
/// as shares allow: a candidate keeps its buckets, less its highest ones when its share shrinks; one that
/// grows (or is new) takes the lowest free buckets; a candidate not wanted any more frees all of its.
/// The percents must add up to at most 100.
pub fn reassign(current: &[Candidate], wanted: &[(String, f64)]) -> Result<Vec<Candidate>, String> {
    let ranges = layout(current)?;
    let total: u32 = wanted.iter().map(|(_, p)| u32::from(threshold(*p))).sum();
    if total > BUCKETS {
        return Err(format!("the candidates' shares add up to {}%, above 100%", f64::from(total) / 100.0));
    }
    let mut kept: Vec<Ranges> = wanted
        .iter()
        .map(|(model, percent)| {
            let old = current.iter().position(|c| &c.model == model).map(|i| ranges[i].clone()).unwrap_or_default();
            keep_lowest(old, threshold(*percent))
        })
        .collect();
    // Growth takes the buckets given up in this same move first, then control's (lowest first): control's
    // users move only when the arms' growth exceeds what the others gave up, i.e. when control shrinks.
    let owned = |ranges: &mut dyn Iterator<Item = &[u16; 2]>| {
        let mut owned = vec![false; BUCKETS as usize];
        for &[start, end] in ranges {
            owned[start as usize..end as usize].fill(true);
        }
        owned
    };
    let (was, kept_now) = (owned(&mut ranges.iter().flatten()), owned(&mut kept.iter().flatten()));
    let control = (0..BUCKETS as u16).filter(|b| !was[*b as usize]);
    let freed = (0..BUCKETS as u16).filter(|b| was[*b as usize] && !kept_now[*b as usize]);
    let mut free = freed.chain(control);
    for (ranges, (_, percent)) in kept.iter_mut().zip(wanted) {
        let have: u32 = ranges.iter().map(|[s, e]| u32::from(e - s)).sum();
        let grown: Vec<u16> = free.by_ref().take((u32::from(threshold(*percent)) - have) as usize).collect();
        ranges.extend(grown.into_iter().map(|b| [b, b + 1]));
        *ranges = normalise(std::mem::take(ranges));
    }
    Ok(wanted
        .iter()
        .zip(kept)
        .map(|((model, percent), buckets)| Candidate { model: model.clone(), percent: *percent, buckets })
        .collect())
}

/// The lowest `width` buckets of `ranges`.
fn keep_lowest(ranges: Ranges, width: u16) -> Ranges {
    let mut left = width;
    let mut kept = Vec::new();
    for [start, end] in normalise(ranges) {
        if left == 0 {
            break;
        }
        let end = end.min(start + left);
        left -= end - start;
        kept.push([start, end]);
    }
    kept
}

/// Sorted, with touching ranges merged.
fn normalise(mut ranges: Ranges) -> Ranges {
    ranges.sort_unstable();
    let mut merged: Ranges = Vec::with_capacity(ranges.len());
    for [start, end] in ranges {
        match merged.last_mut() {
            Some(last) if last[1] >= start => last[1] = last[1].max(end),
            _ => merged.push([start, end]),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arm(model: &str, percent: f64) -> Candidate {
        Candidate { model: model.into(), percent, buckets: Vec::new() }
    }

    fn wanted(shares: &[(&str, f64)]) -> Vec<(String, f64)> {
        shares.iter().map(|(m, p)| (m.to_string(), *p)).collect()
    }

    #[test]
    fn without_buckets_the_arms_are_laid_out_in_list_order() {
        let ranges = layout(&[arm("a", 10.0), arm("b", 0.0), arm("c", 5.5)]).unwrap();
        assert_eq!(ranges, vec![vec![[0, 1000]], vec![], vec![[1000, 1550]]]);
        assert_eq!((arm_of(&ranges, 999), arm_of(&ranges, 1000), arm_of(&ranges, 1550)), (Some(0), Some(2), None));
    }

    #[test]
    fn explicit_buckets_must_match_the_share_and_not_overlap() {
        let with = |model: &str, percent: f64, buckets: Ranges| Candidate { model: model.into(), percent, buckets };
        assert!(layout(&[with("a", 1.0, vec![[0, 50], [200, 250]]), with("b", 0.5, vec![[50, 100]])]).is_ok());
        let overlap = layout(&[with("a", 1.0, vec![[0, 100]]), with("b", 0.5, vec![[50, 100]])]).unwrap_err();
        assert!(overlap.contains("bucket 50 belongs to another range"), "{overlap}");
        let short = layout(&[with("a", 1.0, vec![[0, 99]])]).unwrap_err();
        assert!(short.contains("hold 99 of 10000, not its percent 1"), "{short}");
        let mixed = layout(&[with("a", 1.0, vec![[0, 100]]), arm("b", 1.0)]).unwrap_err();
        assert!(mixed.contains("on every candidate or on none"), "{mixed}");
        assert!(layout(&[with("a", 1.0, vec![[9_950, 10_050]])]).unwrap_err().contains("beyond 10000"));
    }

    #[test]
    fn a_cut_frees_its_buckets_and_growth_takes_the_lowest_free_ones() {
        let start = reassign(&[], &wanted(&[("a", 10.0), ("b", 10.0), ("c", 10.0)])).unwrap();
        assert_eq!(
            start.iter().map(|c| c.buckets.clone()).collect::<Vec<_>>(),
            [vec![[0, 1000]], vec![[1000, 2000]], vec![[2000, 3000]]]
        );
        let cut = reassign(&start, &wanted(&[("a", 10.0), ("c", 10.0)])).unwrap();
        assert_eq!((cut[0].buckets.clone(), cut[1].buckets.clone()), (vec![[0, 1000]], vec![[2000, 3000]]));
        let grown = reassign(&cut, &wanted(&[("a", 20.0), ("c", 20.0)])).unwrap();
        assert_eq!(grown[0].buckets, vec![[0, 2000]], "a takes b's old buckets first: the lowest free");
        assert_eq!(grown[1].buckets, vec![[2000, 4000]], "c keeps its own and takes the next free ones");
        let shrunk = reassign(&grown, &wanted(&[("a", 5.0), ("c", 20.0)])).unwrap();
        assert_eq!(shrunk[0].buckets, vec![[0, 500]], "a keeps its lowest buckets");
        assert!(reassign(&grown, &wanted(&[("a", 60.0), ("c", 50.0)])).unwrap_err().contains("110%"));
    }

    proptest! {
        /// Any sequence of share changes: a user's arm changes only if that arm (a candidate or control)
        /// shrank, and only to an arm that grew; the shares are exact and the arms never overlap.
        #[test]
        fn users_move_only_when_their_arm_shrinks(
            moves in proptest::collection::vec(proptest::collection::vec(0u16..=2_500, 3), 1..8),
        ) {
            let models = ["a", "b", "c"];
            let mut current: Vec<Candidate> = Vec::new();
            for shares in moves {
                let want: Vec<(String, f64)> =
                    models.iter().zip(&shares).map(|(m, s)| (m.to_string(), f64::from(*s) / 100.0)).collect();
                let next = reassign(&current, &want).unwrap();
                let (before, after) = (layout(&current).unwrap(), layout(&next).unwrap());
                for (i, c) in next.iter().enumerate() {
                    let width: u32 = after[i].iter().map(|[s, e]| u32::from(e - s)).sum();
                    prop_assert_eq!(width, u32::from(threshold(c.percent)));
                }
                for bucket in 0..BUCKETS as u16 {
                    let was = arm_of(&before, bucket).map(|i| current[i].model.as_str());
                    let is = arm_of(&after, bucket).map(|i| next[i].model.as_str());
                    if was != is {
                        // The arm the user left — a candidate or control — shrank.
                        let share = |cs: &[Candidate], m: Option<&str>| match m {
                            Some(m) => cs.iter().find(|c| c.model == m).map_or(0, |c| u32::from(threshold(c.percent))),
                            None => BUCKETS - cs.iter().map(|c| u32::from(threshold(c.percent))).sum::<u32>(),
                        };
                        prop_assert!(share(&next, was) < share(&current, was), "bucket {bucket}: {was:?} -> {is:?}");
                        prop_assert!(share(&next, is) > share(&current, is), "bucket {bucket}: {was:?} -> {is:?}");
                    }
                }
                current = next;
            }
        }
    }
}
