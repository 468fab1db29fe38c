//! Outcomes joined to decisions (and to shadow answers of the same requests): pure. The stage around it
//! feeds decisions, shadow comparisons and outcome labels in the order it reads them, calls
//! [`Join::expire`] as time passes, and writes the effects.
//!
//! Rules:
//! - a decision waits for its label until `decided_at + window`; then it is counted unlabelled (label
//!   coverage) and forgotten;
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
//! - memory is bounded: past `max_open` the oldest open decisions are evicted (counted);
//! - every change of a request's state is an [`Effect::State`] for the changelog (the last one per
//!   request is its state; `None` forgets it), from which [`Join::restore`] rebuilds the join after a
//!   restart or rebalance without reading the inputs again.

use std::collections::{HashMap, VecDeque};

use super::metrics::{binary_losses, regression_losses};
use crate::codec::{
    Decision, DecisionStatus, Millis, Outcome, ScoredDecision, ScoredOutcome, ShadowComparison, ShadowScore,
};
use crate::kafka::SourcePos;
use crate::record::quality::{QualitySpec, Task};

#[derive(Debug, Clone, Copy)]
pub struct JoinConfig {
    pub window_ms: i64,
    pub early_wait_ms: i64,
    pub max_open: usize,
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
    /// Labelled: remembered for duplicates and late shadow answers until its window ends.
    Labelled(Decided, Outcome),
    /// A label waiting for its decision, and where it was read.
    Early(Outcome, SourcePos),
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
}

impl Rejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed_label",
            Rejected::Duplicate => "duplicate_label",
            Rejected::NoDecision => "no_decision",
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
    /// A decision whose window ended without a label.
    Unlabelled {
        deployment: String,
        model: String,
        cohort: String,
    },
    /// An open decision dropped to keep memory bounded.
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

#[derive(Debug)]
pub struct Join {
    config: JoinConfig,
    open: HashMap<String, Decided>,
    /// (expires at, request id), in arrival order; stale entries are skipped.
    open_order: VecDeque<(Millis, String)>,
    /// Labelled requests, for duplicates and late shadow answers: the decision and its label.
    labelled: HashMap<String, (Decided, Outcome)>,
    labelled_order: VecDeque<(Millis, String)>,
    early: HashMap<String, (Outcome, SourcePos)>,
    early_order: VecDeque<(Millis, String)>,
    /// Shadow answers before their decision: (answers, partition).
    early_shadows: HashMap<String, (Vec<ShadowScore>, i32)>,
    early_shadows_order: VecDeque<(Millis, String)>,
}

fn state(fx: &mut Vec<Effect>, request_id: &str, partition: i32, entry: Option<Entry>) {
    fx.push(Effect::State { request_id: request_id.to_string(), partition, entry });
}

impl Join {
    pub fn new(config: JoinConfig) -> Join {
        Join {
            config,
            open: HashMap::new(),
            open_order: VecDeque::new(),
            labelled: HashMap::new(),
            labelled_order: VecDeque::new(),
            early: HashMap::new(),
            early_order: VecDeque::new(),
            early_shadows: HashMap::new(),
            early_shadows_order: VecDeque::new(),
        }
    }

    /// Decisions waiting for their label.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// Rebuilds the join from changelog records (request id, entry), read in changelog order: the last
    /// record of a request wins. `arrived` stands for when early labels arrived (their wait restarts).
    pub fn restore(
        config: JoinConfig,
        records: impl IntoIterator<Item = (String, Option<Entry>)>,
        arrived: Millis,
    ) -> Join {
        let mut last: HashMap<String, Option<Entry>> = HashMap::new();
        for (id, entry) in records {
            last.insert(id, entry);
        }
        let mut join = Join::new(config);
        let mut opens = Vec::new();
        let mut labels = Vec::new();
        let mut earlies = Vec::new();
        let mut shadows = Vec::new();
        for (id, entry) in last {
            match entry {
                Some(Entry::Open(d)) => {
                    opens.push((d.decision.decided_at + config.window_ms, id.clone()));
                    join.open.insert(id, d);
                }
                Some(Entry::Labelled(d, o)) => {
                    labels.push((d.decision.decided_at + config.window_ms, id.clone()));
                    join.labelled.insert(id, (d, o));
                }
                Some(Entry::Early(o, source)) => {
                    earlies.push((arrived + config.early_wait_ms, id.clone()));
                    join.early.insert(id, (o, source));
                }
                Some(Entry::EarlyShadows(answers, partition)) => {
                    shadows.push((arrived + config.early_wait_ms, id.clone()));
                    join.early_shadows.insert(id, (answers, partition));
                }
                None => {}
            }
        }
        for list in [&mut opens, &mut labels, &mut earlies, &mut shadows] {
            list.sort_unstable();
        }
        join.early_shadows_order = shadows.into();
        join.open_order = opens.into();
        join.labelled_order = labels.into();
        join.early_order = earlies.into();
        join
    }

