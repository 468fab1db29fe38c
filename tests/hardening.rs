//! What no single record or worker may do to a partition, on a real broker: a record the broker refuses,
//! a request near Kafka's size limit, a worker on another partitioner, a forced abort. Every test reads
//! the topics back and compares them with what was sent (and with the counters).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Env, counter, requests};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use switchyard::clock;
use switchyard::codec::{Decision, DecisionStatus, MergeState, ModelRequest, Prediction, Request};
use switchyard::kafka::{self, OutRecord};
use switchyard::merge::restore;
use switchyard::tools::demo_model;

const LIMIT: Duration = Duration::from_secs(90);
const SETTLE: Duration = Duration::from_secs(2);

async fn create_topic(env: &Env, name: &str, max_message_bytes: usize) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &env.config.kafka.bootstrap_servers).create().unwrap();
    let limit = max_message_bytes.to_string();
    let topic =
        NewTopic::new(name, env.config.topics.partitions, TopicReplication::Fixed(1)).set("max.message.bytes", &limit);
    let results = admin.create_topics([&topic], &AdminOptions::new()).await.unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

fn request(run: &str, i: usize, payload_bytes: usize) -> Request {
    let mut r = requests("fraud", run, i + 1, 50).pop().unwrap();
    // Random bytes: compression must not shrink it below the limits under test.
    r.payload = (0..payload_bytes).map(|_| rand::random::<u8>()).collect();
    r
}

/// A request routed fine whose model copy its topic refuses (a topic with a smaller limit than
/// switchyard's), and a request over `max_request_bytes`: each becomes one dead letter carrying its
/// value byte for byte, and every other request is decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_broker_refuses_are_dead_lettered_and_the_rest_decided() {
    let Some(mut env) = Env::new("refused").await else { return };
    // v1's input topic takes at most 20 kB per record.
    create_topic(&env, &env.config.topics.model_requests("v1"), 20_000).await;
    env.deploy("fraud", r#"{"strategy":"single","control":"v1","timeout_ms":10000}"#).await;
    env.start_service();
    env.start_model("v1", 0, 0.0, 0.0);

    let mut sent = requests("fraud", "refused", 300, 100);
    let refused: Vec<Request> = (0..3).map(|i| request("refused-big", i, 30_000)).collect();
    let oversized = request("oversized", 0, 1_040_000);
    for (at, big) in [(50, &refused[0]), (51, &refused[1]), (200, &refused[2]), (120, &oversized)] {
        sent.insert(at, big.clone());
    }
    env.send(&sent).await;

    let big_ids: HashSet<&str> = refused.iter().chain([&oversized]).map(|r| r.request_id.as_str()).collect();
    let normal: Vec<&Request> = sent.iter().filter(|r| !big_ids.contains(r.request_id.as_str())).collect();
    let decisions = env.read::<Decision>(&env.config.topics.decisions, normal.len(), LIMIT, SETTLE).await;
    let decided: HashMap<&str, usize> = decisions.iter().fold(HashMap::new(), |mut m, d| {
        *m.entry(d.value.request_id.as_str()).or_default() += 1;
        m
    });
    assert_eq!(decisions.len(), normal.len(), "one decision per normal request, none for the refused ones");
    assert!(normal.iter().all(|r| decided.get(r.request_id.as_str()) == Some(&1)));
    assert!(decisions.iter().all(|d| d.value.status == DecisionStatus::Ok));

    let letters = env.read_raw(&env.config.topics.dead_letter, 4, LIMIT, SETTLE).await;
    assert_eq!(letters.len(), 4, "exactly one dead letter per refused or oversized request");
    let by_value: HashMap<Vec<u8>, &common::Read<Vec<u8>>> = letters.iter().map(|l| (l.value.clone(), l)).collect();
    for (big, kind) in refused.iter().map(|r| (r, "unwritable")).chain([(&oversized, "oversized")]) {
        let letter = by_value
            .get(&env.codec.encode(big))
            .unwrap_or_else(|| panic!("{} dead-lettered byte for byte", big.request_id));
        assert_eq!(letter.headers["dlq.kind"], kind);
        assert!(!letter.headers["dlq.reason"].is_empty());
        assert_eq!(letter.key, big.user_id.as_bytes());
    }
    for letter in letters.iter().filter(|l| l.headers["dlq.kind"] == "unwritable") {
        let reason = &letter.headers["dlq.reason"];
        assert!(
            reason.contains(&env.config.topics.model_requests("v1")) && reason.contains("could not be written"),
            "{reason}"
        );
    }
    assert!(
        counter("switchyard_transactions_failed_total", &["stage=\"route\""]) >= 1.0,
        "the refusal aborted a transaction"
    );
    env.stop().await;
}

