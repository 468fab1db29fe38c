//! Losses of one labelled decision, and quality figures from counts that merge: every instance keeps
//! its own counts (and Prometheus counters), and their sums give the same figures as one instance that
//! saw everything. AUC and calibration error come from [`BINS`] score bins (AUC counts pairs within a
//! bin as ties: within 1/BINS-ish of the exact value, tested).

use serde::{Deserialize, Serialize};

use crate::record::quality::{QualitySpec, Task};

/// Score bins of the classification counts.
pub const BINS: usize = 100;
/// Probabilities are clipped to [ε, 1 − ε] for the log-loss.
const EPSILON: f64 = 1e-15;

/// The losses of one labelled binary decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BinaryLosses {
    /// 1 when the answer at the threshold (score ≥ threshold means positive) is wrong.
    pub zero_one: f64,
    pub brier: f64,
    pub log_loss: f64,
}

pub fn binary_losses(score: f64, label: bool, threshold: f64) -> BinaryLosses {
    let y = f64::from(u8::from(label));
    let p = score.clamp(EPSILON, 1.0 - EPSILON);
    BinaryLosses {
        zero_one: f64::from(u8::from((score >= threshold) != label)),
        brier: (score - y) * (score - y),
        log_loss: -(y * p.ln() + (1.0 - y) * (1.0 - p).ln()),
    }
}

/// The losses of one labelled regression decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegressionLosses {
    pub absolute: f64,
    pub squared: f64,
    /// Prediction − label (its mean is the bias).
    pub error: f64,
}

pub fn regression_losses(prediction: f64, label: f64) -> RegressionLosses {
    let error = prediction - label;
    RegressionLosses { absolute: error.abs(), squared: error * error, error }
}

/// Classification counts of one model in one arm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinaryCounts {
    /// Per score bin `[i/BINS, (i+1)/BINS)` (the last bin takes 1.0): labels positive and negative,
    /// and the sum of the scores.
    pub positives: Vec<u64>,
    pub negatives: Vec<u64>,
    pub score_sum: Vec<f64>,
    pub correct: u64,
    pub brier_sum: f64,
    pub log_loss_sum: f64,
}

impl Default for BinaryCounts {
    fn default() -> Self {
        BinaryCounts {
            positives: vec![0; BINS],
            negatives: vec![0; BINS],
            score_sum: vec![0.0; BINS],
            correct: 0,
            brier_sum: 0.0,
            log_loss_sum: 0.0,
        }
    }
}

/// The bin of a score in [0, 1].
pub fn bin(score: f64) -> usize {
    ((score * BINS as f64) as usize).min(BINS - 1)
}

impl BinaryCounts {
    pub fn add(&mut self, score: f64, label: bool, threshold: f64) {
        let b = bin(score);
        if label {
            self.positives[b] += 1;
        } else {
            self.negatives[b] += 1;
        }
        self.score_sum[b] += score;
        let losses = binary_losses(score, label, threshold);
        self.correct += u64::from(losses.zero_one == 0.0);
        self.brier_sum += losses.brier;
        self.log_loss_sum += losses.log_loss;
    }

    pub fn merge(&mut self, other: &BinaryCounts) {
        for b in 0..BINS {
            self.positives[b] += other.positives[b];
            self.negatives[b] += other.negatives[b];
            self.score_sum[b] += other.score_sum[b];
        }
        self.correct += other.correct;
        self.brier_sum += other.brier_sum;
        self.log_loss_sum += other.log_loss_sum;
    }

    pub fn n(&self) -> u64 {
        self.positives.iter().sum::<u64>() + self.negatives.iter().sum::<u64>()
    }

    fn mean(&self, sum: f64) -> Option<f64> {
        let n = self.n();
        (n > 0).then(|| sum / n as f64)
    }

    pub fn accuracy(&self) -> Option<f64> {
        self.mean(self.correct as f64)
    }

    pub fn brier(&self) -> Option<f64> {
        self.mean(self.brier_sum)
    }

    pub fn log_loss(&self) -> Option<f64> {
        self.mean(self.log_loss_sum)
    }

    /// Area under the ROC curve: the chance that a positive scores above a negative (pairs in the same
    /// bin count half). None without both classes.
    pub fn auc(&self) -> Option<f64> {
        let (p, n): (u64, u64) = (self.positives.iter().sum(), self.negatives.iter().sum());
        if p == 0 || n == 0 {
            return None;
        }
        let mut below = 0u64;
        let mut wins = 0.0;
        for b in 0..BINS {
            wins += self.positives[b] as f64 * (below as f64 + 0.5 * self.negatives[b] as f64);
            below += self.negatives[b];
        }
        Some(wins / (p as f64 * n as f64))
    }

