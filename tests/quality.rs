//! Outcome labels joined to decisions on a real broker: labels before, with and after their decision,
//! shadow answers scored on the same labels, duplicates, garbage, malformed labels, labels on the wrong
//! partition and labels without a decision — each counted exactly, nothing lost.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Env, requests};
use switchyard::clock;
use switchyard::codec::{Decision, Outcome, ScoredOutcome};
use switchyard::kafka::{self, OutRecord};
use switchyard::tools::demo_model::{DemoModel, scored_output, truth};

const LIMIT: Duration = Duration::from_secs(90);

fn outcome_record(env: &Env, request: &switchyard::codec::Request, label: f64) -> OutRecord {
    let o = Outcome {
        request_id: request.request_id.clone(),
        user_id: request.user_id.clone(),
        label,
        observed_at: clock::now_millis(),
        source: "test".into(),
    };
    OutRecord::new(env.config.topics.outcomes.clone(), o.user_id.as_bytes(), env.codec.encode(&o))
}

/// A directory for this test's instance logs.
fn logs_dir(env: &Env) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-{}", env.config.service.group_id));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Model v1, 90% accurate against the labeller's truth.
fn start_v1(env: &mut Env) {
    env.start_worker(DemoModel {
        model: "v1".into(),
        latency: Duration::from_millis(2),
        error_rate: 0.0,
        disagree_percent: 0.0,
        accuracy: Some(0.9),
    });
}

