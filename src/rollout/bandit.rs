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

/// Posterior probability that each arm's rate of good outcomes is the highest, for any number of arms
/// (an A/B/n bandit: control first, then the candidates); the probabilities add up to 1.
///
/// The same posteriors as [`p_candidate_better`] (priors centred on the pooled rate, normal
/// approximations); P(arm i is best) = ∫ f_i(x) Π_{j≠i} F_j(x) dx is integrated by Simpson's rule on a
/// fixed grid — no random draws, so a new controller leader computes the same shares. For two arms it
/// agrees with the closed form (tested).
pub fn p_best(arms: &[Counts]) -> Vec<f64> {
    let good: f64 = arms.iter().map(|c| c.good as f64).sum();
    let all = good + arms.iter().map(|c| c.bad as f64).sum::<f64>();
    let pooled = (good + 1.0) / (all + 2.0);
    let moments: Vec<(f64, f64)> = arms
        .iter()
        .map(|c| {
            let (a, b) = (PRIOR_WEIGHT * pooled + c.good as f64, PRIOR_WEIGHT * (1.0 - pooled) + c.bad as f64);
            (a / (a + b), (a * b / ((a + b) * (a + b) * (a + b + 1.0))).sqrt())
        })
        .collect();
    const STEPS: usize = 800; // even, for Simpson's rule
    let p: Vec<f64> = moments
        .iter()
        .enumerate()
        .map(|(i, &(m, sd))| {
            let (from, width) = (m - 10.0 * sd, 20.0 * sd / STEPS as f64);
            (0..=STEPS)
                .map(|k| {
                    let x = from + k as f64 * width;
                    let z = (x - m) / sd;
                    let density = (-0.5 * z * z).exp() / (sd * (2.0 * std::f64::consts::PI).sqrt());
                    let others: f64 = moments
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, &(mj, sj))| phi((x - mj) / sj))
                        .product();
                    let weight = if k == 0 || k == STEPS {
                        1.0
                    } else if k % 2 == 1 {
                        4.0
                    } else {
                        2.0
                    };
                    weight * density * others
                })
                .sum::<f64>()
                * width
                / 3.0
        })
        .collect();
    let total: f64 = p.iter().sum();
    p.into_iter().map(|x| x / total).collect()
}

/// The shares of every arm for the next interval (control first), from `current` and the evidence so
/// far, or None when no share would move by [`MIN_MOVE`]. The target is [`p_best`] with every arm raised
/// to the floor (the others' shares scaled down to make room); the shares move toward it in a straight
/// line, no arm's by more than `max_change`, so they keep adding up to 1 and stay above the floor.
pub fn next_shares(current: &[f64], arms: &[Counts], limits: Limits) -> Option<Vec<f64>> {
    let target = with_floor(&p_best(arms), limits.floor);
    let furthest = target.iter().zip(current).map(|(t, c)| (t - c).abs()).fold(0.0, f64::max);
    if furthest < MIN_MOVE {
        return None;
    }
    let t = (limits.max_change / furthest).min(1.0);
    // Shares travel in the record as percents with two decimals (buckets of 1/10,000): the candidates'
    // are rounded, none below the floor, and control takes what is left — the largest candidate gives
    // back what rounding took from control's floor.
    let floor = (limits.floor * 10_000.0).round() as i64;
    let mut buckets: Vec<i64> =
        current.iter().zip(&target).map(|(c, g)| (((c + t * (g - c)) * 10_000.0).round() as i64).max(floor)).collect();
    let deficit = floor - (10_000 - buckets[1..].iter().sum::<i64>());
    if deficit > 0 {
        let largest = (1..buckets.len()).max_by_key(|i| buckets[*i]).expect("a candidate");
        buckets[largest] -= deficit;
    }
    buckets[0] = 10_000 - buckets[1..].iter().sum::<i64>();
    Some(buckets.into_iter().map(|b| b as f64 / 10_000.0).collect())
}