/// A model worker written from the contract on a client whose default partitioner is not Kafka's
/// murmur2 (librdkafka's `consistent_random`, as confluent-kafka and most non-Java clients): with two
/// instances, every answer is still joined, and the forwarding is counted per model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_on_foreign_partitions_are_forwarded_and_joined() {
    let Some(mut env) = Env::new("partitioner").await else { return };
    env.deploy(
        "fraud",
        r#"{"strategy":"canary","control":"p1","candidate":"p2","canary_percent":30,"timeout_ms":20000}"#,
    )
    .await;
    env.start_instance("a");
    env.start_instance("b");
    let workers: Vec<_> =
        ["p1", "p2"].into_iter().map(|model| tokio::spawn(foreign_worker(env.config.clone(), model))).collect();
    let sent = requests("fraud", "partitioner", 600, 200);
    env.send(&sent).await;
    let decisions = env.read::<Decision>(&env.config.topics.decisions, sent.len(), LIMIT, SETTLE).await;
    assert_eq!(decisions.len(), sent.len());
    let ids: HashSet<&str> = decisions.iter().map(|d| d.value.request_id.as_str()).collect();
    assert_eq!(ids.len(), sent.len(), "one decision each");
    let by_id: HashMap<&str, &Request> = sent.iter().map(|r| (r.request_id.as_str(), r)).collect();
    for d in &decisions {
        assert_eq!(d.value.status, DecisionStatus::Ok, "{} was not joined: {:?}", d.value.request_id, d.value.error);
        let request = by_id[d.value.request_id.as_str()];
        assert_eq!(d.value.output.as_deref(), Some(&demo_model::output(&d.value.model, &request.payload, 0.0)[..]));
    }
    let forwarded = env.read_raw(&env.config.topics.forwarded_predictions, 1, LIMIT, SETTLE).await;
    assert!(forwarded.len() > 100, "about 3/4 of the answers land on a foreign partition, got {}", forwarded.len());
    let counted = counter("switchyard_predictions_forwarded_total", &["model=\"p1\""])
        + counter("switchyard_predictions_forwarded_total", &["model=\"p2\""]);
    assert!(counted >= forwarded.len() as f64, "forwarding is counted per model: {counted} < {}", forwarded.len());
    env.stop().await;
    workers.into_iter().for_each(|w| w.abort());
}

/// A worker as a team writes it from the documented contract: read_committed, same key, and the
/// client's default (non-murmur2) partitioner.
async fn foreign_worker(config: switchyard::config::Config, model: &'static str) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.bootstrap_servers)
        .set("group.id", format!("{}-worker-{model}", config.service.group_id))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[config.topics.model_requests(model).as_str()]).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.bootstrap_servers)
        .set("partitioner", "consistent_random")
        .create()
        .unwrap();
    let codec = config.codec().unwrap();
    let topic = config.topics.model_predictions(model);
    loop {
        let message = consumer.recv().await.unwrap();
        let request: ModelRequest = codec.decode(message.payload().unwrap()).unwrap();
        let prediction = Prediction {
            request_id: request.request.request_id.clone(),
            model: model.to_string(),
            output: Some(demo_model::output(model, &request.request.payload, 0.0)),
            error: None,
            produced_at: clock::now_millis(),
        };
        let value = codec.encode(&prediction);
        let record = FutureRecord::to(&topic).key(message.key().unwrap()).payload(&value);
        producer.send(record, Duration::from_secs(30)).await.unwrap();
    }
}