/// The score stage's catch-up lines in an instance's log, for a non-empty assignment.
fn caught_up(log: &std::path::Path) -> Vec<String> {
    let log = std::fs::read_to_string(log).unwrap();
    log.lines()
        .filter(|l| l.contains("score state caught up") && !l.contains("partitions=0"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_are_joined_scored_once_and_bad_ones_dead_lettered_with_reasons() {
    let Some(mut env) = Env::new("labels").await else { return };
    env.config.quality.early_wait_ms = 4_000;
    env.deploy("fraud", r#"{"strategy":"single","control":"v1","mirror":["v2"],"timeout_ms":5000,"quality":{}}"#).await;
    env.start_service();
    for (model, accuracy) in [("v1", 0.9), ("v2", 0.7)] {
        env.start_worker(DemoModel {
            model: model.into(),
            latency: Duration::from_millis(2),
            error_rate: 0.0,
            disagree_percent: 0.0,
            accuracy: Some(accuracy),
        });
    }
    let sent = requests("fraud", "labels", 200, 40);
    let truth_of = |r: &switchyard::codec::Request| f64::from(u8::from(truth(&r.payload)));
    // 0..50: labelled before their decision exists.
    env.produce(sent[..50].iter().map(|r| outcome_record(&env, r, truth_of(r))).collect()).await;
    env.send(&sent).await;
    env.read::<Decision>(&env.config.topics.decisions, 200, LIMIT, Duration::from_secs(1)).await;
    // 50..180 after; 60..65 twice; 180: not 0 or 1; 181: on the wrong partition; a garbage record; a
    // label for a request never sent. 182..200 get no label.
    let mut late: Vec<OutRecord> = sent[50..180].iter().map(|r| outcome_record(&env, r, truth_of(r))).collect();
    late.extend(sent[60..65].iter().map(|r| outcome_record(&env, r, truth_of(r))));
    late.push(outcome_record(&env, &sent[180], 0.5));
    let mut foreign = outcome_record(&env, &sent[181], truth_of(&sent[181]));
    let home = switchyard::kafka::partition_for_key(&foreign.key, env.config.topics.partitions as usize);
    foreign.partition = Some((home + 1) % env.config.topics.partitions);
    late.push(foreign);
    late.push(OutRecord::new(env.config.topics.outcomes.clone(), b"u".to_vec(), b"garbage".to_vec()));
    let mut ghost = sent[0].clone();
    ghost.request_id = "never-sent".into();
    late.push(outcome_record(&env, &ghost, 1.0));
    env.produce(late).await;

    // 180 labelled requests, each scored for the serving model and the mirror.
    let scored =
        env.read::<ScoredOutcome>(&env.config.topics.scored_outcomes, 330, LIMIT, Duration::from_secs(15)).await;
    {
        let have: HashSet<(String, String)> =
            scored.iter().map(|r| (r.value.request_id.clone(), r.value.role.clone())).collect();
        let missing: Vec<(usize, &str)> = (0..180)
            .flat_map(|i| ["serving", "shadow"].into_iter().map(move |role| (i, role)))
            .filter(|(i, role)| !have.contains(&(sent[*i].request_id.clone(), role.to_string())))
            .collect();
        eprintln!("missing: {missing:?}");
    }
    assert_eq!(scored.len(), 360, "180 labelled requests × (serving + shadow), none twice");
    let by_request: HashMap<&str, &switchyard::codec::Request> =
        sent.iter().map(|r| (r.request_id.as_str(), r)).collect();
    let mut seen = HashSet::new();
    for s in scored.iter().map(|r| &r.value) {
        assert!(seen.insert((s.request_id.clone(), s.role.clone())), "scored twice: {s:?}");
        let request = by_request[s.request_id.as_str()];
        let accuracy = if s.model == "v1" { 0.9 } else { 0.7 };
        let score: f64 =
            String::from_utf8(scored_output(&s.model, &request.payload, accuracy)).unwrap().parse().unwrap();
        assert_eq!(s.score, Some(score));
        assert_eq!(s.label, truth_of(request));
        assert_eq!(s.zero_one, Some(f64::from(u8::from((score >= 0.5) != truth(&request.payload)))));
        assert_eq!(s.role, if s.model == "v1" { "serving" } else { "shadow" });
    }
    let wrong = |model: &str| scored.iter().filter(|r| r.value.model == model && r.value.zero_one == Some(1.0)).count();
    eprintln!("wrong answers in 180 labels: v1 (90% accurate) {}, v2 (70%) {}", wrong("v1"), wrong("v2"));
    assert!(wrong("v1") < wrong("v2"));

    // Dead letters: 5 duplicates, 1 malformed, 1 wrong partition, 1 garbage, 1 without a decision (after
    // its 4 s wait).
    let letters = env.read_raw(&env.config.topics.dead_letter, 9, LIMIT, Duration::from_secs(3)).await;
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for l in &letters {
        *kinds.entry(l.headers["dlq.kind"].clone()).or_default() += 1;
    }
    let expected: HashMap<String, usize> =
        [("duplicate_label", 5), ("invalid", 2), ("undecodable", 1), ("no_decision", 1)]
            .into_iter()
            .map(|(k, n)| (k.to_string(), n))
            .collect();
    assert_eq!(kinds, expected, "{letters:?}");
    assert!(letters.iter().any(|l| l.headers["dlq.reason"].contains("murmur2")));
    assert!(letters.iter().any(|l| l.headers["dlq.reason"].contains("neither 0 nor 1")));

    // status: quality per model from the scored outcomes, the same figures recomputed here.
    let (ok, text, err) = env.cli(&["status", "fraud"]);
    assert!(ok, "{err}");
    for model in ["v1", "v2"] {
        let right = 180 - wrong(model);
        let line = format!(
            "{model} ({}, control): 180 scored, accuracy {:.3}",
            if model == "v1" { "serving" } else { "shadow" },
            right as f64 / 180.0
        );
        assert!(text.contains(&line), "{text} lacks {line:?}");
    }
    // Coverage: 200 decisions, 180 with a label joined to v1's answer.
    assert!(text.contains("v1 (control): 180 of 200 (90.0%)"), "{text}");
    // watch: the same quality figures, live from the scored outcomes.
    let (ok, text, err) = env.cli(&["watch", "--deployment", "fraud", "--seconds", "3", "--from-beginning"]);
    assert!(ok, "{err}");
    let accuracy = |model: &str| format!("{:.3}", (180 - wrong(model)) as f64 / 180.0);
    for (model, role) in [("v1", "serving"), ("v2", "shadow")] {
        assert!(
            text.lines()
                .any(|l| l
                    .contains(&format!("fraud        {model:<14} {role:<8} 180 scored, accuracy {}", accuracy(model)))),
            "{text}"
        );
    }
    env.stop().await;
}

/// A candidate that answers faster but is less accurate (70% against control's 95%) is rolled back by
/// the quality guard, with the losses in the record's figures; the latency guard stays quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faster_but_less_accurate_candidate_is_rolled_back_on_quality() {
    let Some(mut env) = Env::new("accuracy").await else { return };
    let plan = format!(
        r#"{{"steps":[{{"canary_percent":20,"bake_ms":2000,"min_sample":2000,"max_ms":120000}},
                     {{"canary_percent":50,"bake_ms":2000,"min_sample":2000,"max_ms":120000}}],
            "guards":["error_rate","latency","quality"],"quality_guard":{{"loss":"zero_one"}},
            "step_started_at":{}}}"#,
        clock::now_millis()
    );
    env.deploy(
        "fraud",
        &format!(r#"{{"strategy":"canary","control":"v1","candidate":"v2","canary_percent":20,"timeout_ms":3000,"quality":{{}},"plan":{plan}}}"#),
    )
    .await;
    env.start_service();
    for (model, latency, accuracy) in [("v1", 40, 0.95), ("v2", 2, 0.7)] {
        env.start_worker(DemoModel {
            model: model.into(),
            latency: Duration::from_millis(latency),
            error_rate: 0.0,
            disagree_percent: 0.0,
            accuracy: Some(accuracy),
        });
    }
    env.start_labeller(Duration::from_millis(500));
    let start = std::time::Instant::now();
    let mut round = 0;
    let rolled_back = loop {
        round += 1;
        let mut batch = requests("fraud", &format!("acc{round}"), 200, 200);
        for r in &mut batch {
            r.user_id = format!("user-{}", rand::random::<u32>() % 20_000);
        }
        env.send(&batch).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let registry = switchyard::control::watcher::snapshot(&env.config).await.unwrap();
        let d = registry.get("fraud").unwrap();
        if d.spec.plan.is_none() {
            break d;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "not rolled back: {}", d.spec.to_json());
    };
    let change = rolled_back.spec.change.clone().unwrap();
    eprintln!("rolled back after {:.1} s: {}", start.elapsed().as_secs_f64(), change.reason);
    assert_eq!((change.actor.as_str(), rolled_back.spec.canary_percent), ("guard:quality", 0.0));
    let quality = change.figures.unwrap().guards.into_iter().find(|g| g.guard.as_str() == "quality").unwrap();
    let (control, candidate) = quality.mean_loss.unwrap();
    assert!(control < 0.1 && candidate > 0.2, "{quality:?}");
    env.stop().await;
}

/// Blue/green probation: after each switch the old side keeps a copy of every request, and the paired
/// guard compares both sides on the same labelled requests. `worse` (0.9 → 0.7 accurate) switches back
/// on its own; `equal` (0.9 → 0.9, margin 0.05) ends its probation and keeps the new side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_switch_on_probation_switches_back_on_quality_and_a_good_one_stays() {
    let Some(mut env) = Env::new("probation").await else { return };
    for (name, candidate) in [("worse", "v2"), ("equal", "v3")] {
        env.deploy(
            name,
            &format!(r#"{{"strategy":"blue_green","control":"v1","candidate":"{candidate}","timeout_ms":3000,"quality":{{}}}}"#),
        )
        .await;
    }
    env.start_service();
    for (model, accuracy) in [("v1", 0.9), ("v2", 0.7), ("v3", 0.9)] {
        env.start_worker(DemoModel {
            model: model.into(),
            latency: Duration::from_millis(2),
            error_rate: 0.0,
            disagree_percent: 0.0,
            accuracy: Some(accuracy),
        });
    }
    env.start_labeller(Duration::from_millis(300));
    let (ok, _, err) = env.cli(&["promote", "worse", "--probation-ms", "300000", "--reason", "v2 goes live"]);
    assert!(ok, "{err}");
    let (ok, _, err) =
        env.cli(&["promote", "equal", "--probation-ms", "15000", "--probation-guard", r#"{"margin":0.05}"#]);
    assert!(ok, "{err}");
    let (ok, _, err) = env.cli(&["promote", "equal", "--probation-ms", "1000"]);
    assert!(!ok && err.contains("blue_green with control active"), "a second switch is refused: {err}");

    let start = std::time::Instant::now();
    let mut round = 0;
    let mut status_seen = false;
    let (worse, equal) = loop {
        round += 1;
        let mut batch = requests("worse", &format!("w{round}"), 100, 100);
        batch.extend(requests("equal", &format!("e{round}"), 100, 100));
        for r in &mut batch {
            r.user_id = format!("user-{}", rand::random::<u32>() % 50_000);
        }
        env.send(&batch).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let registry = switchyard::control::watcher::snapshot(&env.config).await.unwrap();
        let (worse, equal) = (registry.get("worse").unwrap(), registry.get("equal").unwrap());
        if !status_seen && equal.spec.probation.is_some() && round % 10 == 0 {
            let (ok, text, err) = env.cli(&["status", "equal"]);
            assert!(ok, "{err}");
            status_seen = text.contains("probation:") && text.contains("v1 stays warm on copies");
        }
        if worse.spec.probation.is_none() && equal.spec.probation.is_none() {
            break (worse, equal);
        }
        assert!(start.elapsed() < Duration::from_secs(150), "{}\n{}", worse.spec.to_json(), equal.spec.to_json());
    };
    assert!(status_seen, "status shows the probation");
    let change = worse.spec.change.clone().unwrap();
    eprintln!("worse: {} ({:.1} s after the switch)", change.reason, start.elapsed().as_secs_f64());
    assert_eq!(change.actor, "guard:paired_quality");
    assert_eq!(worse.spec.active, switchyard::record::Side::Control, "switched back");
    let paired = &change.figures.unwrap().guards[0];
    let (old, new) = paired.mean_loss.unwrap();
    assert!(old < 0.15 && new > 0.2 && paired.control.n >= 100, "{paired:?}");

    let change = equal.spec.change.clone().unwrap();
    eprintln!("equal: {}", change.reason);
    assert_eq!(change.actor, "plan");
    assert!(change.reason.starts_with("probation over"), "{}", change.reason);
    assert_eq!(equal.spec.active, switchyard::record::Side::Candidate, "the new side stays");

    // The history tells both stories.
    let (ok, text, err) = env.cli(&["history", "worse"]);
    assert!(ok, "{err}");
    assert!(text.contains("guard:paired_quality") && text.contains("v2 goes live"), "{text}");
    env.stop().await;
}

/// Two instances join labels while one of them is killed with SIGKILL and restarted mid-stream: every
/// labelled request is scored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_instance_killed_mid_stream_scores_every_label_exactly_once() {
    let Some(mut env) = Env::new("labelkill").await else { return };
    env.deploy("fraud", r#"{"strategy":"single","control":"v1","timeout_ms":5000,"quality":{}}"#).await;
    let dir = logs_dir(&env);
    let mut a = env.spawn_instance("a", &dir.join("a.log"));
    let mut b = env.spawn_instance("b", &dir.join("b.log"));
    start_v1(&mut env);
    let sent = requests("fraud", "labelkill", 3000, 600);
    env.send(&sent).await;
    env.read::<Decision>(&env.config.topics.decisions, 3000, LIMIT, Duration::from_secs(1)).await;
    let truth_of = |r: &switchyard::codec::Request| f64::from(u8::from(truth(&r.payload)));
    for (i, chunk) in sent.chunks(250).enumerate() {
        env.produce(chunk.iter().map(|r| outcome_record(&env, r, truth_of(r))).collect()).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        if i == 4 {
            a.kill().unwrap(); // SIGKILL, mid-stream
            a.wait().unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            a = env.spawn_instance("a", &dir.join("a2.log"));
        }
    }
    let scored =
        env.read::<ScoredOutcome>(&env.config.topics.scored_outcomes, 3000, LIMIT, Duration::from_secs(8)).await;
    let ids: HashSet<&str> = scored.iter().map(|r| r.value.request_id.as_str()).collect();
    assert_eq!((scored.len(), ids.len()), (3000, 3000), "every label scored, none twice");
    let letters = env.read_raw(&env.config.topics.dead_letter, 0, Duration::from_secs(5), Duration::from_secs(1)).await;
    assert!(letters.is_empty(), "no label dead-lettered: {:?}", letters.iter().map(|l| &l.headers).collect::<Vec<_>>());
    // The restarted instance found its partitions' states on disk, checkpointed: none was rebuilt from
    // the changelog (the first instance, with an empty store, rebuilt each of them).
    let caught_up = caught_up(&dir.join("a2.log"));
    assert!(!caught_up.is_empty() && caught_up.iter().all(|l| l.contains("rebuilt=0")), "{caught_up:?}");
    for child in [&mut a, &mut b] {
        let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        child.wait().unwrap();
    }
    env.stop().await;
}

/// Labels by absence: a deployment whose decisions mature 6 s after they are made, labelled 0 when no
/// label came by then. Only the positives are labelled (at once, before maturity), and the instance is
/// stopped and started again while they are held: every decision is scored exactly once, at maturity,
/// the positives on their own labels and the rest on the default one, marked implicit; a label after
/// maturity is dead-lettered `late_label`; the restarted instance read nothing back from the changelog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_mature_into_scores_by_absence_across_a_restart() {
    let Some(mut env) = Env::new("maturity").await else { return };
    env.deploy(
        "fraud",
        r#"{"strategy":"single","control":"v1","timeout_ms":5000,"quality":{"maturity_ms":6000,"default_label":0}}"#,
    )
    .await;
    let dir = logs_dir(&env);
    let mut a = env.spawn_instance("a", &dir.join("a.log"));
    start_v1(&mut env);
    let sent = requests("fraud", "maturity", 300, 60);
    env.send(&sent).await;
    let decisions = env.read::<Decision>(&env.config.topics.decisions, 300, LIMIT, Duration::from_secs(1)).await;
    let first_decided = decisions.iter().map(|d| d.value.decided_at).min().unwrap();
    let positives: Vec<&switchyard::codec::Request> = sent.iter().filter(|r| truth(&r.payload)).collect();
    env.produce(positives.iter().map(|r| outcome_record(&env, r, 1.0)).collect()).await;
    // Stopped and started again while the labels are held, before any decision matures.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(clock::now_millis() < first_decided + 6_000, "the restart must come before maturity");
    let _ = std::process::Command::new("kill").args(["-TERM", &a.id().to_string()]).status();
    a.wait().unwrap();
    a = env.spawn_instance("a", &dir.join("a2.log"));

    let scored =
        env.read::<ScoredOutcome>(&env.config.topics.scored_outcomes, 300, LIMIT, Duration::from_secs(8)).await;
    let ids: HashSet<&str> = scored.iter().map(|r| r.value.request_id.as_str()).collect();
    assert_eq!((scored.len(), ids.len()), (300, 300), "every decision scored once");
    let positive_ids: HashSet<&str> = positives.iter().map(|r| r.request_id.as_str()).collect();
    for s in scored.iter().map(|r| &r.value) {
        if positive_ids.contains(s.request_id.as_str()) {
            assert_eq!((s.label, s.source.as_str()), (1.0, "test"), "{s:?}");
        } else {
            assert_eq!((s.label, s.source.as_str(), s.label_delay_ms), (0.0, "implicit", 6_000), "{s:?}");
        }
        assert!(s.decided_at + 6_000 <= clock::now_millis());
    }
    eprintln!("{} positives labelled, {} negatives by absence", positive_ids.len(), 300 - positive_ids.len());
    assert!(!positive_ids.is_empty() && positive_ids.len() < 300);

    let negative = sent.iter().find(|r| !truth(&r.payload)).unwrap();
    env.produce(vec![outcome_record(&env, negative, 1.0)]).await;
    let letters = env.read_raw(&env.config.topics.dead_letter, 1, LIMIT, Duration::from_secs(2)).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].headers["dlq.kind"], "late_label");
    assert!(letters[0].headers["dlq.reason"].contains("matured"), "{:?}", letters[0].headers);

    let caught_up = caught_up(&dir.join("a2.log"));
    assert!(
        !caught_up.is_empty() && caught_up.iter().all(|l| l.contains("rebuilt=0") && l.contains("records=0")),
        "after a clean stop the store is current: {caught_up:?}"
    );
    let _ = std::process::Command::new("kill").args(["-TERM", &a.id().to_string()]).status();
    a.wait().unwrap();
    env.stop().await;
}

