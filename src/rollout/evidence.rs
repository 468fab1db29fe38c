//! The evidence of one plan step: decisions turned into the guards' e-processes. Pure and deterministic
//! — the same decisions give the same statistics — so a controller that restarts, or `status` on an
//! operator's machine, rebuilds it by reading the step's decisions again, without double counting.
//!
//! Rules (see `guard` for why):
//! - a step's evidence is the decisions stamped with the config version that started it;
//! - users, not requests: each user's first decision in the step, in routing order, is its one
//!   observation; users pinned by an override are left out (they were not randomised);
//! - routing order: decisions are grouped in blocks by when their request was sent
//!   (`decided_at − latency_ms`), and a block is scored once every decision in it is in — the pipeline
//!   has settled (see `settle`: every request produced before then is routed, decided and read) past
//!   its end plus a grace period for clients that send late. A decision that arrives for a block
//!   already scored (its request was produced more than the grace period after its `sent_at`) is
//!   counted as late and left out;
//! - the latency guard's threshold is the plan's, or control's p99 among the step's first
//!   [`BURN_IN`] control users answered OK; the guard scores only blocks after it is fixed, and the
//!   controller writes it into the plan when the step passes, so that later steps start with it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use super::bandit::Counts as Tally;
use super::guard::{Block, ExcessRateGuard, MeanGuard, RateGuard, SampleRatioGuard};
use super::plan::Reading;
use crate::codec::{Decision, DecisionStatus, Millis, ScoredOutcome, ShadowComparison};
use crate::record::Side;
use crate::record::figures::{Counts, Figures, GuardFigures, round3};
use crate::record::plan::{GuardKind, Loss};

/// Width of a block of routing time.
pub const BLOCK_MS: i64 = 1_000;
/// How long after a request's `sent_at` it may reach the requests topic and still count in its block:
/// a block is scored once the pipeline has settled this long past its end.
pub const GRACE_MS: i64 = 3_000;
/// Control users whose latencies fix a step's latency threshold when the plan gives none.
pub const BURN_IN: usize = 200;
/// Users per factor of the e-processes within a block of time (in routing order).
pub const CHUNK: usize = 20;
/// Prior concentration of the sample-ratio e-process.
pub const SAMPLE_RATIO_CONCENTRATION: f64 = 100.0;

/// One decision, as the evidence needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub request_id: String,
    pub user: String,
    pub arm: Side,
    /// A/B/n: the candidate that served (the arm is `Candidate`).
    pub candidate: Option<String>,
    pub status: DecisionStatus,
    pub latency_ms: i64,
    /// When the request was sent: routing order.
    pub sent_at: Millis,
}

impl Observation {
    /// An error for the error-rate guard: the arm's model answered with an error, or a hedged canary
    /// served control's answer because the candidate erred or missed the deadline.
    fn failed(&self) -> bool {
        matches!(self.status, DecisionStatus::ModelError | DecisionStatus::Hedged)
    }

    /// The observation a decision makes for the deployment's plan, if it makes one.
    pub fn of(decision: &Decision) -> Option<Observation> {
        let (arm, candidate) = arm_of(&decision.cohort)?;
        Some(Observation {
            request_id: decision.request_id.clone(),
            user: decision.user_id.clone(),
            arm,
            candidate: candidate.map(str::to_string),
            status: decision.status,
            latency_ms: decision.latency_ms,
            sent_at: decision.decided_at - decision.latency_ms,
        })
    }
}

