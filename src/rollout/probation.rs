//! Probation after a blue/green switch: for a while after the switch, the side switched away from keeps
//! a shadow copy of every request (it stays warm, ready to serve again at once), the score stage scores
//! both sides' answers against the same labels, and a paired quality guard compares them request by
//! request. A regression switches back; at the end of the probation the copies stop. Pure: the
//! controller gives it the scored outcomes and the time, [`judge`] says what to do. The probation as
//! the deployment record carries it is `record::probation`.

use std::collections::{HashMap, HashSet};

use super::guard::{Moments, PairedGuard};
use crate::codec::{Millis, ScoredOutcome};
use crate::record::figures::{Counts, Figures, GuardFigures, round3};
use crate::record::plan::{GuardKind, Loss};
use crate::record::probation::Probation;

/// What the controller does with a probation.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Hold,
    /// The new side is worse: back to the old one.
    SwitchBack(String),
    /// The probation is over: the copies to the old side stop.
    End(String),
}

/// The paired evidence of one probation: each user's first request that both sides answered and that got
/// a label, in the order the pairs complete.
#[derive(Debug, Clone)]
pub struct ProbationEvidence {
    pub version: u64,
    new_model: String,
    old_model: String,
    loss: Loss,
    /// Half of a pair waiting for the other: request id → (old loss, new loss).
    halves: HashMap<String, (Option<f64>, Option<f64>)>,
    users: HashSet<String>,
    guard: PairedGuard,
    log_threshold: f64,
}

impl ProbationEvidence {
    /// Evidence for the probation of `deployment`, if it is on one.
    pub fn new(deployment: &crate::record::Deployment) -> Option<ProbationEvidence> {
        let p = deployment.spec.probation.as_ref()?;
        let q = &p.quality_guard;
        Some(ProbationEvidence {
            version: deployment.version(),
            new_model: deployment.spec.candidate.clone()?,
            old_model: deployment.spec.control.clone(),
            loss: q.loss,
            halves: HashMap::new(),
            users: HashSet::new(),
            guard: PairedGuard::new(q.margin, q.tau),
            log_threshold: (1.0 / p.alpha).ln(),
        })
    }

    /// Adds a scored answer of this probation's version: the new side's serving answer or the old side's
    /// shadow answer. Answers without a score (errors, timeouts) make no pair.
    pub fn add(&mut self, s: &ScoredOutcome) {
        let old = match (s.role.as_str(), s.model.as_str()) {
            ("serving", m) if m == self.new_model => false,
            ("shadow", m) if m == self.old_model => true,
            _ => return,
        };
        if self.users.contains(&s.user_id) {
            return;
        }
        let Some(loss) = self.loss.of(s) else {
            self.halves.remove(&s.request_id);
            return;
        };
        let half = self.halves.entry(s.request_id.clone()).or_default();
        if old {
            half.0 = Some(loss)
        } else {
            half.1 = Some(loss)
        }
        if let (Some(old), Some(new)) = *half {
            self.halves.remove(&s.request_id);
            self.users.insert(s.user_id.clone());
            self.guard.observe(old, new);
        }
    }

    pub fn pairs(&self) -> u64 {
        self.guard.pairs()
    }

    /// The guard's figures: "control" is the old side, "candidate" the new one, as the record names them.
    pub fn figures(&self) -> Figures {
        let (old, new) = self.guard.sides();
        let bad = |m: &Moments| (m.mean * m.n as f64).round() as u64;
        Figures {
            candidate: None,
            step: 1,
            users: (self.pairs(), self.pairs()),
            guards: vec![GuardFigures {
                guard: GuardKind::PairedQuality,
                e_value: round3(self.guard.log_e().exp()),
                threshold: round3(self.log_threshold.exp()),
                control: Counts { n: old.n, bad: bad(&old) },
                candidate: Counts { n: new.n, bad: bad(&new) },
                latency_ms: None,
                mean_loss: Some((round3(old.mean), round3(new.mean))),
            }],
        }
    }

    /// The mean difference of losses (new − old) and its confidence sequence at the probation's α.
    pub fn difference(&self) -> (f64, Option<(f64, f64)>) {
        (self.guard.difference(), self.guard.interval((-self.log_threshold).exp()))
    }
}

