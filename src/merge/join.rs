//! The join state of merge, without I/O: routed records and predictions in, decisions, shadow
//! comparisons and changelog records out. Time is passed in, so every rule is testable without waiting.
//!
//! Rules:
//! - the serving model's first prediction becomes the one decision (OK, or MODEL_ERROR if it carries an
//!   error) if it was written by the deadline (`routed_at + timeout_ms`, judged by the prediction
//!   record's timestamp, so the outcome does not depend on how far behind merge is); a request with no
//!   answer written by its deadline gets a TIMEOUT decision, once merge has read its model's
//!   predictions past the deadline (see [`super::reads`]);
//! - shadow predictions are compared with the served answer (once it exists) and never decided on,
//!   except a hedged canary's: when the serving model's answer is an error or missed the deadline, the
//!   decision waits for the hedge model's answer (by the same deadline) and serves it, status HEDGED;
//!   without one, the failure is the decision;
//! - anything else (a second answer, an answer after the decision, an answer from a model the request
//!   was not routed to) is discarded and counted;
//! - a prediction that arrives before its routed record waits (bounded, for `orphan_ttl_ms`);
//! - every step that publishes something also publishes the request's [`MergeState`] to the changelog,
//!   in the same transaction. After a restart or rebalance, [`Join::restore`] loads those states, and
//!   routed records read again are resumed where they were instead of being decided twice.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::codec::{Decision, DecisionStatus, MergeState, Millis, Prediction, Routed, ShadowComparison};
use crate::kafka::SourcePos;
use crate::telemetry::Event;

/// A routed record read while merge catches up after a restart gets at least this long to meet its
/// predictions, even if its deadline has already passed in wall-clock time.
pub const REPLAY_GRACE_MS: Millis = 1_000;

/// Longest a request waits past its deadline for the answers it still lacks to be read: while a
/// model's predictions topic is not (yet) assigned to this instance (a deployment's new topics take a
/// metadata refresh to be subscribed), or merge reads its partition behind the deadline (catching up
/// after a restart or rebalance).
pub const MAX_WAIT_MS: Millis = 30_000;

/// How often a request waiting for its answers to be read is looked at again.
const RECHECK_MS: Millis = 100;

#[derive(Debug, Clone)]
pub struct JoinConfig {
    pub orphan_ttl_ms: Millis,
    /// Cap on remembered finished request ids.
    pub max_remembered: usize,
    /// Hard cap on predictions waiting for their routed record; past it the oldest are discarded.
    pub max_orphans: usize,
}

/// A record merge publishes.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Decision(Decision),
    Comparison {
        user_id: String,
        comparison: ShadowComparison,
    },
    /// Changelog: how far the request got; goes to the changelog partition of its routed record.
    State {
        user_id: String,
        partition: i32,
        state: MergeState,
    },
}

/// What one step of the join produced: records to publish, input records no longer needed, and the
/// events that count them once they are committed.
#[derive(Debug, Default)]
pub struct Effects {
    pub outputs: Vec<Output>,
    /// For each output (where known), the index of the input record in its batch that caused it.
    /// Filled by the caller, which knows the batch; may be shorter than `outputs` (None for the rest).
    pub origins: Vec<Option<usize>>,
    pub released: Vec<SourcePos>,
    pub events: Vec<Event>,
}

impl Effects {
    /// Keeps only the last changelog state of each request: all of a batch's outputs commit in one
    /// transaction, so an earlier state of the same request is never read without the later one — a
    /// request answered by its serving and shadow models in one batch writes one changelog record, not
    /// two. Origins stay aligned with the outputs.
    pub fn coalesce_states(&mut self) {
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (i, output) in self.outputs.iter().enumerate() {
            if let Output::State { state, .. } = output {
                last.insert(state.request_id.as_str(), i);
            }
        }
        let keep: Vec<bool> = (self.outputs.iter().enumerate())
            .map(|(i, o)| match o {
                Output::State { state, .. } => last[state.request_id.as_str()] == i,
                _ => true,
            })
            .collect();
        if keep.iter().all(|k| *k) {
            return;
        }
        let mut origins = std::mem::take(&mut self.origins);
        origins.resize(self.outputs.len(), None);
        let mut flags = keep.iter();
        self.outputs.retain(|_| *flags.next().expect("one flag per output"));
        let mut flags = keep.iter();
        origins.retain(|_| *flags.next().expect("one flag per origin"));
        self.origins = origins;
    }
}

#[derive(Debug)]
struct ShadowSlot {
    model: String,
    /// An answer held until the served one exists, and when it was written.
    answer: Option<(Prediction, Millis)>,
    compared: bool,
}

/// How the serving model failed a request, while a hedged decision waits for the hedge's answer.
#[derive(Debug)]
enum Failure {
    /// It answered with an error, in time.
    Error(Prediction),
    /// Its answer was written after the deadline, or none was read by it: the message says which.
    Missed(String),
}

impl Failure {
    /// What counts as served for shadow comparisons: the failed answer (or the fallback, for a miss).
    fn served(&self, routed: &Routed) -> Served {
        match self {
            Failure::Error(p) => Served { ok: false, latency_ms: Some(latency(p, routed)), output: p.output.clone() },
            Failure::Missed(_) => Served { ok: false, latency_ms: None, output: routed.fallback.clone() },
        }
    }
}

/// The served answer, once decided.
#[derive(Debug, Clone)]
struct Served {
    output: Option<Vec<u8>>,
    ok: bool,
    latency_ms: Option<i64>,
}