/// Counters are recorded when a transaction commits: after transactions aborted by fencing the
/// service's producers mid-stream, the counters still equal what the topics hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_equal_the_topics_after_aborted_transactions() {
    let Some(mut env) = Env::new("abort").await else { return };
    let deployment = format!("abort-{:08x}", rand::random::<u32>());
    env.deploy(
        &deployment,
        r#"{"strategy":"canary","control":"a1","candidate":"a2","canary_percent":50,"timeout_ms":20000}"#,
    )
    .await;
    env.start_service();
    env.start_model("a1", 0, 0.0, 0.0);
    env.start_model("a2", 0, 0.0, 0.0);
    let sent = requests(&deployment, "abort", 1200, 300);
    let chunks: Vec<&[Request]> = sent.chunks(200).collect();
    // The first chunk decided: merge's producer is initialised (a fence before that would be settled
    // by merge's own initialisation, fencing nothing).
    env.send(chunks[0]).await;
    env.read::<Decision>(&env.config.topics.decisions, chunks[0].len(), LIMIT, Duration::ZERO).await;
    let failed_before = counter("switchyard_transactions_failed_total", &[]);
    for (round, chunk) in chunks.iter().enumerate().skip(1) {
        let fenced = round % 2 == 1;
        let failed = counter("switchyard_transactions_failed_total", &[]);
        if fenced {
            // A producer with merge's transactional id fences it: the transaction carrying this chunk
            // fails. (route has no transaction: its copies after a failure are the fault suite's
            // `route_replay`.)
            fence(&env, &env.config.service.transactional_id("merge"));
        }
        env.send(chunk).await;
        if fenced {
            // Until merge has failed and replaced its producer, the next fence could be settled by
            // merge's own new producer instead of fencing it.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while counter("switchyard_transactions_failed_total", &[]) == failed && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let decisions = env.read::<Decision>(&env.config.topics.decisions, sent.len(), LIMIT, SETTLE).await;
    assert_eq!(decisions.len(), sent.len(), "exactly one decision each, aborts or not");
    assert!(
        counter("switchyard_transactions_failed_total", &[]) - failed_before >= 3.0,
        "each of the three fences aborted a transaction of merge"
    );

    // Each of merge's committed transactions recorded its steps (where a commit's time goes).
    let merge = "stage=\"merge\"";
    let step = |name: &str| counter("switchyard_transaction_step_seconds_count", &[merge, &format!("step=\"{name}\"")]);
    let (produced, committed) = (step("produce"), step("commit"));
    let batches = counter("switchyard_commit_seconds_count", &[merge]);
    assert!(step("send_offsets") >= 1.0 && committed >= 1.0, "merge's transaction steps are recorded");
    assert!(produced >= committed, "a commit step follows a produce step: {produced} < {committed}");
    assert!((committed - batches).abs() <= 3.0, "one commit step per committed batch: {committed} against {batches}");

    let label = format!("deployment=\"{deployment}\"");
    assert_eq!(counter("switchyard_decisions_total", &[&label]), decisions.len() as f64, "decisions counted once each");
    let mut copies = 0;
    for model in ["a1", "a2"] {
        let topic = env.config.topics.model_requests(model);
        let records = env.read_raw(&topic, 1, LIMIT, SETTLE).await;
        let counted = counter("switchyard_requests_routed_total", &[&label, &format!("model=\"{model}\"")]);
        assert_eq!(counted, records.len() as f64, "routed to {model} counted once each");
        copies += records.len();
    }
    assert_eq!(copies, sent.len());
    env.stop().await;
}

fn fence(env: &Env, transactional_id: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.config.kafka.bootstrap_servers)
        .set("transactional.id", transactional_id)
        .create()
        .unwrap();
    tokio::task::block_in_place(|| producer.init_transactions(Duration::from_secs(30))).unwrap();
}

/// The oversized-request check covers the inputs; this covers what goes out: a request just under
/// `max_request_bytes` is routed and decided (its model copy, a little larger, still fits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_just_under_the_limit_is_decided() {
    let Some(mut env) = Env::new("nearlimit").await else { return };
    env.deploy("fraud", r#"{"strategy":"shadow","control":"n1","candidate":"n2","timeout_ms":20000}"#).await;
    env.start_service();
    env.start_model("n1", 0, 0.0, 0.0);
    env.start_model("n2", 0, 0.0, 0.0);
    let big = request("nearlimit-big", 0, env.config.service.max_request_bytes - 200);
    assert!(env.codec.encode(&big).len() <= env.config.service.max_request_bytes);
    let mut sent = requests("fraud", "nearlimit", 50, 10);
    sent.insert(25, big.clone());
    env.produce(
        sent.iter()
            .map(|r| OutRecord::new(env.config.topics.requests.clone(), r.user_id.as_bytes(), env.codec.encode(r)))
            .collect(),
    )
    .await;
    let decisions = env.read::<Decision>(&env.config.topics.decisions, sent.len(), LIMIT, SETTLE).await;
    assert_eq!(decisions.len(), sent.len());
    assert!(decisions.iter().any(|d| d.value.request_id == big.request_id && d.value.status == DecisionStatus::Ok));
    env.stop().await;
}

