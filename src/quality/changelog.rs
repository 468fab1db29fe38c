//! The score stage's changelog records: a request's [`Entry`] as a `ScoreState` (Avro through the codec,
//! like merge's `MergeState`), keyed by request id.
//!
//! An entry keeps a score per answer, never the answer's bytes, so its size does not depend on the
//! answers': it is the ids its decision carries (a request's, at most `service.max_request_bytes`) plus
//! at most `config::SCORE_STATE_ROOM` (fixed fields, a score and a name per shadow model, a label's
//! source), which the start-up size check counts.
//!
//! Entries written by earlier versions are JSON with the answers' bytes: [`decode`] still reads them,
//! reading each answer's score with the quality spec now in force for its deployment.

use serde::Deserialize;

use super::join::{Decided, Entry, answer_score};
use crate::codec::{
    Codec, DecisionStatus, Label, Millis, Outcome, ScoreState, ScoreStateKind, ScoredDecision, ShadowScore,
};
use crate::kafka::SourcePos;
use crate::record::quality::QualitySpec;

/// The changelog value of `entry`.
pub fn encode(entry: &Entry, codec: &Codec) -> Vec<u8> {
    codec.encode(&state_of(entry))
}

/// The entry of request `request_id` in a changelog value, Avro or (written by an earlier version) JSON.
/// `spec_of` gives the quality spec of a deployment (None: of the deployment of early shadow answers,
/// which an old entry does not name), to read old entries' answers' scores.
pub fn decode(
    request_id: &str,
    value: &[u8],
    codec: &Codec,
    spec_of: impl Fn(Option<&str>) -> QualitySpec,
) -> Result<Entry, String> {
    match codec.decode::<ScoreState>(value) {
        Ok(state) => entry_of(request_id, state),
        // An Avro value never starts with `{` (plain: an enum index 0..3; framed: magic byte 0).
        Err(error) if value.first() != Some(&b'{') => Err(error.to_string()),
        Err(_) => serde_json::from_slice::<Legacy>(value)
            .map(|legacy| legacy.entry(&spec_of))
            .map_err(|e| format!("neither a ScoreState nor an earlier version's JSON entry: {e}")),
    }
}

fn state_of(entry: &Entry) -> ScoreState {
    let empty = ScoreState {
        state: ScoreStateKind::Open,
        partition: 0,
        decision: None,
        shadows: Vec::new(),
        label: None,
        label_topic: None,
        label_offset: None,
    };
    let decision = |d: &Decided| d.decision.clone();
    let label = |o: &Outcome, user_id: &str| Label {
        user_id: user_id.to_string(),
        label: o.label,
        observed_at: o.observed_at,
        source: o.source.clone(),
    };
    match entry {
        Entry::Open(d) => {
            ScoreState { partition: d.partition, decision: Some(decision(d)), shadows: d.shadows.clone(), ..empty }
        }
        // The label's user is its decision's: not written twice.
        Entry::Labelled(d, o) | Entry::Held(d, o) => ScoreState {
            state: if matches!(entry, Entry::Held(..)) { ScoreStateKind::Held } else { ScoreStateKind::Labelled },
            partition: d.partition,
            decision: Some(decision(d)),
            shadows: d.shadows.clone(),
            label: Some(label(o, "")),
            ..empty
        },
        Entry::Early(o, source, shadows) => ScoreState {
            state: ScoreStateKind::Early,
            partition: source.partition,
            shadows: shadows.clone(),
            label: Some(label(o, &o.user_id)),
            label_topic: Some(source.topic.clone()),
            label_offset: Some(source.offset),
            ..empty
        },
        Entry::EarlyShadows(answers, partition) => {
            ScoreState { state: ScoreStateKind::EarlyShadows, partition: *partition, shadows: answers.clone(), ..empty }
        }
    }
}

fn entry_of(request_id: &str, state: ScoreState) -> Result<Entry, String> {
    let ScoreState { state: kind, partition, decision, shadows, label, label_topic, label_offset } = state;
    let decided = |d: Option<ScoredDecision>| {
        let d = d.ok_or("a decided state without its decision")?;
        Ok::<_, String>(Decided { partition, decision: d, shadows: shadows.clone() })
    };
    let outcome = |l: Option<Label>, user_id: Option<&str>| {
        let l = l.ok_or("a labelled state without its label")?;
        Ok::<_, String>(Outcome {
            request_id: request_id.to_string(),
            user_id: user_id.map_or(l.user_id, str::to_string),
            label: l.label,
            observed_at: l.observed_at,
            source: l.source,
        })
    };
    Ok(match kind {
        ScoreStateKind::Open => Entry::Open(decided(decision)?),
        ScoreStateKind::Labelled | ScoreStateKind::Held => {
            let d = decided(decision)?;
            let o = outcome(label, Some(&d.decision.user_id))?;
            if kind == ScoreStateKind::Held { Entry::Held(d, o) } else { Entry::Labelled(d, o) }
        }
        ScoreStateKind::Early => {
            let source =
                SourcePos { topic: label_topic.unwrap_or_default(), partition, offset: label_offset.unwrap_or(-1) };
            Entry::Early(outcome(label, None)?, source, shadows)
        }
        ScoreStateKind::EarlyShadows => Entry::EarlyShadows(shadows, partition),
    })
}