#[derive(Debug)]
struct Entry {
    routed: Routed,
    /// Partition of the routed record, and so of the request's changelog records.
    partition: i32,
    deadline: Millis,
    holds: Vec<SourcePos>,
    served: Option<Served>,
    shadows: Vec<ShadowSlot>,
    /// The serving model's failure, held while the hedge's answer may still come.
    failed: Option<Failure>,
}

impl Entry {
    /// Publishes the decision, and compares the shadow answers held until the served answer existed.
    fn decide(&mut self, decision: Decision, served: Served, now: Millis, fx: &mut Effects) {
        fx.outputs.push(Output::Decision(decision));
        for slot in &mut self.shadows {
            if let Some((answer, _)) = slot.answer.take() {
                compare(&self.routed, &served, slot, answer, now, fx);
            }
        }
        self.served = Some(served);
    }

    /// Decides a request whose serving model failed (`self.failed`): with the hedge model's answer
    /// (HEDGED) when it was written by the deadline without an error; else with the failure itself, once
    /// the hedge's answer is in or `give_up`. Does nothing while the hedge's answer may still come.
    fn decide_failure(&mut self, give_up: bool, now: Millis, fx: &mut Effects) {
        let due = self.routed.routed_at + self.routed.timeout_ms;
        let hedge = self.routed.hedge_model.as_deref().and_then(|m| self.shadows.iter().find(|s| s.model == m));
        let stand_in = match hedge.map(|slot| &slot.answer) {
            Some(Some((answer, written_at))) if answer.error.is_none() && *written_at <= due => Some(answer),
            Some(None) if !give_up => return,
            _ => None,
        };
        let Some(failure) = self.failed.take() else { return };
        let reason = match &failure {
            Failure::Error(p) => {
                format!("{} failed: {}", p.model, p.error.as_deref().unwrap_or_default())
            }
            Failure::Missed(message) => message.clone(),
        };
        let served = failure.served(&self.routed);
        let decision = match (stand_in, failure) {
            (Some(answer), _) => {
                let error = format!("{reason}; {}'s answer served", answer.model);
                let mut d = decision(&self.routed, DecisionStatus::Hedged, answer.output.clone(), Some(error), now);
                d.model = answer.model.clone();
                d
            }
            (None, Failure::Error(p)) => decision(&self.routed, DecisionStatus::ModelError, p.output, p.error, now),
            (None, Failure::Missed(_)) => missed_deadline(&self.routed, reason, now),
        };
        self.decide(decision, served, now, fx);
    }

    fn complete(&self) -> bool {
        self.served.is_some() && self.shadows.iter().all(|s| s.compared)
    }

    fn state(&self, finished: bool) -> Output {
        let served = self.served.clone().unwrap_or(Served { output: None, ok: false, latency_ms: None });
        Output::State {
            user_id: self.routed.user_id.clone(),
            partition: self.partition,
            state: MergeState {
                request_id: self.routed.request_id.clone(),
                served_ok: served.ok,
                served_output: served.output,
                served_latency_ms: served.latency_ms,
                compared: self.shadows.iter().filter(|s| s.compared).map(|s| s.model.clone()).collect(),
                finished,
            },
        }
    }
}

#[derive(Debug)]
pub struct Join {
    config: JoinConfig,
    entries: HashMap<String, Entry>,
    deadlines: BTreeSet<(Millis, String)>,
    orphans: HashMap<String, Vec<(Prediction, SourcePos, Millis)>>,
    orphan_order: VecDeque<(Millis, String)>,
    /// Recently finished requests: later answers to them are discarded at once.
    finished: HashMap<String, Millis>,
    finished_order: VecDeque<(Millis, String)>,
    /// Progress restored from the changelog, waiting for the routed record to be read again.
    restored: HashMap<String, MergeState>,
    /// When the last restore was: the requests it found open had to wait for it, so their wait for
    /// unread answers is counted from it.
    restored_at: Millis,
}

fn latency(prediction: &Prediction, routed: &Routed) -> i64 {
    (prediction.produced_at - routed.routed_at).max(0)
}

impl Join {
    pub fn new(config: JoinConfig) -> Self {
        Join {
            config,
            entries: HashMap::new(),
            deadlines: BTreeSet::new(),
            orphans: HashMap::new(),
            orphan_order: VecDeque::new(),
            finished: HashMap::new(),
            finished_order: VecDeque::new(),
            restored: HashMap::new(),
            restored_at: Millis::MIN,
        }
    }

    /// Requests waiting for an answer or for their shadows.
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// Predictions waiting for their routed record.
    #[cfg(test)]
    pub fn orphans(&self) -> usize {
        self.orphans.values().map(Vec::len).sum()
    }

    /// Loads changelog states (in changelog order: the last state of a request wins), at `now`.
    pub fn restore(&mut self, states: impl IntoIterator<Item = MergeState>, now: Millis) {
        self.restored_at = now;
        for state in states {
            self.restored.insert(state.request_id.clone(), state);
        }
    }

    /// Whether restored states still wait for their routed records.
    pub fn restoring(&self) -> bool {
        !self.restored.is_empty()
    }

    /// Forgets the restored states not resumed: called once every routed record that existed at the
    /// restore has been read again, so theirs were before the committed offset (finished long ago).
    pub fn end_restore(&mut self) {
        if !self.restored.is_empty() {
            tracing::debug!(states = self.restored.len(), "restored states of requests not read again dropped");
            self.restored = HashMap::new();
        }
    }