/// A prediction larger than `max_prediction_bytes` is dead-lettered byte for byte; its request is
/// decided at its deadline, and the other answers are joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_prediction_is_dead_lettered_and_its_request_times_out() {
    let Some(mut env) = Env::new("bigprediction").await else { return };
    env.deploy("fraud", r#"{"strategy":"single","control":"b1","timeout_ms":3000}"#).await;
    env.start_service();
    let sent = requests("fraud", "bigprediction", 3, 3);
    env.send(&sent).await;
    let answer = |r: &Request, output: Vec<u8>| {
        let prediction = Prediction {
            request_id: r.request_id.clone(),
            model: "b1".into(),
            output: Some(output),
            error: None,
            produced_at: clock::now_millis(),
        };
        OutRecord::new(env.config.topics.model_predictions("b1"), r.user_id.as_bytes(), env.codec.encode(&prediction))
    };
    let big = answer(&sent[1], (0..1_100_000).map(|_| rand::random::<u8>()).collect());
    let big_value = big.payload.clone().unwrap();
    env.produce(vec![answer(&sent[0], b"0.5".to_vec()), big, answer(&sent[2], b"0.7".to_vec())]).await;
    let decisions = env.read::<Decision>(&env.config.topics.decisions, 3, LIMIT, SETTLE).await;
    let status: HashMap<&str, DecisionStatus> =
        decisions.iter().map(|d| (d.value.request_id.as_str(), d.value.status)).collect();
    assert_eq!(decisions.len(), 3);
    assert_eq!(status[sent[0].request_id.as_str()], DecisionStatus::Ok);
    assert_eq!(status[sent[1].request_id.as_str()], DecisionStatus::Timeout);
    assert_eq!(status[sent[2].request_id.as_str()], DecisionStatus::Ok);
    let letters = env.read_raw(&env.config.topics.dead_letter, 1, LIMIT, SETTLE).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].value, big_value, "dead-lettered byte for byte");
    assert_eq!(letters[0].headers["dlq.kind"], "oversized");
    env.stop().await;
}

/// A dead letter the dead-letter topic refuses (it allows less than the input topic) goes out without
/// its value, naming where the original is; the service does not stall on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_its_topic_goes_without_its_value() {
    let Some(mut env) = Env::new("dlqlimit").await else { return };
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &env.config.kafka.bootstrap_servers).create().unwrap();
    let dlq = env.config.topics.dead_letter.clone();
    let change = rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&dlq))
        .set("max.message.bytes", "20000");
    let altered = admin.alter_configs([&change], &AdminOptions::new()).await.unwrap();
    assert!(altered.iter().all(Result::is_ok), "{altered:?}");
    env.deploy("fraud", r#"{"strategy":"single","control":"d1","timeout_ms":10000}"#).await;
    env.start_service();
    env.start_model("d1", 0, 0.0, 0.0);
    let sent = requests("fraud", "dlqlimit", 100, 20);
    let garbage: Vec<u8> = (0..50_000).map(|_| rand::random::<u8>()).collect();
    let mut records: Vec<OutRecord> = sent
        .iter()
        .map(|r| OutRecord::new(env.config.topics.requests.clone(), r.user_id.as_bytes(), env.codec.encode(r)))
        .collect();
    records.insert(40, OutRecord::new(env.config.topics.requests.clone(), "garbage", garbage));
    env.produce(records).await;
    let decisions = env.read::<Decision>(&env.config.topics.decisions, sent.len(), LIMIT, SETTLE).await;
    assert_eq!(decisions.len(), sent.len(), "the rest is decided");
    let letters = env.read_raw(&dlq, 1, LIMIT, SETTLE).await;
    assert_eq!(letters.len(), 1, "one dead letter");
    let letter = &letters[0];
    assert_eq!((letter.headers["dlq.kind"].as_str(), letter.headers["dlq.value"].as_str()), ("unwritable", "dropped"));
    assert!(letter.value.is_empty() && letter.key == b"garbage");
    assert_eq!(letter.headers["dlq.topic"], env.config.topics.requests);
    assert!(letter.headers["dlq.offset"].parse::<i64>().is_ok());
    env.stop().await;
}