/// `p` (adding up to 1) with every arm at least `floor`: arms under it are raised to it, the others
/// scaled down in proportion (repeated until none is under). Needs `floor × arms ≤ 1`.
fn with_floor(p: &[f64], floor: f64) -> Vec<f64> {
    let mut raised = vec![false; p.len()];
    loop {
        let free = 1.0 - floor * raised.iter().filter(|r| **r).count() as f64;
        let mass: f64 = p.iter().zip(&raised).filter(|(_, r)| !**r).map(|(x, _)| x).sum();
        let shares: Vec<f64> = p
            .iter()
            .zip(&raised)
            .map(|(x, r)| {
                if *r {
                    floor
                } else if mass > 0.0 {
                    x / mass * free
                } else {
                    free
                }
            })
            .collect();
        let under: Vec<usize> = (0..p.len()).filter(|i| !raised[*i] && shares[*i] < floor).collect();
        if under.is_empty() {
            return shares;
        }
        under.into_iter().for_each(|i| raised[i] = true);
    }
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

    #[test]
    fn p_best_agrees_with_the_two_arm_closed_form_and_is_symmetric() {
        for (a, b) in [((900, 100), (850, 150)), ((5, 0), (50, 3)), ((0, 0), (0, 0)), ((120, 4), (118, 6))] {
            let (a, b) = (Counts { good: a.0, bad: a.1 }, Counts { good: b.0, bad: b.1 });
            let p = p_best(&[a, b]);
            assert!((p[1] - p_candidate_better(a, b)).abs() < 1e-6, "{p:?} against {}", p_candidate_better(a, b));
        }
        let even = Counts { good: 900, bad: 100 };
        let p = p_best(&[even, even, even]);
        assert!(p.iter().all(|x| (x - 1.0 / 3.0).abs() < 1e-9), "{p:?}");
        let worse = Counts { good: 850, bad: 150 };
        let p = p_best(&[even, even, worse]);
        assert!((p[0] - p[1]).abs() < 1e-9 && p[2] < 0.001, "{p:?}");
    }

    #[test]
    fn the_shares_move_toward_the_best_within_floor_and_step_and_add_up_to_one() {
        let (even, worse) = (Counts { good: 900, bad: 100 }, Counts { good: 850, bad: 150 });
        let next = next_shares(&[0.7, 0.1, 0.1, 0.1], &[even, even, even, worse], LIMITS).unwrap();
        assert!((next.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{next:?}");
        assert!(next.iter().zip([0.7, 0.1, 0.1, 0.1]).all(|(n, c)| (n - c).abs() <= 0.1 + 1e-9), "{next:?}");
        assert!(next[3] < 0.1 && next[1] > 0.1 && next[2] > 0.1 && next[0] < 0.7, "{next:?}");
        let mut shares = vec![0.7, 0.1, 0.1, 0.1];
        for _ in 0..20 {
            shares = next_shares(&shares, &[even, even, even, worse], LIMITS).unwrap_or(shares);
        }
        assert_eq!(shares[3], 0.05, "the worse arm at the floor: {shares:?}");
        assert!(
            shares[..3].iter().all(|s| (s - 0.95 / 3.0).abs() < 0.011),
            "the equal ones share the rest: {shares:?}"
        );
        assert_eq!(next_shares(&shares, &[even, even, even, worse], LIMITS), None, "there: no move");
        assert_eq!(with_floor(&[0.98, 0.01, 0.01], 0.05), vec![0.9, 0.05, 0.05]);
    }

    /// One A/B/n run: control and candidates with bad-outcome `rates` (control first), each user on an
    /// arm drawn with the shares in force, the shares moved by [`next_shares`] every `interval` users. Each
    /// candidate's rate guard sees control's users and its own in blocks of [`CHUNK`] control users, as a
    /// step's evidence per candidate does. Returns (per candidate: whether its guard fired at α = 0.05,
    /// shares after each interval, bad outcomes).
    fn run_arms(seed: u64, users: usize, interval: usize, rates: &[f64]) -> (Vec<bool>, Vec<Vec<f64>>, usize) {
        let mut rng = StdRng::seed_from_u64(seed);
        let k = rates.len();
        let mut shares = vec![0.1; k];
        shares[0] = 1.0 - 0.1 * (k - 1) as f64;
        let mut counts = vec![Counts::default(); k];
        let mut guards = vec![RateGuard::default(); k];
        let mut blocks = vec![Block::default(); k];
        let (mut history, mut bad_total) = (Vec::new(), 0);
        // Each candidate's guard at the whole of alpha 0.05 (stricter than a plan, which splits it).
        let threshold = (1.0f64 / 0.05).ln();
        let mut fired = vec![false; k];
        for u in 0..users {
            let x = rng.random::<f64>();
            let arm = shares
                .iter()
                .scan(0.0, |acc, s| {
                    *acc += s;
                    Some(*acc)
                })
                .position(|c| x < c)
                .unwrap_or(k - 1);
            let bad = rng.random_bool(rates[arm]);
            bad_total += usize::from(bad);
            counts[arm].good += u64::from(!bad);
            counts[arm].bad += u64::from(bad);
            blocks[arm].n += 1;
            blocks[arm].bad += u64::from(bad);
            if blocks[0].n as usize == CHUNK {
                for i in 1..k {
                    guards[i].observe(blocks[0], blocks[i]);
                    fired[i] |= guards[i].log_e() >= threshold;
                }
                blocks = vec![Block::default(); k];
            }
            if (u + 1) % interval == 0 {
                shares = next_shares(&shares, &counts, LIMITS).unwrap_or(shares);
                history.push(shares.clone());
            }
        }
        (fired[1..].to_vec(), history, bad_total)
    }

    /// A/B/n under adaptive allocation: control and two candidates all equal (2% errors), 400 runs of
    /// 20,000 users with the shares moving every 500: each candidate's error guard, at the whole of α, fires
    /// in at most α of them.
    #[test]
    fn an_abn_bandit_keeps_each_guards_alpha_on_equal_arms() {
        let runs = 400;
        let mut alarms = [0usize; 2];
        for seed in 0..runs {
            let (fired, _, _) = run_arms(50_000 + seed, 20_000, 500, &[0.02, 0.02, 0.02]);
            for (a, f) in alarms.iter_mut().zip(fired) {
                *a += usize::from(f);
            }
        }
        eprintln!("A/B/n A/A under adaptive allocation: false alarms per candidate {alarms:?} in {runs} runs");
        assert!(alarms.iter().all(|a| *a <= runs as usize / 20), "{alarms:?}");
    }

    /// Control and one candidate equally good (10% bad), one candidate 5 points worse (15%): the worse one
    /// goes to the floor and the two good ones share the rest. Reports the users until the worse one is
    /// within a point of the floor, and the regret against the best fixed split (the worse arm at the
    /// floor).
    #[test]
    fn an_abn_bandit_sends_the_worse_candidate_to_its_floor_within_a_few_thousand_labels() {
        let runs = 200;
        let (mut until, mut regret, mut good_share) = (Vec::new(), 0.0, Vec::new());
        let rates = [0.10, 0.10, 0.15];
        for seed in 0..runs {
            let (_, history, bad) = run_arms(70_000 + seed, 20_000, 500, &rates);
            let first =
                history.iter().position(|s| s[2] < LIMITS.floor + MIN_MOVE).map_or(usize::MAX, |i| (i + 1) * 500);
            until.push(first);
            good_share.push(history.last().unwrap()[0] + history.last().unwrap()[1]);
            // The best fixed split: the worse arm at the floor, 10% bad elsewhere.
            let best = 20_000.0 * (0.10 * (1.0 - LIMITS.floor) + 0.15 * LIMITS.floor);
            regret += bad as f64 - best;
        }
        until.sort_unstable();
        good_share.sort_by(f64::total_cmp);
        let (median, p90) = (until[until.len() / 2], until[until.len() * 9 / 10]);
        eprintln!(
            "A/B/n bandit, a candidate 5 points worse: at its floor after {median} users (median), {p90} (90th \
             percentile); the two good arms' final share, median {:.3}; regret against the best fixed split {:.0} \
             bad outcomes per 20,000 users",
            good_share[good_share.len() / 2],
            regret / runs as f64
        );
        assert!(median <= 5_000 && p90 <= 10_000, "{median} / {p90}");
        assert!(good_share[good_share.len() / 10] >= 0.9, "{good_share:?}");
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
