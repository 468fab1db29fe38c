//! The control-plane commands as an operator uses them: the `switchyard` binary against a real broker.

mod common;

use common::Env;
use switchyard::kafka::OutRecord;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_status_promote_rollback_and_rejections() {
    let Some(env) = Env::new("cli").await else { return };

    let (ok, out, err) = env.cli(&[
        "deploy",
        "fraud",
        "--strategy",
        "canary",
        "--control",
        "v1",
        "--candidate",
        "v2",
        "--canary-percent",
        "10",
        "--hedge",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "fraud version 1 written: 10.00% -> v2 (candidate), 90.00% -> v1 (control); hedged: v1 answers when v2 fails"
        ),
        "{out}"
    );

    // Invalid input is refused before anything is written.
    let (ok, _, err) = env.cli(&[
        "deploy",
        "fraud",
        "--strategy",
        "canary",
        "--control",
        "v1",
        "--candidate",
        "v2",
        "--canary-percent",
        "150",
    ]);
    assert!(!ok);
    assert!(err.contains("canary_percent must be between 0 and 100"), "{err}");
    let (ok, _, err) = env.cli(&["deploy", "fraud", "--strategy", "rainbow", "--control", "v1"]);
    assert!(!ok);
    assert!(err.contains("rainbow"), "{err}");

    // A bad record written around the CLI (e.g. with kcat) is rejected, and the last good one stays.
    let raw = br#"{"version":5,"strategy":"single","control":"v9","colour":"red"}"#.to_vec();
    env.produce(vec![OutRecord::new(env.config.topics.deployments.clone(), "fraud", raw)]).await;
    let (ok, out, err) = env.cli(&["status", "fraud"]);
    assert!(ok, "{err}");
    assert!(out.contains("fraud  version 1  strategy canary"), "{out}");
    assert!(out.contains("rejected records (1)") && out.contains("unknown field `colour`"), "{out}");

    let (ok, out, err) = env.cli(&["promote", "fraud"]);
    assert!(ok, "{err}");
    assert!(out.contains("fraud version 2 written: 100.00% -> v2 (control)"), "{out}");
    let (ok, _, err) = env.cli(&["rollback", "fraud"]);
    assert!(!ok, "a single deployment has nothing to roll back");
    assert!(err.contains("nothing to roll back") || err.contains("no candidate"), "{err}");

    let (ok, out, _) = env.cli(&["status"]);
    assert!(ok);
    assert!(out.contains("fraud  version 2  strategy single"), "{out}");
    let (ok, _, err) = env.cli(&["status", "missing"]);
    assert!(!ok);
    assert!(err.contains("\"missing\" is not in force"), "{err}");

    let (ok, _, _) = env.cli(&["delete", "fraud"]);
    assert!(ok);
    let (_, out, _) = env.cli(&["status"]);
    assert!(out.contains("no deployments in force"), "{out}");
    env.stop().await;
}

/// An invalid record is refused for what is wrong with it before any broker is asked: with the broker
/// away the operator must still hear about the 150%, not only that Kafka cannot be reached.
#[test]
fn deploy_validates_before_connecting() {
    let deploy = |extra: &[&str]| {
        let mut args = vec!["deploy", "fraud", "--strategy", "canary", "--control", "v1", "--candidate", "v2"];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(&args)
            .env("SWITCHYARD_BOOTSTRAP_SERVERS", "127.0.0.1:1")
            .output()
            .expect("the binary runs");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = deploy(&["--canary-percent", "150"]);
    assert!(!ok);
    assert!(err.contains("canary_percent must be between 0 and 100"), "{err}");
    let falling = r#"{"steps":[{"canary_percent":20,"bake_ms":1000,"min_sample":10,"max_ms":60000},
                              {"canary_percent":10,"bake_ms":1000,"min_sample":10,"max_ms":60000}]}"#;
    let (ok, err) = deploy(&["--plan", falling]);
    assert!(!ok);
    assert!(!err.contains("reach"), "validated before connecting: {err}");
    // A valid record goes on to the broker, which is away.
    let (ok, err) = deploy(&["--canary-percent", "10"]);
    assert!(!ok);
    assert!(err.contains("reach"), "{err}");
}

/// A replication factor the cluster cannot give is refused with what to set, before any topic is
/// created; -1 (the default) takes the brokers' own default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_topics_refuses_more_replicas_than_brokers() {
    let Some(env) = Env::new("replication").await else { return };
    let requests = env.config.topics.requests.replace(".requests", ".unreplicable");
    let run = |factor: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("create-topics")
            .envs(env.vars.iter().cloned())
            .env("SWITCHYARD__TOPICS__REQUESTS", &requests)
            .env("SWITCHYARD__TOPICS__REPLICATION_FACTOR", factor)
            .env("RUST_LOG", "error")
            .output()
            .expect("switchyard binary runs")
    };
    let refused = run("99");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("topics.replication_factor is 99 but the cluster has"), "{err}");
    assert!(err.contains("or to -1 for the brokers' default.replication.factor"), "{err}");
    let admin = switchyard::kafka::reader(&env.config).unwrap();
    let exists = |topic: &str| {
        use rdkafka::consumer::Consumer;
        let metadata = admin.fetch_metadata(Some(topic), std::time::Duration::from_secs(10)).unwrap();
        metadata.topics().iter().any(|t| t.name() == topic && t.error().is_none())
    };
    assert!(!exists(&requests), "nothing is created when the replication is refused");
    let created = run("-1");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    assert!(exists(&requests));
}