    pub fn on_routed(&mut self, routed: Routed, pos: SourcePos, now: Millis, fx: &mut Effects) {
        let id = routed.request_id.clone();
        if self.entries.contains_key(&id) || self.finished.contains_key(&id) {
            fx.released.push(pos);
            return;
        }
        let restored = self.restored.remove(&id);
        if restored.as_ref().is_some_and(|state| state.finished) {
            // Finished before the restart: its decision and comparisons are already out.
            fx.released.push(pos);
            for (prediction, pos, _) in self.orphans.remove(&id).unwrap_or_default() {
                fx.events
                    .push(Event::PredictionDiscarded { model: prediction.model.clone(), reason: "after_decision" });
                fx.released.push(pos);
            }
            self.remember_finished(id, now);
            return;
        }
        let deadline = (routed.routed_at + routed.timeout_ms).max(now + REPLAY_GRACE_MS.min(routed.timeout_ms));
        let mut shadows: Vec<ShadowSlot> = routed
            .shadow_models
            .iter()
            .map(|m| ShadowSlot { model: m.clone(), answer: None, compared: false })
            .collect();
        let mut served = None;
        if let Some(state) = restored {
            // Decided before the restart, with shadows still open: resume without deciding again.
            served =
                Some(Served { output: state.served_output, ok: state.served_ok, latency_ms: state.served_latency_ms });
            for slot in &mut shadows {
                slot.compared = state.compared.contains(&slot.model);
            }
        }
        self.deadlines.insert((deadline, id.clone()));
        let partition = pos.partition;
        self.entries
            .insert(id.clone(), Entry { routed, partition, deadline, holds: vec![pos], served, shadows, failed: None });
        for (prediction, pos, written_at) in self.orphans.remove(&id).unwrap_or_default() {
            self.on_prediction(prediction, pos, written_at, now, fx);
        }
    }

    /// `written_at` is when the prediction was written (the record's timestamp).
    pub fn on_prediction(
        &mut self,
        prediction: Prediction,
        pos: SourcePos,
        written_at: Millis,
        now: Millis,
        fx: &mut Effects,
    ) {
        let id = prediction.request_id.clone();
        let Some(entry) = self.entries.get_mut(&id) else {
            if self.finished.contains_key(&id) || self.restored.get(&id).is_some_and(|state| state.finished) {
                fx.events
                    .push(Event::PredictionDiscarded { model: prediction.model.clone(), reason: "after_decision" });
                fx.released.push(pos);
            } else {
                self.orphan_order.push_back((now, id.clone()));
                self.orphans.entry(id).or_default().push((prediction, pos, written_at));
                if self.orphan_order.len() > self.config.max_orphans {
                    self.evict_orphans(now, true, fx);
                }
            }
            return;
        };
        entry.holds.push(pos);
        if prediction.model == entry.routed.serving_model {
            if entry.served.is_some() || entry.failed.is_some() {
                fx.events.push(Event::PredictionDiscarded { model: prediction.model.clone(), reason: "duplicate" });
                return;
            }
            fx.events.push(Event::PredictionLatency {
                model: prediction.model.clone(),
                seconds: latency(&prediction, &entry.routed) as f64 / 1000.0,
            });
            let deadline = entry.routed.routed_at + entry.routed.timeout_ms;
            if written_at > deadline {
                fx.events.push(Event::PredictionDiscarded { model: prediction.model.clone(), reason: "late" });
                entry.failed = Some(Failure::Missed(format!(
                    "{} answered {} ms after routing, past the {} ms deadline",
                    prediction.model,
                    written_at - entry.routed.routed_at,
                    entry.routed.timeout_ms
                )));
            } else if prediction.error.is_some() {
                entry.failed = Some(Failure::Error(prediction));
            } else {
                let served = Served {
                    ok: true,
                    latency_ms: Some(latency(&prediction, &entry.routed)),
                    output: prediction.output.clone(),
                };
                let d = decision(&entry.routed, DecisionStatus::Ok, prediction.output, None, now);
                entry.decide(d, served, now, fx);
            }
            entry.decide_failure(false, now, fx);
            if entry.served.is_none() {
                return; // the hedge's answer may still come: nothing to publish yet
            }
        } else if let Some(slot) = entry.shadows.iter_mut().find(|s| s.model == prediction.model) {
            if slot.compared || slot.answer.is_some() {
                fx.events.push(Event::PredictionDiscarded { model: prediction.model.clone(), reason: "duplicate" });
                return;
            }
            fx.events.push(Event::PredictionLatency {
                model: prediction.model.clone(),
                seconds: latency(&prediction, &entry.routed) as f64 / 1000.0,
            });
            match &entry.served {
                Some(served) => compare(&entry.routed, served, slot, prediction, now, fx),
                None => {
                    slot.answer = Some((prediction, written_at));
                    entry.decide_failure(false, now, fx);
                    if entry.served.is_none() {
                        return;
                    }
                }
            }
        } else {
            fx.events
                .push(Event::PredictionDiscarded { model: prediction.model.clone(), reason: "not_routed_to_model" });
            return;
        }
        if entry.complete() {
            self.finish(&id, now, fx);
        } else {
            fx.outputs.push(entry.state(false));
        }
    }

