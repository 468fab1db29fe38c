//! Confluent Schema Registry framing against a real registry (Apicurio Registry's Confluent API, started
//! by `scripts/registry.sh`; its URL in `SWITCHYARD_TEST_REGISTRY`): schemas registered under their
//! subjects (the per-model topics' too, once a deployment names them), records framed with the
//! registered ids and read by the writer's id — a producer on a newer Request schema is routed and
//! decided — an incompatible schema refusing the start with the registry's message, and cached ids
//! working while the registry is unreachable.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use apache_avro::Schema;
use common::{Env, requests};
use switchyard::codec::{Decision, DecisionStatus, RecordKind, Request};
use switchyard::config::Config;
use switchyard::kafka::OutRecord;
use tokio::net::TcpListener;

const LIMIT: Duration = Duration::from_secs(90);
const SETTLE: Duration = Duration::from_secs(2);

/// The registry's Confluent API base URL; None (skipped) without one, unless `CI` is set.
fn registry() -> Option<String> {
    match (std::env::var("SWITCHYARD_TEST_REGISTRY"), std::env::var_os("CI")) {
        (Ok(url), _) if !url.is_empty() => Some(url.trim_end_matches('/').to_string()),
        (_, Some(_)) => panic!("SWITCHYARD_TEST_REGISTRY is not set: start one with `scripts/registry.sh start`"),
        _ => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: no SWITCHYARD_TEST_REGISTRY (scripts/registry.sh start)");
            None
        }
    }
}

fn framed_with(url: &str) -> [(&'static str, String); 3] {
    [
        ("SWITCHYARD__CODEC__FRAMING", "confluent".to_string()),
        ("SWITCHYARD__CODEC__REGISTRY_URL", url.to_string()),
        ("SWITCHYARD__CODEC__REGISTRY_WAIT_MS", "10000".to_string()),
    ]
}

fn get(url: &str) -> serde_json::Value {
    let text = ureq::get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}")).into_string().unwrap();
    serde_json::from_str(&text).unwrap()
}

