//! Offline evaluation of a split: what a different candidate share would have given, estimated from
//! the decisions switchyard logged under the shares it ran. Pure; `switchyard evaluate` reads the
//! decisions and scored outcomes and hands them here.
//!
//! Each logged decision carries its propensity `μ(a)`: the share of users its deployment version gave
//! its side, which is the probability that a user drawn at random lands there (the cohort hash spreads
//! users uniformly over buckets). For a target split `π` (the candidate's share `p`):
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

use std::collections::HashMap;

use crate::record::Side;

/// z of a two-sided 95% normal interval.
const Z95: f64 = 1.959_964;

/// One logged decision with its reward (a loss, or 1 for a failure and 0 for an answer).
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    pub user: String,
    pub arm: Side,
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

/// The target split's probability of `arm`.
fn target(candidate_share: f64, arm: Side) -> f64 {
    if arm == Side::Candidate { candidate_share } else { 1.0 - candidate_share }
}

/// Whether every arm the target gives traffic to was logged.
fn supported(logs: &[Logged], candidate_share: f64) -> bool {
    [Side::Control, Side::Candidate]
        .into_iter()
        .all(|arm| target(candidate_share, arm) == 0.0 || logs.iter().any(|l| l.arm == arm))
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

/// The inverse-propensity estimate of the mean reward under a split giving the candidate
/// `candidate_share` (0..=1); None without logs of an arm the split uses.
pub fn ips(logs: &[Logged], candidate_share: f64) -> Option<Estimate> {
    if logs.is_empty() || !supported(logs, candidate_share) {
        return None;
    }
    let terms: Vec<f64> = logs.iter().map(|l| target(candidate_share, l.arm) / l.propensity * l.reward).collect();
    let value = terms.iter().sum::<f64>() / terms.len() as f64;
    let influence: Vec<f64> = terms.iter().map(|t| t - value).collect();
    Some(clustered(logs, value, &influence))
}

/// The doubly robust estimate (arm means as the model); None as for [`ips`].
pub fn doubly_robust(logs: &[Logged], candidate_share: f64) -> Option<Estimate> {
    if logs.is_empty() || !supported(logs, candidate_share) {
        return None;
    }
    let means = arm_means(logs);
    let mean = |arm: Side| means.iter().find(|(a, _, _)| *a == arm).map_or(0.0, |(_, m, _)| *m);
    let direct = target(candidate_share, Side::Control) * mean(Side::Control)
        + target(candidate_share, Side::Candidate) * mean(Side::Candidate);
    let terms: Vec<f64> = logs
        .iter()
        .map(|l| direct + target(candidate_share, l.arm) / l.propensity * (l.reward - mean(l.arm)))
        .collect();
    let value = terms.iter().sum::<f64>() / terms.len() as f64;
    let influence: Vec<f64> = terms.iter().map(|t| t - value).collect();
    Some(clustered(logs, value, &influence))
}

/// Per logged arm: its mean reward and its number of decisions.
pub fn arm_means(logs: &[Logged]) -> Vec<(Side, f64, usize)> {
    [Side::Control, Side::Candidate]
        .into_iter()
        .filter_map(|arm| {
            let rewards: Vec<f64> = logs.iter().filter(|l| l.arm == arm).map(|l| l.reward).collect();
            (!rewards.is_empty()).then(|| (arm, rewards.iter().sum::<f64>() / rewards.len() as f64, rewards.len()))
        })
        .collect()
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
            let arm = if hash::bucket(&salt, &user) < threshold { Side::Candidate } else { Side::Control };
            let propensity = if arm == Side::Candidate { percent / 100.0 } else { 1.0 - percent / 100.0 };
            let shift = rng.random_range(-0.1..0.1);
            let rate = if arm == Side::Candidate { candidate } else { control } + shift;
            for _ in 0..rng.random_range(1..=5) {
                let reward = f64::from(u8::from(rng.random_bool(rate)));
                logs.push(Logged { user: user.clone(), arm, propensity, reward });
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
            let dr = doubly_robust(&logs, 0.5).unwrap();
            let ips = ips(&logs, 0.5).unwrap();
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
                let arm = if rng.random_bool(0.3) { Side::Candidate } else { Side::Control };
                let propensity = if arm == Side::Candidate { 0.3 } else { 0.7 };
                let rate: f64 = rng.random_range(0.0..0.6);
                for _ in 0..20 {
                    let reward = f64::from(u8::from(rng.random_bool(rate)));
                    logs.push(Logged { user: format!("u{u}"), arm, propensity, reward });
                }
            }
            covered += usize::from(doubly_robust(&logs, 0.8).unwrap().contains(0.3));
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
                .filter(|l| l.arm == Side::Control || !rng.random_bool(0.2))
                .collect();
            ips_sum += ips(&answered, 0.5).unwrap().value;
            dr_sum += doubly_robust(&answered, 0.5).unwrap().value;
        }
        assert!(ips_sum / 100.0 < 0.24, "IPS is biased here: {}", ips_sum / 100.0);
        assert!((dr_sum / 100.0 - 0.25).abs() < 0.004, "DR {}", dr_sum / 100.0);
    }

    #[test]
    fn the_logging_split_itself_is_the_observed_mean_and_an_unlogged_arm_is_not_estimable() {
        let logs = run(7, 2_000, 10.0, (0.2, 0.3));
        let observed = logs.iter().map(|l| l.reward).sum::<f64>() / logs.len() as f64;
        let dr = doubly_robust(&logs, 0.1).unwrap();
        assert!((dr.value - observed).abs() < 0.01, "{} vs {observed}", dr.value);
        assert_eq!(dr.n, logs.len());
        let control_only: Vec<Logged> = logs.iter().filter(|l| l.arm == Side::Control).cloned().collect();
        assert!(ips(&control_only, 0.5).is_none() && doubly_robust(&control_only, 0.5).is_none());
        let all_control = doubly_robust(&control_only, 0.0).unwrap();
        assert!((all_control.value - arm_means(&logs)[0].1).abs() < 1e-9, "no candidate: control's mean");
        assert!(ips(&[], 0.5).is_none());
    }
}
