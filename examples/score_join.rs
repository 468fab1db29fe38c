//! Measures the outcome join: memory with N decisions waiting for labels, labels scored per second, and
//! the restart time of the score stage with a full window (its changelog read back from Kafka).
//!
//!     cargo run --release --example score_join [-- N]      (default N = 1,000,000; needs the local
//!                                                           broker for the restart part: scripts/kafka.sh start)

use std::time::Instant;

use switchyard::codec::{Decision, DecisionStatus, Outcome};
use switchyard::config::Config;
use switchyard::kafka::{self, OutRecord, SourcePos};
use switchyard::quality::changelog;
use switchyard::quality::join::{Effect, Join, JoinConfig};
use switchyard::record::quality::QualitySpec;

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

fn decision(i: usize) -> Decision {
    Decision {
        request_id: format!("req-{i:012}"),
        user_id: format!("user-{}", i % 100_000),
        deployment: "fraud".into(),
        model: "fraud-v2".into(),
        strategy: "canary".into(),
        cohort: if i % 10 == 0 { "candidate".into() } else { "control".into() },
        bucket: (i % 10_000) as i32,
        config_version: 7,
        status: DecisionStatus::Ok,
        output: Some(format!("0.{:04}", i % 10_000).into_bytes()),
        error: None,
        latency_ms: 12,
        decided_at: 1_700_000_000_000 + i as i64,
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let config = JoinConfig { window_ms: 7 * 86_400_000, early_wait_ms: 300_000, max_open: n * 2 };
    let spec = QualitySpec::default();
    let before = rss_mib();
    let start = Instant::now();
    let mut join = Join::new(config);
    let mut fx = Vec::new();
    let codec = switchyard::codec::Codec::default();
    let mut changelog_bytes = 0;
    for i in 0..n {
        join.on_decision(decision(i), (i % 4) as i32, &spec, &mut fx);
        for e in fx.drain(..) {
            if let Effect::State { entry: Some(entry), .. } = e {
                changelog_bytes += changelog::encode(&entry, &codec).len();
            }
        }
    }
    let opened = start.elapsed();
    let held = rss_mib() - before;
    println!("open decisions: {n}, opened in {:.2} s ({:.0}/s)", opened.as_secs_f64(), n as f64 / opened.as_secs_f64());
    println!(
        "join memory with {n} open decisions: {held:.0} MiB ({:.0} bytes each)",
        held * 1024.0 * 1024.0 / n as f64
    );
    println!("changelog: {n} records, {:.0} MiB of Avro", changelog_bytes as f64 / (1024.0 * 1024.0));

    let start = Instant::now();
    let source = SourcePos { topic: "outcomes".into(), partition: 0, offset: 0 };
    let mut scored = 0;
    for i in 0..n {
        let outcome = Outcome {
            request_id: format!("req-{i:012}"),
            user_id: format!("user-{}", i % 100_000),
            label: f64::from(u8::from(i % 3 == 0)),
            observed_at: 1_700_000_100_000 + i as i64,
            source: "bench".into(),
        };
        join.on_outcome(outcome, source.clone(), |_| spec.clone(), 0, &mut fx);
        scored += fx.iter().filter(|e| matches!(e, Effect::Scored(_))).count();
        fx.clear();
    }
    let labelling = start.elapsed();
    println!(
        "labels joined and scored: {scored} in {:.2} s = {:.0} labels/s (pure join, one core)",
        labelling.as_secs_f64(),
        scored as f64 / labelling.as_secs_f64()
    );
    drop(join);

    // The restart: the changelog of a full window on a real broker, read back by the stage's restore.
    let mut cfg = Config::load(None, std::env::vars()).expect("configuration");
    let prefix = format!("bench-{:08x}", rand::random::<u32>());
    cfg.topics.score_changelog = format!("{prefix}.score-state");
    if kafka::check_reachable(&cfg).await.is_err() {
        println!("restart: no broker at {} (scripts/kafka.sh start), skipped", cfg.kafka.bootstrap_servers);
        return;
    }
    kafka::ensure_topics(&cfg, std::slice::from_ref(&cfg.topics.score_changelog), kafka::TopicKind::Changelog)
        .await
        .unwrap();
    let producer = kafka::producer(&cfg).unwrap();
    let start = Instant::now();
    let mut writer = Join::new(config);
    for chunk_start in (0..n).step_by(20_000) {
        let mut records = Vec::new();
        for i in chunk_start..(chunk_start + 20_000).min(n) {
            writer.on_decision(decision(i), (i % cfg.topics.partitions as usize) as i32, &spec, &mut fx);
            for e in fx.drain(..) {
                if let Effect::State { request_id, partition, entry: Some(entry) } = e {
                    let value = changelog::encode(&entry, &codec);
                    let mut r = OutRecord::new(cfg.topics.score_changelog.clone(), request_id.into_bytes(), value);
                    r.partition = Some(partition);
                    records.push(r);
                }
            }
        }
        kafka::send_all(&producer, &records).await.unwrap();
    }
    drop(writer);
    println!("restart: {n} changelog records written in {:.1} s", start.elapsed().as_secs_f64());
    let start = Instant::now();
    let assigned: Vec<i32> = (0..cfg.topics.partitions).collect();
    let specs = std::collections::HashMap::from([("fraud".to_string(), spec.clone())]);
    let restored = switchyard::quality::stage::restore(&cfg, &codec, &specs, &assigned).await.unwrap();
    println!(
        "restart with a full window: {} open decisions restored from the changelog in {:.1} s",
        restored.open(),
        start.elapsed().as_secs_f64()
    );
}
