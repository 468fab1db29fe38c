//! Adaptive allocation between control and candidate: Thompson sampling's probability matching. The
//! candidate's next share is the posterior probability that it is the better arm, kept within a floor
//! per arm and moved at most a maximum per interval. Pure: the controller gives it the evidence.
//!
//! The posterior of each arm's rate of good outcomes is Beta(2p + good, 2(1 − p) + bad), `p` the pooled
//! rate of both arms; the probability that the candidate's is higher is taken in closed form from the
//! normal approximation of the two Betas' difference (no random draws: the same evidence always gives the same share, so a new controller
//! leader computes what the old one would have).
//!
//! The guards stay valid under this allocation. Each block's factor of the rate guard's e-process
//! (`guard::RateGuard`) is an e-variable conditional on the block's counts per arm, whatever chose them,
//! as long as the choice used only earlier data: the share moves between intervals from evidence already
//! read, so the product stays a supermartingale under the null and Ville's inequality still bounds the
//! false alarms by α. The simulations below check it with fixed seeds. The sample-ratio guard is not: its
//! null is a fixed share.

/// Outcomes of one arm: `good` and `bad` counts (users).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub good: u64,
    pub bad: u64,
}

/// How far the allocation may go: `floor` is each arm's least share (0..0.5), `max_change` the most the
/// candidate's share moves per interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub floor: f64,
    pub max_change: f64,
}