    /// Decides every request whose deadline passed (TIMEOUT) and, if `routed_flowing`, drops orphans
    /// past their time (while the routed topic is paused, their routed records are merely not read yet).
    /// `read_past(model, partition, t)` says whether merge has read every answer `model` wrote to
    /// `partition` by `t` (false while its predictions topic is not assigned here). A request waits
    /// while an answer it lacks may still be written in time but unread: up to [`MAX_WAIT_MS`] past
    /// its deadline, or past the last restore if that was later.
    pub fn expire(
        &mut self,
        now: Millis,
        read_past: impl Fn(&str, i32, Millis) -> bool,
        routed_flowing: bool,
        fx: &mut Effects,
    ) {
        while let Some((deadline, id)) = self.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(entry) = self.entries.get_mut(&id) else { continue };
            let answers_due = entry.routed.routed_at + entry.routed.timeout_ms;
            let unread = |model: &str| !read_past(model, entry.partition, answers_due);
            let lacking = (entry.served.is_none() && entry.failed.is_none() && unread(&entry.routed.serving_model))
                || (entry.shadows.iter()).any(|s| !s.compared && s.answer.is_none() && unread(&s.model));
            if lacking && now < answers_due.max(self.restored_at) + MAX_WAIT_MS {
                entry.deadline = now + RECHECK_MS;
                self.deadlines.insert((entry.deadline, id));
                continue;
            }
            if entry.served.is_none() {
                let routed = &entry.routed;
                entry.failed.get_or_insert_with(|| {
                    Failure::Missed(format!("{} did not answer within {} ms", routed.serving_model, routed.timeout_ms))
                });
                entry.decide_failure(true, now, fx);
            }
            for slot in entry.shadows.iter().filter(|s| !s.compared) {
                fx.events.push(Event::ShadowMissing {
                    deployment: entry.routed.deployment.clone(),
                    shadow_model: slot.model.clone(),
                });
            }
            self.finish(&id, now, fx);
        }
        if routed_flowing {
            self.evict_orphans(now, false, fx);
        }
        let keep_after = now - self.config.orphan_ttl_ms;
        while let Some((at, _)) = self.finished_order.front() {
            if *at >= keep_after && self.finished_order.len() <= self.config.max_remembered {
                break;
            }
            let (at, id) = self.finished_order.pop_front().expect("front exists");
            if self.finished.get(&id) == Some(&at) {
                self.finished.remove(&id);
            }
        }
    }

    /// Drops orphans older than their TTL, and with `over_cap` also the oldest beyond `max_orphans`.
    fn evict_orphans(&mut self, now: Millis, over_cap: bool, fx: &mut Effects) {
        let keep_after = now - self.config.orphan_ttl_ms;
        while let Some((at, _)) = self.orphan_order.front() {
            if *at >= keep_after && !(over_cap && self.orphan_order.len() > self.config.max_orphans) {
                break;
            }
            let (_, id) = self.orphan_order.pop_front().expect("front exists");
            if let Some(waiting) = self.orphans.remove(&id) {
                for (prediction, pos, _) in waiting {
                    tracing::warn!(request_id = %id, model = %prediction.model, "prediction for a request never routed; discarded");
                    fx.events.push(Event::PredictionDiscarded {
                        model: prediction.model.clone(),
                        reason: "unknown_request",
                    });
                    fx.released.push(pos);
                }
            }
        }
    }

    fn finish(&mut self, id: &str, now: Millis, fx: &mut Effects) {
        if let Some(entry) = self.entries.remove(id) {
            self.deadlines.remove(&(entry.deadline, id.to_string()));
            fx.outputs.push(entry.state(true));
            fx.released.extend(entry.holds);
            self.remember_finished(id.to_string(), now);
        }
    }

    fn remember_finished(&mut self, id: String, now: Millis) {
        self.finished.insert(id.clone(), now);
        self.finished_order.push_back((now, id));
    }
}

fn decision(
    routed: &Routed,
    status: DecisionStatus,
    output: Option<Vec<u8>>,
    error: Option<String>,
    now: Millis,
) -> Decision {
    Decision {
        request_id: routed.request_id.clone(),
        user_id: routed.user_id.clone(),
        deployment: routed.deployment.clone(),
        model: routed.serving_model.clone(),
        strategy: routed.strategy.clone(),
        cohort: routed.cohort.clone(),
        bucket: routed.bucket,
        config_version: routed.config_version,
        status,
        output,
        error,
        latency_ms: (now - routed.sent_at).max(0),
        decided_at: now,
        propensity: routed.propensity,
    }
}

/// The decision for a request whose serving model missed the deadline: the deployment's fallback answer
/// (FALLBACK) if it has one, else TIMEOUT.
fn missed_deadline(routed: &Routed, error: String, now: Millis) -> Decision {
    let status = if routed.fallback.is_some() { DecisionStatus::Fallback } else { DecisionStatus::Timeout };
    decision(routed, status, routed.fallback.clone(), Some(error), now)
}