/// The topics the score stage joins are created to keep records at least as long as its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_topics_are_created_to_outlive_the_window() {
    let Some(mut env) = Env::new("retention").await else { return };
    let thirty_days: u64 = 30 * 86_400_000;
    env.config.quality.window_ms = thirty_days;
    let prefix = format!("{}-30d", env.config.service.group_id);
    env.config.topics.decisions = format!("{prefix}.decisions");
    env.config.topics.outcomes = format!("{prefix}.outcomes");
    env.config.topics.requests = format!("{prefix}.requests");
    switchyard::service::ensure_core_topics(&env.config).await.unwrap();
    let t = &env.config.topics;
    let retention: HashMap<String, i64> =
        kafka::topic_config_ms(&env.config, &[&t.decisions, &t.outcomes, &t.requests], "retention.ms")
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(retention[&t.decisions], thirty_days as i64);
    assert_eq!(retention[&t.outcomes], thirty_days as i64);
    assert_ne!(retention[&t.requests], thirty_days as i64, "other topics keep the broker's default");
    env.stop().await;
}

/// A JSON answer `{"score": <score>, "pad": "xxx…"}` with a pad of `pad` bytes.
fn json_output(score: f64, pad: usize) -> Vec<u8> {
    format!(r#"{{"score": {score}, "pad": "{}"}}"#, "x".repeat(pad)).into_bytes()
}

/// A prediction whose value (as encoded) is exactly `size` bytes, with a JSON answer of `score`.
fn prediction_of_size(
    codec: &switchyard::codec::Codec,
    request_id: &str,
    model: &str,
    score: f64,
    size: usize,
) -> Vec<u8> {
    let mut prediction = switchyard::codec::Prediction {
        request_id: request_id.into(),
        model: model.into(),
        output: Some(json_output(score, 0)),
        error: None,
        produced_at: clock::now_millis(),
    };
    let mut pad = size - codec.encode(&prediction).len();
    loop {
        prediction.output = Some(json_output(score, pad));
        let value = codec.encode(&prediction);
        match value.len().cmp(&size) {
            std::cmp::Ordering::Equal => return value,
            std::cmp::Ordering::Greater => pad -= value.len() - size,
            std::cmp::Ordering::Less => pad += size - value.len(),
        }
    }
}

/// A model worker that answers in JSON (`{"score": …, "pad": ""}`, the demo model's score) and answers
/// the requests in `big` with a prediction of the given size (score 0.9), until `stop`.
async fn json_worker(
    env_config: switchyard::config::Config,
    codec: switchyard::codec::Codec,
    model: &'static str,
    big: HashMap<String, usize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use rdkafka::consumer::{CommitMode, Consumer};
    use rdkafka::message::Message;
    let input = env_config.topics.model_requests(model);
    let output = env_config.topics.model_predictions(model);
    let consumer =
        kafka::group_consumer(&env_config, &format!("{}-json-{model}", env_config.service.group_id), None).unwrap();
    consumer.subscribe(&[input.as_str()]).unwrap();
    let producer = kafka::producer(&env_config).unwrap();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let batch = kafka::batch::next_batch(&consumer, 500, Duration::from_millis(5), Duration::from_millis(200))
            .await
            .unwrap();
        let mut out = Vec::new();
        for message in &batch {
            let request: switchyard::codec::ModelRequest = codec.decode(message.payload().unwrap()).unwrap();
            let id = request.request.request_id.clone();
            let value = match big.get(&id) {
                Some(size) => prediction_of_size(&codec, &id, model, 0.9, *size),
                None => {
                    let score: f64 =
                        String::from_utf8(switchyard::tools::demo_model::output(model, &request.request.payload, 0.0))
                            .unwrap()
                            .parse()
                            .unwrap();
                    codec.encode(&switchyard::codec::Prediction {
                        request_id: id,
                        model: model.into(),
                        output: Some(json_output(score, 0)),
                        error: None,
                        produced_at: clock::now_millis(),
                    })
                }
            };
            out.push(OutRecord::new(output.clone(), message.key().unwrap().to_vec(), value));
        }
        if !batch.is_empty() {
            kafka::send_all(&producer, &out).await.unwrap();
            consumer.commit(&kafka::batch_offsets(&batch), CommitMode::Sync).unwrap();
        }
    }
}