    /// A decision read at `partition`.
    pub fn on_decision(&mut self, d: Decision, partition: i32, spec: &QualitySpec, fx: &mut Vec<Effect>) {
        if self.open.contains_key(&d.request_id) || self.labelled.contains_key(&d.request_id) {
            return; // read again (a replay): already known
        }
        let id = d.request_id;
        let shadows = match self.early_shadows.remove(&id) {
            Some((answers, at)) => {
                if at != partition {
                    state(fx, &id, at, None);
                }
                answers
            }
            None => Vec::new(),
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
        if let Some((outcome, source)) = self.early.remove(&id) {
            if source.partition != partition {
                state(fx, &id, source.partition, None);
            }
            return self.label(id, decided, outcome, spec, fx);
        }
        self.open_order.push_back((decided.decision.decided_at + self.config.window_ms, id.clone()));
        state(fx, &id, partition, Some(Entry::Open(decided.clone())));
        self.open.insert(id, decided);
        while self.open.len() > self.config.max_open {
            let Some((_, oldest)) = self.open_order.pop_front() else { break };
            if let Some(d) = self.open.remove(&oldest) {
                state(fx, &oldest, d.partition, None);
                let ScoredDecision { deployment, model, cohort, .. } = d.decision;
                fx.push(Effect::Evicted { deployment, model, cohort });
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
        let answer = shadow_score(spec, c.shadow_model, c.shadow_output.as_deref());
        if let Some(d) = self.open.get_mut(&c.request_id) {
            if !d.shadows.iter().any(|s| s.model == answer.model) {
                d.shadows.push(answer);
                state(fx, &c.request_id, d.partition, Some(Entry::Open(d.clone())));
            }
        } else if let Some((d, outcome)) = self.labelled.get_mut(&c.request_id) {
            if !d.shadows.iter().any(|s| s.model == answer.model) {
                fx.push(Effect::Scored(score(&c.request_id, d, &answer, "shadow", outcome, spec)));
                d.shadows.push(answer);
                state(fx, &c.request_id, d.partition, Some(Entry::Labelled(d.clone(), outcome.clone())));
            }
        } else {
            let id = c.request_id;
            let (answers, _) = self.early_shadows.entry(id.clone()).or_insert_with(|| {
                self.early_shadows_order.push_back((now + self.config.early_wait_ms, id.clone()));
                (Vec::new(), partition)
            });
            if !answers.iter().any(|s| s.model == answer.model) {
                answers.push(answer);
                let entry = Entry::EarlyShadows(answers.clone(), partition);
                state(fx, &id, partition, Some(entry));
            }
        }
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
        if self.labelled.contains_key(&id) || self.early.contains_key(&id) {
            let reason = format!("request {id} already has a label");
            return fx.push(Effect::Rejected { outcome, source, why: Rejected::Duplicate, reason });
        }
        match self.open.remove(&id) {
            Some(decided) => {
                let spec = spec_of(&decided.decision.deployment);
                if let Some(reason) = malformed(&outcome, &spec) {
                    self.open.insert(id, decided);
                    return fx.push(Effect::Rejected { outcome, source, why: Rejected::Malformed, reason });
                }
                self.label(id, decided, outcome, &spec, fx)
            }
            None => {
                if !outcome.label.is_finite() {
                    let reason = format!("label {} is not a number", outcome.label);
                    return fx.push(Effect::Rejected { outcome, source, why: Rejected::Malformed, reason });
                }
                self.early_order.push_back((now + self.config.early_wait_ms, id.clone()));
                state(fx, &id, source.partition, Some(Entry::Early(outcome.clone(), source.clone())));
                self.early.insert(id, (outcome, source));
            }
        }
    }

    fn label(&mut self, id: String, decided: Decided, outcome: Outcome, spec: &QualitySpec, fx: &mut Vec<Effect>) {
        if let Some(reason) = malformed(&outcome, spec) {
            // Only labels that waited for their decision get here: the deployment's task decides.
            let source = SourcePos { topic: String::new(), partition: decided.partition, offset: -1 };
            state(fx, &id, decided.partition, Some(Entry::Open(decided.clone())));
            self.open_order.push_back((decided.decision.decided_at + self.config.window_ms, id.clone()));
            self.open.insert(id, decided);
            return fx.push(Effect::Rejected { outcome, source, why: Rejected::Malformed, reason });
        }
        let serving = ShadowScore {
            model: decided.decision.model.clone(),
            answered: decided.decision.status == DecisionStatus::Ok,
            score: decided.decision.score,
        };
        fx.push(Effect::Scored(score(&id, &decided, &serving, "serving", &outcome, spec)));
        for answer in &decided.shadows {
            fx.push(Effect::Scored(score(&id, &decided, answer, "shadow", &outcome, spec)));
        }
        self.labelled_order.push_back((decided.decision.decided_at + self.config.window_ms, id.clone()));
        // Kept for duplicates and late shadow answers.
        state(fx, &id, decided.partition, Some(Entry::Labelled(decided.clone(), outcome.clone())));
        self.labelled.insert(id, (decided, outcome));
    }

    /// Ends what is past its time at `now`: decisions past their window (unlabelled), labels that
    /// waited for their decision in vain, labelled requests past their window (forgotten).
    pub fn expire(&mut self, now: Millis, fx: &mut Vec<Effect>) {
        while let Some((at, id)) = pop_due(&mut self.open_order, now) {
            if let Some(d) = self.open.remove(&id) {
                if d.decision.decided_at + self.config.window_ms != at {
                    self.open.insert(id, d); // a stale order entry
                    continue;
                }
                state(fx, &id, d.partition, None);
                let ScoredDecision { deployment, model, cohort, .. } = d.decision;
                fx.push(Effect::Unlabelled { deployment, model, cohort });
            }
        }
        while let Some((_, id)) = pop_due(&mut self.early_order, now) {
            if let Some((outcome, source)) = self.early.remove(&id) {
                state(fx, &id, source.partition, None);
                let reason = format!(
                    "no decision for request {id} within {} ms of its label: not decided, decided more than the window ago, \
                     or its deployment has no quality spec",
                    self.config.early_wait_ms
                );
                fx.push(Effect::Rejected { outcome, source, why: Rejected::NoDecision, reason });
            }
        }
        while let Some((_, id)) = pop_due(&mut self.early_shadows_order, now) {
            if let Some((_, partition)) = self.early_shadows.remove(&id) {
                state(fx, &id, partition, None);
            }
        }
        while let Some((_, id)) = pop_due(&mut self.labelled_order, now) {
            if let Some((d, _)) = self.labelled.remove(&id) {
                state(fx, &id, d.partition, None);
            }
        }
    }
}

/// The first entry of `order` if it is due at `now`, taken off it.
fn pop_due(order: &mut VecDeque<(Millis, String)>, now: Millis) -> Option<(Millis, String)> {
    if order.front().is_some_and(|(at, _)| *at <= now) { order.pop_front() } else { None }
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
        SourcePos { topic: "outcomes".into(), partition: 0, offset: 1 }
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
        let mut join = Join::new(CONFIG);
        let mut fx = Vec::new();
        join.on_decision(decision("open", DecisionStatus::Ok, Some("0.9"), 1_000), 2, &binary(), &mut fx);
        join.on_shadow(shadow("open", "v3", "0.1"), 2, &binary(), 1_000, &mut fx);
        join.on_decision(decision("done", DecisionStatus::Ok, Some("0.2"), 1_000), 1, &binary(), &mut fx);
        join.on_outcome(label("done", 0.0, 2_000), src(), |_| binary(), 2_000, &mut fx);
        join.on_outcome(label("early", 1.0, 2_000), src(), |_| binary(), 2_000, &mut fx);
        let records: Vec<(String, Option<Entry>)> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::State { request_id, entry, .. } => Some((request_id.clone(), entry.clone())),
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
        let records: Vec<(String, Option<Entry>)> = records
            .into_iter()
            .map(|(id, e)| {
                let e = e.map(|e| {
                    crate::quality::changelog::decode(
                        &id,
                        &crate::quality::changelog::encode(&e, &codec),
                        &codec,
                        |_| binary(),
                    )
                    .unwrap()
                });
                (id, e)
            })
            .collect();
        let mut restored = Join::restore(CONFIG, records, 2_000);
        assert_eq!((restored.open.len(), restored.labelled.len(), restored.early.len()), (1, 1, 1));
        fx.clear();
        restored.on_outcome(label("open", 1.0, 3_000), src(), |_| binary(), 3_000, &mut fx);
        restored.on_outcome(label("done", 0.0, 3_000), src(), |_| binary(), 3_000, &mut fx);
        restored.on_decision(decision("early", DecisionStatus::Ok, Some("0.8"), 2_500), 0, &binary(), &mut fx);
        let models: Vec<&str> = scored(&fx).iter().map(|s| s.model.as_str()).collect();
        assert_eq!(models, ["v2", "v3", "v2"], "the open request and its shadow, then the early label's decision");
        assert!(visible(&fx).iter().any(|e| matches!(e, Effect::Rejected { why: Rejected::Duplicate, .. })));
    }

    #[test]
    fn labels_before_with_and_after_their_decision_are_scored_once() {
        let mut join = Join::new(CONFIG);
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
        let mut join = Join::new(CONFIG);
        let mut fx = Vec::new();
        join.on_shadow(shadow("a", "v3", "0.2"), 0, &binary(), 0, &mut fx);
        join.on_decision(decision("a", DecisionStatus::Ok, Some("0.9"), 10), 0, &binary(), &mut fx);
        join.on_outcome(label("a", 1.0, 20), src(), |_| binary(), 20, &mut fx);
        let models: Vec<&str> = scored(&fx).iter().map(|s| s.model.as_str()).collect();
        assert_eq!(models, ["v2", "v3"]);
        fx.clear();
        join.on_shadow(shadow("orphan", "v3", "0.2"), 1, &binary(), 0, &mut fx);
        join.expire(CONFIG.early_wait_ms, &mut fx);
        assert!(matches!(fx.last(), Some(Effect::State { entry: None, partition: 1, .. })), "{fx:?}");
    }

    #[test]
    fn windows_end_decisions_and_waiting_labels_with_a_count_or_a_reason() {
        let mut join = Join::new(CONFIG);
        let mut fx = Vec::new();
        join.on_decision(decision("old", DecisionStatus::Ok, Some("0.4"), 0), 0, &binary(), &mut fx);
        join.on_outcome(label("never", 1.0, 1_000), src(), |_| binary(), 1_000, &mut fx);
        fx.clear();
        join.expire(5_999, &mut fx);
        assert!(fx.is_empty());
        join.expire(6_000, &mut fx);
        let seen = visible(&fx);
        assert!(
            matches!(seen[0], Effect::Rejected { why: Rejected::NoDecision, reason, .. } if reason.contains("never"))
        );
        join.expire(60_000, &mut fx);
        let seen = visible(&fx);
        assert!(matches!(seen[1], Effect::Unlabelled { model, cohort, .. } if model == "v2" && cohort == "candidate"));
        assert!(
            fx.iter().any(|e| matches!(e, Effect::State { entry: None, request_id, .. } if request_id == "old")),
            "the changelog forgets it"
        );
        assert_eq!(join.open(), 0);
        fx.clear();
        join.on_outcome(label("old", 1.0, 70_000), src(), |_| binary(), 70_000, &mut fx);
        join.expire(75_000, &mut fx);
        let seen = visible(&fx);
        assert!(matches!(seen[0], Effect::Rejected { why: Rejected::NoDecision, .. }), "past the window: not found");
    }

    #[test]
    fn malformed_labels_are_refused_and_the_decision_keeps_waiting() {
        let mut join = Join::new(CONFIG);
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
        let mut join = Join::new(CONFIG);
        let mut fx = Vec::new();
        join.on_decision(decision("t", DecisionStatus::Timeout, None, 0), 0, &binary(), &mut fx);
        join.on_decision(decision("f", DecisionStatus::Fallback, Some("0.0"), 0), 0, &binary(), &mut fx);
        join.on_outcome(label("t", 1.0, 5), src(), |_| binary(), 5, &mut fx);
        join.on_outcome(label("f", 1.0, 5), src(), |_| binary(), 5, &mut fx);
        let all = scored(&fx);
        assert!(all.iter().all(|s| s.score.is_none() && s.zero_one.is_none()), "{all:?}");
        assert_eq!((all[0].status.as_str(), all[1].status.as_str()), ("TIMEOUT", "FALLBACK"));
        let regression =
            QualitySpec { task: Task::Regression, score: ScoreFormat::JsonField("eta".into()), threshold: 0.5 };
        fx.clear();
        join.on_decision(decision("r", DecisionStatus::Ok, Some(r#"{"eta":12.5}"#), 0), 0, &regression, &mut fx);
        join.on_outcome(label("r", 10.0, 5), src(), |_| regression.clone(), 5, &mut fx);
        let r = scored(&fx)[0];
        assert_eq!((r.absolute_error, r.squared_error, r.zero_one), (Some(2.5), Some(6.25), None));
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_oldest() {
        let mut join = Join::new(JoinConfig { max_open: 2, ..CONFIG });
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
}
