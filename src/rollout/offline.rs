//! Offline evaluation of a split: what a different candidate share would have given, estimated from
//! the decisions switchyard logged under the shares it ran. Pure; `switchyard evaluate` reads the
//! decisions and scored outcomes and hands them here.
//!
//! Each logged decision carries its propensity `μ(a)`: the share of users its deployment version gave
//! its arm, which is the probability that a user drawn at random lands there (the cohort hash spreads
//! users uniformly over buckets). An arm is a decision's cohort: `control`, `candidate`, or an A/B/n
//! candidate's `candidate:<model>`. For a target split `π` (each arm's share):
//! - **IPS** (inverse propensity): `V̂ = mean(π(aᵢ)/μ(aᵢ) · rᵢ)`, unbiased whenever `μ(a) > 0` wherever
//!   `π(a) > 0` — over a sample of decisions as they were logged. Losses exist only for the answered,
//!   labelled decisions, whose arm shares are not the propensities (a candidate that fails more has
//!   fewer): there IPS is biased, and only DR is valid (labels missing at random within an arm).
//! - **Doubly robust**: `V̂ = mean(Σₐ π(a)·q̂(a) + π(aᵢ)/μ(aᵢ) · (rᵢ − q̂(aᵢ)))`, with `q̂(a)` the arm's
//!   mean reward. A split has no context, so the model is the arm means; DR then has IPS's consistency
//!   and a far smaller variance when the propensities are far from the target (90/10 → 50/50).
//!
//! Users are sticky (every request of a user has the same arm), so requests of one user are not
//! independent: the intervals are cluster-robust by user (the variance of the per-user sums), normal
//! approximation, 95%.

use std::collections::{BTreeMap, HashMap};

/// z of a two-sided 95% normal interval.
const Z95: f64 = 1.959_964;

/// One logged decision with its reward (a loss, or 1 for a failure and 0 for an answer).
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    pub user: String,
    /// The decision's cohort.
    pub arm: String,
    /// The probability its arm had, in (0, 1].
    pub propensity: f64,
    pub reward: f64,
}

/// An estimate with its 95% interval, from `n` decisions of `users` users.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub low: f64,
    pub high: f64,
    pub n: usize,
    pub users: usize,
}

impl Estimate {
    pub fn contains(&self, x: f64) -> bool {
        (self.low..=self.high).contains(&x)
    }
}

/// A target split: each arm's share (arms not listed get none); the shares add up to 1.
pub type Split = [(String, f64)];

/// The split of a two-arm canary giving the candidate `candidate_share` (0..=1).
pub fn two_arm(candidate_share: f64) -> Vec<(String, f64)> {
    vec![("control".to_string(), 1.0 - candidate_share), ("candidate".to_string(), candidate_share)]
}

/// The target split's probability of `arm`.
fn target(split: &Split, arm: &str) -> f64 {
    split.iter().find(|(a, _)| a == arm).map_or(0.0, |(_, share)| *share)
}

/// Whether every arm the target gives traffic to was logged.
fn supported(logs: &[Logged], split: &Split) -> bool {
    split.iter().all(|(arm, share)| *share == 0.0 || logs.iter().any(|l| &l.arm == arm))
}

/// `value` with a 95% interval clustered by user, from each decision's influence on it (deviations
/// that average to zero).
fn clustered(logs: &[Logged], value: f64, influence: &[f64]) -> Estimate {
    let n = logs.len();
    let mut by_user: HashMap<&str, f64> = HashMap::new();
    for (l, d) in logs.iter().zip(influence) {
        *by_user.entry(l.user.as_str()).or_default() += d;
    }
    let users = by_user.len();
    let variance = by_user.values().map(|s| s * s).sum::<f64>() / (n as f64 * n as f64);
    // Small-sample correction of the cluster-robust variance (G / (G − 1)).
    let variance = if users > 1 { variance * users as f64 / (users as f64 - 1.0) } else { variance };
    let half = Z95 * variance.sqrt();
    Estimate { value, low: value - half, high: value + half, n, users }
}

/// The inverse-propensity estimate of the mean reward under `split`; None without logs of an arm the
/// split uses.
pub fn ips(logs: &[Logged], split: &Split) -> Option<Estimate> {
    if logs.is_empty() || !supported(logs, split) {
        return None;
    }
    let terms: Vec<f64> = logs.iter().map(|l| target(split, &l.arm) / l.propensity * l.reward).collect();
    let value = terms.iter().sum::<f64>() / terms.len() as f64;
    let influence: Vec<f64> = terms.iter().map(|t| t - value).collect();
    Some(clustered(logs, value, &influence))
}