/// An entry as versions before the Avro changelog wrote it: JSON, with the answers' bytes.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Legacy {
    Open(LegacyDecided),
    Labelled(LegacyDecided, Outcome),
    Early(Outcome, SourcePos),
    EarlyShadows(Vec<(String, Option<Vec<u8>>)>, i32),
}

#[derive(Deserialize)]
struct LegacyDecided {
    partition: i32,
    user_id: String,
    deployment: String,
    model: String,
    cohort: String,
    config_version: i64,
    status: DecisionStatus,
    output: Option<Vec<u8>>,
    decided_at: Millis,
    shadows: Vec<(String, Option<Vec<u8>>)>,
}

fn legacy_shadows(answers: Vec<(String, Option<Vec<u8>>)>, spec: &QualitySpec) -> Vec<ShadowScore> {
    (answers.into_iter())
        .map(|(model, output)| ShadowScore {
            model,
            answered: output.is_some(),
            score: output.and_then(|o| answer_score(spec, &o)),
        })
        .collect()
}

impl LegacyDecided {
    fn decided(self, spec_of: &impl Fn(Option<&str>) -> QualitySpec) -> Decided {
        let spec = spec_of(Some(&self.deployment));
        let served = self.status == DecisionStatus::Ok;
        Decided {
            partition: self.partition,
            decision: ScoredDecision {
                score: self.output.filter(|_| served).and_then(|o| answer_score(&spec, &o)),
                user_id: self.user_id,
                deployment: self.deployment,
                model: self.model,
                cohort: self.cohort,
                config_version: self.config_version,
                status: self.status,
                decided_at: self.decided_at,
            },
            shadows: legacy_shadows(self.shadows, &spec),
        }
    }
}