/// The arm a decision's cohort names — `control`, `candidate`, or an A/B/n `candidate:<model>` — with the
/// A/B/n candidate; None for a cohort routed by an attribute rule (`<side>:rule:<attribute>`: not
/// randomised).
pub fn arm_of(cohort: &str) -> Option<(Side, Option<&str>)> {
    match cohort.split_once(':') {
        None if cohort == "control" => Some((Side::Control, None)),
        None if cohort == "candidate" => Some((Side::Candidate, None)),
        Some(("candidate", model)) if crate::record::deployment::is_valid_name(model) => {
            Some((Side::Candidate, Some(model)))
        }
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct ArmBlock {
    n: u64,
    errors: u64,
    timeouts: u64,
    slow: u64,
}

/// Per arm: users, errors, timeouts, slow answers, and latency sum (for the mean).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ArmSummary {
    pub users: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub latency_sum_ms: i64,
}

impl ArmSummary {
    pub fn mean_latency_ms(&self) -> f64 {
        self.latency_sum_ms as f64 / self.users.max(1) as f64
    }
}

/// The evidence of one step of one deployment's plan.
#[derive(Debug, Clone)]
pub struct StepEvidence {
    /// The version that started the step; a bandit's later versions continue it (`adaptive`).
    pub version: u64,
    /// A/B/n: the candidate judged against control; the other candidates' users are left out.
    pub judged: Option<String>,
    adaptive: bool,
    started_at: Millis,
    guards: Vec<GuardKind>,
    log_threshold: f64,
    /// Users overridden to a side: not randomised, left out.
    excluded: HashSet<String>,
    latency_threshold: Option<i64>,
    burn_in: Vec<i64>,
    /// Blocks not scored yet, by index.
    open: BTreeMap<i64, Vec<Observation>>,
    /// Blocks below this index are scored.
    scored_below: i64,
    seen: HashSet<String>,
    error: RateGuard,
    timeout: RateGuard,
    latency: RateGuard,
    ratio: SampleRatioGuard,
    /// The quality guard: its loss, the test, and the users whose first labelled answer it took.
    quality_loss: Loss,
    quality_margin: f64,
    quality: MeanGuard,
    quality_seen: HashSet<String>,
    /// The coverage guard: scored blocks' first requests (block, request id, arm) waiting for their
    /// labels, the requests whose serving answer was scored, and the wait.
    coverage_pending: VecDeque<(i64, String, usize)>,
    covered: HashSet<String>,
    coverage_wait_ms: i64,
    coverage: RateGuard,
    /// The disagreement guard: the deployment's (control, candidate) models, the shadow comparisons of
    /// pairs of them read so far (request id -> compared at, agreed) waiting for their request's block,
    /// and the test.
    pair_models: (String, String),
    comparisons: HashMap<String, (Millis, bool)>,
    disagreement: ExcessRateGuard,
    arms: [ArmSummary; 2],
    late: u64,
}

impl StepEvidence {
    /// Evidence for the step the plan of `deployment` is in (its version started it). A/B/n: that of
    /// its first candidate (the controller keeps a [`PlanEvidence`]: all of them).
    #[cfg(test)]
    pub fn new(deployment: &crate::record::Deployment) -> Option<StepEvidence> {
        Self::judging(deployment, (!deployment.arms.is_empty()).then_some(0))
    }

    /// The step's evidence on control and one candidate: the A/B/n candidate of index `arm`, or the
    /// candidate of a two-arm deployment. The sample-ratio guard expects the two arms' users in the
    /// ratio of their shares.
    fn judging(deployment: &crate::record::Deployment, arm: Option<usize>) -> Option<StepEvidence> {
        let plan = deployment.spec.plan.as_ref()?;
        let buckets = |n: u16| f64::from(n) / 10_000.0;
        let (share, judged) = match arm {
            None => (buckets(deployment.canary_threshold), None),
            Some(i) => {
                let own = deployment.arms[i].iter().map(|[start, end]| end - start).sum::<u16>();
                let control = 10_000 - deployment.canary_threshold;
                (f64::from(own) / f64::from(own + control).max(1.0), Some(deployment.spec.candidates[i].model.clone()))
            }
        };
        let candidate = judged.clone().or(deployment.spec.candidate.clone()).unwrap_or_default();
        let quality = plan.quality_guard.clone().unwrap_or_default();
        Some(StepEvidence {
            version: plan.evidence_from(deployment.version()),
            judged,
            adaptive: plan.bandit.is_some(),
            started_at: plan.step_started_at,
            guards: plan.guards.clone(),
            log_threshold: plan.budget().log_threshold(),
            excluded: deployment.spec.overrides.keys().cloned().collect(),
            latency_threshold: plan.latency_threshold_ms.map(|ms| ms as i64),
            burn_in: Vec::new(),
            open: BTreeMap::new(),
            scored_below: 0,
            seen: HashSet::new(),
            error: RateGuard::default(),
            timeout: RateGuard::default(),
            latency: RateGuard::default(),
            ratio: SampleRatioGuard::new(share, SAMPLE_RATIO_CONCENTRATION),
            quality_loss: quality.loss,
            quality_margin: quality.margin,
            quality: MeanGuard::new(quality.margin, quality.tau),
            quality_seen: HashSet::new(),
            coverage_pending: VecDeque::new(),
            covered: HashSet::new(),
            coverage_wait_ms: quality.coverage_wait_ms as i64,
            coverage: RateGuard::default(),
            pair_models: (deployment.spec.control.clone(), candidate),
            comparisons: HashMap::new(),
            disagreement: ExcessRateGuard::new(plan.disagreement_guard.clone().unwrap_or_default().max_rate),
            arms: [ArmSummary::default(); 2],
            late: 0,
        })
    }

    /// Whether this is the evidence of the step `deployment` is in.
    pub fn covers(&self, deployment: &crate::record::Deployment) -> bool {
        deployment.spec.plan.as_ref().is_some_and(|p| p.evidence_from(deployment.version()) == self.version)
            && (deployment.version() == self.version || self.adaptive)
    }

    /// Whether a record made under `version` belongs to this step.
    pub fn accepts(&self, version: u64) -> bool {
        version == self.version || (self.adaptive && version > self.version)
    }

    /// Per arm (control, candidate), good and bad outcomes of the users scored so far, as a bandit's
    /// `reward` counts them.
    pub fn bandit_counts(&self, reward: crate::record::plan::BanditReward) -> (Tally, Tally) {
        use crate::record::plan::BanditReward;
        match reward {
            BanditReward::Errors => {
                let counts = |a: &ArmSummary| {
                    let bad = a.errors + a.timeouts;
                    Tally { good: a.users.saturating_sub(bad), bad }
                };
                (counts(&self.arms[0]), counts(&self.arms[1]))
            }
            BanditReward::Quality => {
                let (a, b) = self.quality.arms();
                let counts = |m: &super::guard::Moments| {
                    let bad = (m.mean.clamp(0.0, 1.0) * m.n as f64).round() as u64;
                    Tally { good: m.n - bad.min(m.n), bad: bad.min(m.n) }
                };
                (counts(&a), counts(&b))
            }
        }
    }

    fn block_of(&self, sent_at: Millis) -> i64 {
        ((sent_at - self.started_at).max(0)) / BLOCK_MS
    }

    /// Adds one observation (of this step's version); one for a block already scored is counted late.
    pub fn add(&mut self, observation: Observation) {
        let other_candidate = observation.arm == Side::Candidate && observation.candidate != self.judged;
        if self.excluded.contains(&observation.user) || other_candidate {
            return;
        }
        let block = self.block_of(observation.sent_at);
        if block < self.scored_below {
            self.late += 1;
            return;
        }
        self.open.entry(block).or_default().push(observation);
    }

    /// Adds a scored answer (of this step's version) to the quality guard: the serving answer of a user's
    /// first labelled request in the step, in the order labels arrive (so label delays must not depend
    /// on the label, or the order says something about the outcome). Overrides, attribute rules and
    /// answers without a score (errors, timeouts: see label coverage) are left out. The coverage guard
    /// notes every serving answer with a score.
    pub fn add_scored(&mut self, s: &ScoredOutcome) {
        if s.role != "serving" || self.excluded.contains(&s.user_id) {
            return;
        }
        let arm = match arm_of(&s.cohort) {
            Some((Side::Control, _)) => 0,
            Some((Side::Candidate, candidate)) if candidate == self.judged.as_deref() => 1,
            _ => return,
        };
        let Some(loss) = self.quality_loss.of(s) else { return };
        if self.guards.contains(&GuardKind::Coverage) {
            self.covered.insert(s.request_id.clone());
        }
        if self.quality_seen.insert(s.user_id.clone()) {
            self.quality.observe(arm, loss);
        }
    }

    /// Adds a shadow comparison for the disagreement guard: one between the deployment's control and
    /// candidate (either serving), both of which answered. It counts if its request turns out to be a
    /// user's first in the step (see `score`), and only if it was read by the time that request's block
    /// is scored: a comparison comes by its request's deadline, like the decision, but on another topic.
    /// A pair where either model failed or missed the deadline says nothing about their answers (the
    /// error and timeout guards judge that): an overloaded control must not make the candidate look
    /// different.
    pub fn add_comparison(&mut self, c: &ShadowComparison) {
        let (control, candidate) = &self.pair_models;
        let pair = (&c.serving_model == control && &c.shadow_model == candidate)
            || (&c.serving_model == candidate && &c.shadow_model == control);
        let answered = c.serving_output.is_some() && c.shadow_output.is_some();
        if pair && answered && self.guards.contains(&GuardKind::Disagreement) {
            self.comparisons.insert(c.request_id.clone(), (c.compared_at, c.agreed));
        }
    }

    /// Scores every block whose decisions are all in by `settled`: the time before which every request
    /// produced has been decided and read (see `settle`), less [`GRACE_MS`].
    pub fn score_until(&mut self, settled: Millis) {
        let complete_before = settled - GRACE_MS;
        // Block b covers [start + b·W, start + (b+1)·W): complete when its end is at or before the bound.
        let limit = (complete_before - self.started_at).div_euclid(BLOCK_MS);
        while self.scored_below < limit {
            let block = self.open.remove(&self.scored_below).unwrap_or_default();
            self.score(block);
            self.scored_below += 1;
        }
        // A request is compared after it was sent: comparisons from before the first block not scored
        // (less a margin for the clocks of client and merge) belong to blocks already scored.
        let keep_from = self.started_at + self.scored_below * BLOCK_MS - GRACE_MS;
        self.comparisons.retain(|_, (at, _)| *at >= keep_from);
    }

    fn score(&mut self, mut block: Vec<Observation>) {
        block.sort_by(|a, b| (a.sent_at, &a.request_id).cmp(&(b.sent_at, &b.request_id)));
        let mut first = Vec::new();
        for o in block {
            if self.seen.insert(o.user.clone()) {
                first.push(o);
            }
        }
        // Within a block of time, the e-processes take the users in routing order, CHUNK at a time:
        // each factor's plug-ins come from the chunks before it, so a step whose users all arrive in
        // one block of time still carries evidence.
        for chunk in first.chunks(CHUNK) {
            self.score_chunk(chunk);
        }
        // The disagreement guard: the users' first requests that are shadow pairs, in routing order.
        for o in &first {
            if let Some((_, agreed)) = self.comparisons.remove(&o.request_id) {
                self.disagreement.observe(usize::from(o.arm == Side::Candidate), !agreed);
            }
        }
        if self.guards.contains(&GuardKind::Coverage) {
            let block = self.scored_below;
            let arm = |o: &Observation| usize::from(o.arm == Side::Candidate);
            self.coverage_pending.extend(first.iter().map(|o| (block, o.request_id.clone(), arm(o))));
        }
    }

    /// Scores the coverage guard on the blocks whose labels had their time by `labels_by`: the time up to
    /// which every scored-outcomes partition has been read, less `timeout_ms`, [`GRACE_MS`] and the
    /// guard's wait. A first request with no scored serving answer by then counts as uncovered.
    pub fn score_coverage_until(&mut self, labels_by: Millis, timeout_ms: u64) {
        let complete_before = labels_by - timeout_ms as i64 - GRACE_MS - self.coverage_wait_ms;
        let limit = (complete_before - self.started_at).div_euclid(BLOCK_MS);
        let mut chunk = Vec::new();
        while let Some(&(block, _, _)) = self.coverage_pending.front() {
            if block >= limit {
                break;
            }
            let (_, request_id, arm) = self.coverage_pending.pop_front().expect("peeked");
            chunk.push((arm, !self.covered.remove(&request_id)));
            if chunk.len() == CHUNK || self.coverage_pending.front().is_none_or(|(b, _, _)| *b != block) {
                let mut arms = [Block::default(); 2];
                for (arm, uncovered) in chunk.drain(..) {
                    arms[arm].n += 1;
                    arms[arm].bad += u64::from(uncovered);
                }
                self.coverage.observe(arms[0], arms[1]);
            }
        }
    }

    fn score_chunk(&mut self, chunk: &[Observation]) {
        let mut arms = [ArmBlock::default(); 2];
        for o in chunk {
            let i = usize::from(o.arm == Side::Candidate);
            let a = &mut arms[i];
            a.n += 1;
            a.errors += u64::from(o.failed());
            a.timeouts += u64::from(matches!(o.status, DecisionStatus::Timeout | DecisionStatus::Fallback));
            a.slow += u64::from(self.latency_threshold.is_some_and(|t| o.latency_ms > t));
            let s = &mut self.arms[i];
            s.users += 1;
            s.errors += u64::from(o.failed());
            s.timeouts += u64::from(matches!(o.status, DecisionStatus::Timeout | DecisionStatus::Fallback));
            s.latency_sum_ms += o.latency_ms;
        }
        let pair = |f: fn(&ArmBlock) -> u64| {
            (Block { n: arms[0].n, bad: f(&arms[0]) }, Block { n: arms[1].n, bad: f(&arms[1]) })
        };
        let (a, b) = pair(|a| a.errors);
        self.error.observe(a, b);
        let (a, b) = pair(|a| a.timeouts);
        self.timeout.observe(a, b);
        if self.latency_threshold.is_some() {
            let (a, b) = pair(|a| a.slow);
            self.latency.observe(a, b);
        } else {
            self.burn_in.extend(
                chunk.iter().filter(|o| o.arm == Side::Control && o.status == DecisionStatus::Ok).map(|o| o.latency_ms),
            );
            if self.burn_in.len() >= BURN_IN {
                self.burn_in.sort_unstable();
                // Nearest-rank p99, at least 1 ms.
                let rank = ((self.burn_in.len() as f64) * 0.99).ceil() as usize;
                self.latency_threshold = Some(self.burn_in[rank.saturating_sub(1)].max(1));
                self.burn_in = Vec::new();
            }
        }
        self.ratio.observe(arms[0].n, arms[1].n);
    }

    /// Users observed so far: (control, candidate).
    pub fn users(&self) -> (u64, u64) {
        (self.arms[0].users, self.arms[1].users)
    }

    /// Users every guard of the plan has scored, per arm: the latency guard scores none before its
    /// threshold is fixed. What a step's minimum sample counts — no guard passes a step unheard.
    pub fn scored(&self) -> (u64, u64) {
        self.guards.iter().fold((u64::MAX, u64::MAX), |(a, b), guard| {
            let (ga, gb) = match guard {
                GuardKind::ErrorRate => self.error.samples(),
                GuardKind::TimeoutRate => self.timeout.samples(),
                GuardKind::Latency => self.latency.samples(),
                GuardKind::SampleRatio => self.users(),
                GuardKind::Quality => {
                    let (a, b) = self.quality.arms();
                    (a.n, b.n)
                }
                GuardKind::Coverage => self.coverage.samples(),
                GuardKind::Disagreement => self.disagreement.samples(),
                GuardKind::PairedQuality => (0, 0),
            };
            (a.min(ga), b.min(gb))
        })
    }

    /// The latency guard's threshold, once fixed.
    pub fn latency_threshold(&self) -> Option<i64> {
        self.latency_threshold
    }

    pub fn arms(&self) -> (ArmSummary, ArmSummary) {
        (self.arms[0], self.arms[1])
    }

    /// Decisions that arrived after their block was scored.
    pub fn late(&self) -> u64 {
        self.late
    }

    /// Each guard of the plan with its e-process.
    pub fn readings(&self) -> Vec<Reading> {
        self.guards
            .iter()
            .map(|&guard| Reading { guard, log_e: self.log_e(guard), cleared: self.cleared(guard) })
            .collect()
    }

    /// Whether `guard` lets the step pass. The quality guard: once the upper end of its confidence
    /// sequence (at its share of α) is below its margin — the candidate is shown no worse than that.
    fn cleared(&self, guard: GuardKind) -> bool {
        match guard {
            GuardKind::Quality => {
                self.quality.interval((-self.log_threshold).exp()).is_some_and(|(_, high)| high < self.quality_margin)
            }
            _ => true,
        }
    }

    fn log_e(&self, guard: GuardKind) -> f64 {
        match guard {
            GuardKind::ErrorRate => self.error.log_e(),
            GuardKind::TimeoutRate => self.timeout.log_e(),
            GuardKind::Latency => self.latency.log_e(),
            GuardKind::SampleRatio => self.ratio.log_e(),
            GuardKind::Quality => self.quality.log_e(),
            GuardKind::Coverage => self.coverage.log_e(),
            GuardKind::Disagreement => self.disagreement.log_e(),
            GuardKind::PairedQuality => 0.0,
        }
    }

    /// The figures behind the guards, for the record, `status` and the metrics.
    pub fn figures(&self, step: usize) -> Figures {
        let counts = |g: &RateGuard| {
            let (n, bad) = (g.samples(), g.bad());
            (Counts { n: n.0, bad: bad.0 }, Counts { n: n.1, bad: bad.1 })
        };
        let guards = self
            .guards
            .iter()
            .map(|&guard| {
                let (control, candidate) = match guard {
                    GuardKind::ErrorRate => counts(&self.error),
                    GuardKind::TimeoutRate => counts(&self.timeout),
                    GuardKind::Latency => counts(&self.latency),
                    GuardKind::Coverage => counts(&self.coverage),
                    GuardKind::Disagreement => {
                        let (n, bad) = (self.disagreement.samples(), self.disagreement.bad());
                        (Counts { n: n.0, bad: bad.0 }, Counts { n: n.1, bad: bad.1 })
                    }
                    GuardKind::PairedQuality => Default::default(),
                    GuardKind::SampleRatio => {
                        let (a, b) = self.users();
                        (Counts { n: a, bad: 0 }, Counts { n: b, bad: 0 })
                    }
                    GuardKind::Quality => {
                        let (a, b) = self.quality.arms();
                        let bad = |m: &super::guard::Moments| (m.mean * m.n as f64).round() as u64;
                        (Counts { n: a.n, bad: bad(&a) }, Counts { n: b.n, bad: bad(&b) })
                    }
                };
                GuardFigures {
                    guard,
                    e_value: round3(self.log_e(guard).exp()),
                    threshold: round3(self.log_threshold.exp()),
                    control,
                    candidate,
                    latency_ms: if guard == GuardKind::Latency { self.latency_threshold } else { None },
                    mean_loss: (guard == GuardKind::Quality).then(|| {
                        let (a, b) = self.quality.arms();
                        (round3(a.mean), round3(b.mean))
                    }),
                }
            })
            .collect();
        Figures { candidate: self.judged.clone(), step: step + 1, users: self.users(), guards }
    }
}

/// The evidence of a plan's step: one [`StepEvidence`] for a two-arm canary; for an A/B/n canary one
/// per candidate, each judging it against control (they share control's users, each sees only its own
/// candidate's).
#[derive(Debug, Clone)]
pub struct PlanEvidence {
    pub arms: Vec<StepEvidence>,
}

impl PlanEvidence {
    pub fn new(deployment: &crate::record::Deployment) -> Option<PlanEvidence> {
        let arms = if deployment.arms.is_empty() {
            vec![StepEvidence::judging(deployment, None)?]
        } else {
            (0..deployment.arms.len()).map(|i| StepEvidence::judging(deployment, Some(i))).collect::<Option<_>>()?
        };
        Some(PlanEvidence { arms })
    }

    pub fn covers(&self, deployment: &crate::record::Deployment) -> bool {
        let judged = |e: &StepEvidence| e.judged.clone();
        let candidates: Vec<_> = deployment.spec.candidates.iter().map(|c| Some(c.model.clone())).collect();
        let same_arms = if candidates.is_empty() {
            self.arms.len() == 1 && self.arms[0].judged.is_none()
        } else {
            self.arms.iter().map(judged).collect::<Vec<_>>() == candidates
        };
        same_arms && self.arms.iter().all(|e| e.covers(deployment))
    }

    pub fn accepts(&self, version: u64) -> bool {
        self.arms[0].accepts(version)
    }

    /// A candidate's observation goes to the arm judging that candidate; control's to every arm.
    pub fn add(&mut self, observation: Observation) {
        if observation.arm == Side::Candidate {
            if let Some(e) = self.arms.iter_mut().find(|e| e.judged == observation.candidate) {
                e.add(observation);
            }
        } else if let Some((last, rest)) = self.arms.split_last_mut() {
            for e in rest {
                e.add(observation.clone());
            }
            last.add(observation);
        }
    }

    pub fn add_scored(&mut self, s: &ScoredOutcome) {
        self.arms.iter_mut().for_each(|e| e.add_scored(s));
    }

    pub fn add_comparison(&mut self, c: &ShadowComparison) {
        self.arms.iter_mut().for_each(|e| e.add_comparison(c));
    }

    pub fn score_until(&mut self, settled: Millis) {
        self.arms.iter_mut().for_each(|e| e.score_until(settled));
    }

    pub fn score_coverage_until(&mut self, labels_by: Millis, timeout_ms: u64) {
        self.arms.iter_mut().for_each(|e| e.score_coverage_until(labels_by, timeout_ms));
    }

    /// Decisions that arrived after their block was scored (control's count in every arm: the most).
    pub fn late(&self) -> u64 {
        self.arms.iter().map(StepEvidence::late).max().unwrap_or(0)
    }

    /// Each arm's figures.
    pub fn figures(&self, step: usize) -> Vec<Figures> {
        self.arms.iter().map(|e| e.figures(step)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::DeploymentSpec;

    fn deployment() -> crate::record::Deployment {
        DeploymentSpec::from_json(
            br#"{"version":7,"strategy":"canary","control":"a","candidate":"b","canary_percent":10,
                "overrides":{"vip":"candidate"},
                "plan":{"steps":[{"canary_percent":10,"bake_ms":0,"min_sample":1,"max_ms":60000}],
                        "step_started_at":100000}}"#,
        )
        .unwrap()
        .validate("fraud")
        .unwrap()
    }

    fn obs(user: &str, arm: Side, status: DecisionStatus, latency_ms: i64, sent_at: Millis) -> Observation {
        Observation {
            request_id: format!("{user}-{sent_at}"),
            user: user.into(),
            arm,
            candidate: None,
            status,
            latency_ms,
            sent_at,
        }
    }

    #[test]
    fn a_hedged_decision_is_an_error_of_its_arm() {
        let mut e = StepEvidence::new(&deployment()).unwrap();
        e.add(obs("u1", Side::Candidate, DecisionStatus::Hedged, 500, 100_100));
        e.add(obs("u2", Side::Candidate, DecisionStatus::Ok, 5, 100_200));
        e.add(obs("u3", Side::Control, DecisionStatus::Ok, 5, 100_300));
        e.score_until(100_000 + 1_000 + GRACE_MS);
        let (control, candidate) = e.arms();
        assert_eq!((candidate.users, candidate.errors, candidate.timeouts, control.errors), (2, 1, 0, 0));
        let (control, candidate) = e.bandit_counts(crate::record::plan::BanditReward::Errors);
        assert_eq!((control.good, control.bad, candidate.good, candidate.bad), (1, 0, 1, 1), "hedged is bad");
    }

    #[test]
    fn users_count_once_in_routing_order_and_overrides_not_at_all() {
        let mut e = StepEvidence::new(&deployment()).unwrap();
        // u1's first request (sent first) timed out; its second, sent later but arriving first, was fine.
        e.add(obs("u1", Side::Candidate, DecisionStatus::Ok, 5, 100_500));
        e.add(obs("u1", Side::Candidate, DecisionStatus::Timeout, 1000, 100_100));
        e.add(obs("u2", Side::Control, DecisionStatus::Ok, 5, 100_200));
        e.add(obs("vip", Side::Candidate, DecisionStatus::ModelError, 5, 100_300));
        e.score_until(100_000 + 1_000 + GRACE_MS - 1);
        assert_eq!(e.users(), (0, 0), "the block is not final until the pipeline settled past it and the grace");
        e.score_until(100_000 + 1_000 + GRACE_MS);
        assert_eq!(e.users(), (1, 1), "one observation per user; the override is left out");
        let (_, candidate) = e.arms();
        assert_eq!((candidate.timeouts, candidate.errors), (1, 0), "the user's first request in routing order counts");
        e.add(obs("u3", Side::Control, DecisionStatus::Ok, 5, 100_900));
        assert_eq!(e.late(), 1, "a decision for a scored block is late, not counted");
        assert_eq!(e.users(), (1, 1));
    }

    #[test]
    fn the_disagreement_guard_takes_the_shadow_pair_of_each_users_first_request() {
        let d = DeploymentSpec::from_json(
            br#"{"version":7,"strategy":"canary","control":"a","candidate":"b","canary_percent":50,
                "overrides":{"vip":"candidate"},"mirror":["m"],
                "plan":{"steps":[{"canary_percent":50,"bake_ms":0,"min_sample":1,"max_ms":60000}],
                        "guards":["disagreement"],"disagreement_guard":{"max_rate":0.1},"step_started_at":100000}}"#,
        )
        .unwrap()
        .validate("fraud")
        .unwrap();
        let mut e = StepEvidence::new(&d).unwrap();
        let pair = |o: &Observation, serving: &str, shadow: &str, agreed: bool| ShadowComparison {
            request_id: o.request_id.clone(),
            deployment: "fraud".into(),
            serving_model: serving.into(),
            serving_output: Some(b"0.5".to_vec()),
            shadow_model: shadow.into(),
            shadow_output: Some(if agreed { b"0.5".to_vec() } else { b"0.9".to_vec() }),
            agreed,
            serving_latency_ms: Some(5),
            shadow_latency_ms: 5,
            compared_at: o.sent_at + 5,
        };
        let first = obs("u1", Side::Control, DecisionStatus::Ok, 5, 100_100);
        let second = obs("u1", Side::Control, DecisionStatus::Ok, 5, 100_200);
        let other = obs("u2", Side::Candidate, DecisionStatus::Ok, 5, 100_300);
        let vip = obs("vip", Side::Candidate, DecisionStatus::Ok, 5, 100_400);
        let unpaired = obs("u3", Side::Control, DecisionStatus::Ok, 5, 100_500);
        let timed_out = obs("u4", Side::Control, DecisionStatus::Timeout, 2000, 100_600);
        e.add_comparison(&pair(&second, "a", "b", false)); // not the user's first request
        e.add_comparison(&pair(&first, "a", "b", true));
        e.add_comparison(&pair(&other, "b", "a", false)); // the candidate serving, control the shadow
        e.add_comparison(&pair(&vip, "b", "a", false)); // overridden: not randomised
        e.add_comparison(&pair(&unpaired, "a", "m", false)); // a mirror, not the pair
        e.add_comparison(&ShadowComparison { serving_output: None, ..pair(&timed_out, "a", "b", false) });
        for o in [&first, &second, &other, &vip, &unpaired, &timed_out] {
            e.add(o.clone());
        }
        e.score_until(100_000 + 1_000 + GRACE_MS);
        let figures = e.figures(0);
        let g = &figures.guards[0];
        assert_eq!(
            (g.guard, g.control, g.candidate),
            (GuardKind::Disagreement, Counts { n: 1, bad: 0 }, Counts { n: 1, bad: 1 })
        );
        assert_eq!(e.scored(), (1, 1), "pairs are the guard's sample");
        assert_eq!(e.comparisons.len(), 2, "kept a while: the clocks of client and merge may differ");
        e.score_until(100_000 + 4_000 + GRACE_MS);
        assert!(e.comparisons.is_empty(), "comparisons of scored blocks are dropped: {:?}", e.comparisons);
        // Disagreeing on every pair fires it; agreeing keeps it quiet.
        let mut loud = StepEvidence::new(&d).unwrap();
        let mut quiet = StepEvidence::new(&d).unwrap();
        for i in 0..200 {
            let o = obs(&format!("k{i}"), Side::Control, DecisionStatus::Ok, 5, 101_000 + i);
            loud.add_comparison(&pair(&o, "a", "b", false));
            quiet.add_comparison(&pair(&o, "a", "b", true));
            loud.add(o.clone());
            quiet.add(o);
        }
        loud.score_until(102_000 + GRACE_MS);
        quiet.score_until(102_000 + GRACE_MS);
        let log_threshold = d.spec.plan.as_ref().unwrap().budget().log_threshold();
        assert!(loud.log_e(GuardKind::Disagreement) > log_threshold);
        assert!(quiet.log_e(GuardKind::Disagreement) <= 0.0);
    }

    #[test]
    fn the_quality_guard_takes_each_users_first_labelled_serving_answer() {
        let d = DeploymentSpec::from_json(
            br#"{"version":7,"strategy":"canary","control":"a","candidate":"b","canary_percent":50,
                "plan":{"steps":[{"canary_percent":50,"bake_ms":0,"min_sample":1,"max_ms":60000}],
                        "guards":["quality"],"quality_guard":{"loss":"zero_one"},"step_started_at":100000}}"#,
        )
        .unwrap()
        .validate("fraud")
        .unwrap();
        let mut e = StepEvidence::new(&d).unwrap();
        let scored = |user: &str, cohort: &str, role: &str, wrong: bool| ScoredOutcome {
            request_id: format!("{user}-{cohort}-{role}"),
            user_id: user.into(),
            deployment: "fraud".into(),
            model: "m".into(),
            role: role.into(),
            cohort: cohort.into(),
            config_version: 7,
            status: "OK".into(),
            score: Some(0.9),
            label: 1.0,
            zero_one: Some(f64::from(u8::from(wrong))),
            brier: Some(0.01),
            log_loss: Some(0.1),
            absolute_error: None,
            squared_error: None,
            label_delay_ms: 1,
            decided_at: 100_000,
            observed_at: 100_001,
            source: "t".into(),
        };
        for i in 0..400 {
            // Control is wrong 10% of the time, the candidate 30%.
            e.add_scored(&scored(&format!("c{i}"), "control", "serving", i % 10 == 0));
            e.add_scored(&scored(&format!("k{i}"), "candidate", "serving", i % 10 < 3));
            e.add_scored(&scored(&format!("k{i}"), "candidate", "serving", false)); // the same user again
            e.add_scored(&scored(&format!("s{i}"), "candidate", "shadow", true)); // shadows are not arms
            e.add_scored(&scored(&format!("r{i}"), "candidate:rule:country", "serving", true));
        }
        let figures = e.figures(0);
        let q = &figures.guards[0];
        assert_eq!((q.guard, q.control.n, q.candidate.n), (GuardKind::Quality, 400, 400));
        assert_eq!(q.mean_loss, Some((0.1, 0.3)));
        assert!(q.e_value >= q.threshold, "{q:?}");
        assert_eq!(e.scored(), (400, 400), "the step's sample counts labelled users");
        // A bandit rewarding quality counts the same users: good answers and wrong ones.
        let (control, candidate) = e.bandit_counts(crate::record::plan::BanditReward::Quality);
        assert_eq!((control.good, control.bad, candidate.good, candidate.bad), (360, 40, 280, 120));
    }

    #[test]
    fn the_coverage_guard_counts_first_requests_left_without_a_scored_label_after_the_wait() {
        let d = DeploymentSpec::from_json(
            br#"{"version":7,"strategy":"canary","control":"a","candidate":"b","canary_percent":50,
                "plan":{"steps":[{"canary_percent":50,"bake_ms":0,"min_sample":1,"max_ms":60000}],
                        "guards":["coverage"],"quality_guard":{"coverage_wait_ms":10000},"step_started_at":100000}}"#,
        )
        .unwrap()
        .validate("fraud")
        .unwrap();
        let mut e = StepEvidence::new(&d).unwrap();
        let timeout = 1_000;
        for i in 0..2_000i64 {
            let arm = if i % 2 == 0 { Side::Control } else { Side::Candidate };
            let o = obs(&format!("u{i}"), arm, DecisionStatus::Ok, 5, 100_000 + i * 5);
            // Control's answers all get a label; the candidate's one in two.
            if arm == Side::Control || i % 4 == 1 {
                let mut s = crate::rollout::probation::tests::scored(0, "m", "serving", false);
                (s.request_id, s.user_id, s.cohort) =
                    (o.request_id.clone(), o.user.clone(), format!("{arm:?}").to_lowercase());
                e.add_scored(&s);
            }
            e.add(o);
        }
        let decided_by = 100_000 + 10_000 + timeout + GRACE_MS;
        e.score_until(decided_by - timeout);
        e.score_coverage_until(decided_by, timeout as u64);
        assert_eq!(e.scored(), (0, 0), "labels get their wait before a request counts as uncovered");
        e.score_coverage_until(decided_by + 10_000, timeout as u64);
        let f = e.figures(0);
        let coverage = &f.guards[0];
        assert_eq!((coverage.control, coverage.candidate), (Counts { n: 1000, bad: 0 }, Counts { n: 1000, bad: 500 }));
        assert!(e.readings()[0].log_e > 20.0f64.ln(), "{coverage:?}");
    }

    #[test]
    fn requests_routed_by_a_rule_make_no_observation() {
        let decision = |cohort: &str| Decision {
            request_id: "r".into(),
            user_id: "u".into(),
            deployment: "fraud".into(),
            model: "b".into(),
            strategy: "canary".into(),
            cohort: cohort.into(),
            bucket: 5,
            config_version: 7,
            status: DecisionStatus::Ok,
            output: None,
            error: None,
            latency_ms: 30,
            decided_at: 1_000,
            propensity: None,
        };
        assert_eq!(Observation::of(&decision("candidate")).map(|o| (o.arm, o.sent_at)), Some((Side::Candidate, 970)));
        assert_eq!(Observation::of(&decision("candidate:rule:country")), None, "not randomised: left out");
    }

    #[test]
    fn the_same_decisions_give_the_same_evidence_whatever_their_arrival_order() {
        let d = deployment();
        let mut all = Vec::new();
        for i in 0..3000i64 {
            let arm = if i % 10 == 0 { Side::Candidate } else { Side::Control };
            let status = if i % 37 == 0 { DecisionStatus::ModelError } else { DecisionStatus::Ok };
            all.push(obs(&format!("u{}", i % 900), arm, status, 3 + i % 50, 100_000 + i * 7));
        }
        let mut forward = StepEvidence::new(&d).unwrap();
        let mut shuffled = StepEvidence::new(&d).unwrap();
        for o in &all {
            forward.add(o.clone());
            forward.score_until(o.sent_at);
        }
        forward.score_until(200_000);
        let mut reversed = all.clone();
        reversed.reverse();
        for o in reversed {
            shuffled.add(o);
        }
        shuffled.score_until(200_000);
        assert_eq!(forward.figures(0), shuffled.figures(0));
        assert_eq!(forward.users().0 + forward.users().1, 900);
        let latency = forward.figures(0).guards.into_iter().find(|g| g.guard == GuardKind::Latency).unwrap();
        assert!(latency.latency_ms.is_some(), "control's p99 fixed the threshold after the burn-in");
    }

    #[test]
    fn a_broken_candidate_moves_its_guard() {
        let d = deployment();
        let mut e = StepEvidence::new(&d).unwrap();
        for i in 0..20_000i64 {
            let arm = if i % 10 == 0 { Side::Candidate } else { Side::Control };
            let status =
                if arm == Side::Candidate && i % 50 == 0 { DecisionStatus::ModelError } else { DecisionStatus::Ok };
            e.add(obs(&format!("u{i}"), arm, status, 5, 100_000 + i));
        }
        e.score_until(200_000);
        let readings = e.readings();
        let error = readings.iter().find(|r| r.guard == GuardKind::ErrorRate).unwrap();
        let ratio = readings.iter().find(|r| r.guard == GuardKind::SampleRatio).unwrap();
        assert!(error.log_e > d.spec.plan.as_ref().unwrap().budget().log_threshold(), "{readings:?}");
        assert!(ratio.log_e < 1.0, "an exact 10% split is no evidence against the configured share: {readings:?}");
    }
}

