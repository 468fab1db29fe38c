//! Guards that may be checked after every batch without inflating false alarms.
//!
//! Each guard keeps an e-process: `E_0 = 1`, multiplied after each block of data by a factor whose
//! expected value is at most 1 while the candidate is not worse. By Ville's inequality the chance that
//! `E` ever reaches `1/α` is at most `α`, however often it is looked at; a guard fires there. Everything a
//! factor uses (plug-in estimates) comes from blocks before it. Values are kept as logarithms.
//!
//! Validity assumes independent observations: feed users, not requests (e.g. each user's first
//! decision in a step), since one user's requests are correlated; leave out users who were not
//! randomised (overrides, attribute rules); run one e-process per ramp step; and form blocks in routing
//! order, scoring a block once all its decisions are final (a timeout arrives at its deadline, so
//! arrival order depends on the outcome). `../shared/GUARDS.md` in the project's steering notes has the
//! formulas and their sources; the simulations below check them.

/// Outcomes of one arm in one block: `n` observations, `bad` of them bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Block {
    pub n: u64,
    pub bad: u64,
}

/// One-sided test that the candidate's rate of bad outcomes (errors, timeouts, answers slower than a
/// threshold fixed when the step starts) is higher than control's: the exact 2×2 e-process of Turner,
/// Ly & Grünwald (2024), with plug-in estimates from earlier blocks and the null point at their
/// weighted mean. A block in which the candidate does not look worse so far contributes a factor of 1.
#[derive(Debug, Clone)]
pub struct RateGuard {
    /// Pseudo-counts of the plug-in estimates before any data.
    prior_bad: f64,
    prior_good: f64,
    /// Totals so far: index 0 control, 1 candidate.
    n: [f64; 2],
    bad: [f64; 2],
    log_e: f64,
}

impl Default for RateGuard {
    fn default() -> Self {
        RateGuard::with_prior(0.5, 0.5)
    }
}

impl RateGuard {
    pub fn with_prior(prior_bad: f64, prior_good: f64) -> Self {
        RateGuard { prior_bad, prior_good, n: [0.0; 2], bad: [0.0; 2], log_e: 0.0 }
    }

    fn plug_in(&self, arm: usize) -> f64 {
        (self.prior_bad + self.bad[arm]) / (self.prior_bad + self.prior_good + self.n[arm])
    }

    /// Scores one block (sizes fixed by routing, not by outcomes).
    pub fn observe(&mut self, control: Block, candidate: Block) {
        let (pa, pb) = (self.plug_in(0), self.plug_in(1));
        let (na, nb) = (control.n as f64, candidate.n as f64);
        if pb > pa && na + nb > 0.0 {
            let (ya, yb) = (control.bad as f64, candidate.bad as f64);
            let p0 = (na * pa + nb * pb) / (na + nb);
            let log_likelihood = |p: f64, bad: f64, n: f64| bad * p.ln() + (n - bad) * (1.0 - p).ln();
            self.log_e +=
                log_likelihood(pa, ya, na) + log_likelihood(pb, yb, nb) - log_likelihood(p0, ya + yb, na + nb);
        }
        self.n[0] += na;
        self.n[1] += nb;
        self.bad[0] += control.bad as f64;
        self.bad[1] += candidate.bad as f64;
    }

    pub fn log_e(&self) -> f64 {
        self.log_e
    }

    /// Observations so far: (control, candidate).
    pub fn samples(&self) -> (u64, u64) {
        (self.n[0] as u64, self.n[1] as u64)
    }

    /// Bad outcomes so far: (control, candidate).
    pub fn bad(&self) -> (u64, u64) {
        (self.bad[0] as u64, self.bad[1] as u64)
    }
}

/// Is the split what was configured? The Dirichlet-multinomial e-process of Lindon & Malek (2022) for
/// two arms: under the null an observation lands in the candidate arm with the configured share.
/// Two-sided. Count users, not requests: the cohort hash controls the share of users.
#[derive(Debug, Clone)]
pub struct SampleRatioGuard {
    /// Configured candidate share, in (0, 1).
    share: f64,
    /// Prior concentration of the mixture (larger: slower, more sensitive to small deviations).
    concentration: f64,
    n: [u64; 2],
}

