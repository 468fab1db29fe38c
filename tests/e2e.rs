//! End-to-end tests on a real Kafka broker: every strategy and a combination, timeouts, model errors and
//! dead letters, asserting on records read back from Kafka.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Env, Read, requests};
use switchyard::codec::{Decision, DecisionStatus, Prediction, Request, ShadowComparison};
use switchyard::cohort::hash::{bucket, shadow_bucket};
use switchyard::kafka::OutRecord;
use switchyard::tools::demo_model;

const LIMIT: Duration = Duration::from_secs(90);
const SETTLE: Duration = Duration::from_secs(2);

/// Disagreement of the demo models used below: control answers the common score; the others always
/// answer their own, so every output tells which model produced it.
fn disagree(model: &str) -> f64 {
    if model == "v1" { 0.0 } else { 100.0 }
}

fn expected_output(model: &str, request: &Request) -> Vec<u8> {
    demo_model::output(model, &request.payload, disagree(model))
}

/// Asserts every request has exactly one decision and returns them by request id.
fn one_each<'a>(sent: &'a [Request], decisions: &'a [Read<Decision>]) -> HashMap<&'a str, &'a Read<Decision>> {
    let mut by_id: HashMap<&str, &Read<Decision>> = HashMap::new();
    for d in decisions {
        assert!(
            by_id.insert(d.value.request_id.as_str(), d).is_none(),
            "duplicate decision for {}",
            d.value.request_id
        );
    }
    let sent_ids: HashSet<&str> = sent.iter().map(|r| r.request_id.as_str()).collect();
    let decided: HashSet<&str> = by_id.keys().copied().collect();
    assert_eq!(decided, sent_ids, "decisions are exactly the requests sent");
    by_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_with_mirror_and_override() {
    let Some(mut env) = Env::new("canary").await else { return };
    env.deploy(
        "fraud",
        r#"{"strategy":"canary","control":"v1","candidate":"v2","canary_percent":10,"mirror":["v3"],
            "timeout_ms":10000,"overrides":{"user-5":"candidate"}}"#,
    )
    .await;
    env.start_service();
    for model in ["v1", "v2", "v3"] {
        env.start_model(model, 5, 0.0, disagree(model));
    }
    let sent = requests("fraud", "canary", 600, 300);
    env.send(&sent).await;
    let decisions = env.read::<Decision>(&env.config.topics.decisions, sent.len(), LIMIT, SETTLE).await;
    let by_id = one_each(&sent, &decisions);
    let mut candidates = 0;
    for request in &sent {
        let d = by_id[request.request_id.as_str()];
        let b = bucket("fraud", &request.user_id);
        let in_candidate = b < 1000 || request.user_id == "user-5";
        let model = if in_candidate { "v2" } else { "v1" };
        candidates += usize::from(in_candidate);
        assert_eq!(d.value.model, model, "{} (bucket {b})", request.user_id);
        assert_eq!(d.value.cohort, if in_candidate { "candidate" } else { "control" });
        assert_eq!(
            (d.value.bucket, d.value.status, d.value.strategy.as_str()),
            (i32::from(b), DecisionStatus::Ok, "canary")
        );
        assert_eq!(d.value.output.as_deref(), Some(&expected_output(model, request)[..]), "answer came from {model}");
        assert_eq!((d.headers["model"].as_str(), d.headers["cohort"].as_str()), (model, d.value.cohort.as_str()));
        assert_eq!(d.key, request.user_id.as_bytes());
    }
    assert!(candidates > 20 && candidates < 120, "about 10% in the canary, got {candidates}/600");

    let comparisons =
        env.read::<ShadowComparison>(&env.config.topics.shadow_comparisons, sent.len(), LIMIT, SETTLE).await;
    assert_eq!(comparisons.len(), sent.len(), "the mirror sees every request once");
    let by_request: HashMap<&str, &Request> = sent.iter().map(|r| (r.request_id.as_str(), r)).collect();
    for c in &comparisons {
        let request = by_request[c.value.request_id.as_str()];
        assert_eq!(c.value.shadow_model, "v3");
        assert_eq!(c.value.serving_model, by_id[c.value.request_id.as_str()].value.model);
        assert_eq!(c.value.shadow_output.as_deref(), Some(&expected_output("v3", request)[..]));
        assert_eq!(c.value.agreed, c.value.serving_output == c.value.shadow_output);
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_copies_a_sample_and_never_serves_it() {
    let Some(mut env) = Env::new("shadow").await else { return };
    env.deploy(
        "recs",
        r#"{"strategy":"shadow","control":"v1","candidate":"v2","shadow_percent":50,"timeout_ms":10000}"#,
    )
    .await;
    env.start_service();
    env.start_model("v1", 0, 0.0, disagree("v1"));
    env.start_model("v2", 0, 0.0, disagree("v2"));
    let sent = requests("recs", "shadow", 400, 200);
    env.send(&sent).await;
    let decisions = env.read::<Decision>(&env.config.topics.decisions, sent.len(), LIMIT, SETTLE).await;
    let by_id = one_each(&sent, &decisions);
    for request in &sent {
        let d = &by_id[request.request_id.as_str()].value;
        assert_eq!((d.model.as_str(), d.cohort.as_str(), d.strategy.as_str()), ("v1", "control", "shadow"));
        assert_eq!(d.output.as_deref(), Some(&expected_output("v1", request)[..]));
    }
    let sampled: Vec<&Request> = sent.iter().filter(|r| shadow_bucket("recs", &r.user_id) < 5000).collect();
    assert!(!sampled.is_empty() && sampled.len() < sent.len());
    let comparisons =
        env.read::<ShadowComparison>(&env.config.topics.shadow_comparisons, sampled.len(), LIMIT, SETTLE).await;
    let compared: HashSet<&str> = comparisons.iter().map(|c| c.value.request_id.as_str()).collect();
    let expected: HashSet<&str> = sampled.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(comparisons.len(), sampled.len());
    assert_eq!(compared, expected, "exactly the users in the 50% shadow sample are copied");
    assert!(comparisons.iter().all(|c| c.value.shadow_model == "v2" && !c.value.agreed));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switches_and_switches_back() {
    let Some(mut env) = Env::new("bluegreen").await else { return };
    env.deploy(
        "pricing",
        r#"{"strategy":"blue_green","control":"v1","candidate":"v2","active":"control","timeout_ms":10000}"#,
    )
    .await;
    env.start_service();
    env.start_model("v1", 0, 0.0, disagree("v1"));
    env.start_model("v2", 0, 0.0, disagree("v2"));
    let config = env.config.clone();
    let mut sent = Vec::new();
    for (phase, expect_model) in [("blue", "v1"), ("green", "v2"), ("back", "v1")] {
        match phase {
            "green" => drop(
                switchyard::control::ops::apply_move(
                    &config,
                    "pricing",
                    switchyard::control::ops::Move::Promote(None),
                    None,
                )
                .await
                .unwrap(),
            ),
            "back" => drop(
                switchyard::control::ops::apply_move(
                    &config,
                    "pricing",
                    switchyard::control::ops::Move::Rollback,
                    None,
                )
                .await
                .unwrap(),
            ),
            _ => {}
        }
        // Every instance follows the deployments topic within milliseconds; give it ample time.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let batch = requests("pricing", phase, 150, 150);
        env.send(&batch).await;
        sent.extend(batch.clone());
        let decisions = env.read::<Decision>(&config.topics.decisions, sent.len(), LIMIT, Duration::ZERO).await;
        let by_id = one_each(&sent, &decisions);
        for request in &batch {
            let d = &by_id[request.request_id.as_str()].value;
            assert_eq!(d.model, expect_model, "{phase}: everyone on {expect_model}");
            assert_eq!(d.output.as_deref(), Some(&expected_output(expect_model, request)[..]));
        }
    }
    let decisions = env.read::<Decision>(&config.topics.decisions, sent.len(), LIMIT, SETTLE).await;
    let by_id = one_each(&sent, &decisions);
    let versions: Vec<i64> = ["blue-0", "green-0", "back-0"].iter().map(|id| by_id[id].value.config_version).collect();
    assert_eq!(versions, vec![1, 2, 3], "each phase ran under its own config version");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_model_errors_still_give_exactly_one_decision() {
    let Some(mut env) = Env::new("faults").await else { return };
    env.deploy("silent", r#"{"strategy":"single","control":"ghost","timeout_ms":300}"#).await;
    env.deploy("slow", r#"{"strategy":"single","control":"sloth","timeout_ms":300}"#).await;
    // Shares its model with "silent": creating a model's topics for two deployments at once once crashed
    // the service (duplicate names in one CreateTopics request).
    env.deploy("guarded", r#"{"strategy":"single","control":"ghost","timeout_ms":300,"fallback":"0.5"}"#).await;
    env.deploy("flaky", r#"{"strategy":"shadow","control":"v1","candidate":"v2","timeout_ms":10000}"#).await;
    env.start_service();
    env.start_model("sloth", 1500, 0.0, 0.0);
    env.start_model("v1", 0, 0.3, disagree("v1"));
    env.start_model("v2", 0, 0.0, disagree("v2"));
    let mut sent = requests("silent", "silent", 50, 50);
    sent.extend(requests("guarded", "guarded", 50, 50));
    sent.extend(requests("slow", "slow", 50, 50));
    sent.extend(requests("flaky", "flaky", 200, 100));
    env.send(&sent).await;
    // Long settle: the sloth's late answers arrive after the timeouts and must not add decisions.
    let decisions = env.read::<Decision>(&env.config.topics.decisions, sent.len(), LIMIT, Duration::from_secs(4)).await;
    let by_id = one_each(&sent, &decisions);
    let mut errors = 0;
    for request in &sent {
        let d = &by_id[request.request_id.as_str()].value;
        match request.deployment.as_str() {
            "guarded" => {
                assert_eq!((d.status, d.output.as_deref()), (DecisionStatus::Fallback, Some(&b"0.5"[..])), "{d:?}");
                assert!(d.error.as_deref().unwrap().contains("did not answer within 300 ms"));
            }
            "silent" | "slow" => {
                assert_eq!(d.status, DecisionStatus::Timeout, "{d:?}");
                assert!(d.output.is_none());
                let error = d.error.as_deref().unwrap();
                // The sloth's late answer may be read before merge gets to the deadline (merge behind,
                // e.g. after the rebalance a new model topic causes): TIMEOUT either way, said differently.
                let late = request.deployment == "slow" && error.contains("past the 300 ms deadline");
                assert!(error.contains("did not answer within 300 ms") || late, "{d:?}");
                assert!(d.latency_ms >= 300);
            }
            _ if demo_model::fails("v1", &request.request_id, 0.3) => {
                errors += 1;
                assert_eq!(
                    (d.status, d.error.as_deref(), d.output.as_deref()),
                    (DecisionStatus::ModelError, Some("demo model failure"), None)
                );
            }
            _ => {
                assert_eq!(d.status, DecisionStatus::Ok);
                assert_eq!(d.output.as_deref(), Some(&expected_output("v1", request)[..]));
            }
        }
    }
    assert!(errors > 20, "the error path was exercised ({errors})");
    let comparisons = env.read::<ShadowComparison>(&env.config.topics.shadow_comparisons, 200, LIMIT, SETTLE).await;
    assert_eq!(comparisons.len(), 200);
    assert!(comparisons.iter().all(|c| !c.value.agreed && c.value.shadow_model == "v2"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_and_valid_traffic_flows_around_it() {
    let Some(mut env) = Env::new("dlq").await else { return };
    env.deploy("fraud", r#"{"strategy":"single","control":"v1","timeout_ms":10000}"#).await;
    env.config.service.max_request_bytes = 10_000;
    env.start_service();
    env.start_model("v1", 0, 0.0, 0.0);
    let valid = requests("fraud", "ok", 100, 20);
    let mut unknown = requests("nope", "unknown", 1, 1).remove(0);
    unknown.deployment = "no-such-deployment".into();
    let encoded = env.codec.encode(&valid[0]);
    let prediction = env.codec.encode(&Prediction {
        request_id: "p".into(),
        model: "v1".into(),
        output: None,
        error: None,
        produced_at: 1,
    });
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("undecodable", Vec::new()),
        ("undecodable", b"\xde\xad\xbe\xef random bytes".to_vec()),
        ("undecodable", encoded[..encoded.len() / 2].to_vec()),
        ("undecodable", prediction),
        ("unknown_deployment", env.codec.encode(&unknown)),
        ("oversized", vec![7u8; 20_000]),
    ];
    let topic = env.config.topics.requests.clone();
    let mut records = Vec::new();
    for (i, request) in valid.iter().enumerate() {
        records.push(OutRecord::new(topic.clone(), request.user_id.as_bytes(), env.codec.encode(request)));
        if let Some((_, value)) = bad.get(i / 10)
            && i % 10 == 5
        {
            records.push(OutRecord::new(topic.clone(), format!("bad-{i}").into_bytes(), value.clone()));
        }
    }
    // Bad output from a model worker: garbage, and an answer claiming to come from another model.
    let predictions = env.config.topics.model_predictions("v1");
    let impostor = Prediction {
        request_id: "ok-3".into(),
        model: "v2".into(),
        output: Some(b"0.9".to_vec()),
        error: None,
        produced_at: 1,
    };
    records.push(OutRecord::new(predictions.clone(), "user-3", b"not avro".to_vec()));
    records.push(OutRecord::new(predictions.clone(), "user-3", env.codec.encode(&impostor)));
    env.produce(records).await;
    let decisions = env.read::<Decision>(&env.config.topics.decisions, valid.len(), LIMIT, SETTLE).await;
    let by_id = one_each(&valid, &decisions);
    assert_ne!(by_id["ok-3"].value.output.as_deref(), Some(&b"0.9"[..]), "the impostor's answer is not served");
    let letters = env.read_raw(&env.config.topics.dead_letter, bad.len() + 2, LIMIT, SETTLE).await;
    let (from_model, letters): (Vec<_>, Vec<_>) =
        letters.into_iter().partition(|l| l.headers["dlq.topic"] == predictions);
    assert_eq!(from_model.len(), 2);
    assert!(from_model.iter().any(|l| l.headers["dlq.kind"] == "undecodable" && l.value == b"not avro"));
    assert!(
        from_model
            .iter()
            .any(|l| l.headers["dlq.kind"] == "invalid" && l.headers["dlq.reason"].contains("names model \"v2\""))
    );
    assert_eq!(letters.len(), bad.len());
    for letter in &letters {
        assert!(!letter.headers["dlq.reason"].is_empty());
        assert_eq!(letter.headers["dlq.topic"], topic);
    }
    let mut got: Vec<(String, Vec<u8>)> =
        letters.iter().map(|l| (l.headers["dlq.kind"].clone(), l.value.clone())).collect();
    let mut want: Vec<(String, Vec<u8>)> = bad.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "every bad record is dead-lettered, byte for byte, with its kind");
    let reason = &letters.iter().find(|l| l.headers["dlq.kind"] == "unknown_deployment").unwrap().headers["dlq.reason"];
    assert!(reason.contains("no-such-deployment"), "{reason}");
    env.stop().await;
}