/// The guards end to end through [`StepEvidence`], on simulated traffic with a realistic skew: requests
/// per user follow a Zipf law (a few users send most requests), and users differ in how often they
/// fail (90% at 0.5%, 10% at 5.5%: 1% on average), so one user's requests are correlated. Fixed seeds.
#[cfg(test)]
mod simulation {
    use super::*;
    use crate::record::DeploymentSpec;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    struct Population {
        ids: Vec<String>,
        /// Cumulative Zipf weights, for drawing the user of each request.
        cumulative: Vec<f64>,
        candidate: Vec<bool>,
        risk: Vec<f64>,
    }

    impl Population {
        fn new(rng: &mut StdRng, users: usize, share: f64) -> Population {
            let mut total = 0.0;
            let cumulative = (1..=users)
                .map(|rank| {
                    total += 1.0 / rank as f64;
                    total
                })
                .collect();
            Population {
                ids: (0..users).map(|u| format!("u{u}")).collect(),
                cumulative,
                candidate: (0..users).map(|_| rng.random::<f64>() < share).collect(),
                risk: (0..users).map(|_| if rng.random::<f64>() < 0.9 { 0.005 } else { 0.055 }).collect(),
            }
        }

        /// New arms and risks, as a deployment with another salt would give the same users.
        fn reassign(&mut self, rng: &mut StdRng, share: f64) {
            let users = self.ids.len();
            self.candidate = (0..users).map(|_| rng.random::<f64>() < share).collect();
            self.risk = (0..users).map(|_| if rng.random::<f64>() < 0.9 { 0.005 } else { 0.055 }).collect();
        }