impl SampleRatioGuard {
    pub fn new(share: f64, concentration: f64) -> Self {
        SampleRatioGuard { share, concentration, n: [0; 2] }
    }

    pub fn observe(&mut self, control: u64, candidate: u64) {
        self.n[0] += control;
        self.n[1] += candidate;
    }

    pub fn log_e(&self) -> f64 {
        let (ra, rb) = (1.0 - self.share, self.share);
        let (ka, kb) = (self.concentration * ra, self.concentration * rb);
        let (na, nb) = (self.n[0] as f64, self.n[1] as f64);
        ln_beta(ka + na, kb + nb) - ln_beta(ka, kb) - na * ra.ln() - nb * rb.ln()
    }
}

fn ln_beta(x: f64, y: f64) -> f64 {
    libm::lgamma(x) + libm::lgamma(y) - libm::lgamma(x + y)
}

/// Running mean and variance of one arm's losses (Welford).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub n: u64,
    pub mean: f64,
    m2: f64,
}

impl Moments {
    pub fn add(&mut self, x: f64) {
        self.n += 1;
        let delta = x - self.mean;
        self.mean += delta / self.n as f64;
        self.m2 += delta * (x - self.mean);
    }

    /// The sample variance (0 below two observations).
    pub fn variance(&self) -> f64 {
        if self.n < 2 { 0.0 } else { self.m2 / (self.n - 1) as f64 }
    }
}

/// Is the candidate's mean loss worse than control's by more than `margin`? The mixture SPRT of Johari,
/// Pekelis & Walsh ("Always valid inference"), centred on the margin and one-sided: with θ̂ the
/// difference of mean losses (candidate − control), V = s²_A/n_A + s²_B/n_B and mixing variance τ²,
/// Λ = √(V/(V+τ²)) · exp(τ²(θ̂−δ)² / (2V(V+τ²))) while θ̂ > δ, else 1. Asymptotic (normal
/// approximation): it judges nothing before [`MeanGuard::MIN_PER_ARM`] observations per arm, and the
/// variance is floored so that a run of identical early losses cannot make V vanish.
#[derive(Debug, Clone)]
pub struct MeanGuard {
    margin: f64,
    tau2: f64,
    arms: [Moments; 2],
}

impl MeanGuard {
    /// Observations each arm needs before the guard judges.
    pub const MIN_PER_ARM: u64 = 100;
    /// `margin`: how much worse counts as harm; `tau`: about the smallest harm worth catching.
    pub fn new(margin: f64, tau: f64) -> Self {
        MeanGuard { margin, tau2: tau * tau, arms: [Moments::default(); 2] }
    }

    pub fn observe(&mut self, arm: usize, loss: f64) {
        self.arms[arm].add(loss);
    }

    pub fn arms(&self) -> (Moments, Moments) {
        (self.arms[0], self.arms[1])
    }

    fn v(&self) -> Option<f64> {
        let [a, b] = &self.arms;
        if a.n < Self::MIN_PER_ARM || b.n < Self::MIN_PER_ARM {
            return None;
        }
        let var = |m: &Moments| m.variance().max(VARIANCE_FLOOR) / m.n as f64;
        Some(var(a) + var(b))
    }

    /// The difference of mean losses, candidate − control.
    pub fn difference(&self) -> f64 {
        self.arms[1].mean - self.arms[0].mean
    }

    pub fn log_e(&self) -> f64 {
        self.v().map_or(0.0, |v| mixture_log_e(self.difference() - self.margin, v, self.tau2))
    }

    /// The confidence sequence for the difference at level `alpha`: (low, high), valid at every look.
    pub fn interval(&self, alpha: f64) -> Option<(f64, f64)> {
        self.v().map(|v| mixture_interval(self.difference(), v, self.tau2, alpha))
    }
}

