//! Outcomes joined to decisions (and to shadow answers of the same requests): pure. The stage around it
//! feeds decisions, shadow comparisons and outcome labels in the order it reads them, calls
//! [`Join::expire`] as time passes, and writes the effects. What it keeps of each request is one
//! [`Entry`] in a [`States`] store (memory in tests, local disk in the stage), with the time it comes
//! due.
//!
//! Rules:
//! - a decision waits for its label until `decided_at + window`; then it is counted unlabelled (label
//!   coverage) and forgotten;
//! - **maturity** (a deployment's `quality.maturity_ms`): a decision is judged when it matures, at
//!   `decided_at + maturity`, whenever its label came: a label that came earlier is held until then
//!   (scored at maturity, [`Entry::Held`]); a decision without one is scored with the spec's
//!   `default_label` (source [`IMPLICIT`]: labels by absence, "no chargeback by day 90"), or, without a
//!   default, counted unlabelled. Scored records then come in the order of their decisions, whatever
//!   the labels' delays — which is what keeps the quality guard valid when the delay depends on the
//!   label. A label after maturity is dead-lettered `late_label`;
//! - a label whose decision is not open yet waits up to `early_wait_ms` for it (labels can overtake
//!   their decision by the time merge takes); then it is dead-lettered: no decision was found (not
//!   decided, or decided longer than the window ago);
//! - one label per request: a second one within the window is dead-lettered as a duplicate;
//! - a label that is not a number, or for a classification not 0 or 1, is dead-lettered as malformed;
//! - the serving answer is scored (status OK only: errors, timeouts and fallbacks have no score, and
//!   count in coverage), and every shadow answer of the same request too, also one that arrives after
//!   the label (a labelled request is remembered for the window);
//! - an answer's score is read from its output when the answer arrives, by the deployment's quality
//!   spec then in force ([`answer_score`]); the join keeps the score, never the output's bytes, so
//!   what it keeps per request is small whatever the answers' size;
//! - the store is bounded: past `max_open` requests the ones due first are dropped (counted);
//! - every change of a request's state is an [`Effect::State`] for the changelog (the last one per
//!   request is its state; `None` forgets it), from which [`Join::replay`] rebuilds the store after the
//!   disk is lost, or the part of it written since its last checkpoint.

use super::metrics::{binary_losses, regression_losses};
use super::store::{States, Stored};
use crate::codec::{
    Decision, DecisionStatus, Millis, Outcome, ScoredDecision, ScoredOutcome, ShadowComparison, ShadowScore,
};
use crate::kafka::SourcePos;
use crate::record::quality::{IMPLICIT, QualitySpec, Task};

/// Most requests made due by one [`Join::expire`]: the rest follow at the next tick, so that one
/// transaction stays small however many come due at once.
pub const EXPIRE_CHUNK: usize = 20_000;

#[derive(Debug, Clone, Copy)]
pub struct JoinConfig {
    pub window_ms: i64,
    pub early_wait_ms: i64,
    pub max_open: u64,
}

/// What a decision leaves for scoring: its ids and scores, not its answers' bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// The partition of its decision: where its changelog records go.
    pub partition: i32,
    /// The decision's ids and the served answer's score (read when it arrived, status OK only), as the
    /// changelog keeps them.
    pub decision: ScoredDecision,
    /// Shadow answers so far.
    pub shadows: Vec<ShadowScore>,
}

/// A request's state, as the changelog keeps it (see [`super::changelog`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// Decided, waiting for its label.
    Open(Decided),
    /// Labelled before it matured: scored when it does.
    Held(Decided, Outcome),
    /// Labelled and scored: remembered for duplicates and late shadow answers until its window ends.
    Labelled(Decided, Outcome),
    /// A label waiting for its decision, where it was read, and shadow answers that came before the
    /// decision too.
    Early(Outcome, SourcePos, Vec<ShadowScore>),
    /// Shadow answers that arrived before their decision (another topic), on this partition.
    EarlyShadows(Vec<ShadowScore>, i32),
}

/// The score in an answer's `output` under `spec`: a probability for classification, any finite number
/// for regression; None if the output holds none. Read when the answer arrives, so that the join keeps
/// the score instead of the output.
pub fn answer_score(spec: &QualitySpec, output: &[u8]) -> Option<f64> {
    match spec.task {
        Task::BinaryClassification => spec.score.probability(output).ok(),
        Task::Regression => spec.score.score(output).ok(),
    }
}

/// A shadow model's answer as the join keeps it.
fn shadow_score(spec: &QualitySpec, model: String, output: Option<&[u8]>) -> ShadowScore {
    ShadowScore { model, answered: output.is_some(), score: output.and_then(|o| answer_score(spec, o)) }
}

/// Why a label was not joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Malformed,
    Duplicate,
    NoDecision,
    /// Its decision matured without it (and was judged then).
    Late,
}