/// Standard normal distribution function.
fn phi(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// Weight of the prior, in outcomes.
const PRIOR_WEIGHT: f64 = 2.0;

/// Posterior probability that the candidate's rate of good outcomes is above control's.
///
/// Each arm's prior is centred on the pooled rate of both arms (weight [`PRIOR_WEIGHT`]), not on 1/2:
/// with a uniform prior and rare failures, the arm with fewer users looks worse only because its mean is
/// pulled further toward 1/2 — equal models would drift toward the bigger arm (seen in the fault suite:
/// an A/A bandit settling at 23%).
pub fn p_candidate_better(control: Counts, candidate: Counts) -> f64 {
    let good = (control.good + candidate.good) as f64;
    let all = good + (control.bad + candidate.bad) as f64;
    let pooled = (good + 1.0) / (all + 2.0);
    let moments = |c: Counts| {
        let (a, b) = (PRIOR_WEIGHT * pooled + c.good as f64, PRIOR_WEIGHT * (1.0 - pooled) + c.bad as f64);
        (a / (a + b), a * b / ((a + b) * (a + b) * (a + b + 1.0)))
    };
    let ((mc, vc), (mt, vt)) = (moments(control), moments(candidate));
    phi((mt - mc) / (vc + vt).sqrt())
}

/// Smallest move worth a new deployment version: one percentage point.
const MIN_MOVE: f64 = 0.01;

/// The candidate's share for the next interval, from `current` and the evidence so far (`current` when
/// the move would be under [`MIN_MOVE`]: equal arms must not write a version every interval).
pub fn next_share(current: f64, control: Counts, candidate: Counts, limits: Limits) -> f64 {
    let target = p_candidate_better(control, candidate).clamp(limits.floor, 1.0 - limits.floor);
    let step = (target - current).clamp(-limits.max_change, limits.max_change);
    if step.abs() < MIN_MOVE {
        return current;
    }
    // Shares travel in the record as percents with two decimals.
    let share = current + step;
    (share * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::evidence::CHUNK;
    use crate::rollout::guard::{Block, RateGuard};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const LIMITS: Limits = Limits { floor: 0.05, max_change: 0.1 };

    #[test]
    fn the_share_follows_the_evidence_within_its_limits() {
        let even = Counts { good: 900, bad: 100 };
        assert!((p_candidate_better(even, even) - 0.5).abs() < 1e-12);
        let worse = Counts { good: 850, bad: 150 };
        assert!(p_candidate_better(even, worse) < 0.01 && p_candidate_better(worse, even) > 0.99);
        assert_eq!(next_share(0.5, even, worse, LIMITS), 0.4, "at most 10 points per interval");
        assert_eq!(next_share(0.08, even, worse, LIMITS), 0.05, "never below the floor");
        assert_eq!(next_share(0.92, worse, even, LIMITS), 0.95, "nor above 1 − floor");
        let none = Counts::default();
        assert_eq!(next_share(0.1, none, none, LIMITS), 0.2, "no evidence: toward an even split");
        let (big, small) = (Counts { good: 5_000, bad: 0 }, Counts { good: 500, bad: 0 });
        let p = p_candidate_better(big, small);
        assert!((0.45..0.55).contains(&p), "no failures on either arm: no reason to prefer the bigger ({p})");
        assert_eq!(next_share(0.5, big, small, LIMITS), 0.5, "a move under a point is not made");
    }

    /// One simulated run: `users` users arrive in intervals of `interval`, each lands on the candidate
    /// with the share in force (the cohort hash makes that a fair coin per user), and has a bad outcome
    /// with its arm's rate. After each interval the share moves by [`next_share`]. The rate guard sees
    /// the users in blocks of [`CHUNK`], as in a step. Returns (alarm, shares after each interval,
    /// users on the worse arm).
    fn run(seed: u64, users: usize, interval: usize, (control, candidate): (f64, f64)) -> (bool, Vec<f64>, usize) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut share = 0.1;
        let (mut counts, mut guard) = ([Counts::default(); 2], RateGuard::default());
        let (mut shares, mut alarm, mut on_worse) = (Vec::new(), false, 0);
        let threshold = (1.0f64 / 0.05).ln();
        let mut block = [Block::default(); 2];
        for u in 0..users {
            let arm = usize::from(rng.random_bool(share));
            let bad = rng.random_bool(if arm == 1 { candidate } else { control });
            on_worse += usize::from((arm == 1) == (candidate > control));
            counts[arm].good += u64::from(!bad);
            counts[arm].bad += u64::from(bad);
            block[arm].n += 1;
            block[arm].bad += u64::from(bad);
            if (u + 1) % CHUNK == 0 {
                guard.observe(block[0], block[1]);
                block = [Block::default(); 2];
                alarm |= guard.log_e() >= threshold;
            }
            if (u + 1) % interval == 0 {
                share = next_share(share, counts[0], counts[1], LIMITS);
                shares.push(share);
            }
        }
        (alarm, shares, on_worse)
    }

    /// A/A: two equal arms (2% errors) under adaptive allocation, 1,000 runs of 20,000 users with the
    /// share moving every 500: the error guard (α = 0.05) fires in at most 5% of them.
    #[test]
    fn under_adaptive_allocation_the_guard_keeps_its_alpha_on_equal_arms() {
        let runs = 1_000;
        let (mut alarms, mut finals) = (0, Vec::new());
        for seed in 0..runs {
            let (alarm, shares, _) = run(seed, 20_000, 500, (0.02, 0.02));
            alarms += usize::from(alarm);
            finals.push(*shares.last().unwrap());
        }
        finals.sort_by(f64::total_cmp);
        eprintln!(
            "A/A under adaptive allocation: {alarms} false alarms in {runs} runs; the candidate's final share: \
             10th percentile {:.2}, median {:.2}, 90th {:.2} (it wanders: equal arms)",
            finals[runs as usize / 10],
            finals[runs as usize / 2],
            finals[runs as usize * 9 / 10]
        );
        assert!(alarms <= runs as usize / 20, "{alarms} of {runs}");
    }

    /// A candidate 5 points worse (85% against 90% good): the allocation goes to the floor, and the
    /// regret against the best fixed split (the floor on the worse arm) is counted; the other way round
    /// the candidate gets most traffic. Reports the users (labels) until the worse candidate is at the
    /// floor, or the better one holds 80%.
    #[test]
    fn most_traffic_goes_to_the_better_arm_within_a_few_thousand_labels() {
        for (name, rates) in [("worse candidate", (0.10, 0.15)), ("better candidate", (0.15, 0.10))] {
            let mut until: Vec<usize> = Vec::new();
            let mut regret = 0.0;
            let runs = 200;
            for seed in 0..runs {
                let (_, shares, on_worse) = run(10_000 + seed, 20_000, 500, rates);
                let better = |s: f64| if rates.1 < rates.0 { s } else { 1.0 - s };
                // From 10%: the worse candidate is within a point of the floor, the better one holds 80%.
                let reached = |s: f64| if rates.1 < rates.0 { better(s) >= 0.8 } else { s < LIMITS.floor + MIN_MOVE };
                let first = shares.iter().position(|s| reached(*s)).map_or(usize::MAX, |i| (i + 1) * 500);
                until.push(first);
                // Regret: bad outcomes beyond the best fixed split's (the floor on the worse arm).
                regret += (on_worse as f64 - LIMITS.floor * 20_000.0).max(0.0) * 0.05;
            }
            until.sort_unstable();
            let (median, p90) = (until[until.len() / 2], until[until.len() * 9 / 10]);
            eprintln!(
                "{name}: there after {median} users (median), {p90} (90th percentile); \
                 regret against the best fixed split {:.0} bad outcomes per 20,000 users",
                regret / runs as f64
            );
            assert!(median <= 5_000 && p90 <= 10_000, "{name}: {median} / {p90}");
        }
    }
}