/// Floor of a variance of losses on a 0–1 scale.
const VARIANCE_FLOOR: f64 = 1e-4;

/// The one-sided normal-mixture e-value (log) of an estimate `excess` above the null's boundary, with
/// estimate variance `v` and mixing variance `tau2` (1 while the estimate is at or below the boundary).
fn mixture_log_e(excess: f64, v: f64, tau2: f64) -> f64 {
    if excess <= 0.0 {
        return 0.0;
    }
    0.5 * (v / (v + tau2)).ln() + tau2 * excess * excess / (2.0 * v * (v + tau2))
}

/// The normal-mixture confidence sequence around `estimate` at level `alpha`.
fn mixture_interval(estimate: f64, v: f64, tau2: f64, alpha: f64) -> (f64, f64) {
    let half = (2.0 * v * (v + tau2) / tau2 * (((v + tau2) / v).sqrt() / alpha).ln()).sqrt();
    (estimate - half, estimate + half)
}

/// The paired form of [`MeanGuard`], for requests that both models answered (one serving, the other on
/// a shadow copy) and that got a label: each pair gives one difference of losses d = new − old, and the
/// same one-sided mixture SPRT tests whether their mean exceeds `margin`, with V = s²_d / n. Pairing
/// removes what the two models' losses share (the hard requests are hard for both), so it needs far
/// fewer labels than two independent arms.
#[derive(Debug, Clone)]
pub struct PairedGuard {
    margin: f64,
    tau2: f64,
    differences: Moments,
    /// Each side's losses, for the figures: (old, new).
    sides: [Moments; 2],
}

impl PairedGuard {
    /// Pairs before the guard judges.
    pub const MIN_PAIRS: u64 = 100;

    pub fn new(margin: f64, tau: f64) -> Self {
        PairedGuard { margin, tau2: tau * tau, differences: Moments::default(), sides: [Moments::default(); 2] }
    }

    pub fn observe(&mut self, old: f64, new: f64) {
        self.differences.add(new - old);
        self.sides[0].add(old);
        self.sides[1].add(new);
    }

    /// Each side's losses: (old, new).
    pub fn sides(&self) -> (Moments, Moments) {
        (self.sides[0], self.sides[1])
    }

    pub fn pairs(&self) -> u64 {
        self.differences.n
    }

    fn v(&self) -> Option<f64> {
        let d = &self.differences;
        (d.n >= Self::MIN_PAIRS).then(|| d.variance().max(VARIANCE_FLOOR) / d.n as f64)
    }

    /// The mean difference of losses, new − old.
    pub fn difference(&self) -> f64 {
        self.differences.mean
    }

    pub fn log_e(&self) -> f64 {
        self.v().map_or(0.0, |v| mixture_log_e(self.difference() - self.margin, v, self.tau2))
    }

    pub fn interval(&self, alpha: f64) -> Option<(f64, f64)> {
        self.v().map(|v| mixture_interval(self.difference(), v, self.tau2, alpha))
    }
}

/// Is the share of bad observations above a bound `p0`? One sample, one-sided: under the null every
/// observation is bad with probability at most `p0`. Each observation multiplies the e-process by the
/// likelihood ratio of a plug-in rate `q` (the share so far, Jeffreys-smoothed, never below `p0`) against
/// `p0`: `q/p0` if bad, `(1 − q)/(1 − p0)` if not. With `q ≥ p0`, its expectation under any rate
/// `p ≤ p0` is at most 1, so the null is composite and the test valid for all of it. Observations are
/// also counted per arm, for the figures.
#[derive(Debug, Clone)]
pub struct ExcessRateGuard {
    p0: f64,
    n: [u64; 2],
    bad: [u64; 2],
    log_e: f64,
}

impl ExcessRateGuard {
    pub fn new(p0: f64) -> Self {
        ExcessRateGuard { p0, n: [0; 2], bad: [0; 2], log_e: 0.0 }
    }