impl Rejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed_label",
            Rejected::Duplicate => "duplicate_label",
            Rejected::NoDecision => "no_decision",
            Rejected::Late => "late_label",
        }
    }
}

/// What the join did.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Scored(ScoredOutcome),
    /// A label not joined: dead-letter it with the reason. `source` is where it was read.
    Rejected {
        outcome: Outcome,
        source: SourcePos,
        why: Rejected,
        reason: String,
    },
    /// A decision whose window (or maturity, without a default label) ended without a label.
    Unlabelled {
        deployment: String,
        model: String,
        cohort: String,
    },
    /// An open decision dropped to keep the store bounded.
    Evicted {
        deployment: String,
        model: String,
        cohort: String,
    },
    /// The request's state changed: the changelog record (on `partition`) that keeps it; None forgets it.
    State {
        request_id: String,
        partition: i32,
        entry: Option<Entry>,
    },
}

/// The join over its store.
#[derive(Debug)]
pub struct Join<S> {
    config: JoinConfig,
    states: S,
}

impl<S: States> Join<S> {
    pub fn new(config: JoinConfig, states: S) -> Join<S> {
        Join { config, states }
    }

    /// Requests held (open decisions, held and remembered labels, labels and answers waiting for their
    /// decision).
    pub fn open(&self) -> u64 {
        self.states.len()
    }

    pub fn states(&mut self) -> &mut S {
        &mut self.states
    }

    /// When `entry` comes due: a decision at its maturity (or window end), a labelled one at its window
    /// end, what waits for its decision `early_wait_ms` after `now`.
    fn due(&self, entry: &Entry, spec: &QualitySpec, now: Millis) -> Millis {
        let maturity = spec.maturity_ms.map(|m| m as i64);
        match entry {
            Entry::Open(d) => d.decision.decided_at + maturity.unwrap_or(self.config.window_ms),
            Entry::Held(d, _) => d.decision.decided_at + maturity.unwrap_or(0),
            Entry::Labelled(d, _) => d.decision.decided_at + self.config.window_ms.max(maturity.unwrap_or(0)),
            Entry::Early(..) | Entry::EarlyShadows(..) => now + self.config.early_wait_ms,
        }
    }

    /// Sets the state of `id` (due as [`Join::due`] says, unless given) and writes it to the changelog.
    fn set(
        &mut self,
        partition: i32,
        id: &str,
        entry: Option<Entry>,
        due: Option<Millis>,
        spec: &QualitySpec,
        fx: &mut Vec<Effect>,
    ) {
        let stored = entry.clone().map(|entry| Stored { due: due.unwrap_or_else(|| self.due(&entry, spec, 0)), entry });
        self.states.set(partition, id, stored);
        fx.push(Effect::State { request_id: id.to_string(), partition, entry });
    }

    /// A changelog record (request `id` on `partition`; None: forgotten) read back into the store, when
    /// the store is rebuilt or catches up with the changelog. `now` stands for when waiting labels
    /// arrived (their wait restarts).
    pub fn replay(
        &mut self,
        partition: i32,
        id: &str,
        entry: Option<Entry>,
        spec_of: impl Fn(&str) -> QualitySpec,
        now: Millis,
    ) {
        let stored = entry.map(|entry| {
            let spec = match &entry {
                Entry::Open(d) | Entry::Held(d, _) | Entry::Labelled(d, _) => spec_of(&d.decision.deployment),
                Entry::Early(..) | Entry::EarlyShadows(..) => QualitySpec::default(),
            };
            Stored { due: self.due(&entry, &spec, now), entry }
        });
        self.states.set(partition, id, stored);
    }

    /// A decision read at `partition`.
    pub fn on_decision(&mut self, d: Decision, partition: i32, spec: &QualitySpec, fx: &mut Vec<Effect>) {
        let id = d.request_id;
        let (shadows, early) = match self.states.get(partition, &id).map(|s| s.entry) {
            Some(Entry::Open(_) | Entry::Held(..) | Entry::Labelled(..)) => return, // read again (a replay)
            Some(Entry::EarlyShadows(answers, _)) => (answers, None),
            Some(Entry::Early(outcome, source, answers)) => (answers, Some((outcome, source))),
            None => (Vec::new(), None),
        };
        let served = d.status == DecisionStatus::Ok;
        let decision = ScoredDecision {
            user_id: d.user_id,
            deployment: d.deployment,
            model: d.model,
            cohort: d.cohort,
            config_version: d.config_version,
            status: d.status,
            score: d.output.as_deref().filter(|_| served).and_then(|o| answer_score(spec, o)),
            decided_at: d.decided_at,
        };
        let decided = Decided { partition, decision, shadows };
        if let Some((outcome, source)) = early {
            return self.label(id, decided, outcome, source, spec, fx);
        }
        self.set(partition, &id, Some(Entry::Open(decided)), None, spec, fx);
        self.evict(fx);
    }