impl Legacy {
    fn entry(self, spec_of: &impl Fn(Option<&str>) -> QualitySpec) -> Entry {
        match self {
            Legacy::Open(d) => Entry::Open(d.decided(spec_of)),
            Legacy::Labelled(d, o) => Entry::Labelled(d.decided(spec_of), o),
            Legacy::Early(o, source) => Entry::Early(o, source, Vec::new()),
            Legacy::EarlyShadows(answers, partition) => {
                Entry::EarlyShadows(legacy_shadows(answers, &spec_of(None)), partition)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Decision, ShadowComparison};
    use crate::config::{Config, SCORE_STATE_ROOM};
    use crate::quality::join::{Effect, Join, JoinConfig};
    use crate::quality::store::MemStates;
    use crate::record::quality::ScoreFormat;

    const CONFIG: JoinConfig = JoinConfig { window_ms: 60_000, early_wait_ms: 5_000, max_open: 1000 };

    fn codecs() -> Vec<Codec> {
        let ids = Config::load(None, Vec::new()).unwrap().codec.schema_ids;
        vec![Codec::default(), Codec::new(crate::codec::Framing::Confluent(ids))]
    }

    /// `{"score": 0.9, "pad": "xxx…"}`, `size` bytes.
    fn big_output(size: usize) -> Vec<u8> {
        let head = br#"{"score": 0.9, "pad": ""#;
        let mut out = head.to_vec();
        out.resize(size - 2, b'x');
        out.extend_from_slice(br#""}"#);
        out
    }

    fn decision(id: &str, user: &str, output: Vec<u8>) -> Decision {
        Decision {
            request_id: id.into(),
            user_id: user.into(),
            deployment: "fraud".into(),
            model: "v1".into(),
            strategy: "canary".into(),
            cohort: "control".into(),
            bucket: 7,
            config_version: 3,
            status: DecisionStatus::Ok,
            output: Some(output),
            error: None,
            latency_ms: 10,
            decided_at: 1_000,
            propensity: None,
        }
    }

    fn shadow(id: &str, model: &str, output: Option<Vec<u8>>) -> ShadowComparison {
        ShadowComparison {
            request_id: id.into(),
            deployment: "fraud".into(),
            serving_model: "v1".into(),
            serving_output: None,
            shadow_model: model.into(),
            shadow_output: output,
            agreed: false,
            serving_latency_ms: None,
            shadow_latency_ms: 5,
            compared_at: 0,
        }
    }

    fn label(id: &str, user: &str) -> Outcome {
        Outcome { request_id: id.into(), user_id: user.into(), label: 1.0, observed_at: 2_000, source: "test".into() }
    }

    fn states(fx: &[Effect]) -> Vec<(String, Entry)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::State { request_id, entry: Some(entry), .. } => Some((request_id.clone(), entry.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_entry_keeps_scores_not_answers_and_stays_small_whatever_their_size() {
        let spec = QualitySpec { score: ScoreFormat::JsonField("score".into()), ..QualitySpec::default() };
        let mut join = Join::new(CONFIG, MemStates::default());
        let mut fx = Vec::new();
        join.on_decision(decision("r", "user-1", big_output(1_000_000)), 1, &spec, &mut fx);
        for (i, model) in ["v2", "v3", "v4", "v5"].into_iter().enumerate() {
            let output = (i != 3).then(|| big_output(1_000_000 - i));
            join.on_shadow(shadow("r", model, output), 1, &spec, 1_000, &mut fx);
        }
        join.on_outcome(
            label("r", "user-1"),
            SourcePos { topic: "o".into(), partition: 1, offset: 4 },
            |_| spec.clone(),
            2_000,
            &mut fx,
        );
        let written = states(&fx);
        assert_eq!(written.len(), 6, "open, four shadows, labelled");
        for codec in codecs() {
            for (id, entry) in &written {
                let bytes = encode(entry, &codec);
                assert!(bytes.len() < 200, "{} bytes for {entry:?}", bytes.len());
                assert_eq!(&decode(id, &bytes, &codec, |_| spec.clone()).unwrap(), entry);
            }
        }
        let Entry::Labelled(d, _) = &written[5].1 else { panic!("{written:?}") };
        assert_eq!(d.decision.score, Some(0.9), "the served answer's score, read from its 1,000,000 bytes");
        let shadows: Vec<(&str, bool, Option<f64>)> =
            d.shadows.iter().map(|s| (s.model.as_str(), s.answered, s.score)).collect();
        assert_eq!(
            shadows,
            [("v2", true, Some(0.9)), ("v3", true, Some(0.9)), ("v4", true, Some(0.9)), ("v5", false, None)]
        );
        let scored: Vec<Option<f64>> =
            fx.iter().filter_map(|e| if let Effect::Scored(s) = e { Some(s.score) } else { None }).collect();
        assert_eq!(scored, [Some(0.9), Some(0.9), Some(0.9), Some(0.9), None], "serving and four shadows");
    }

    #[test]
    fn the_largest_entry_fits_the_room_the_size_check_counts() {
        // Ids as large as a whole request allows, and 250 shadow models with the longest names.
        let max_request_bytes = 1_000_000;
        let user = "u".repeat(max_request_bytes);
        let spec = QualitySpec::default();
        let mut join = Join::new(CONFIG, MemStates::default());
        let mut fx = Vec::new();
        join.on_decision(decision("r", &user, b"0.5".to_vec()), 0, &spec, &mut fx);
        for i in 0..250 {
            let model = format!("{i:0>200}");
            join.on_shadow(shadow("r", &model, Some(b"0.25".to_vec())), 0, &spec, 1_000, &mut fx);
        }
        let mut o = label("r", &user);
        o.source = "s".repeat(1_000);
        join.on_outcome(o, SourcePos { topic: "o".into(), partition: 0, offset: 1 }, |_| spec.clone(), 2_000, &mut fx);
        // The last two states are the largest: open with every shadow answer, and labelled.
        let largest = states(&fx).iter().rev().take(2).map(|(_, e)| encode(e, &codecs()[1]).len()).max().unwrap();
        assert!(largest > max_request_bytes && largest <= max_request_bytes + SCORE_STATE_ROOM, "{largest}");
    }

    #[test]
    fn entries_an_earlier_version_wrote_as_json_are_read_with_their_scores() {
        let spec = QualitySpec::default();
        let codec = Codec::default();
        let open = br#"{"open":{"partition":2,"user_id":"u","deployment":"fraud","model":"v1","cohort":"control","config_version":3,"status":"Ok","output":[48,46,56],"decided_at":1000,"shadows":[["v3",[48,46,50]],["v4",null]]}}"#;
        let Entry::Open(d) = decode("r", open, &codec, |_| spec.clone()).unwrap() else { panic!() };
        assert_eq!((d.partition, d.decision.score, d.decision.status), (2, Some(0.8), DecisionStatus::Ok));
        assert_eq!(d.shadows[0], ShadowScore { model: "v3".into(), answered: true, score: Some(0.2) });
        assert_eq!(d.shadows[1], ShadowScore { model: "v4".into(), answered: false, score: None });
        let early = br#"{"early":[{"request_id":"r","user_id":"u","label":1.0,"observed_at":5,"source":"s"},{"topic":"o","partition":1,"offset":9}]}"#;
        let Entry::Early(o, source, _) = decode("r", early, &codec, |_| spec.clone()).unwrap() else { panic!() };
        assert_eq!((o.label, source.offset), (1.0, 9));
        assert!(decode("r", b"\x08garbage", &codec, |_| spec.clone()).is_err());
        assert!(decode("r", b"{not json", &codec, |_| spec.clone()).is_err());
    }
}