    /// One observation of `arm` (0 control, 1 candidate).
    pub fn observe(&mut self, arm: usize, bad: bool) {
        let (n, b) = ((self.n[0] + self.n[1]) as f64, (self.bad[0] + self.bad[1]) as f64);
        let q = ((b + 0.5) / (n + 1.0)).max(self.p0);
        self.log_e += if bad { (q / self.p0).ln() } else { ((1.0 - q) / (1.0 - self.p0)).ln() };
        self.n[arm] += 1;
        self.bad[arm] += u64::from(bad);
    }

    pub fn log_e(&self) -> f64 {
        self.log_e
    }

    /// Observations so far: (control, candidate).
    pub fn samples(&self) -> (u64, u64) {
        (self.n[0], self.n[1])
    }

    /// Bad observations so far: (control, candidate).
    pub fn bad(&self) -> (u64, u64) {
        (self.bad[0], self.bad[1])
    }
}

/// The false-alarm budget α of a whole rollout, split evenly over its guards and steps: each guard in
/// each step fires when its e-process reaches `guards · steps / α`.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub alpha: f64,
    pub guards: usize,
    pub steps: usize,
    /// Candidates judged against control (A/B/n; 1 otherwise). Each cut of one restarts the step for
    /// the others, so a candidate may be judged in up to `steps + candidates - 1` steps.
    pub candidates: usize,
}

impl Budget {
    /// The log of the e-value at which one guard in one step fires for one candidate: α split evenly
    /// over every (guard, candidate, step) test the rollout can make — a union bound, valid however
    /// the tests depend on each other.
    pub fn log_threshold(&self) -> f64 {
        (self.tests() as f64 / self.alpha).ln()
    }