/// Judges a probation at `now`.
pub fn judge(probation: &Probation, evidence: &ProbationEvidence, now: Millis) -> Verdict {
    let loss = probation.quality_guard.loss.as_str();
    let log_e = evidence.guard.log_e();
    let (d, interval) = evidence.difference();
    let bounds = interval.map(|(low, high)| format!(" [{low:+.4}, {high:+.4}]")).unwrap_or_default();
    if log_e >= evidence.log_threshold {
        return Verdict::SwitchBack(format!(
            "{} answers {loss} {d:+.4}{bounds} worse than {} on {} labelled requests both answered (e-value {:.1} ≥ {:.1})",
            evidence.new_model,
            evidence.old_model,
            evidence.pairs(),
            log_e.exp(),
            evidence.log_threshold.exp()
        ));
    }
    if now >= probation.ends_at() {
        return Verdict::End(format!(
            "probation over after {} s: {} labelled requests both answered, {} − {} {loss} {d:+.4}{bounds}",
            probation.duration_ms / 1000,
            evidence.pairs(),
            evidence.new_model,
            evidence.old_model,
        ));
    }
    Verdict::Hold
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::DeploymentSpec;

    fn deployment() -> crate::record::Deployment {
        DeploymentSpec::from_json(
            br#"{"version":9,"strategy":"blue_green","control":"old","candidate":"new","active":"candidate",
                "quality":{},"probation":{"started_at":1000,"duration_ms":60000}}"#,
        )
        .unwrap()
        .validate("churn")
        .unwrap()
    }

    pub(crate) fn scored(request: usize, model: &str, role: &str, wrong: bool) -> ScoredOutcome {
        ScoredOutcome {
            request_id: format!("r{request}"),
            user_id: format!("u{}", request / 2),
            deployment: "churn".into(),
            model: model.into(),
            role: role.into(),
            cohort: "candidate".into(),
            config_version: 9,
            status: "OK".into(),
            score: Some(0.5),
            label: 1.0,
            zero_one: Some(f64::from(u8::from(wrong))),
            brier: None,
            log_loss: None,
            absolute_error: None,
            squared_error: None,
            label_delay_ms: 1,
            decided_at: 2_000,
            observed_at: 2_001,
            source: "t".into(),
        }
    }

    #[test]
    fn pairs_are_each_users_first_request_both_sides_answered() {
        let d = deployment();
        let mut e = ProbationEvidence::new(&d).unwrap();
        e.add(&scored(0, "new", "serving", true));
        assert_eq!(e.pairs(), 0, "half a pair");
        e.add(&scored(0, "old", "shadow", false));
        assert_eq!(e.pairs(), 1);
        e.add(&scored(1, "new", "serving", true)); // u0 again: left out
        e.add(&scored(1, "old", "shadow", true));
        e.add(&scored(2, "old", "serving", true)); // not this probation's roles
        e.add(&scored(2, "new", "shadow", true));
        assert_eq!(e.pairs(), 1);
        let figures = e.figures();
        assert_eq!(figures.guards[0].mean_loss, Some((0.0, 1.0)));
    }

    #[test]
    fn a_worse_new_side_switches_back_and_a_fine_one_ends_the_probation() {
        let d = deployment();
        let p = d.spec.probation.clone().unwrap();
        let mut worse = ProbationEvidence::new(&d).unwrap();
        let mut fine = ProbationEvidence::new(&d).unwrap();
        for i in 0..1_000 {
            let r = 2 * i; // one request per user
            worse.add(&scored(r, "old", "shadow", i % 10 == 0));
            worse.add(&scored(r, "new", "serving", i % 10 == 0 || i % 10 == 5 || i % 10 == 7));
            fine.add(&scored(r, "old", "shadow", i % 10 == 0));
            fine.add(&scored(r, "new", "serving", i % 10 == 0));
        }
        assert!(matches!(judge(&p, &worse, 2_000), Verdict::SwitchBack(ref r) if r.contains("1000 labelled requests")));
        assert_eq!(judge(&p, &fine, 2_000), Verdict::Hold);
        assert!(matches!(judge(&p, &fine, p.ends_at()), Verdict::End(_)));
    }
}