    /// Expected calibration error: the share-weighted gap between mean score and positive rate per bin.
    pub fn calibration_error(&self) -> Option<f64> {
        let n = self.n();
        if n == 0 {
            return None;
        }
        let mut total = 0.0;
        for b in 0..BINS {
            let in_bin = self.positives[b] + self.negatives[b];
            if in_bin > 0 {
                let gap = self.score_sum[b] / in_bin as f64 - self.positives[b] as f64 / in_bin as f64;
                total += in_bin as f64 / n as f64 * gap.abs();
            }
        }
        Some(total)
    }
}

/// Regression counts of one model in one arm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RegressionCounts {
    pub n: u64,
    pub absolute_sum: f64,
    pub squared_sum: f64,
    pub error_sum: f64,
}

impl RegressionCounts {
    pub fn add(&mut self, prediction: f64, label: f64) {
        let l = regression_losses(prediction, label);
        self.n += 1;
        self.absolute_sum += l.absolute;
        self.squared_sum += l.squared;
        self.error_sum += l.error;
    }

    pub fn merge(&mut self, other: &RegressionCounts) {
        self.n += other.n;
        self.absolute_sum += other.absolute_sum;
        self.squared_sum += other.squared_sum;
        self.error_sum += other.error_sum;
    }

    pub fn mae(&self) -> Option<f64> {
        (self.n > 0).then(|| self.absolute_sum / self.n as f64)
    }

    pub fn rmse(&self) -> Option<f64> {
        (self.n > 0).then(|| (self.squared_sum / self.n as f64).sqrt())
    }

    pub fn bias(&self) -> Option<f64> {
        (self.n > 0).then(|| self.error_sum / self.n as f64)
    }
}

/// Label delays (label observed − decision) in doubling buckets from 1 s: bucket 0 is ≤ 1 s, bucket
/// k is (2^(k−1), 2^k] s, the last holds everything longer (2^38 s is far beyond any window).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DelayHistogram {
    pub counts: Vec<u64>,
}

const DELAY_BUCKETS: usize = 40;

impl Default for DelayHistogram {
    fn default() -> Self {
        DelayHistogram { counts: vec![0; DELAY_BUCKETS] }
    }
}

impl DelayHistogram {
    /// The upper bound of bucket `k`, in ms.
    pub fn bound_ms(k: usize) -> i64 {
        1000i64 << k.min(DELAY_BUCKETS - 1)
    }

    pub fn add(&mut self, delay_ms: i64) {
        let k = (0..DELAY_BUCKETS).find(|&k| delay_ms <= Self::bound_ms(k)).unwrap_or(DELAY_BUCKETS - 1);
        self.counts[k] += 1;
    }

    pub fn merge(&mut self, other: &DelayHistogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    /// The bucket bound at or below which `q` of the delays are (an upper estimate), in ms.
    pub fn quantile_ms(&self, q: f64) -> Option<i64> {
        let n: u64 = self.counts.iter().sum();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (k, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::bound_ms(k));
            }
        }
        Some(Self::bound_ms(DELAY_BUCKETS - 1))
    }
}

/// One model's quality from its scored outcomes, as `status` and `watch` show it.
#[derive(Debug, Clone, Default)]
pub struct QualityFigures {
    pub binary: BinaryCounts,
    pub regression: RegressionCounts,
    /// Labelled answers without a score (errors, timeouts, outputs that are no score).
    pub unscored: u64,
    pub delays: DelayHistogram,
}

impl QualityFigures {
    pub fn add(&mut self, s: &crate::codec::ScoredOutcome, spec: &QualitySpec) {
        self.delays.add(s.label_delay_ms);
        match (s.score, spec.task) {
            (None, _) => self.unscored += 1,
            (Some(score), Task::BinaryClassification) => self.binary.add(score, s.label == 1.0, spec.threshold),
            (Some(score), Task::Regression) => self.regression.add(score, s.label),
        }
    }