    /// Drops the requests due first while the store holds more than `max_open`.
    fn evict(&mut self, fx: &mut Vec<Effect>) {
        while self.states.len() > self.config.max_open {
            let Some((partition, id, stored)) = self.states.due(Millis::MAX, 1).pop() else { break };
            self.states.set(partition, &id, None);
            fx.push(Effect::State { request_id: id.clone(), partition, entry: None });
            match stored.entry {
                Entry::Open(d) | Entry::Held(d, _) => {
                    let ScoredDecision { deployment, model, cohort, .. } = d.decision;
                    fx.push(Effect::Evicted { deployment, model, cohort });
                }
                Entry::Early(outcome, source, _) => {
                    let reason = format!("request {id}'s label was dropped to keep the store within quality.max_open");
                    fx.push(Effect::Rejected { outcome, source, why: Rejected::NoDecision, reason });
                }
                Entry::Labelled(..) | Entry::EarlyShadows(..) => {}
            }
        }
    }

    /// A shadow answer read at `partition` (its decision may not have been read yet).
    pub fn on_shadow(
        &mut self,
        c: ShadowComparison,
        partition: i32,
        spec: &QualitySpec,
        now: Millis,
        fx: &mut Vec<Effect>,
    ) {
        let id = c.request_id;
        let answer = shadow_score(spec, c.shadow_model, c.shadow_output.as_deref());
        let known = |answers: &[ShadowScore]| answers.iter().any(|s| s.model == answer.model);
        let Some(Stored { due, entry }) = self.states.get(partition, &id) else {
            let entry = Entry::EarlyShadows(vec![answer], partition);
            return self.set(partition, &id, Some(entry), Some(now + self.config.early_wait_ms), spec, fx);
        };
        let entry = match entry {
            Entry::Open(mut d) if !known(&d.shadows) => {
                d.shadows.push(answer);
                Entry::Open(d)
            }
            Entry::Held(mut d, outcome) if !known(&d.shadows) => {
                d.shadows.push(answer);
                Entry::Held(d, outcome)
            }
            Entry::Labelled(mut d, outcome) if !known(&d.shadows) => {
                fx.push(Effect::Scored(score(&id, &d, &answer, "shadow", &outcome, spec)));
                d.shadows.push(answer);
                Entry::Labelled(d, outcome)
            }
            Entry::Early(outcome, source, mut answers) if !known(&answers) => {
                answers.push(answer);
                Entry::Early(outcome, source, answers)
            }
            Entry::EarlyShadows(mut answers, at) if !known(&answers) => {
                answers.push(answer);
                Entry::EarlyShadows(answers, at)
            }
            _ => return, // this model's answer is known already
        };
        self.set(partition, &id, Some(entry), Some(due), spec, fx);
    }

    /// A label read at `source`; `spec_of` gives a deployment's quality spec.
    pub fn on_outcome(
        &mut self,
        outcome: Outcome,
        source: SourcePos,
        spec_of: impl Fn(&str) -> QualitySpec,
        now: Millis,
        fx: &mut Vec<Effect>,
    ) {
        let id = outcome.request_id.clone();
        let partition = source.partition;
        let reject = |outcome, why, reason| Effect::Rejected { outcome, source: source.clone(), why, reason };
        let shadows = match self.states.get(partition, &id).map(|s| s.entry) {
            Some(Entry::Labelled(_, first)) if first.source == IMPLICIT => {
                let reason = format!(
                    "request {id}'s decision matured at {} without a label and was scored with the default label; \
                     a label must come within the deployment's quality.maturity_ms",
                    first.observed_at
                );
                return fx.push(reject(outcome, Rejected::Late, reason));
            }
            Some(Entry::Labelled(..) | Entry::Held(..) | Entry::Early(..)) => {
                let reason = format!("request {id} already has a label");
                return fx.push(reject(outcome, Rejected::Duplicate, reason));
            }
            Some(Entry::Open(decided)) => {
                let spec = spec_of(&decided.decision.deployment);
                return self.label(id, decided, outcome, source, &spec, fx);
            }
            Some(Entry::EarlyShadows(answers, _)) => answers,
            None => Vec::new(),
        };
        if !outcome.label.is_finite() {
            let reason = format!("label {} is not a number", outcome.label);
            return fx.push(reject(outcome, Rejected::Malformed, reason));
        }
        let entry = Entry::Early(outcome, source.clone(), shadows);
        self.set(partition, &id, Some(entry), Some(now + self.config.early_wait_ms), &QualitySpec::default(), fx);
    }

    /// A label meets its decision: scored now, or held until the decision matures.
    fn label(
        &mut self,
        id: String,
        decided: Decided,
        outcome: Outcome,
        source: SourcePos,
        spec: &QualitySpec,
        fx: &mut Vec<Effect>,
    ) {
        let partition = decided.partition;
        if let Some(reason) = malformed(&outcome, spec) {
            // The decision keeps waiting for a good label.
            self.set(partition, &id, Some(Entry::Open(decided)), None, spec, fx);
            return fx.push(Effect::Rejected { outcome, source, why: Rejected::Malformed, reason });
        }
        if spec.maturity_ms.is_some() {
            return self.set(partition, &id, Some(Entry::Held(decided, outcome)), None, spec, fx);
        }
        self.score_all(id, decided, outcome, spec, fx);
    }