/// The doubly robust estimate (arm means as the model); None as for [`ips`].
pub fn doubly_robust(logs: &[Logged], split: &Split) -> Option<Estimate> {
    if logs.is_empty() || !supported(logs, split) {
        return None;
    }
    let means = arm_means(logs);
    let mean = |arm: &str| means.iter().find(|(a, _, _)| a == arm).map_or(0.0, |(_, m, _)| *m);
    let direct: f64 = split.iter().map(|(arm, share)| share * mean(arm)).sum();
    let terms: Vec<f64> =
        logs.iter().map(|l| direct + target(split, &l.arm) / l.propensity * (l.reward - mean(&l.arm))).collect();
    let value = terms.iter().sum::<f64>() / terms.len() as f64;
    let influence: Vec<f64> = terms.iter().map(|t| t - value).collect();
    Some(clustered(logs, value, &influence))
}

/// Per logged arm (in the order of their names): its mean reward and its number of decisions.
pub fn arm_means(logs: &[Logged]) -> Vec<(String, f64, usize)> {
    let mut arms: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for l in logs {
        let (sum, n) = arms.entry(l.arm.as_str()).or_default();
        *sum += l.reward;
        *n += 1;
    }
    arms.into_iter().map(|(arm, (sum, n))| (arm.to_string(), sum / n as f64, n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cohort::hash;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A run of `users` users, each sending 1–5 requests, the candidate serving the users whose bucket
    /// is below `percent`% (the published hash, salt per seed); a request's loss is 1 with its arm's
    /// rate (`control`, `candidate`), and users differ (a per-user shift of ±0.1).
    fn run(seed: u64, users: usize, percent: f64, (control, candidate): (f64, f64)) -> Vec<Logged> {
        let mut rng = StdRng::seed_from_u64(seed);
        let salt = format!("sim-{seed}");
        let threshold = (percent * 100.0).round() as u16;
        let mut logs = Vec::new();
        for u in 0..users {
            let user = format!("user-{u}");
            let candidate_arm = hash::bucket(&salt, &user) < threshold;
            let propensity = if candidate_arm { percent / 100.0 } else { 1.0 - percent / 100.0 };
            let shift = rng.random_range(-0.1..0.1);
            let rate = if candidate_arm { candidate } else { control } + shift;
            let arm = if candidate_arm { "candidate" } else { "control" };
            for _ in 0..rng.random_range(1..=5) {
                let reward = f64::from(u8::from(rng.random_bool(rate)));
                logs.push(Logged { user: user.clone(), arm: arm.to_string(), propensity, reward });
            }
        }
        logs
    }

    /// The check: a 50/50 split estimated from 90/10 runs (losses 0.2 and 0.3: the truth is
    /// 0.25 per request, as users send equally many requests on both sides) is within its interval in
    /// about 95% of runs, and unbiased.
    #[test]
    fn a_fifty_fifty_split_is_estimated_from_a_ninety_ten_run_within_its_interval() {
        let truth = 0.25;
        let runs = 200;
        let (mut covered_dr, mut covered_ips, mut sum_dr, mut width_dr, mut width_ips) = (0, 0, 0.0, 0.0, 0.0);
        for seed in 0..runs {
            let logs = run(seed, 4_000, 10.0, (0.2, 0.3));
            let dr = doubly_robust(&logs, &two_arm(0.5)).unwrap();
            let ips = ips(&logs, &two_arm(0.5)).unwrap();
            covered_dr += usize::from(dr.contains(truth));
            covered_ips += usize::from(ips.contains(truth));
            sum_dr += dr.value;
            width_dr += dr.high - dr.low;
            width_ips += ips.high - ips.low;
        }
        let runs = runs as f64;
        eprintln!(
            "DR covered the truth in {covered_dr} of {runs}, IPS in {covered_ips}; mean DR {:.4}; mean width DR {:.4}, IPS {:.4}",
            sum_dr / runs,
            width_dr / runs,
            width_ips / runs
        );
        assert!((180..=200).contains(&covered_dr), "DR: {covered_dr} of {runs}");
        assert!((180..=200).contains(&covered_ips), "IPS: {covered_ips} of {runs}");
        assert!((sum_dr / runs - truth).abs() < 0.003, "DR is unbiased: {}", sum_dr / runs);
        assert!(width_dr < width_ips, "DR is tighter: {width_dr} vs {width_ips}");
    }

    /// Intervals that ignored the stickiness (one user's requests as independent) would cover less;
    /// the clustered ones hold even when users differ a lot.
    #[test]
    fn intervals_hold_when_each_user_sends_many_requests() {
        let mut covered = 0;
        for seed in 0..200 {
            let mut rng = StdRng::seed_from_u64(1_000 + seed);
            let mut logs = Vec::new();
            for u in 0..600 {
                let candidate = rng.random_bool(0.3);
                let propensity = if candidate { 0.3 } else { 0.7 };
                let arm = if candidate { "candidate" } else { "control" }.to_string();
                let rate: f64 = rng.random_range(0.0..0.6);
                for _ in 0..20 {
                    let reward = f64::from(u8::from(rng.random_bool(rate)));
                    logs.push(Logged { user: format!("u{u}"), arm: arm.clone(), propensity, reward });
                }
            }
            covered += usize::from(doubly_robust(&logs, &two_arm(0.8)).unwrap().contains(0.3));
        }
        assert!((180..=200).contains(&covered), "{covered} of 200");
    }

    /// Losses exist only for answered decisions: a candidate failing 20% is under-represented among
    /// them. DR (arm means) still finds the truth of a 50/50 split (0.25); IPS does not, which is why
    /// `evaluate` gives only DR for losses.
    #[test]
    fn losses_of_answered_decisions_only_are_weighed_right() {
        let mut rng = StdRng::seed_from_u64(99);
        let (mut ips_sum, mut dr_sum) = (0.0, 0.0);
        for seed in 0..100 {
            let answered: Vec<Logged> = run(seed, 4_000, 10.0, (0.2, 0.3))
                .into_iter()
                .filter(|l| l.arm == "control" || !rng.random_bool(0.2))
                .collect();
            ips_sum += ips(&answered, &two_arm(0.5)).unwrap().value;
            dr_sum += doubly_robust(&answered, &two_arm(0.5)).unwrap().value;
        }
        assert!(ips_sum / 100.0 < 0.24, "IPS is biased here: {}", ips_sum / 100.0);
        assert!((dr_sum / 100.0 - 0.25).abs() < 0.004, "DR {}", dr_sum / 100.0);
    }

    #[test]
    fn the_logging_split_itself_is_the_observed_mean_and_an_unlogged_arm_is_not_estimable() {
        let logs = run(7, 2_000, 10.0, (0.2, 0.3));
        let observed = logs.iter().map(|l| l.reward).sum::<f64>() / logs.len() as f64;
        let dr = doubly_robust(&logs, &two_arm(0.1)).unwrap();
        assert!((dr.value - observed).abs() < 0.01, "{} vs {observed}", dr.value);
        assert_eq!(dr.n, logs.len());
        let control_only: Vec<Logged> = logs.iter().filter(|l| l.arm == "control").cloned().collect();
        assert!(ips(&control_only, &two_arm(0.5)).is_none() && doubly_robust(&control_only, &two_arm(0.5)).is_none());
        let all_control = doubly_robust(&control_only, &two_arm(0.0)).unwrap();
        let control_mean = arm_means(&logs).into_iter().find(|(arm, _, _)| arm == "control").unwrap().1;
        assert!((all_control.value - control_mean).abs() < 1e-9, "no candidate: control's mean");
        assert!(ips(&[], &two_arm(0.5)).is_none());
    }

    /// A/B/n: logged under control 80%, candidates a and b 10% each (losses 0.2, 0.3, 0.1), the split
    /// that drops a and gives b half (control 50%, b 50%: truth 0.15 per request) is within DR's
    /// interval in about 95% of runs, and unbiased.
    #[test]
    fn an_abn_split_is_estimated_from_the_logged_one() {
        let truth = 0.15;
        let split = vec![("control".to_string(), 0.5), ("candidate:b".to_string(), 0.5)];
        let (mut covered, mut sum) = (0, 0.0);
        let runs = 200;
        for seed in 0..runs {
            let mut rng = StdRng::seed_from_u64(5_000 + seed);
            let salt = format!("abn-{seed}");
            let mut logs = Vec::new();
            for u in 0..6_000 {
                let user = format!("user-{u}");
                let (arm, propensity, rate) = match hash::bucket(&salt, &user) {
                    0..1000 => ("candidate:a", 0.1, 0.3),
                    1000..2000 => ("candidate:b", 0.1, 0.1),
                    _ => ("control", 0.8, 0.2),
                };
                let rate: f64 = rate + rng.random_range(-0.05..0.05);
                for _ in 0..rng.random_range(1..=5) {
                    let reward = f64::from(u8::from(rng.random_bool(rate)));
                    logs.push(Logged { user: user.clone(), arm: arm.to_string(), propensity, reward });
                }
            }
            let dr = doubly_robust(&logs, &split).unwrap();
            covered += usize::from(dr.contains(truth));
            sum += dr.value;
        }
        eprintln!("A/B/n: DR covered the truth in {covered} of {runs}; mean {:.4}", sum / runs as f64);
        assert!((180..=200).contains(&covered), "{covered} of {runs}");
        assert!((sum / runs as f64 - truth).abs() < 0.003, "unbiased: {}", sum / runs as f64);
    }
}