    /// "N scored, accuracy …; K without a score; label delay …".
    pub fn describe(&self, task: Task) -> String {
        let show = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
        let figures = match task {
            Task::BinaryClassification => format!(
                "{} scored, accuracy {}, Brier {}, log-loss {}, AUC {}, calibration error {}",
                self.binary.n(),
                show(self.binary.accuracy()),
                show(self.binary.brier()),
                show(self.binary.log_loss()),
                show(self.binary.auc()),
                show(self.binary.calibration_error())
            ),
            Task::Regression => format!(
                "{} scored, MAE {}, RMSE {}, bias {}",
                self.regression.n,
                show(self.regression.mae()),
                show(self.regression.rmse()),
                show(self.regression.bias())
            ),
        };
        format!(
            "{figures}; {} without a score; label delay p50 <= {} s, p90 <= {} s",
            self.unscored,
            self.delays.quantile_ms(0.5).unwrap_or(0) / 1000,
            self.delays.quantile_ms(0.9).unwrap_or(0) / 1000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Scores of a model that separates the classes somewhat: positives drawn higher.
    fn sample(rng: &mut StdRng, n: usize) -> Vec<(f64, bool)> {
        (0..n)
            .map(|_| {
                let label = rng.random::<f64>() < 0.3;
                let base: f64 = rng.random();
                let score = if label { (base * 0.6 + 0.4).min(1.0) } else { base * 0.7 };
                (score, label)
            })
            .collect()
    }

    fn exact_auc(data: &[(f64, bool)]) -> f64 {
        let pos: Vec<f64> = data.iter().filter(|d| d.1).map(|d| d.0).collect();
        let neg: Vec<f64> = data.iter().filter(|d| !d.1).map(|d| d.0).collect();
        let mut wins = 0.0;
        for p in &pos {
            for n in &neg {
                wins += if p > n {
                    1.0
                } else if p == n {
                    0.5
                } else {
                    0.0
                };
            }
        }
        wins / (pos.len() * neg.len()) as f64
    }

    #[test]
    fn figures_match_direct_computation_and_counts_merge() {
        let mut rng = StdRng::seed_from_u64(43);
        let data = sample(&mut rng, 4000);
        let mut all = BinaryCounts::default();
        let (mut first, mut second) = (BinaryCounts::default(), BinaryCounts::default());
        for (i, &(score, label)) in data.iter().enumerate() {
            all.add(score, label, 0.5);
            if i % 3 == 0 { &mut first } else { &mut second }.add(score, label, 0.5);
        }
        first.merge(&second);
        assert_eq!(first.n(), all.n());
        assert_eq!(first.correct, all.correct);
        assert!((first.brier().unwrap() - all.brier().unwrap()).abs() < 1e-12, "two instances add up to one");
        let n = data.len() as f64;
        let accuracy = data.iter().filter(|(s, l)| (*s >= 0.5) == *l).count() as f64 / n;
        let brier = data.iter().map(|(s, l)| (s - f64::from(u8::from(*l))).powi(2)).sum::<f64>() / n;
        assert!((all.accuracy().unwrap() - accuracy).abs() < 1e-12);
        assert!((all.brier().unwrap() - brier).abs() < 1e-12);
        let auc = exact_auc(&data);
        assert!((all.auc().unwrap() - auc).abs() < 0.01, "binned {} exact {auc}", all.auc().unwrap());
        assert!(all.auc().unwrap() > 0.8);
        assert!(all.log_loss().unwrap() > 0.0);
    }

    #[test]
    fn calibration_error_tells_calibrated_from_overconfident() {
        let mut rng = StdRng::seed_from_u64(47);
        let (mut calibrated, mut overconfident) = (BinaryCounts::default(), BinaryCounts::default());
        for _ in 0..50_000 {
            let p: f64 = rng.random();
            let label = rng.random::<f64>() < p;
            calibrated.add(p, label, 0.5);
            overconfident.add(if p > 0.5 { 1.0 } else { 0.0 }, label, 0.5);
        }
        assert!(calibrated.calibration_error().unwrap() < 0.02, "{:?}", calibrated.calibration_error());
        assert!(overconfident.calibration_error().unwrap() > 0.2, "{:?}", overconfident.calibration_error());
        assert_eq!(BinaryCounts::default().auc(), None, "no labels, no AUC");
    }

    #[test]
    fn losses_of_single_decisions() {
        let sure_right = binary_losses(1.0, true, 0.5);
        assert_eq!((sure_right.zero_one, sure_right.brier), (0.0, 0.0));
        assert!(sure_right.log_loss < 1e-12);
        let sure_wrong = binary_losses(1.0, false, 0.5);
        assert_eq!((sure_wrong.zero_one, sure_wrong.brier), (1.0, 1.0));
        assert!((sure_wrong.log_loss - 34.539).abs() < 0.01, "clipped, not infinite: {}", sure_wrong.log_loss);
        assert_eq!(binary_losses(0.7, true, 0.8).zero_one, 1.0, "the threshold decides");
        let r = regression_losses(3.0, 5.0);
        assert_eq!((r.absolute, r.squared, r.error), (2.0, 4.0, -2.0));
        let mut counts = RegressionCounts::default();
        counts.add(3.0, 5.0);
        counts.add(6.0, 5.0);
        assert_eq!((counts.mae(), counts.bias()), (Some(1.5), Some(-0.5)));
        assert!((counts.rmse().unwrap() - 2.5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn delay_quantiles_come_from_doubling_buckets() {
        let mut h = DelayHistogram::default();
        for ms in [500, 900, 1_500, 3_000, 60_000, 3_600_000] {
            h.add(ms);
        }
        assert_eq!(h.quantile_ms(0.5), Some(2_000));
        assert_eq!(h.quantile_ms(1.0), Some(1000 << 12), "an hour falls in (2^11, 2^12] s");
        let mut other = DelayHistogram::default();
        other.add(100);
        h.merge(&other);
        assert_eq!(h.counts.iter().sum::<u64>(), 7);
    }
}