fn compare(routed: &Routed, served: &Served, slot: &mut ShadowSlot, answer: Prediction, now: Millis, fx: &mut Effects) {
    let agreed = served.ok && answer.error.is_none() && served.output == answer.output;
    fx.events.push(Event::ShadowCompared {
        deployment: routed.deployment.clone(),
        shadow_model: slot.model.clone(),
        agreed,
    });
    slot.compared = true;
    fx.outputs.push(Output::Comparison {
        user_id: routed.user_id.clone(),
        comparison: ShadowComparison {
            request_id: routed.request_id.clone(),
            deployment: routed.deployment.clone(),
            serving_model: routed.serving_model.clone(),
            serving_output: served.output.clone(),
            shadow_model: slot.model.clone(),
            shadow_latency_ms: latency(&answer, routed),
            shadow_output: answer.output,
            agreed,
            serving_latency_ms: served.latency_ms,
            compared_at: now,
        },
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join() -> Join {
        Join::new(JoinConfig { orphan_ttl_ms: 10_000, max_remembered: 1000, max_orphans: 1000 })
    }

    fn routed(id: &str, shadows: &[&str]) -> Routed {
        Routed {
            request_id: id.into(),
            user_id: format!("user-{id}"),
            deployment: "d".into(),
            strategy: "shadow".into(),
            cohort: "control".into(),
            bucket: 7,
            config_version: 2,
            serving_model: "v1".into(),
            shadow_models: shadows.iter().map(|s| s.to_string()).collect(),
            timeout_ms: 500,
            sent_at: 900,
            routed_at: 1000,
            fallback: None,
            hedge_model: None,
            propensity: Some(1.0),
        }
    }

    fn answer(id: &str, model: &str, output: &str, at: Millis) -> Prediction {
        Prediction {
            request_id: id.into(),
            model: model.into(),
            output: Some(output.as_bytes().to_vec()),
            error: None,
            produced_at: at,
        }
    }

    fn pos(offset: i64) -> SourcePos {
        SourcePos { topic: "t".into(), partition: 0, offset }
    }

    fn decisions(fx: &Effects) -> Vec<&Decision> {
        fx.outputs.iter().filter_map(|o| if let Output::Decision(d) = o { Some(d) } else { None }).collect()
    }

    fn comparisons(fx: &Effects) -> Vec<&ShadowComparison> {
        fx.outputs
            .iter()
            .filter_map(|o| if let Output::Comparison { comparison, .. } = o { Some(comparison) } else { None })
            .collect()
    }

    #[test]
    fn serving_answer_decides_and_shadow_is_compared_not_served() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_routed(routed("a", &["v2"]), pos(0), 1000, &mut fx);
        j.on_prediction(answer("a", "v2", "yes", 1010), pos(1), 1010, 1011, &mut fx);
        assert!(fx.outputs.is_empty(), "a shadow answer alone decides nothing");
        j.on_prediction(answer("a", "v1", "no", 1020), pos(2), 1020, 1021, &mut fx);
        let d = decisions(&fx);
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].model.as_str(), d[0].output.as_deref(), d[0].status),
            ("v1", Some(&b"no"[..]), DecisionStatus::Ok)
        );
        assert_eq!(d[0].latency_ms, 1021 - 900);
        let c = comparisons(&fx);
        assert_eq!(c.len(), 1);
        assert!(!c[0].agreed);
        assert_eq!((c[0].serving_latency_ms, c[0].shadow_latency_ms), (Some(20), 10));
        assert_eq!(j.pending(), 0);
        assert_eq!(fx.released.len(), 3, "all input records released once complete");
    }

    #[test]
    fn agreement_and_late_duplicates() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_routed(routed("a", &["v2"]), pos(0), 1000, &mut fx);
        j.on_prediction(answer("a", "v1", "same", 1005), pos(1), 1005, 1006, &mut fx);
        assert_eq!(j.pending(), 1, "waits for the shadow");
        j.on_prediction(answer("a", "v2", "same", 1007), pos(2), 1007, 1008, &mut fx);
        assert!(comparisons(&fx)[0].agreed);
        j.on_prediction(answer("a", "v1", "again", 1009), pos(3), 1009, 1010, &mut fx);
        j.on_routed(routed("a", &["v2"]), pos(4), 1011, &mut fx);
        j.expire(5000, |_, _, _| true, true, &mut fx);
        assert_eq!(decisions(&fx).len(), 1, "one decision whatever arrives later");
        assert_eq!(fx.released.len(), 5);
    }

    #[test]
    fn timeout_gives_exactly_one_decision() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_routed(routed("a", &["v2"]), pos(0), 1000, &mut fx);
        j.on_prediction(answer("a", "v2", "s", 1100), pos(1), 1100, 1100, &mut fx);
        j.expire(1499, |_, _, _| true, true, &mut fx);
        assert!(decisions(&fx).is_empty());
        j.expire(1500, |_, _, _| true, true, &mut fx);
        let d = decisions(&fx);
        assert_eq!((d.len(), d[0].status, d[0].output.is_none()), (1, DecisionStatus::Timeout, true));
        assert!(d[0].error.as_deref().unwrap().contains("v1 did not answer within 500 ms"));
        assert_eq!(comparisons(&fx).len(), 1, "the shadow answer is still compared");
        assert!(!comparisons(&fx)[0].agreed);
        j.on_prediction(answer("a", "v1", "late", 1600), pos(2), 1600, 1600, &mut fx);
        assert_eq!(decisions(&fx).len(), 1, "a late answer is not a second decision");
    }

    #[test]
    fn an_answer_written_after_the_deadline_is_a_timeout_however_early_merge_reads_it() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_routed(routed("a", &[]), pos(0), 1000, &mut fx);
        j.on_prediction(answer("a", "v1", "x", 1501), pos(1), 1501, 1100, &mut fx);
        let d = decisions(&fx);
        assert_eq!((d.len(), d[0].status, d[0].output.is_none()), (1, DecisionStatus::Timeout, true));
        assert!(d[0].error.as_deref().unwrap().contains("past the 500 ms deadline"));
        j.on_routed(routed("b", &[]), pos(2), 1000, &mut fx);
        j.on_prediction(answer("b", "v1", "x", 1500), pos(3), 1500, 1600, &mut fx);
        assert_eq!(decisions(&fx)[1].status, DecisionStatus::Ok, "written exactly at the deadline is on time");
    }

    #[test]
    fn a_configured_fallback_replaces_the_timeout() {
        let mut j = join();
        let mut fx = Effects::default();
        let mut with_fallback = routed("a", &[]);
        with_fallback.fallback = Some(b"0.5".to_vec());
        j.on_routed(with_fallback.clone(), pos(0), 1000, &mut fx);
        j.expire(1500, |_, _, _| true, true, &mut fx);
        let mut late = with_fallback;
        late.request_id = "b".into();
        j.on_routed(late, pos(1), 1000, &mut fx);
        j.on_prediction(answer("b", "v1", "x", 1600), pos(2), 1600, 1600, &mut fx);
        let d = decisions(&fx);
        assert_eq!(d.len(), 2);
        for d in d {
            assert_eq!(
                (d.status, d.output.as_deref(), d.model.as_str()),
                (DecisionStatus::Fallback, Some(&b"0.5"[..]), "v1")
            );
            assert!(d.error.is_some(), "the reason stays visible");
        }
    }

    #[test]
    fn model_error_is_a_decision() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_routed(routed("a", &[]), pos(0), 1000, &mut fx);
        let mut failed = answer("a", "v1", "", 1001);
        failed.output = None;
        failed.error = Some("boom".into());
        j.on_prediction(failed, pos(1), 1001, 1002, &mut fx);
        let d = decisions(&fx);
        assert_eq!((d[0].status, d[0].error.as_deref()), (DecisionStatus::ModelError, Some("boom")));
    }

    #[test]
    fn prediction_before_routed_record_waits_and_unknown_ones_expire() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_prediction(answer("a", "v1", "x", 1000), pos(1), 1000, 1000, &mut fx);
        j.on_prediction(answer("ghost", "v1", "x", 1000), pos(2), 1000, 1000, &mut fx);
        assert_eq!(j.orphans(), 2);
        j.on_routed(routed("a", &[]), pos(0), 1001, &mut fx);
        assert_eq!(decisions(&fx).len(), 1);
        j.expire(1000 + 10_001, |_, _, _| true, true, &mut fx);
        assert_eq!(j.orphans(), 0);
        assert_eq!(fx.released.len(), 3);
    }

    #[test]
    fn orphans_wait_while_the_routed_topic_is_paused() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_prediction(answer("a", "v1", "x", 1000), pos(1), 1000, 1000, &mut fx);
        j.expire(1000 + 20_000, |_, _, _| true, false, &mut fx);
        assert_eq!(j.orphans(), 1, "kept past its TTL while routed records are not being read");
        j.on_routed(routed("a", &[]), pos(0), 21_000, &mut fx);
        assert_eq!(decisions(&fx)[0].status, DecisionStatus::Ok);
    }

    #[test]
    fn answers_from_models_not_routed_to_are_ignored() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_routed(routed("a", &["v2"]), pos(0), 1000, &mut fx);
        j.on_prediction(answer("a", "v9", "x", 1001), pos(1), 1001, 1001, &mut fx);
        assert!(fx.outputs.is_empty());
        assert_eq!(j.pending(), 1);
    }

    #[test]
    fn waits_while_answers_written_in_time_may_be_unread_but_not_forever() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_routed(routed("a", &["v2"]), pos(0), 1000, &mut fx);
        j.expire(1600, |model, _, _| model != "v1", true, &mut fx);
        assert!(decisions(&fx).is_empty(), "v1's partition is not read past the deadline (1500): no timeout");
        j.on_prediction(answer("a", "v1", "x", 1450), pos(1), 1450, 1800, &mut fx);
        assert_eq!(decisions(&fx)[0].status, DecisionStatus::Ok);
        j.expire(1900, |model, _, _| model != "v2", true, &mut fx);
        assert_eq!(j.pending(), 1, "the shadow's answer may still be unread");
        j.expire(2000, |_, partition, t| partition == 0 && t == 1500, true, &mut fx);
        assert_eq!(j.pending(), 0, "read past the deadline on the request's partition: the shadow is missing");
        j.on_routed(routed("b", &[]), pos(2), 1000, &mut fx);
        j.expire(1000 + 500 + MAX_WAIT_MS - 1, |_, _, _| false, true, &mut fx);
        assert_eq!(decisions(&fx).len(), 1);
        j.expire(1000 + 500 + MAX_WAIT_MS + RECHECK_MS, |_, _, _| false, true, &mut fx);
        assert_eq!(decisions(&fx)[1].status, DecisionStatus::Timeout, "not forever");
        // After a restore, counted from it: the requests it found open waited for it.
        let mut j = join();
        let mut fx = Effects::default();
        j.restore([], 20_000);
        j.on_routed(routed("c", &[]), pos(3), 20_000, &mut fx);
        j.expire(20_000 + MAX_WAIT_MS - 1, |_, _, _| false, true, &mut fx);
        assert!(decisions(&fx).is_empty());
        j.expire(20_000 + MAX_WAIT_MS + RECHECK_MS, |_, _, _| false, true, &mut fx);
        assert_eq!(decisions(&fx)[0].status, DecisionStatus::Timeout);
    }

    fn states(fx: &Effects) -> Vec<MergeState> {
        fx.outputs
            .iter()
            .filter_map(|o| if let Output::State { state, .. } = o { Some(state.clone()) } else { None })
            .collect()
    }

    #[test]
    fn restored_states_prevent_a_second_decision_and_resume_open_shadows() {
        // First life: "a" finishes, "b" is decided while its shadow is still open; then a crash.
        let mut first = join();
        let mut fx = Effects::default();
        first.on_routed(routed("a", &[]), pos(0), 1000, &mut fx);
        first.on_routed(routed("b", &["v2"]), pos(1), 1000, &mut fx);
        first.on_prediction(answer("a", "v1", "x", 1010), pos(2), 1010, 1011, &mut fx);
        first.on_prediction(answer("b", "v1", "y", 1010), pos(3), 1010, 1011, &mut fx);
        assert_eq!(decisions(&fx).len(), 2);
        let changelog = states(&fx);
        assert!(changelog.iter().any(|s| s.request_id == "a" && s.finished));
        assert!(
            changelog
                .iter()
                .any(|s| s.request_id == "b" && !s.finished && s.served_output.as_deref() == Some(&b"y"[..]))
        );

        // Second life: the same inputs are read again from the committed offsets.
        let mut second = join();
        second.restore(changelog, 2000);
        let mut fx = Effects::default();
        second.on_prediction(answer("a", "v1", "x", 1010), pos(2), 1010, 2000, &mut fx);
        assert_eq!(second.orphans(), 0, "an answer to a finished request is not kept waiting");
        second.on_routed(routed("a", &[]), pos(0), 2000, &mut fx);
        second.on_routed(routed("b", &["v2"]), pos(1), 2000, &mut fx);
        second.on_prediction(answer("b", "v1", "y", 1010), pos(3), 1010, 2001, &mut fx);
        assert!(decisions(&fx).is_empty(), "nothing is decided twice");
        second.on_prediction(answer("b", "v2", "y", 1020), pos(4), 1020, 2002, &mut fx);
        let c = comparisons(&fx);
        assert_eq!(c.len(), 1);
        assert!(c[0].agreed, "compared with the answer served before the restart");
        assert_eq!(second.pending(), 0);
        assert_eq!(fx.released.len(), 5);
    }

    #[test]
    fn every_published_step_is_in_the_changelog() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_routed(routed("a", &["v2"]), pos(0), 1000, &mut fx);
        j.on_prediction(answer("a", "v1", "x", 1010), pos(1), 1010, 1011, &mut fx);
        assert_eq!(states(&fx).len(), 1);
        j.on_prediction(answer("a", "v2", "x", 1010), pos(2), 1010, 1012, &mut fx);
        let s = states(&fx);
        assert_eq!((s.len(), s[1].finished, s[1].compared.clone()), (2, true, vec!["v2".to_string()]));
        j.on_routed(routed("t", &[]), pos(3), 1000, &mut fx);
        j.expire(1500, |_, _, _| true, true, &mut fx);
        assert!(states(&fx).last().unwrap().finished, "a timeout is recorded too");
    }

    #[test]
    fn a_batch_writes_one_changelog_state_per_request_the_last() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_routed(routed("a", &["v2"]), pos(0), 1000, &mut fx);
        j.on_routed(routed("b", &["v2"]), pos(1), 1000, &mut fx);
        j.on_prediction(answer("a", "v1", "x", 1010), pos(2), 1010, 1011, &mut fx);
        j.on_prediction(answer("b", "v1", "x", 1010), pos(3), 1010, 1011, &mut fx);
        j.on_prediction(answer("a", "v2", "x", 1010), pos(4), 1010, 1012, &mut fx);
        fx.origins = (0..fx.outputs.len()).map(Some).collect();
        let before = fx.outputs.len();
        let tagged: Vec<(String, Option<usize>)> =
            fx.outputs.iter().zip(&fx.origins).map(|(o, origin)| (format!("{o:?}"), *origin)).collect();
        fx.coalesce_states();
        let s = states(&fx);
        assert_eq!(s.iter().map(|s| s.request_id.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert!(s[1].finished, "a's last state is the one kept");
        assert_eq!(fx.outputs.len(), before - 1, "only a's earlier state dropped");
        assert_eq!((decisions(&fx).len(), comparisons(&fx).len()), (2, 1));
        for (o, origin) in fx.outputs.iter().zip(&fx.origins) {
            assert!(tagged.contains(&(format!("{o:?}"), *origin)), "origins stay with their outputs");
        }
        // Restoring the coalesced changelog gives the same state as the full one.
        let mut restored = join();
        restored.restore(s, 2000);
        let mut again = Effects::default();
        restored.on_routed(routed("a", &["v2"]), pos(0), 2000, &mut again);
        restored.on_prediction(answer("a", "v2", "x", 1010), pos(4), 1010, 2001, &mut again);
        assert!(decisions(&again).is_empty() && comparisons(&again).is_empty(), "a is finished");
    }

    /// Each decision's (request, status, model).
    fn by_request<'a>(decisions: &[&'a Decision]) -> Vec<(&'a str, DecisionStatus, &'a str)> {
        decisions.iter().map(|d| (d.request_id.as_str(), d.status, d.model.as_str())).collect()
    }

    fn hedged(id: &str) -> Routed {
        let mut r = routed(id, &["v1"]);
        (r.strategy, r.cohort, r.serving_model, r.hedge_model) =
            ("canary".into(), "candidate".into(), "v2".into(), Some("v1".into()));
        r
    }

    fn failed(id: &str, model: &str, at: Millis) -> Prediction {
        Prediction { output: None, error: Some("boom".into()), ..answer(id, model, "", at) }
    }

    #[test]
    fn a_hedged_canary_serves_control_when_the_candidate_fails_and_only_then() {
        let mut j = join();
        let mut fx = Effects::default();
        // Candidate errs first: the decision waits for control's answer, then serves it.
        j.on_routed(hedged("err"), pos(0), 1000, &mut fx);
        j.on_prediction(failed("err", "v2", 1010), pos(1), 1010, 1011, &mut fx);
        assert!(fx.outputs.is_empty(), "nothing published while control may still answer");
        j.on_prediction(answer("err", "v1", "safe", 1020), pos(2), 1020, 1021, &mut fx);
        // Control first, then the candidate errs: at once.
        j.on_routed(hedged("first"), pos(3), 1000, &mut fx);
        j.on_prediction(answer("first", "v1", "safe", 1005), pos(4), 1005, 1006, &mut fx);
        j.on_prediction(failed("first", "v2", 1010), pos(5), 1010, 1011, &mut fx);
        // The candidate answers well: it is served, control's answer only compared.
        j.on_routed(hedged("ok"), pos(6), 1000, &mut fx);
        j.on_prediction(answer("ok", "v2", "mine", 1010), pos(7), 1010, 1011, &mut fx);
        j.on_prediction(answer("ok", "v1", "safe", 1012), pos(8), 1012, 1013, &mut fx);
        // The candidate says nothing: at the deadline, control's answer written in time.
        j.on_routed(hedged("silent"), pos(9), 1000, &mut fx);
        j.on_prediction(answer("silent", "v1", "safe", 1100), pos(10), 1100, 1101, &mut fx);
        j.expire(1500, |_, _, _| true, true, &mut fx);
        let d = decisions(&fx);
        assert_eq!(
            by_request(&d),
            [
                ("err", DecisionStatus::Hedged, "v1"),
                ("first", DecisionStatus::Hedged, "v1"),
                ("ok", DecisionStatus::Ok, "v2"),
                ("silent", DecisionStatus::Hedged, "v1")
            ]
        );
        for hedged in [d[0], d[1], d[3]] {
            assert_eq!((hedged.output.as_deref(), hedged.cohort.as_str()), (Some(&b"safe"[..]), "candidate"));
        }
        assert!(d[0].error.as_deref().unwrap().starts_with("v2 failed: boom; v1's answer served"));
        assert!(d[3].error.as_deref().unwrap().contains("v2 did not answer within 500 ms"));
        let c = comparisons(&fx);
        assert_eq!(c.len(), 4, "control's answer is compared with the candidate's in every case");
        assert_eq!(c.iter().filter(|c| c.agreed).count(), 0);
        assert_eq!(j.pending(), 0);
        assert_eq!(fx.released.len(), 11);
    }

    #[test]
    fn a_hedged_canary_keeps_the_failure_when_control_cannot_stand_in() {
        let mut j = join();
        let mut fx = Effects::default();
        j.on_routed(hedged("both"), pos(0), 1000, &mut fx);
        j.on_prediction(failed("both", "v1", 1005), pos(1), 1005, 1006, &mut fx);
        j.on_prediction(failed("both", "v2", 1010), pos(2), 1010, 1011, &mut fx);
        j.on_routed(hedged("late"), pos(3), 1000, &mut fx);
        j.on_prediction(answer("late", "v1", "safe", 1600), pos(4), 1600, 1601, &mut fx);
        j.on_routed(hedged("alone"), pos(5), 1000, &mut fx);
        j.on_prediction(failed("alone", "v2", 1010), pos(6), 1010, 1011, &mut fx);
        j.expire(1500, |model, _, _| model != "v1", true, &mut fx);
        assert_eq!(decisions(&fx).len(), 2, "alone's stand-in may still be unread; late's was written too late");
        j.expire(1700, |_, _, _| true, true, &mut fx);
        let d = decisions(&fx);
        assert_eq!(
            by_request(&d),
            [
                ("both", DecisionStatus::ModelError, "v2"),
                ("late", DecisionStatus::Timeout, "v2"),
                ("alone", DecisionStatus::ModelError, "v2")
            ]
        );
        assert_eq!(d[2].error.as_deref(), Some("boom"));
    }

    #[test]
    fn a_hedged_decision_is_not_made_twice_after_a_restart() {
        let mut first = join();
        let mut fx = Effects::default();
        first.on_routed(hedged("h"), pos(0), 1000, &mut fx);
        first.on_prediction(failed("h", "v2", 1010), pos(1), 1010, 1011, &mut fx);
        assert!(states(&fx).is_empty(), "no state while the decision waits for control");
        first.on_prediction(answer("h", "v1", "safe", 1020), pos(2), 1020, 1021, &mut fx);
        assert_eq!(decisions(&fx)[0].status, DecisionStatus::Hedged);
        let mut second = join();
        second.restore(states(&fx), 2000);
        let mut again = Effects::default();
        second.on_routed(hedged("h"), pos(0), 2000, &mut again);
        second.on_prediction(failed("h", "v2", 1010), pos(1), 1010, 2001, &mut again);
        second.on_prediction(answer("h", "v1", "safe", 1020), pos(2), 1020, 2002, &mut again);
        assert!(decisions(&again).is_empty());
    }

    #[test]
    fn replayed_routed_record_gets_a_grace_period() {
        let mut j = join();
        let mut fx = Effects::default();
        // Routed long ago (merge restarted); its answer is further down the predictions topic.
        j.on_routed(routed("a", &[]), pos(0), 60_000, &mut fx);
        j.expire(60_400, |_, _, _| true, true, &mut fx);
        assert!(decisions(&fx).is_empty());
        j.on_prediction(answer("a", "v1", "x", 1100), pos(1), 1100, 60_400, &mut fx);
        assert_eq!(decisions(&fx)[0].status, DecisionStatus::Ok);
    }
}