    /// Scores the serving answer and every shadow answer of a decision on `outcome`, and remembers it.
    fn score_all(&mut self, id: String, decided: Decided, outcome: Outcome, spec: &QualitySpec, fx: &mut Vec<Effect>) {
        let serving = ShadowScore {
            model: decided.decision.model.clone(),
            answered: decided.decision.status == DecisionStatus::Ok,
            score: decided.decision.score,
        };
        fx.push(Effect::Scored(score(&id, &decided, &serving, "serving", &outcome, spec)));
        for answer in &decided.shadows {
            fx.push(Effect::Scored(score(&id, &decided, answer, "shadow", &outcome, spec)));
        }
        // Kept for duplicates and late shadow answers.
        self.set(decided.partition, &id, Some(Entry::Labelled(decided, outcome)), None, spec, fx);
    }

    /// Ends what is due at `now` (at most [`EXPIRE_CHUNK`] requests; the rest at the next call):
    /// decisions that matured (scored on their held or default label, or unlabelled) or passed their
    /// window (unlabelled), labels that waited for their decision in vain, labelled requests past their
    /// window (forgotten).
    pub fn expire(&mut self, now: Millis, spec_of: impl Fn(&str) -> QualitySpec, fx: &mut Vec<Effect>) {
        for (partition, id, Stored { due, entry }) in self.states.due(now, EXPIRE_CHUNK) {
            match entry {
                Entry::Open(d) => {
                    let spec = spec_of(&d.decision.deployment);
                    // The deployment's maturity may have grown since the decision was stored.
                    let now_due = self.due(&Entry::Open(d.clone()), &spec, now);
                    if now_due > due && now_due > now {
                        self.set(partition, &id, Some(Entry::Open(d)), Some(now_due), &spec, fx);
                        continue;
                    }
                    match (spec.maturity_ms, spec.default_label) {
                        (Some(_), Some(label)) => {
                            let outcome = Outcome {
                                request_id: id.clone(),
                                user_id: d.decision.user_id.clone(),
                                label,
                                observed_at: due,
                                source: IMPLICIT.to_string(),
                            };
                            self.score_all(id, d, outcome, &spec, fx);
                        }
                        _ => {
                            self.set(partition, &id, None, None, &spec, fx);
                            let ScoredDecision { deployment, model, cohort, .. } = d.decision;
                            fx.push(Effect::Unlabelled { deployment, model, cohort });
                        }
                    }
                }
                Entry::Held(d, outcome) => {
                    let spec = spec_of(&d.decision.deployment);
                    self.score_all(id, d, outcome, &spec, fx);
                }
                Entry::Early(outcome, source, _) => {
                    self.set(partition, &id, None, None, &QualitySpec::default(), fx);
                    let reason = format!(
                        "no decision for request {id} within {} ms of its label: not decided, decided more than the window ago, \
                         or its deployment has no quality spec",
                        self.config.early_wait_ms
                    );
                    fx.push(Effect::Rejected { outcome, source, why: Rejected::NoDecision, reason });
                }
                Entry::Labelled(..) | Entry::EarlyShadows(..) => {
                    self.set(partition, &id, None, None, &QualitySpec::default(), fx)
                }
            }
        }
    }
}

/// Why a label cannot be scored under `spec`, if it cannot.
fn malformed(outcome: &Outcome, spec: &QualitySpec) -> Option<String> {
    let label = outcome.label;
    match spec.task {
        _ if !label.is_finite() => Some(format!("label {label} is not a number")),
        Task::BinaryClassification if label != 0.0 && label != 1.0 => {
            Some(format!("label {label} is neither 0 nor 1 (binary classification)"))
        }
        _ => None,
    }
}