/// A topic whose records are all gone (deleted by retention or `kafka-delete-records`; compaction
/// removing even the tombstones) still has its end offset: reading it whole must end, not wait for a
/// position that a reader that reads nothing never gets (seen: a merge restore that never finished).
/// Here the history topic as `history` reads it (compacted topics refuse record deletion; the deployments
/// topic and the changelogs are read through the same `kafka::batch::whole`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_whose_records_are_all_deleted_is_read_to_its_end() {
    let Some(env) = Env::new("emptied").await else { return };
    let t = &env.config.topics;
    kafka::ensure_topics(&env.config, std::slice::from_ref(&t.history), kafka::TopicKind::Audit).await.unwrap();
    env.produce(vec![OutRecord::new(t.history.clone(), b"fraud", b"not an entry".to_vec())]).await;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", common::bootstrap()).create().unwrap();
    let mut all = rdkafka::TopicPartitionList::new();
    all.add_partition_offset(&t.history, 0, rdkafka::Offset::End).unwrap();
    let deleted = admin.delete_records(&all, &AdminOptions::new()).await.unwrap();
    let e = &deleted.elements()[0];
    assert!(e.error().is_ok() && matches!(e.offset(), rdkafka::Offset::Offset(n) if n > 0), "{e:?}");
    let reader: StreamConsumer = kafka::reader(&env.config).unwrap();
    let (assignment, targets) = kafka::batch::whole(&env.config, &reader, &t.history, [0]).unwrap();
    assert!(assignment.count() == 1 && targets.is_empty(), "assigned (to follow it), nothing to wait for");

    let started = std::time::Instant::now();
    let mut history = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["history", "fraud"])
        .envs(env.vars.iter().cloned())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while history.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            history.kill().unwrap();
            panic!("`switchyard history` still reading an emptied topic after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(history.wait().unwrap().success());
}

/// A restore reads what a transaction still open when it began wrote, once that transaction commits. The
/// group's committed offsets can already be a transaction's while its records are not readable yet (the
/// coordinator completes the offsets on its own; the other partitions' markers follow), so a restore that
/// stopped at the readable end would miss the last transaction's changelog states and decide its requests
/// again (seen: a duplicate decision and a TIMEOUT after a rebalance, fault scenario
/// foreign_partitioner_worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_waits_for_a_transaction_open_when_it_began() {
    let Some(env) = Env::new("restore-open").await else { return };
    let t = env.config.topics.clone();
    let mut routed = OutRecord::new(t.routed.clone(), b"user-1", b"read again from offset 0".to_vec());
    routed.partition = Some(0);
    env.produce(vec![routed]).await;

    let id = format!("{}-previous-owner", env.config.service.group_id);
    let producer = kafka::transactional_producer(&env.config, &id).unwrap();
    tokio::task::block_in_place(|| {
        producer.init_transactions(LIMIT)?;
        producer.begin_transaction()
    })
    .unwrap();
    let state = MergeState {
        request_id: "decided-in-the-open-transaction".into(),
        served_ok: true,
        served_output: Some(b"0.97".to_vec()),
        served_latency_ms: Some(3),
        compared: Vec::new(),
        finished: true,
    };
    let value = env.codec.encode(&state);
    let delivered =
        producer.send(FutureRecord::to(&t.merge_changelog).partition(0).key("user-1").payload(&value), LIMIT);
    delivered.await.map_err(|(e, _)| e).expect("written, not yet committed");

    let mut committed = rdkafka::TopicPartitionList::new();
    committed.add_partition_offset(&t.routed, 0, rdkafka::Offset::Offset(0)).unwrap();
    committed.find_partition(&t.routed, 0).unwrap().set_metadata(format!("{}0", restore::METADATA_PREFIX));
    let (config, codec) = (env.config.clone(), env.codec.clone());
    let restoring = tokio::spawn(async move { restore::load(&config, &codec, &committed).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!restoring.is_finished(), "the restore waits for the transaction open when it began");
    tokio::task::block_in_place(|| producer.commit_transaction(LIMIT)).unwrap();
    let restored = tokio::time::timeout(Duration::from_secs(30), restoring).await.expect("restored").unwrap().unwrap();
    let ids: Vec<&str> = restored.states.iter().map(|s| s.request_id.as_str()).collect();
    assert_eq!(ids, ["decided-in-the-open-transaction"]);
    assert!(restored.states[0].finished);
    env.stop().await;
}