/// One answer of about 700 KB and one of exactly `max_prediction_bytes` (both under the limit, far over
/// what the score stage's changelog could hold as bytes): every other label on their partitions is
/// scored at once, and their own decisions are scored too, from the score read out of the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_are_scored_and_never_stall_their_partitions() {
    let Some(mut env) = Env::new("bigscore").await else { return };
    env.deploy(
        "fraud",
        r#"{"strategy":"single","control":"v1","mirror":["v2"],"timeout_ms":10000,"quality":{"score":{"json_field":"score"}}}"#,
    )
    .await;
    env.start_service();
    let sent = requests("fraud", "bigscore", 300, 60);
    let max = env.config.service.max_prediction_bytes;
    let (large, largest) = (sent[100].request_id.clone(), sent[200].request_id.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for (model, big) in [
        ("v1", HashMap::from([(large.clone(), 700_000), (largest.clone(), max)])),
        ("v2", HashMap::from([(large.clone(), 700_000)])),
    ] {
        let (config, codec, stop) = (env.config.clone(), env.codec.clone(), stop.clone());
        workers.push(tokio::spawn(json_worker(config, codec, model, big, stop)));
    }
    env.send(&sent).await;
    let decisions = env.read::<Decision>(&env.config.topics.decisions, 300, LIMIT, Duration::from_secs(1)).await;
    let size_of = |id: &str| {
        decisions.iter().find(|d| d.value.request_id == id).and_then(|d| d.value.output.as_ref()).map(Vec::len)
    };
    assert!(decisions.iter().all(|d| d.value.status == switchyard::codec::DecisionStatus::Ok));
    assert!(size_of(&large).unwrap() > 690_000 && size_of(&largest).unwrap() > max - 200, "served as answered");

    // Every other request labelled first: none of them may wait for the large answers' labels.
    let truth_of = |r: &switchyard::codec::Request| f64::from(u8::from(truth(&r.payload)));
    let is_big = |r: &&switchyard::codec::Request| r.request_id == large || r.request_id == largest;
    let started = std::time::Instant::now();
    env.produce(sent.iter().filter(|r| !is_big(r)).map(|r| outcome_record(&env, r, truth_of(r))).collect()).await;
    let scored =
        env.read::<ScoredOutcome>(&env.config.topics.scored_outcomes, 596, LIMIT, Duration::from_secs(1)).await;
    eprintln!("298 labels (596 answers) scored in {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(scored.len(), 596, "serving and shadow answer of every other labelled request, once");
    assert!(started.elapsed() < Duration::from_secs(30), "scored promptly: {:?}", started.elapsed());
    assert!(scored.iter().all(|s| s.value.score.is_some()), "every JSON answer has its score");

    env.produce(sent.iter().filter(is_big).map(|r| outcome_record(&env, r, truth_of(r))).collect()).await;
    let scored =
        env.read::<ScoredOutcome>(&env.config.topics.scored_outcomes, 600, LIMIT, Duration::from_secs(3)).await;
    assert_eq!(scored.len(), 600);
    let mut big: Vec<(String, String, Option<f64>)> = scored
        .iter()
        .filter(|s| s.value.request_id == large || s.value.request_id == largest)
        .map(|s| (s.value.request_id.clone(), s.value.role.clone(), s.value.score))
        .collect();
    big.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let normal_shadow = {
        let r = &sent[200];
        String::from_utf8(switchyard::tools::demo_model::output("v2", &r.payload, 0.0)).unwrap().parse::<f64>().ok()
    };
    let mut expected = vec![
        (large.clone(), "serving".to_string(), Some(0.9)),
        (large.clone(), "shadow".to_string(), Some(0.9)),
        (largest.clone(), "serving".to_string(), Some(0.9)),
        (largest.clone(), "shadow".to_string(), normal_shadow),
    ];
    expected.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(big, expected, "the large answers scored by the score read from them");

    // What the score stage keeps stays small: a score per answer, never the answer.
    let states = env.read_raw(&env.config.topics.score_changelog, 1, LIMIT, Duration::from_secs(1)).await;
    let largest_state = states.iter().map(|s| s.value.len()).max().unwrap();
    assert!(largest_state < 1_000, "largest score changelog record: {largest_state} bytes");
    let letters = env.read_raw(&env.config.topics.dead_letter, 0, Duration::from_secs(3), Duration::from_secs(1)).await;
    assert!(letters.is_empty(), "nothing dead-lettered: {:?}", letters.iter().map(|l| &l.headers).collect::<Vec<_>>());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    env.stop().await;
}

/// `switchyard evaluate` on a 90/10 canary: control 90% accurate and never failing, the candidate 70%
/// accurate and failing 20% of requests. A 50/50 split would fail 10% of requests and be wrong on 20%
/// of the answered ones: both estimates' intervals hold those truths, and the candidate's failures show
/// in its logged arm. An override's requests are not randomised and are left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluate_estimates_a_fifty_fifty_split_from_a_ninety_ten_canary() {
    let Some(mut env) = Env::new("evaluate").await else { return };
    env.deploy(
        "fraud",
        r#"{"strategy":"canary","control":"v1","candidate":"v2","canary_percent":10,"timeout_ms":5000,
            "quality":{},"overrides":{"user-0":"candidate"}}"#,
    )
    .await;
    env.start_service();
    for (model, accuracy, error_rate) in [("v1", 0.9, 0.0), ("v2", 0.7, 0.2)] {
        env.start_worker(DemoModel {
            model: model.into(),
            latency: Duration::from_millis(2),
            error_rate,
            disagree_percent: 0.0,
            accuracy: Some(accuracy),
        });
    }
    env.start_labeller(Duration::from_millis(300));
    let sent = requests("fraud", "eval", 6_000, 3_000);
    for chunk in sent.chunks(500) {
        env.send(chunk).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Wait until the answered decisions have their scored labels.
    let parse = |text: &str, what: &str, estimator: &str| -> Option<(f64, f64, f64)> {
        let line = text.lines().find(|l| l.trim_start().starts_with(what))?;
        let rest = &line[line.find(&format!("{estimator} "))? + estimator.len() + 1..];
        let numbers: Vec<f64> = rest
            .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
            .filter(|s| !s.is_empty())
            .take(3)
            .map(|s| s.parse().unwrap())
            .collect();
        Some((numbers[0], numbers[1], numbers[2]))
    };
    let start = std::time::Instant::now();
    let text = loop {
        let (ok, text, err) = env.cli(&["evaluate", "fraud", "--candidate-percent", "50", "--minutes", "10"]);
        assert!(ok, "{err}");
        let scored = text.lines().find(|l| l.contains("zero_one loss")).and_then(|l| {
            let arms = &l[l.find("logged by arm")?..];
            Some(
                arms.split("n=").skip(1).map(|n| n.split(')').next().unwrap().parse::<usize>().unwrap()).sum::<usize>(),
            )
        });
        if text.contains("5998 decisions with a known propensity") && scored.is_some_and(|n| n >= 5_300) {
            break text;
        }
        assert!(start.elapsed() < LIMIT, "not all decided and scored: {text}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    eprintln!("{text}");
    assert!(text.contains("2 left out"), "user-0's two requests: {text}");
    for (what, truth, estimators) in [("failure rate", 0.1, &["DR", "IPS"][..]), ("zero_one loss", 0.2, &["DR"])] {
        for estimator in estimators {
            let (value, low, high) = parse(&text, what, estimator).unwrap();
            assert!(low <= truth && truth <= high, "{what} {estimator}: {value} [{low}, {high}] misses {truth}");
            assert!(high - low < 0.1, "{what} {estimator}: an interval that says something");
        }
    }
    assert!(text.contains("failure rate") && text.contains("control 0.0000"), "{text}");
    let (ok, text, _) = env.cli(&["evaluate", "fraud", "--candidate-percent", "10", "--minutes", "10"]);
    let (value, _, _) = parse(&text, "failure rate", "DR").unwrap();
    assert!(ok && (0.005..0.04).contains(&value), "the split that ran: about 2% failed: {text}");
    env.stop().await;
}