        fn draw(&self, rng: &mut StdRng) -> usize {
            let x = rng.random::<f64>() * self.cumulative[self.cumulative.len() - 1];
            self.cumulative.partition_point(|c| *c < x).min(self.ids.len() - 1)
        }
    }

    fn plan_deployment(steps: usize) -> crate::record::Deployment {
        let step = r#"{"canary_percent":10,"bake_ms":0,"min_sample":1,"max_ms":1}"#;
        let mut percents = (1..steps).map(|i| step.replace("10", &(10 + i).to_string())).collect::<Vec<_>>();
        percents.insert(0, step.to_string());
        DeploymentSpec::from_json(
            format!(
                r#"{{"version":1,"strategy":"canary","control":"a","candidate":"b","canary_percent":10,
                    "plan":{{"steps":[{}],"step_started_at":1}}}}"#,
                percents.join(",")
            )
            .as_bytes(),
        )
        .unwrap()
        .validate("sim")
        .unwrap()
    }

    /// Runs one step at 200 requests/s, scoring and checking the guards after every second (block);
    /// returns the number of requests sent when a guard fired, if one did.
    fn rollout(
        rng: &mut StdRng,
        population: &Population,
        d: &crate::record::Deployment,
        candidate_scale: f64,
        requests: usize,
    ) -> Option<(usize, GuardKind)> {
        let mut e = StepEvidence::new(d).unwrap();
        let log_threshold = d.spec.plan.as_ref().unwrap().budget().log_threshold();
        for i in 0..requests {
            let u = population.draw(rng);
            let candidate = population.candidate[u];
            let p = population.risk[u] * if candidate { candidate_scale } else { 1.0 };
            let status = if rng.random::<f64>() < p {
                DecisionStatus::ModelError
            } else if rng.random::<f64>() < 0.002 {
                DecisionStatus::Timeout
            } else {
                DecisionStatus::Ok
            };
            let latency_ms = 20 + (-(rng.random::<f64>().max(1e-12)).ln() * 15.0) as i64;
            let sent_at = 1 + (i as i64) * 5;
            e.add(Observation {
                request_id: String::new(),
                user: population.ids[u].clone(),
                arm: if candidate { Side::Candidate } else { Side::Control },
                candidate: None,
                status,
                latency_ms,
                sent_at,
            });
            if i % 200 == 199 {
                e.score_until(sent_at + GRACE_MS);
                if let Some(r) = e.readings().into_iter().find(|r| r.log_e >= log_threshold) {
                    return Some((i + 1, r.guard));
                }
            }
        }
        None
    }

    #[test]
    fn equal_arms_with_skewed_users_raise_false_alarms_at_most_alpha() {
        let mut rng = StdRng::seed_from_u64(23);
        let mut population = Population::new(&mut rng, 20_000, 0.1);
        // One step holding the whole budget (alpha 0.05 over its 4 guards): stricter than any plan,
        // whose steps each get a share of it.
        let d = plan_deployment(1);
        let runs = 1000;
        let mut alarms = BTreeMap::new();
        for _ in 0..runs {
            population.reassign(&mut rng, 0.1);
            if let Some((_, guard)) = rollout(&mut rng, &population, &d, 1.0, 10_000) {
                *alarms.entry(guard).or_insert(0) += 1;
            }
        }
        let total: usize = alarms.values().sum();
        eprintln!(
            "A/A, 10% canary, Zipf users, 10,000 requests checked every 200, all four guards at alpha 0.05: \
             {total} false alarms in {runs} rollouts {alarms:?}"
        );
        assert!(total as f64 <= 0.05 * runs as f64, "{total} false alarms in {runs}: {alarms:?}");
    }

    /// A/B/n A/A: control and three candidates at 10% each, all equally good, Zipf users. Each candidate's
    /// evidence, checked after every 200 requests against the whole of one step's budget for a single
    /// candidate (alpha 0.05 over its four guards — stricter than the plan's split over candidates),
    /// raises false alarms at most alpha of the time: its sample-ratio guard expects the candidate's
    /// users against control's alone in the ratio 10 : 70, and the other candidates' users are not
    /// counted.
    #[test]
    fn abn_equal_arms_raise_false_alarms_at_most_alpha_per_candidate() {
        let d = DeploymentSpec::from_json(
            br#"{"version":1,"strategy":"canary","control":"a",
                 "candidates":[{"model":"b","percent":10},{"model":"c","percent":10},{"model":"d","percent":10}],
                 "plan":{"steps":[{"canary_percent":10,"bake_ms":0,"min_sample":1,"max_ms":1}],"step_started_at":1}}"#,
        )
        .unwrap()
        .validate("sim")
        .unwrap();
        let one_candidate = crate::rollout::guard::Budget { candidates: 1, ..d.spec.plan.as_ref().unwrap().budget() };
        let log_threshold = one_candidate.log_threshold();
        let mut rng = StdRng::seed_from_u64(31);
        let mut population = Population::new(&mut rng, 20_000, 0.0);
        let (runs, requests) = (400, 10_000);
        let mut alarms: BTreeMap<(String, GuardKind), usize> = BTreeMap::new();
        for _ in 0..runs {
            population.reassign(&mut rng, 0.0);
            let arm: Vec<Option<usize>> = (0..population.ids.len())
                .map(|_| {
                    let x = rng.random::<f64>();
                    (x < 0.3).then(|| (x / 0.1) as usize)
                })
                .collect();
            let mut e = PlanEvidence::new(&d).unwrap();
            let mut fired = [false; 3];
            for i in 0..requests {
                let u = population.draw(&mut rng);
                let status = if rng.random::<f64>() < population.risk[u] {
                    DecisionStatus::ModelError
                } else {
                    DecisionStatus::Ok
                };
                let sent_at = 1 + (i as i64) * 5;
                e.add(Observation {
                    request_id: String::new(),
                    user: population.ids[u].clone(),
                    arm: if arm[u].is_some() { Side::Candidate } else { Side::Control },
                    candidate: arm[u].map(|k| ["b", "c", "d"][k].to_string()),
                    status,
                    latency_ms: 20 + (-(rng.random::<f64>().max(1e-12)).ln() * 15.0) as i64,
                    sent_at,
                });
                if i % 200 == 199 {
                    e.score_until(sent_at + GRACE_MS);
                    for (k, arm) in e.arms.iter().enumerate() {
                        if let Some(r) = arm.readings().into_iter().find(|r| r.log_e >= log_threshold)
                            && !std::mem::replace(&mut fired[k], true)
                        {
                            *alarms.entry((arm.judged.clone().unwrap(), r.guard)).or_insert(0) += 1;
                        }
                    }
                }
            }
        }
        eprintln!("A/B/n A/A, 3 candidates at 10%, {runs} rollouts of {requests} requests: false alarms {alarms:?}");
        for model in ["b", "c", "d"] {
            let n: usize = alarms.iter().filter(|((m, _), _)| m == model).map(|(_, n)| n).sum();
            assert!(n as f64 <= 0.05 * runs as f64, "{model}: {n} false alarms in {runs}: {alarms:?}");
        }
        let users: Vec<u64> = PlanEvidence::new(&d).unwrap().arms.iter().map(|a| a.users().1).collect();
        assert_eq!(users, [0, 0, 0]);
    }

    #[test]
    fn a_doubled_error_rate_at_one_percent_is_caught_by_the_error_guard() {
        let mut rng = StdRng::seed_from_u64(29);
        let population = Population::new(&mut rng, 200_000, 0.1);
        // A four-step plan: each guard in each step gets alpha 0.05 / 16.
        let d = plan_deployment(4);
        let runs = 100;
        let mut needed = Vec::new();
        for _ in 0..runs {
            match rollout(&mut rng, &population, &d, 2.0, 400_000) {
                Some((n, GuardKind::ErrorRate)) => needed.push(n),
                other => panic!("expected the error guard to fire, got {other:?}"),
            }
        }
        needed.sort_unstable();
        let median = needed[needed.len() / 2];
        eprintln!(
            "1% -> 2% errors at a 10% canary, Zipf users, alpha 0.05 over 4 guards x 4 steps: fired in {} of {runs}; \
             median {median} decisions ({:.0} s at 200 requests/s), 90th percentile {}",
            needed.len(),
            median as f64 / 200.0,
            needed[needed.len() * 9 / 10]
        );
        assert!(median < 300_000);
    }
}