    /// The number of (guard, candidate, step) tests.
    pub fn tests(&self) -> usize {
        let k = self.candidates.max(1);
        self.guards.max(1) * k * (self.steps.max(1) + k - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Users with a realistic skew of risk: most rarely fail, a few often (mean 1% at `scale` 1). One
    /// observation per user (its first decision in the step).
    fn user_bad(rng: &mut StdRng, scale: f64) -> bool {
        let p = if rng.random::<f64>() < 0.9 { 0.005 } else { 0.055 };
        rng.random::<f64>() < p * scale
    }

    /// Runs a rate guard over `users` users in blocks of `block`, the candidate arm getting `share` of
    /// them; returns the number of users seen when it fired, if it did.
    fn run_rate(
        rng: &mut StdRng,
        share: f64,
        candidate_scale: f64,
        users: usize,
        block: usize,
        log_threshold: f64,
    ) -> Option<usize> {
        let mut guard = RateGuard::default();
        let mut seen = 0;
        while seen < users {
            let (mut a, mut b) = (Block::default(), Block::default());
            for _ in 0..block {
                if rng.random::<f64>() < share {
                    b.n += 1;
                    b.bad += u64::from(user_bad(rng, candidate_scale));
                } else {
                    a.n += 1;
                    a.bad += u64::from(user_bad(rng, 1.0));
                }
            }
            seen += block;
            guard.observe(a, b);
            if guard.log_e() >= log_threshold {
                return Some(seen);
            }
        }
        None
    }

    #[test]
    fn equal_arms_raise_false_alarms_at_most_alpha_when_checked_after_every_block() {
        let mut rng = StdRng::seed_from_u64(7);
        let alpha: f64 = 0.05;
        let threshold = (1.0 / alpha).ln();
        let runs = 1000;
        let alarms = (0..runs).filter(|_| run_rate(&mut rng, 0.1, 1.0, 20_000, 100, threshold).is_some()).count();
        eprintln!(
            "rate guard, equal arms, 10% canary, 20,000 users checked every 100: {alarms} alarms in {runs} rollouts"
        );
        assert!(alarms as f64 <= alpha * runs as f64, "{alarms} false alarms in {runs}");
    }

    /// Runs an excess-rate guard over `n` observations bad with probability `p`, against bound `p0`;
    /// returns the observations seen when it fired, if it did.
    fn run_excess(rng: &mut StdRng, p0: f64, p: f64, n: usize, log_threshold: f64) -> Option<usize> {
        let mut guard = ExcessRateGuard::new(p0);
        (1..=n).find(|i| {
            guard.observe(i % 2, rng.random::<f64>() < p);
            guard.log_e() >= log_threshold
        })
    }

    #[test]
    fn a_disagreement_rate_at_its_bound_raises_false_alarms_at_most_alpha_and_one_above_it_is_caught() {
        let mut rng = StdRng::seed_from_u64(23);
        let alpha: f64 = 0.05;
        let threshold = (1.0 / alpha).ln();
        let runs = 1000;
        for (p0, p) in [(0.05, 0.05), (0.2, 0.2), (0.05, 0.02)] {
            let alarms = (0..runs).filter(|_| run_excess(&mut rng, p0, p, 10_000, threshold).is_some()).count();
            eprintln!(
                "excess-rate guard, bound {p0}, rate {p}, checked after each of 10,000: {alarms} alarms in {runs}"
            );
            assert!(alarms as f64 <= alpha * runs as f64, "bound {p0}, rate {p}: {alarms} false alarms in {runs}");
        }
        // As a plan of 5 steps with 5 guards judges it: a candidate disagreeing on 10% against a 5% bound.
        let threshold = Budget { alpha: 0.05, guards: 5, steps: 5, candidates: 1 }.log_threshold();
        let mut needed: Vec<usize> =
            (0..200).map(|_| run_excess(&mut rng, 0.05, 0.10, 100_000, threshold).expect("caught")).collect();
        needed.sort_unstable();
        let (median, p90) = (needed[needed.len() / 2], needed[needed.len() * 9 / 10]);
        eprintln!(
            "excess-rate guard, 10% against a 5% bound: caught after {median} pairs (median), {p90} (90th percentile)"
        );
        assert!(p90 < 5_000, "{median} / {p90}");
    }

    #[test]
    fn a_doubled_error_rate_is_caught() {
        let mut rng = StdRng::seed_from_u64(11);
        let threshold = Budget { alpha: 0.05, guards: 4, steps: 5, candidates: 1 }.log_threshold();
        let mut needed: Vec<usize> =
            (0..200).filter_map(|_| run_rate(&mut rng, 0.1, 2.0, 400_000, 100, threshold)).collect();
        assert!(needed.len() >= 190, "fired in {} of 200 rollouts", needed.len());
        needed.sort_unstable();
        let median = needed[needed.len() / 2];
        eprintln!(
            "rate guard, 1% -> 2% at a 10% canary, alpha 0.05/20: fired in {} of 200, median {median} users (both arms)",
            needed.len()
        );
        assert!(median < 200_000);
    }

    /// The demo's second plan: steps at 1%, 10% and 50% that pass once 20 users per arm are scored (about
    /// 2,000, 300 and 170 users arrive by then at 200 requests/s), a fresh e-process per step in chunks of
    /// 20 users, α 0.05 over 4 guards × 3 steps; control fails 1% of users. Returns in how many of `runs`
    /// rollouts the error guard fires in some step.
    fn demo_plan_catches(rng: &mut StdRng, candidate_rate: f64, runs: usize) -> usize {
        use crate::rollout::evidence::CHUNK;
        let threshold = Budget { alpha: 0.05, guards: 4, steps: 3, candidates: 1 }.log_threshold();
        let caught = |rng: &mut StdRng| {
            [(0.01, 2000), (0.1, 300), (0.5, 170)].into_iter().any(|(share, users)| {
                let mut guard = RateGuard::default();
                (0..users / CHUNK).any(|_| {
                    let (mut a, mut b) = (Block::default(), Block::default());
                    for _ in 0..CHUNK {
                        let (arm, rate) =
                            if rng.random::<f64>() < share { (&mut b, candidate_rate) } else { (&mut a, 0.01) };
                        arm.n += 1;
                        arm.bad += u64::from(rng.random::<f64>() < rate);
                    }
                    guard.observe(a, b);
                    guard.log_e() >= threshold
                })
            })
        };
        (0..runs).filter(|_| caught(rng)).count()
    }

    #[test]
    fn the_demo_catches_its_broken_candidate() {
        let mut rng = StdRng::seed_from_u64(19);
        let at_30 = demo_plan_catches(&mut rng, 0.3, 2000);
        let at_20 = demo_plan_catches(&mut rng, 0.2, 2000);
        eprintln!("demo plan, candidate failing 30%: caught in {at_30} of 2000; failing 20%: {at_20} of 2000");
        assert!(at_30 >= 1990, "{at_30} of 2000");
    }

    #[test]
    fn a_better_candidate_fires_even_less() {
        let mut rng = StdRng::seed_from_u64(13);
        let alarms = (0..300).filter(|_| run_rate(&mut rng, 0.1, 0.5, 20_000, 100, (20.0f64).ln()).is_some()).count();
        assert!(alarms <= 5, "{alarms}");
    }

    #[test]
    fn sample_ratio_holds_alpha_and_catches_a_skewed_split() {
        let mut rng = StdRng::seed_from_u64(17);
        let threshold = (20.0f64).ln();
        let mut alarms = 0;
        for _ in 0..500 {
            let mut guard = SampleRatioGuard::new(0.1, 100.0);
            for _ in 0..200 {
                let b = (0..100).filter(|_| rng.random::<f64>() < 0.1).count() as u64;
                guard.observe(100 - b, b);
                if guard.log_e() >= threshold {
                    alarms += 1;
                    break;
                }
            }
        }
        assert!(alarms <= 25, "{alarms} false alarms in 500");
        let mut skewed = SampleRatioGuard::new(0.1, 100.0);
        let mut fired_at = None;
        for block in 1..=200 {
            let b = (0..100).filter(|_| rng.random::<f64>() < 0.12).count() as u64;
            skewed.observe(100 - b, b);
            if skewed.log_e() >= threshold {
                fired_at = Some(block * 100);
                break;
            }
        }
        assert!(fired_at.is_some(), "12% observed against 10% configured goes unnoticed in 20,000 users");
    }

    /// Labelled decisions at a 10% canary, checked every 100 labels: returns the number of labels when
    /// the mean guard fired (0/1 loss: wrong answer), if it did.
    fn run_mean(
        rng: &mut StdRng,
        control_accuracy: f64,
        candidate_accuracy: f64,
        labels: usize,
        alpha: f64,
    ) -> Option<usize> {
        let mut guard = MeanGuard::new(0.0, 0.02);
        for i in 1..=labels {
            let candidate = rng.random::<f64>() < 0.1;
            let accuracy = if candidate { candidate_accuracy } else { control_accuracy };
            guard.observe(usize::from(candidate), f64::from(u8::from(rng.random::<f64>() >= accuracy)));
            if i % 100 == 0 && guard.log_e() >= (1.0 / alpha).ln() {
                return Some(i);
            }
        }
        None
    }

    #[test]
    fn the_mean_guard_holds_alpha_under_equal_models() {
        let mut rng = StdRng::seed_from_u64(31);
        let runs = 1000;
        let alarms = (0..runs).filter(|_| run_mean(&mut rng, 0.9, 0.9, 20_000, 0.05).is_some()).count();
        eprintln!(
            "mean guard, equal models (90% accurate), 10% canary, 20,000 labels checked every 100: {alarms} alarms in {runs}"
        );
        assert!(alarms as f64 <= 0.05 * runs as f64, "{alarms} false alarms in {runs}");
    }

    #[test]
    fn the_mean_guard_catches_90_to_85_percent_accuracy_within_20000_labels() {
        let mut rng = StdRng::seed_from_u64(37);
        let runs = 500;
        let mut needed: Vec<usize> = (0..runs).filter_map(|_| run_mean(&mut rng, 0.9, 0.85, 20_000, 0.05)).collect();
        needed.sort_unstable();
        let median = needed.get(needed.len() / 2).copied().unwrap_or(0);
        eprintln!(
            "mean guard, 90% -> 85% accuracy at a 10% canary, alpha 0.05: fired within 20,000 labels in {} of {runs}; median {median} labels",
            needed.len()
        );
        assert!(needed.len() as f64 >= 0.95 * runs as f64, "fired in {} of {runs}", needed.len());
    }

    /// Labelled requests both models answered, checked every 100 pairs: returns the pairs seen when the
    /// paired guard fired, if it did. The models share what makes a request hard: with probability
    /// `shared` both draw the same uniform number, else independent ones; wrong = draw ≥ accuracy.
    fn run_paired(rng: &mut StdRng, old_accuracy: f64, new_accuracy: f64, shared: f64, pairs: usize) -> Option<usize> {
        let mut guard = PairedGuard::new(0.0, 0.02);
        for i in 1..=pairs {
            let u = rng.random::<f64>();
            let v = if rng.random::<f64>() < shared { u } else { rng.random::<f64>() };
            guard.observe(f64::from(u8::from(u >= old_accuracy)), f64::from(u8::from(v >= new_accuracy)));
            if i % 100 == 0 && guard.log_e() >= (1.0f64 / 0.05).ln() {
                return Some(i);
            }
        }
        None
    }

    #[test]
    fn the_paired_guard_holds_alpha_and_needs_far_fewer_labels_than_two_arms() {
        let mut rng = StdRng::seed_from_u64(43);
        let runs = 1000;
        let alarms = (0..runs).filter(|_| run_paired(&mut rng, 0.9, 0.9, 0.5, 20_000).is_some()).count();
        eprintln!("paired guard, equal models (90%), 20,000 pairs checked every 100: {alarms} alarms in {runs}");
        assert!(alarms as f64 <= 0.05 * runs as f64, "{alarms} false alarms in {runs}");

        let runs = 500;
        let mut needed: Vec<usize> = (0..runs).filter_map(|_| run_paired(&mut rng, 0.9, 0.85, 0.5, 20_000)).collect();
        needed.sort_unstable();
        let median = needed.get(needed.len() / 2).copied().unwrap_or(usize::MAX);
        eprintln!(
            "paired guard, 90% -> 85% accuracy, alpha 0.05: fired within 20,000 pairs in {} of {runs}; median {median} pairs",
            needed.len()
        );
        assert!(needed.len() as f64 >= 0.95 * runs as f64, "fired in {} of {runs}", needed.len());
        // Two independent arms at a 10% canary need a median of ~5,800 labels for the same drop (see the
        // mean guard's test); the pairs need a fraction of that.
        assert!(median <= 2_000, "median {median} pairs");
    }

    #[test]
    fn the_confidence_sequence_covers_the_difference() {
        let mut rng = StdRng::seed_from_u64(41);
        let mut misses = 0;
        for _ in 0..300 {
            let mut guard = MeanGuard::new(0.0, 0.02);
            let mut missed = false;
            for i in 1..=5_000 {
                let candidate = i % 2 == 0;
                let accuracy = if candidate { 0.8 } else { 0.9 };
                guard.observe(usize::from(candidate), f64::from(u8::from(rng.random::<f64>() >= accuracy)));
                if i % 100 == 0
                    && let Some((low, high)) = guard.interval(0.05)
                {
                    missed |= !(low..=high).contains(&0.1);
                }
            }
            misses += usize::from(missed);
        }
        assert!(misses <= 15, "the true difference left the 95% sequence in {misses} of 300 runs");
    }

    #[test]
    fn budget_splits_alpha_over_guards_and_steps() {
        let b = Budget { alpha: 0.05, guards: 4, steps: 5, candidates: 1 };
        assert!((b.log_threshold() - 400f64.ln()).abs() < 1e-12);
        // Three candidates over five steps: each may be judged in up to seven (two cuts restart a step).
        let abn = Budget { candidates: 3, ..b };
        assert_eq!(abn.tests(), 4 * 3 * 7);
        assert!((abn.log_threshold() - (84.0f64 / 0.05).ln()).abs() < 1e-12);
        let mut g = RateGuard::default();
        g.observe(Block { n: 0, bad: 0 }, Block { n: 0, bad: 0 });
        assert_eq!(g.log_e(), 0.0, "no data, no evidence");
    }

    /// Positive outcomes (a chargeback: the loss is the label) whose label comes 1 to `max_delay` days
    /// after the decision, negatives by absence at 30 days; users decided evenly over 60 days at a 10%
    /// canary; the mean guard checked every 100 observations at α 0.05. `matured`: each user counts when
    /// its decision matures (the score stage's `maturity_ms`: in decision order); otherwise when its label
    /// is known (positives at arrival, negatives at 30 days). Returns the users observed when it fired.
    fn run_delayed(
        rng: &mut StdRng,
        rates: [f64; 2],
        max_delay_days: [f64; 2],
        users: usize,
        matured: bool,
    ) -> Option<usize> {
        let (maturity, span) = (30.0, 60.0);
        let mut observed: Vec<(f64, usize, f64)> = (0..users)
            .map(|i| {
                let decided = span * i as f64 / users as f64;
                let arm = usize::from(rng.random::<f64>() < 0.1);
                let positive = rng.random::<f64>() < rates[arm];
                let known =
                    if positive { decided + rng.random_range(1.0..max_delay_days[arm]) } else { decided + maturity };
                (if matured { decided + maturity } else { known }, arm, f64::from(u8::from(positive)))
            })
            .collect();
        observed.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut guard = MeanGuard::new(0.0, 0.02);
        for (i, (_, arm, loss)) in observed.into_iter().enumerate() {
            guard.observe(arm, loss);
            if (i + 1) % 100 == 0 && guard.log_e() >= (1.0f64 / 0.05).ln() {
                return Some(i + 1);
            }
        }
        None
    }

    /// Label delays that depend on the label and on the arm (the candidate's chargebacks come within 10
    /// days, control's within 30; equally often): judged as labels arrive, the candidate looks worse
    /// early on and the guard fires far more often than α; judged on matured users, it holds α.
    #[test]
    fn judged_on_matured_users_the_quality_guard_holds_alpha_when_label_delays_depend_on_the_label() {
        let mut rng = StdRng::seed_from_u64(53);
        let runs = 400;
        let mut alarms = [0, 0];
        for matured in [true, false] {
            for _ in 0..runs {
                if run_delayed(&mut rng, [0.1, 0.1], [30.0, 10.0], 20_000, matured).is_some() {
                    alarms[usize::from(matured)] += 1;
                }
            }
        }
        let [arrival, matured] = alarms;
        eprintln!(
            "equal chargeback rates (10%), candidate's labelled within 10 days, control's within 30, 20,000 users: \
             false alarms judged at arrival {arrival} in {runs}, on matured users {matured} in {runs}"
        );
        assert!(matured as f64 <= 0.05 * runs as f64, "{matured} false alarms in {runs}");
        assert!(arrival as f64 >= 0.2 * runs as f64, "judged at arrival: only {arrival} false alarms in {runs}");
    }

    /// A candidate with 20% more chargebacks (12% against 10%) at a 10% canary, judged on matured users.
    #[test]
    fn judged_on_matured_users_a_candidate_with_20_percent_more_positives_is_caught() {
        let mut rng = StdRng::seed_from_u64(59);
        let runs = 200;
        let users = 200_000;
        let mut needed: Vec<usize> =
            (0..runs).filter_map(|_| run_delayed(&mut rng, [0.10, 0.12], [30.0, 30.0], users, true)).collect();
        needed.sort_unstable();
        let quantile = |q: f64| needed.get(((needed.len() as f64 * q) as usize).min(needed.len().max(1) - 1)).copied();
        eprintln!(
            "10% -> 12% chargebacks at a 10% canary, judged on matured users: caught in {} of {runs} within {users} users; \
             median {:?}, 90th percentile {:?} matured users",
            needed.len(),
            quantile(0.5),
            quantile(0.9)
        );
        assert!(needed.len() as f64 >= 0.9 * runs as f64, "caught in {} of {runs}", needed.len());
    }
}