/// The scored record of one answer (`role` serving or shadow) of a labelled decision.
fn score(
    request_id: &str,
    decided: &Decided,
    answer: &ShadowScore,
    role: &str,
    outcome: &Outcome,
    spec: &QualitySpec,
) -> ScoredOutcome {
    let d = &decided.decision;
    // Read when the answer arrived; a probability only if the task (which may have changed since) says so.
    let value = answer.score.filter(|v| answer.answered && (spec.task == Task::Regression || (0.0..=1.0).contains(v)));
    let (mut zero_one, mut brier, mut log_loss, mut absolute_error, mut squared_error) = (None, None, None, None, None);
    if let Some(v) = value {
        match spec.task {
            Task::BinaryClassification => {
                let l = binary_losses(v, outcome.label == 1.0, spec.threshold);
                (zero_one, brier, log_loss) = (Some(l.zero_one), Some(l.brier), Some(l.log_loss));
            }
            Task::Regression => {
                let l = regression_losses(v, outcome.label);
                (absolute_error, squared_error) = (Some(l.absolute), Some(l.squared));
            }
        }
    }
    let status = match (role, answer.answered) {
        ("serving", _) => d.status.as_str().to_string(),
        (_, true) => "OK".to_string(),
        (_, false) => "MODEL_ERROR".to_string(),
    };
    ScoredOutcome {
        request_id: request_id.to_string(),
        user_id: d.user_id.clone(),
        deployment: d.deployment.clone(),
        model: answer.model.clone(),
        role: role.to_string(),
        cohort: d.cohort.clone(),
        config_version: d.config_version,
        status,
        score: value,
        label: outcome.label,
        zero_one,
        brier,
        log_loss,
        absolute_error,
        squared_error,
        label_delay_ms: outcome.observed_at - d.decided_at,
        decided_at: d.decided_at,
        observed_at: outcome.observed_at,
        source: outcome.source.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quality::store::MemStates;
    use crate::record::quality::ScoreFormat;

    const CONFIG: JoinConfig = JoinConfig { window_ms: 60_000, early_wait_ms: 5_000, max_open: 1000 };

    fn decision(id: &str, status: DecisionStatus, output: Option<&str>, at: Millis) -> Decision {
        Decision {
            request_id: id.into(),
            user_id: format!("user-of-{id}"),
            deployment: "fraud".into(),
            model: "v2".into(),
            strategy: "canary".into(),
            cohort: "candidate".into(),
            bucket: 7,
            config_version: 3,
            status,
            output: output.map(|o| o.as_bytes().to_vec()),
            error: None,
            latency_ms: 10,
            decided_at: at,
            propensity: Some(0.5),
        }
    }

    fn label(id: &str, label: f64, at: Millis) -> Outcome {
        Outcome {
            request_id: id.into(),
            user_id: format!("user-of-{id}"),
            label,
            observed_at: at,
            source: "test".into(),
        }
    }

    fn shadow(id: &str, model: &str, output: &str) -> ShadowComparison {
        ShadowComparison {
            request_id: id.into(),
            deployment: "fraud".into(),
            serving_model: "v2".into(),
            serving_output: None,
            shadow_model: model.into(),
            shadow_output: Some(output.as_bytes().to_vec()),
            agreed: false,
            serving_latency_ms: None,
            shadow_latency_ms: 5,
            compared_at: 0,
        }
    }

    fn src() -> SourcePos {
        src_at(0)
    }

    fn src_at(partition: i32) -> SourcePos {
        SourcePos { topic: "outcomes".into(), partition, offset: 1 }
    }

    fn binary() -> QualitySpec {
        QualitySpec::default()
    }

    fn scored(fx: &[Effect]) -> Vec<&ScoredOutcome> {
        fx.iter().filter_map(|e| if let Effect::Scored(s) = e { Some(s) } else { None }).collect()
    }

    /// The effects without changelog records.
    fn visible(fx: &[Effect]) -> Vec<&Effect> {
        fx.iter().filter(|e| !matches!(e, Effect::State { .. })).collect()
    }

    #[test]
    fn the_changelog_rebuilds_the_same_join() {
        let mut join = Join::new(CONFIG, MemStates::default());
        let mut fx = Vec::new();
        join.on_decision(decision("open", DecisionStatus::Ok, Some("0.9"), 1_000), 2, &binary(), &mut fx);
        join.on_shadow(shadow("open", "v3", "0.1"), 2, &binary(), 1_000, &mut fx);
        join.on_decision(decision("done", DecisionStatus::Ok, Some("0.2"), 1_000), 1, &binary(), &mut fx);
        join.on_outcome(label("done", 0.0, 2_000), src_at(1), |_| binary(), 2_000, &mut fx);
        join.on_outcome(label("early", 1.0, 2_000), src(), |_| binary(), 2_000, &mut fx);
        let records: Vec<(i32, String, Option<Entry>)> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::State { request_id, partition, entry } => Some((*partition, request_id.clone(), entry.clone())),
                _ => None,
            })
            .collect();
        let partitions: Vec<i32> = fx
            .iter()
            .filter_map(|e| if let Effect::State { partition, .. } = e { Some(*partition) } else { None })
            .collect();
        assert_eq!(partitions, [2, 2, 1, 1, 0], "each state goes to its request's partition");
        // Through Avro, as the changelog carries it.
        let codec = crate::codec::Codec::default();
        let records: Vec<(i32, String, Option<Entry>)> = records
            .into_iter()
            .map(|(p, id, e)| {
                let e = e.map(|e| {
                    crate::quality::changelog::decode(
                        &id,
                        &crate::quality::changelog::encode(&e, &codec),
                        &codec,
                        |_| binary(),
                    )
                    .unwrap()
                });
                (p, id, e)
            })
            .collect();
        let mut restored = Join::new(CONFIG, MemStates::default());
        for (p, id, entry) in records {
            restored.replay(p, &id, entry, |_| binary(), 2_000);
        }
        assert_eq!(restored.open(), 3, "open, labelled, early");
        fx.clear();
        restored.on_outcome(label("open", 1.0, 3_000), src_at(2), |_| binary(), 3_000, &mut fx);
        restored.on_outcome(label("done", 0.0, 3_000), src_at(1), |_| binary(), 3_000, &mut fx);
        restored.on_decision(decision("early", DecisionStatus::Ok, Some("0.8"), 2_500), 0, &binary(), &mut fx);
        let models: Vec<&str> = scored(&fx).iter().map(|s| s.model.as_str()).collect();
        assert_eq!(models, ["v2", "v3", "v2"], "the open request and its shadow, then the early label's decision");
        assert!(visible(&fx).iter().any(|e| matches!(e, Effect::Rejected { why: Rejected::Duplicate, .. })));
    }

    #[test]
    fn labels_before_with_and_after_their_decision_are_scored_once() {
        let mut join = Join::new(CONFIG, MemStates::default());
        let mut fx = Vec::new();
        // After: the usual case, with a shadow answer of the same request.
        join.on_decision(decision("a", DecisionStatus::Ok, Some("0.9"), 1_000), 0, &binary(), &mut fx);
        join.on_shadow(shadow("a", "v3", "0.2"), 0, &binary(), 0, &mut fx);
        join.on_outcome(label("a", 1.0, 9_000), src(), |_| binary(), 9_000, &mut fx);
        // Before: the label waits for its decision.
        join.on_outcome(label("b", 0.0, 2_000), src(), |_| binary(), 2_000, &mut fx);
        assert_eq!(scored(&fx).len(), 2);
        join.on_decision(decision("b", DecisionStatus::Ok, Some("0.7"), 2_500), 0, &binary(), &mut fx);
        let all = scored(&fx);
        assert_eq!(all.len(), 3);
        let (a, a3, b) = (all[0], all[1], all[2]);
        assert_eq!((a.role.as_str(), a.score, a.zero_one, a.label_delay_ms), ("serving", Some(0.9), Some(0.0), 8_000));
        assert!((a.brier.unwrap() - 0.01).abs() < 1e-12);
        assert_eq!(
            (a3.model.as_str(), a3.role.as_str(), a3.zero_one),
            ("v3", "shadow", Some(1.0)),
            "the shadow scored on the same label"
        );
        assert_eq!((b.request_id.as_str(), b.zero_one), ("b", Some(1.0)), "0.7 says positive; the truth was 0");
        // A shadow answer after the label is still scored; the duplicate label is refused.
        fx.clear();
        join.on_shadow(shadow("a", "v4", "0.95"), 0, &binary(), 9_500, &mut fx);
        join.on_outcome(label("a", 1.0, 9_500), src(), |_| binary(), 9_500, &mut fx);
        assert_eq!(scored(&fx)[0].model, "v4");
        assert!(matches!(visible(&fx)[1], Effect::Rejected { why: Rejected::Duplicate, .. }), "{fx:?}");
    }

    #[test]
    fn a_shadow_answer_read_before_its_decision_is_kept_for_it() {
        let mut join = Join::new(CONFIG, MemStates::default());
        let mut fx = Vec::new();
        join.on_shadow(shadow("a", "v3", "0.2"), 0, &binary(), 0, &mut fx);
        join.on_decision(decision("a", DecisionStatus::Ok, Some("0.9"), 10), 0, &binary(), &mut fx);
        join.on_outcome(label("a", 1.0, 20), src(), |_| binary(), 20, &mut fx);
        let models: Vec<&str> = scored(&fx).iter().map(|s| s.model.as_str()).collect();
        assert_eq!(models, ["v2", "v3"]);
        fx.clear();
        join.on_shadow(shadow("orphan", "v3", "0.2"), 1, &binary(), 0, &mut fx);
        join.expire(CONFIG.early_wait_ms, |_| binary(), &mut fx);
        assert!(matches!(fx.last(), Some(Effect::State { entry: None, partition: 1, .. })), "{fx:?}");
    }

    #[test]
    fn windows_end_decisions_and_waiting_labels_with_a_count_or_a_reason() {
        let mut join = Join::new(CONFIG, MemStates::default());
        let mut fx = Vec::new();
        join.on_decision(decision("old", DecisionStatus::Ok, Some("0.4"), 0), 0, &binary(), &mut fx);
        join.on_outcome(label("never", 1.0, 1_000), src(), |_| binary(), 1_000, &mut fx);
        fx.clear();
        join.expire(5_999, |_| binary(), &mut fx);
        assert!(fx.is_empty());
        join.expire(6_000, |_| binary(), &mut fx);
        let seen = visible(&fx);
        assert!(
            matches!(seen[0], Effect::Rejected { why: Rejected::NoDecision, reason, .. } if reason.contains("never"))
        );
        join.expire(60_000, |_| binary(), &mut fx);
        let seen = visible(&fx);
        assert!(matches!(seen[1], Effect::Unlabelled { model, cohort, .. } if model == "v2" && cohort == "candidate"));
        assert!(
            fx.iter().any(|e| matches!(e, Effect::State { entry: None, request_id, .. } if request_id == "old")),
            "the changelog forgets it"
        );
        assert_eq!(join.open(), 0);
        fx.clear();
        join.on_outcome(label("old", 1.0, 70_000), src(), |_| binary(), 70_000, &mut fx);
        join.expire(75_000, |_| binary(), &mut fx);
        let seen = visible(&fx);
        assert!(matches!(seen[0], Effect::Rejected { why: Rejected::NoDecision, .. }), "past the window: not found");
    }

    #[test]
    fn malformed_labels_are_refused_and_the_decision_keeps_waiting() {
        let mut join = Join::new(CONFIG, MemStates::default());
        let mut fx = Vec::new();
        join.on_decision(decision("a", DecisionStatus::Ok, Some("0.9"), 0), 0, &binary(), &mut fx);
        join.on_outcome(label("a", 0.5, 10), src(), |_| binary(), 10, &mut fx);
        join.on_outcome(label("z", f64::NAN, 10), src(), |_| binary(), 10, &mut fx);
        let seen = visible(&fx);
        assert!(
            matches!(seen[0], Effect::Rejected { why: Rejected::Malformed, reason, .. } if reason.contains("neither 0 nor 1"))
        );
        assert!(matches!(seen[1], Effect::Rejected { why: Rejected::Malformed, .. }));
        join.on_outcome(label("a", 1.0, 20), src(), |_| binary(), 20, &mut fx);
        assert_eq!(scored(&fx).len(), 1, "the good label after the bad one is joined");
    }

    #[test]
    fn errors_and_timeouts_have_no_score_and_regression_has_its_losses() {
        let mut join = Join::new(CONFIG, MemStates::default());
        let mut fx = Vec::new();
        join.on_decision(decision("t", DecisionStatus::Timeout, None, 0), 0, &binary(), &mut fx);
        join.on_decision(decision("f", DecisionStatus::Fallback, Some("0.0"), 0), 0, &binary(), &mut fx);
        join.on_outcome(label("t", 1.0, 5), src(), |_| binary(), 5, &mut fx);
        join.on_outcome(label("f", 1.0, 5), src(), |_| binary(), 5, &mut fx);
        let all = scored(&fx);
        assert!(all.iter().all(|s| s.score.is_none() && s.zero_one.is_none()), "{all:?}");
        assert_eq!((all[0].status.as_str(), all[1].status.as_str()), ("TIMEOUT", "FALLBACK"));
        let regression = QualitySpec {
            task: Task::Regression,
            score: ScoreFormat::JsonField("eta".into()),
            ..QualitySpec::default()
        };
        fx.clear();
        join.on_decision(decision("r", DecisionStatus::Ok, Some(r#"{"eta":12.5}"#), 0), 0, &regression, &mut fx);
        join.on_outcome(label("r", 10.0, 5), src(), |_| regression.clone(), 5, &mut fx);
        let r = scored(&fx)[0];
        assert_eq!((r.absolute_error, r.squared_error, r.zero_one), (Some(2.5), Some(6.25), None));
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_oldest() {
        let mut join = Join::new(JoinConfig { max_open: 2, ..CONFIG }, MemStates::default());
        let mut fx = Vec::new();
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            join.on_decision(decision(id, DecisionStatus::Ok, Some("0.5"), i as i64), 0, &binary(), &mut fx);
        }
        assert_eq!(join.open(), 2);
        assert!(visible(&fx).iter().any(|e| matches!(e, Effect::Evicted { .. })));
        join.on_outcome(label("a", 1.0, 10), src(), |_| binary(), 10, &mut fx);
        join.on_outcome(label("c", 1.0, 10), src(), |_| binary(), 10, &mut fx);
        assert_eq!(scored(&fx).len(), 1, "the evicted decision is not scored");
    }

    fn matured(maturity_ms: u64, default_label: Option<f64>) -> QualitySpec {
        QualitySpec { maturity_ms: Some(maturity_ms), default_label, ..binary() }
    }

    #[test]
    fn with_maturity_labels_wait_for_it_and_absence_is_the_default_label() {
        let spec = matured(30_000, Some(0.0));
        let mut join = Join::new(CONFIG, MemStates::default());
        let mut fx = Vec::new();
        join.on_decision(decision("early", DecisionStatus::Ok, Some("0.9"), 1_000), 0, &spec, &mut fx);
        join.on_decision(decision("never", DecisionStatus::Ok, Some("0.8"), 2_000), 0, &spec, &mut fx);
        join.on_decision(decision("late", DecisionStatus::Ok, Some("0.1"), 3_000), 0, &spec, &mut fx);
        join.on_outcome(label("early", 1.0, 5_000), src(), |_| spec.clone(), 5_000, &mut fx);
        join.on_shadow(shadow("early", "v3", "0.4"), 0, &spec, 6_000, &mut fx);
        assert!(scored(&fx).is_empty(), "a label before maturity is held: {fx:?}");
        join.expire(30_999, |_| spec.clone(), &mut fx);
        assert!(scored(&fx).is_empty());
        join.expire(31_000, |_| spec.clone(), &mut fx);
        let at_31: Vec<(&str, &str, f64, &str)> =
            scored(&fx).iter().map(|s| (s.request_id.as_str(), s.model.as_str(), s.label, s.source.as_str())).collect();
        assert_eq!(at_31, [("early", "v2", 1.0, "test"), ("early", "v3", 1.0, "test")], "its own label, at maturity");
        fx.clear();
        join.expire(33_000, |_| spec.clone(), &mut fx);
        let implicit: Vec<(&str, f64, &str, i64, Option<f64>)> = scored(&fx)
            .iter()
            .map(|s| (s.request_id.as_str(), s.label, s.source.as_str(), s.label_delay_ms, s.zero_one))
            .collect();
        assert_eq!(
            implicit,
            [("never", 0.0, IMPLICIT, 30_000, Some(1.0)), ("late", 0.0, IMPLICIT, 30_000, Some(0.0))],
            "no label by maturity: the default label, observed at maturity"
        );
        fx.clear();
        join.on_outcome(label("late", 1.0, 40_000), src(), |_| spec.clone(), 40_000, &mut fx);
        join.on_outcome(label("early", 1.0, 40_000), src(), |_| spec.clone(), 40_000, &mut fx);
        let why: Vec<Rejected> =
            fx.iter().filter_map(|e| if let Effect::Rejected { why, .. } = e { Some(*why) } else { None }).collect();
        assert_eq!(why, [Rejected::Late, Rejected::Duplicate], "{fx:?}");
        assert!(scored(&fx).is_empty());
        // Without a default label, a decision that matures unlabelled counts as unlabelled.
        let spec = matured(30_000, None);
        fx.clear();
        join.on_decision(decision("none", DecisionStatus::Ok, Some("0.5"), 50_000), 0, &spec, &mut fx);
        join.expire(80_000, |_| spec.clone(), &mut fx);
        assert!(visible(&fx).iter().any(|e| matches!(e, Effect::Unlabelled { .. })), "{fx:?}");
        assert!(scored(&fx).is_empty());
    }

    /// Labels whose delay depends on the label (positives within 1-30 "days", negatives never): with
    /// maturity every decision is scored exactly once, in the order of its decision, whatever the delays.
    #[test]
    fn with_maturity_scored_records_come_in_decision_order_whatever_the_label_delays() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        const DAY: i64 = 1_000;
        let spec = matured(30 * DAY as u64, Some(0.0));
        let mut rng = StdRng::seed_from_u64(5);
        let mut join =
            Join::new(JoinConfig { window_ms: 60 * DAY, max_open: 1_000_000, ..CONFIG }, MemStates::default());
        // (time, kind): decisions every 10 ms over 60 days, positives (10%) labelled 1-30 days later.
        let mut events: Vec<(i64, usize)> = Vec::new();
        let n = 6_000;
        for i in 0..n {
            events.push((i as i64 * 10, i));
            if rng.random::<f64>() < 0.1 {
                events.push((i as i64 * 10 + rng.random_range(DAY..30 * DAY), n + i));
            }
        }
        events.sort_unstable();
        let mut fx = Vec::new();
        let mut order = Vec::new();
        let mut positives = 0;
        for (now, what) in events.into_iter().chain([(200 * DAY, usize::MAX), (200 * DAY, usize::MAX)]) {
            join.expire(now, |_| spec.clone(), &mut fx);
            if what < n {
                let id = what.to_string();
                join.on_decision(decision(&id, DecisionStatus::Ok, Some("0.2"), now), 0, &spec, &mut fx);
            } else if what != usize::MAX {
                positives += 1;
                join.on_outcome(label(&(what - n).to_string(), 1.0, now), src(), |_| spec.clone(), now, &mut fx);
            }
            for s in scored(&fx) {
                order.push((s.decided_at, s.label, s.source == IMPLICIT));
            }
            fx.clear();
        }
        assert_eq!(order.len(), n, "every decision scored once");
        assert!(order.windows(2).all(|w| w[0].0 <= w[1].0), "in the order of their decisions");
        let explicit = order.iter().filter(|(_, label, implicit)| *label == 1.0 && !implicit).count();
        assert_eq!(explicit, positives, "every positive with its own label, every other one by absence");
        assert_eq!(join.open(), 0);
    }
}