fn send_json(method: &str, url: &str, body: serde_json::Value) -> Result<serde_json::Value, (u16, String)> {
    match ureq::request(method, url)
        .set("Content-Type", "application/vnd.schemaregistry.v1+json")
        .send_string(&body.to_string())
    {
        Ok(r) => Ok(serde_json::from_str(&r.into_string().unwrap()).unwrap()),
        Err(ureq::Error::Status(code, r)) => Err((code, r.into_string().unwrap_or_default())),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

fn subject_url(base: &str, subject: &str) -> String {
    format!("{base}/subjects/{}", subject.replace('{', "%7B").replace('}', "%7D"))
}

fn subjects(base: &str) -> HashSet<String> {
    get(&format!("{base}/subjects")).as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn latest_id(base: &str, subject: &str) -> u32 {
    get(&format!("{}/versions/latest", subject_url(base, subject)))["id"].as_u64().unwrap() as u32
}

/// The Request schema with one more field at the end: what a producer one version ahead writes.
fn request_v2() -> String {
    let mut schema: serde_json::Value = serde_json::from_str(RecordKind::Request.schema_text()).unwrap();
    schema["fields"].as_array_mut().unwrap().push(serde_json::json!(
        {"name": "channel", "type": "string", "default": "web", "doc": "where the request came from"}
    ));
    schema.to_string()
}

/// An Avro string: zig-zag length, then the bytes.
fn avro_string(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut z = ((text.len() as i64) << 1) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
    out.extend_from_slice(text.as_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_records_round_trip_through_a_real_registry_across_a_schema_change() {
    let Some(base) = registry() else { return };
    let extra = framed_with(&base);
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let Some(mut env) = Env::with("registry", &extra).await else { return };
    let t = env.config.topics.clone();

    // Every record type's schema is in the registry under the subject of its topic.
    let registered = subjects(&base);
    for kind in RecordKind::ALL {
        let subject = format!("{}-value", t.of(kind));
        assert!(registered.contains(&subject), "{subject} not among the registry's subjects");
        let id = latest_id(&base, &subject);
        let schema = get(&format!("{base}/schemas/ids/{id}"))["schema"].as_str().unwrap().to_string();
        assert_eq!(&Schema::parse_str(&schema).unwrap(), kind.schema(), "{subject}: id {id} is switchyard's schema");
    }

    env.deploy(
        "fraud",
        r#"{"strategy":"canary","control":"v1","candidate":"v2","canary_percent":20,"timeout_ms":20000}"#,
    )
    .await;
    env.start_service();
    env.start_model("v1", 2, 0.0, 0.0);
    env.start_model("v2", 2, 0.0, 0.0);

    // The per-model topics' own subjects appear once the deployment is installed.
    let wanted: Vec<String> = ["v1", "v2"]
        .iter()
        .flat_map(|m| [format!("{}-value", t.model_requests(m)), format!("{}-value", t.model_predictions(m))])
        .collect();
    let started = Instant::now();
    while !wanted.iter().all(|s| subjects(&base).contains(s)) {
        assert!(started.elapsed() < Duration::from_secs(30), "per-model subjects {wanted:?} not registered");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Requests of switchyard's schema, and requests of a producer already on the next schema version
    // (registered under the requests subject: a new id), which switchyard reads by the writer's schema.
    let current = requests("fraud", "now", 200, 100);
    env.send(&current).await;
    let v2_subject = format!("{}-value", t.requests);
    let v2_id = send_json(
        "POST",
        &format!("{}/versions", subject_url(&base, &v2_subject)),
        serde_json::json!({"schema": request_v2()}),
    )
    .expect("a field with a default is a compatible change")["id"]
        .as_u64()
        .unwrap() as u32;
    let own_request_id = latest_id(&base, &format!("{}-value", t.requests));
    assert_ne!(v2_id, latest_id(&base, &format!("{}-value", t.decisions)));
    let ahead = requests("fraud", "ahead", 200, 100);
    let records = ahead
        .iter()
        .map(|r| {
            let own = env.codec.encode(r);
            let mut value = vec![0];
            value.extend_from_slice(&v2_id.to_be_bytes());
            value.extend_from_slice(&own[5..]);
            value.extend_from_slice(&avro_string("mobile"));
            OutRecord::new(t.requests.clone(), r.user_id.as_bytes(), value)
        })
        .collect();
    env.produce(records).await;

    let raw = env.read_raw(&t.decisions, 400, LIMIT, SETTLE).await;
    let decision_id = latest_id(&base, &format!("{}-value", t.decisions));
    let mut decided = HashSet::new();
    for record in &raw {
        assert_eq!(record.value[0], 0, "magic byte");
        assert_eq!(
            u32::from_be_bytes(record.value[1..5].try_into().unwrap()),
            decision_id,
            "framed with the registered id"
        );
        let d: Decision = env.codec.decode(&record.value).unwrap();
        assert_eq!(d.status, DecisionStatus::Ok, "{d:?}");
        assert!(decided.insert(d.request_id.clone()), "one decision per request: {}", d.request_id);
    }
    let sent: HashSet<String> = current.iter().chain(&ahead).map(|r| r.request_id.clone()).collect();
    assert_eq!(decided, sent, "requests of both schema versions decided");
    assert!(own_request_id > 0);
    // Nothing was dead-lettered: the newer writer's requests were readable.
    assert_eq!(common::counter("switchyard_dead_letters_total", &[]), 0.0);

    // A model request made from a v2 request carries switchyard's ModelRequest id, not the request's bytes.
    let model_requests = env.read_raw(&t.model_requests("v1"), 1, LIMIT, Duration::ZERO).await;
    let model_request_id = latest_id(&base, &format!("{}-value", t.of(RecordKind::ModelRequest)));
    for record in &model_requests {
        assert_eq!(u32::from_be_bytes(record.value[1..5].try_into().unwrap()), model_request_id);
    }
}

#[tokio::test]
async fn an_incompatible_schema_stops_the_start_with_the_registrys_message() {
    let Some(base) = registry() else { return };
    if !common::broker_available() {
        return;
    }
    let prefix = format!("incompatible-{:08x}", rand::random::<u32>());
    let mut env = switchyard::config::isolated_env(&common::bootstrap(), &prefix, 1);
    env.extend(framed_with(&base).map(|(k, v)| (k.to_string(), v)));
    let config = Config::load(None, env).unwrap();
    // Someone else's Decision already owns the decisions subject, and the subject only takes
    // schemas that can read what was written before.
    let subject = format!("{}-value", config.topics.decisions);
    let theirs =
        r#"{"type":"record","name":"Decision","namespace":"other","fields":[{"name":"request_id","type":"long"}]}"#;
    send_json("POST", &format!("{}/versions", subject_url(&base, &subject)), serde_json::json!({"schema": theirs}))
        .expect("the first schema of a subject is always accepted");
    send_json("PUT", &format!("{base}/config/{}", subject), serde_json::json!({"compatibility": "BACKWARD"}))
        .expect("per-subject compatibility");
    let error = config.codec().unwrap_err().to_string();
    assert!(error.contains("incompatible") && error.contains(&subject) && error.contains("Decision"), "{error}");
}

#[tokio::test]
async fn an_unreachable_registry_fails_the_start_after_the_wait() {
    let prefix = format!("unreachable-{:08x}", rand::random::<u32>());
    let mut env = switchyard::config::isolated_env("127.0.0.1:9092", &prefix, 1);
    env.extend(framed_with("http://127.0.0.1:9").map(|(k, v)| (k.to_string(), v)));
    env.push(("SWITCHYARD__CODEC__REGISTRY_WAIT_MS".into(), "1500".into()));
    let config = Config::load(None, env).unwrap();
    let started = Instant::now();
    let error = config.codec().unwrap_err().to_string();
    assert!(error.contains("unreachable") && error.contains("http://127.0.0.1:9"), "{error}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "waited {:?}", started.elapsed());
}

/// A TCP proxy to the registry that can be cut (its connections too: the client pools them): the
/// registry "down" for one client. Send `true` to cut it.
fn proxy(target: String, listener: TcpListener) -> tokio::sync::watch::Sender<bool> {
    let (cut, cut_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut accept_cut = cut_rx.clone();
        loop {
            let (mut inbound, _) = tokio::select! {
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
                _ = accept_cut.changed() => return,
            };
            let (target, mut cut_rx) = (target.clone(), cut_rx.clone());
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                }
            });
        }
    });
    cut
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_ids_keep_working_while_the_registry_is_unreachable() {
    let Some(base) = registry() else { return };
    let rest = base.strip_prefix("http://").expect("an http:// registry");
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut = proxy(authority.to_string(), listener);
    let proxied = format!("http://127.0.0.1:{port}/{path}");

    let prefix = format!("outage-{:08x}", rand::random::<u32>());
    let mut env = switchyard::config::isolated_env("127.0.0.1:9092", &prefix, 1);
    env.extend(framed_with(&proxied).map(|(k, v)| (k.to_string(), v)));
    let config = Config::load(None, env).unwrap();
    let codec =
        tokio::task::spawn_blocking(move || config.codec()).await.unwrap().expect("registered through the proxy");
    let request = &requests("fraud", "outage", 1, 1)[0];
    let own = codec.encode(request);

    // A newer writer's id that this codec has not seen yet.
    let subject = format!("{prefix}.requests-value");
    let v2_id = send_json(
        "POST",
        &format!("{}/versions", subject_url(&base, &subject)),
        serde_json::json!({"schema": request_v2()}),
    )
    .unwrap()["id"]
        .as_u64()
        .unwrap() as u32;
    let mut newer = vec![0];
    newer.extend_from_slice(&v2_id.to_be_bytes());
    newer.extend_from_slice(&own[5..]);
    newer.extend_from_slice(&avro_string("mobile"));

    cut.send(true).unwrap(); // the registry is gone for this codec
    tokio::time::sleep(Duration::from_millis(100)).await;
    let down = codec.clone();
    let (own_back, newer_back) = tokio::task::spawn_blocking(move || {
        (down.decode::<Request>(&own), down.decode::<Request>(&newer).map_err(|e| e.to_string()))
    })
    .await
    .unwrap();
    assert_eq!(&own_back.expect("a cached id needs no registry"), request);
    let error = newer_back.expect_err("an id never seen cannot be read without the registry");
    assert!(error.contains(&format!("schema id {v2_id}")) && error.contains("unreachable"), "{error}");
}