/// route has no transaction: when it dies before committing its offsets it writes a request's routing
/// again, maybe under another deployment version. merge keeps the first routing of each request — a
/// copy is dropped while its request is open, after it was decided, and after merge restarted, where only
/// the routing marks committed with merge's offsets can tell a copy from a first routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_keeps_the_first_routing_of_each_request_across_a_restart() {
    let Some(mut env) = Env::new("firsts").await else { return };
    env.deploy("firsts", r#"{"strategy":"canary","control":"f1","candidate":"f2","canary_percent":50}"#).await;
    env.start_model("f1", 0, 0.0, 0.0);
    env.start_model("f2", 0, 0.0, 0.0);
    let dir = std::env::temp_dir().join(format!("switchyard-{}", env.config.service.group_id));
    std::fs::create_dir_all(&dir).unwrap();
    let mut instance = env.spawn_instance("a", &dir.join("a.log"));
    // What route writes for request `i` (at offset i of requests partition 0) under `version`, served
    // by `model`: the model request, then the routed record naming its source.
    let routing = |i: usize, version: i64, model: &str| -> Vec<OutRecord> {
        let request = request("firsts", i, 16);
        let routed = switchyard::codec::Routed {
            request_id: request.request_id.clone(),
            user_id: request.user_id.clone(),
            deployment: "firsts".into(),
            strategy: "single".into(),
            cohort: "control".into(),
            bucket: 0,
            config_version: version,
            serving_model: model.into(),
            shadow_models: Vec::new(),
            timeout_ms: 20_000,
            sent_at: request.sent_at,
            routed_at: clock::now_millis(),
            fallback: None,
            hedge_model: None,
            propensity: Some(1.0),
        };
        let copy = ModelRequest {
            request: request.clone(),
            model: model.into(),
            role: switchyard::codec::Role::Primary,
            config_version: version,
            routed_at: routed.routed_at,
        };
        let key = request.user_id.as_bytes();
        vec![
            OutRecord::new(env.config.topics.model_requests(model), key, env.codec.encode(&copy)),
            OutRecord::new(env.config.topics.routed.clone(), key, env.codec.encode(&routed))
                .header(switchyard::codec::ROUTED_SOURCE_HEADER, switchyard::codec::routed_source(0, i as i64)),
        ]
    };
    let (n, decisions_topic) = (200, env.config.topics.decisions.clone());
    env.produce((0..n).flat_map(|i| routing(i, 1, "f1")).collect()).await;
    // Copies of the first half under version 2 while the requests are open or just decided.
    env.produce((0..n / 2).flat_map(|i| routing(i, 2, "f2")).collect()).await;
    let decided = env.read::<Decision>(&decisions_topic, n, LIMIT, SETTLE).await;
    assert_eq!(decided.len(), n, "one decision each, copies or not");

    // merge restarts: what it remembered of finished requests is gone, only its commits remain.
    let _ = std::process::Command::new("kill").args(["-TERM", &instance.id().to_string()]).status();
    assert!(instance.wait().unwrap().success());
    instance = env.spawn_instance("a", &dir.join("a2.log"));
    // Copies of every request under version 2, then 50 requests routed for the first time.
    env.produce((0..n).flat_map(|i| routing(i, 2, "f2")).collect()).await;
    env.produce((n..n + 50).flat_map(|i| routing(i, 2, "f2")).collect()).await;
    let decided = env.read::<Decision>(&decisions_topic, n + 50, LIMIT, Duration::from_secs(5)).await;
    let _ = std::process::Command::new("kill").args(["-TERM", &instance.id().to_string()]).status();
    let _ = instance.wait();
    assert_eq!(decided.len(), n + 50, "no copy decided again after the restart");
    for d in &decided {
        let i: usize = d.value.request_id.rsplit('-').next().unwrap().parse().unwrap();
        let expected = if i < n { (1, "f1") } else { (2, "f2") };
        assert_eq!(
            (d.value.config_version, d.value.model.as_str()),
            expected,
            "{} decided as its first routing",
            d.value.request_id
        );
        assert_eq!(d.value.status, DecisionStatus::Ok);
    }
    env.stop().await;
}
