//! Measures the score stage's store of open decisions on local disk (docs/benchmarks.md, "Labels weeks
//! later"): N decisions written straight to the store through the join (as the stage does, a commit
//! per 5,000), its resident memory and bytes on disk per open decision, labels joined per second with N
//! open, the time to open it again after a clean close and after kill -9, and (with the local broker)
//! the rate at which a lost store is rebuilt from the changelog topic.
//!
//!     cargo run --release --example score_store [-- N [REBUILD]]   (default N = 10,000,000, REBUILD =
//!                                                                   1,000,000 changelog records)
//!
//! The store goes to .bench/score-store (removed first); the shipped settings (64 MiB cache, 64 MiB
//! write buffers).
//!
//!     cargo run --release --example score_store -- --e2e N      (needs the local broker and
//!                                                                 target/release/switchyard)
//!
//! End to end through Kafka: N decisions of a deployment with a quality spec written to the decisions
//! topic and taken in by `switchyard run` (the release binary, shipped settings), its resident memory and
//! store on disk with N open; then stopped with SIGTERM and started again, and killed with kill -9 and
//! started again: how long until its store has caught up, and until labels sent after the start are
//! scored again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use switchyard::codec::{Codec, Decision, DecisionStatus, Outcome};
use switchyard::config::Config;
use switchyard::kafka::{self, OutRecord, SourcePos};
use switchyard::quality::changelog;
use switchyard::quality::join::{Effect, Join, JoinConfig};
use switchyard::quality::store::{DiskConfig, DiskStates, States};
use switchyard::record::quality::QualitySpec;

// As in the switchyard binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 5_000;
const PARTITIONS: usize = 12;

fn rss_mib() -> f64 {
    rss_of("self")
}

/// VmRSS of process `pid` ("self": this one), MiB.
fn rss_of(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { dir_bytes(&entry.path()) } else { meta.len() };
    }
    total
}

/// Request ids as UUIDs (text, random-looking), users from a million.
fn request_id(i: u64) -> String {
    let (a, b) = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15), i.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ i);
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

fn decision(i: u64, at: i64) -> Decision {
    Decision {
        request_id: request_id(i),
        user_id: format!("user-{}", i.wrapping_mul(7_919) % 1_000_000),
        deployment: "fraud".into(),
        model: if i.is_multiple_of(10) { "fraud-v2".into() } else { "fraud-v1".into() },
        strategy: "canary".into(),
        cohort: if i.is_multiple_of(10) { "candidate".into() } else { "control".into() },
        bucket: (i % 10_000) as i32,
        config_version: 7,
        status: DecisionStatus::Ok,
        output: Some(format!("0.{:04}", i % 10_000).into_bytes()),
        error: None,
        latency_ms: 12,
        decided_at: at,
        propensity: Some(if i.is_multiple_of(10) { 0.1 } else { 0.9 }),
    }
}

fn partition(i: u64) -> i32 {
    (i % PARTITIONS as u64) as i32
}

/// The shipped settings (64 MiB each); SCORE_STORE_CACHE_MB sets the block cache, for experiments.
fn disk_config(dir: &Path) -> DiskConfig {
    let cache_mb: u64 = std::env::var("SCORE_STORE_CACHE_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    DiskConfig { dir: dir.to_path_buf(), cache_bytes: cache_mb << 20, write_buffer_bytes: 64 << 20 }
}

fn open(dir: &Path) -> Join<DiskStates> {
    let config = JoinConfig { window_ms: 90 * 86_400_000, early_wait_ms: 300_000, max_open: u64::MAX };
    let mut states = DiskStates::open(&disk_config(dir), Duration::from_secs(30)).unwrap();
    states.assign(&(0..PARTITIONS as i32).collect::<Vec<_>>());
    Join::new(config, states)
}

/// Writes decisions `from..to` in commits of [`BATCH`]; prints progress every `every`.
fn write(join: &mut Join<DiskStates>, from: u64, to: u64, every: u64, dir: &Path) {
    let spec = QualitySpec::default();
    let mut fx = Vec::new();
    let started = Instant::now();
    let mut last = (Instant::now(), from);
    for i in from..to {
        join.on_decision(decision(i, 1_700_000_000_000 + i as i64 / 10), partition(i), &spec, &mut fx);
        fx.clear();
        if (i + 1) % BATCH as u64 == 0 || i + 1 == to {
            join.states().commit(&[(partition(i), i as i64)], 0).unwrap();
        }
        if (i + 1) % every == 0 {
            let rate = (i + 1 - last.1) as f64 / last.0.elapsed().as_secs_f64();
            println!(
                "  {:>11} open: {:>8.0} writes/s, RSS {:.0} MiB, {:.1} bytes on disk each ({:.0} s)",
                i + 1,
                rate,
                rss_mib(),
                dir_bytes(dir) as f64 / (i + 1) as f64,
                started.elapsed().as_secs_f64()
            );
            last = (Instant::now(), i + 1);
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("--e2e") {
        let n: u64 = args.next().and_then(|a| a.replace('_', "").parse().ok()).unwrap_or(5_000_000);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        return runtime.block_on(end_to_end(n));
    }
    if first.as_deref() == Some("--labels") {
        // More labels on a store written by an earlier run: N decisions, from the FROM-th label on.
        let n: u64 = args.next().and_then(|a| a.replace('_', "").parse().ok()).unwrap();
        let from: u64 = args.next().and_then(|a| a.replace('_', "").parse().ok()).unwrap_or(1_000_000);
        let dir = Path::new(".bench/score-store");
        let mut join = open(dir);
        labels(&mut join, n, from);
        return;
    }
    if first.as_deref() == Some("--restarts") {
        // The restart figures of a store written by an earlier run (.bench/score-store, N decisions).
        let n: u64 = args.next().and_then(|a| a.replace('_', "").parse().ok()).unwrap();
        return restarts(Path::new(".bench/score-store"), n);
    }
    if first.as_deref() == Some("--crash-child") {
        // Opens the store and writes until killed.
        let dir = PathBuf::from(args.next().unwrap());
        let from: u64 = args.next().unwrap().parse().unwrap();
        let mut join = open(&dir);
        write(&mut join, from, u64::MAX, u64::MAX, &dir);
        return;
    }
    let n: u64 = first.and_then(|a| a.replace('_', "").parse().ok()).unwrap_or(10_000_000);
    let rebuild: u64 = args.next().and_then(|a| a.replace('_', "").parse().ok()).unwrap_or(1_000_000);
    let dir = PathBuf::from(".bench/score-store");
    let _ = std::fs::remove_dir_all(&dir);
    println!("score store: {n} open decisions, {PARTITIONS} partitions, commits of {BATCH}, in {}", dir.display());

    let started = Instant::now();
    let mut join = open(&dir);
    write(&mut join, 0, n, (n / 10).max(1), &dir);
    let secs = started.elapsed().as_secs_f64();
    let rss = rss_mib();
    join.states().sync().unwrap();
    println!(
        "written: {n} open decisions in {secs:.0} s = {:.0}/s; RSS {rss:.0} MiB; {:.1} bytes on disk per open decision \
         (states {:.1}, expiry index {:.1}; tables written out)",
        n as f64 / secs,
        dir_bytes(&dir) as f64 / n as f64,
        join.states().disk_space().0 as f64 / n as f64,
        join.states().disk_space().1 as f64 / n as f64,
    );

    labels(&mut join, n, 0);
    join.states().sync().unwrap();
    println!(
        "  after the labels, tables written out: {:.1} bytes on disk per decision (labelled ones are kept for the window)",
        dir_bytes(&dir) as f64 / n as f64
    );
    drop(join);

    restarts(&dir, n);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(rebuild_rate(rebuild));
}

/// Opens the store in `dir` (holding `n` decisions) after a clean close, then after kill -9 of a process
/// writing to it.
fn restarts(dir: &Path, n: u64) {
    let started = Instant::now();
    let join = open(dir);
    println!("reopened after a clean close: {:.2} s ({} held)", started.elapsed().as_secs_f64(), join.open());
    drop(join);

    // kill -9 of a process writing to it, then opened again (the journal replayed).
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--crash-child", &dir.display().to_string(), &n.to_string()])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let _ = std::process::Command::new("kill").args(["-KILL", &child.id().to_string()]).status();
    let mut child = child;
    child.wait().unwrap();
    let started = Instant::now();
    let join = open(dir);
    println!(
        "reopened after kill -9 mid-write: {:.2} s ({} held: the {} the killed process committed are kept)",
        started.elapsed().as_secs_f64(),
        join.open(),
        join.open() - n
    );
}

/// Labels 1,000,000 random open decisions of the `n` in the store (each once: a stride through 0..n
/// coprime with it, from its `from`-th step), committing every 5,000, and prints the rate: batches taking
/// turns between reading each state when its label meets it and reading the batch's states ahead in
/// parallel first (`States::prefetch`, as the score stage does), so both rates come from the same store
/// at the same time.
fn labels(join: &mut Join<DiskStates>, n: u64, from: u64) {
    let labels = 1_000_000.min(n);
    let stride = (0..).map(|k| 1_000_003 + 2 * k).find(|s| gcd(*s, n) == 1).unwrap();
    let spec = QualitySpec::default();
    let source = SourcePos { topic: "outcomes".into(), partition: 0, offset: 0 };
    let mut fx = Vec::new();
    let mut scored = 0;
    // [one by one, read ahead]: labels, seconds
    let mut took = [(0u64, 0f64); 2];
    // Of the batches read ahead: seconds reading ahead, joining, committing.
    let mut parts = [0f64; 3];
    let outcome = |i: u64| Outcome {
        request_id: request_id(i),
        user_id: String::new(),
        label: f64::from(u8::from(i.is_multiple_of(3))),
        observed_at: 1_800_000_000_000,
        source: "bench".into(),
    };
    for (b, batch) in (from..from + labels).collect::<Vec<_>>().chunks(BATCH).enumerate() {
        let started = Instant::now();
        let ahead = b % 2 == 1;
        if ahead {
            join.states()
                .prefetch(batch.iter().map(|k| (k * stride) % n).map(|i| (partition(i), request_id(i))).collect());
            parts[0] += started.elapsed().as_secs_f64();
        }
        let joining = Instant::now();
        for k in batch {
            let i = (k * stride) % n;
            join.on_outcome(
                outcome(i),
                SourcePos { partition: partition(i), ..source.clone() },
                |_| spec.clone(),
                0,
                &mut fx,
            );
            scored += fx.iter().filter(|e| matches!(e, Effect::Scored(_))).count();
            fx.clear();
        }
        let committing = Instant::now();
        join.states().commit(&[], 0).unwrap();
        if ahead {
            parts[1] += (committing - joining).as_secs_f64();
            parts[2] += committing.elapsed().as_secs_f64();
        }
        let t = &mut took[usize::from(ahead)];
        t.0 += batch.len() as u64;
        t.1 += started.elapsed().as_secs_f64();
    }
    assert_eq!(scored as u64, labels, "every label met its decision");
    let rate = |(count, secs): (u64, f64)| count as f64 / secs;
    println!(
        "labels joined with {} held: {labels} (random decisions; RSS {:.0} MiB): {:.0}/s read one by one, {:.0}/s with \
         each batch's states read ahead on {} threads; ratio read-ahead/one-by-one = {:.2}",
        join.open(),
        rss_mib(),
        rate(took[0]),
        rate(took[1]),
        std::thread::available_parallelism().map_or(1, usize::from),
        rate(took[1]) / rate(took[0]),
    );
    let per_label = |secs: f64| secs * 1e6 / took[1].0 as f64;
    println!(
        "  per label read ahead: {:.1} µs reading ahead, {:.1} µs joining, {:.1} µs committing",
        per_label(parts[0]),
        per_label(parts[1]),
        per_label(parts[2])
    );
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Writes `n` open decisions' changelog records to a new changelog topic and rebuilds a store from it.
async fn rebuild_rate(n: u64) {
    let mut cfg = Config::load(None, std::env::vars()).expect("configuration");
    let prefix = format!("bench-{:08x}", rand::random::<u32>());
    cfg.topics.score_changelog = format!("{prefix}.score-state");
    if kafka::check_reachable(&cfg).await.is_err() {
        println!("rebuild: no broker at {} (scripts/kafka.sh start), skipped", cfg.kafka.bootstrap_servers);
        return;
    }
    kafka::ensure_topics(&cfg, std::slice::from_ref(&cfg.topics.score_changelog), kafka::TopicKind::Changelog)
        .await
        .unwrap();
    let codec = Codec::default();
    let spec = QualitySpec::default();
    let producer = kafka::producer(&cfg).unwrap();
    let dir = PathBuf::from(".bench/score-store-rebuild");
    let _ = std::fs::remove_dir_all(&dir);
    let mut writer = Join::new(
        JoinConfig { window_ms: 90 * 86_400_000, early_wait_ms: 300_000, max_open: u64::MAX },
        switchyard::quality::store::MemStates::default(),
    );
    let partitions = cfg.topics.partitions as u64;
    let mut fx = Vec::new();
    for chunk in (0..n).step_by(20_000) {
        let mut records = Vec::new();
        for i in chunk..(chunk + 20_000).min(n) {
            writer.on_decision(decision(i, 1_700_000_000_000 + i as i64), (i % partitions) as i32, &spec, &mut fx);
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
        // The writer's memory is not what is measured.
        *writer.states() = switchyard::quality::store::MemStates::default();
    }
    cfg.quality.state_dir = dir.display().to_string();
    let mut join = Join::new(
        JoinConfig { window_ms: 90 * 86_400_000, early_wait_ms: 300_000, max_open: u64::MAX },
        switchyard::quality::stage::open_store(&cfg).unwrap(),
    );
    let specs = std::collections::HashMap::from([("fraud".to_string(), spec)]);
    let assigned: Vec<i32> = (0..cfg.topics.partitions).collect();
    let started = Instant::now();
    let done =
        switchyard::quality::stage::catch_up(&cfg, &codec, &specs, &assigned, i64::MAX, &mut join).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "rebuilt from the changelog: {} records of {} partitions in {secs:.1} s = {:.0} records/s ({} held)",
        done.records,
        done.rebuilt,
        done.records as f64 / secs,
        join.open()
    );
    println!("  (delete the topic {} when done)", cfg.topics.score_changelog);
}

/// A `switchyard run` of the end-to-end part, its log and its metrics address.
struct Instance {
    child: std::process::Child,
    log: PathBuf,
    metrics: String,
}

impl Instance {
    fn start(vars: &[(String, String)], log: PathBuf, metrics: &str) -> Instance {
        let child = std::process::Command::new("target/release/switchyard")
            .args(["run", "--instance-id", "bench-0"])
            .envs(vars.iter().cloned())
            .env("SWITCHYARD__SERVICE__METRICS_ADDRESS", metrics)
            .env("RUST_LOG", "info,rdkafka=warn,librdkafka=error")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("target/release/switchyard (cargo build --release)");
        Instance { child, log, metrics: metrics.to_string() }
    }

    fn signal(&mut self, signal: &str) -> Duration {
        let started = Instant::now();
        let _ = std::process::Command::new("kill").args([signal, &self.child.id().to_string()]).status();
        self.child.wait().unwrap();
        started.elapsed()
    }

    fn rss_mib(&self) -> f64 {
        rss_of(&self.child.id().to_string())
    }

    /// The sum of a metric's series on /metrics (None while it does not answer).
    fn metric(&self, name: &str) -> Option<f64> {
        let output = std::process::Command::new("curl")
            .args(["-fs", &format!("http://{}/metrics", self.metrics)])
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&output.stdout);
        Some(
            text.lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }

    /// Waits until the log has a line containing every one of `parts`; how long it took from `since`.
    fn wait_for_log(&self, parts: &[&str], since: Instant, limit: Duration) -> Option<(Duration, String)> {
        while since.elapsed() < limit {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return Some((since.elapsed(), line.to_string()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

async fn end_to_end(n: u64) {
    let bootstrap = std::env::var("SWITCHYARD_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let prefix = format!("b{:06x}", rand::random::<u32>() & 0xff_ffff);
    let partitions = 12;
    let state = PathBuf::from(".bench/score-e2e");
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).unwrap();
    let mut vars = switchyard::config::isolated_env(&bootstrap, &prefix, partitions);
    vars.retain(|(k, _)| k != "SWITCHYARD__QUALITY__STATE_DIR");
    vars.push(("SWITCHYARD__QUALITY__STATE_DIR".into(), state.join("store").display().to_string()));
    let cfg = Config::load(None, vars.clone()).unwrap();
    let codec = Codec::default();
    let deploy = std::process::Command::new("target/release/switchyard")
        .args(["deploy", "bench", "--strategy", "single", "--control", "m1", "--quality", "{}", "--reason", "bench"])
        .envs(vars.iter().cloned())
        .env("RUST_LOG", "error")
        .status()
        .unwrap();
    assert!(deploy.success(), "switchyard deploy");
    let metrics = "127.0.0.1:9897";
    let mut instance = Instance::start(&vars, state.join("run-1.log"), metrics);
    let started = Instant::now();
    instance.wait_for_log(&["score state caught up", "partitions=12"], started, Duration::from_secs(120)).unwrap();
    println!(
        "end to end: {n} decisions of a deployment with a quality spec, {partitions} partitions, topics {prefix}.*"
    );

    // The decisions, as merge writes them (keyed by user, with the deployment header).
    let producer = kafka::producer(&cfg).unwrap();
    let started = Instant::now();
    let at = switchyard::clock::now_millis();
    for chunk in (0..n).step_by(20_000) {
        let records: Vec<OutRecord> = (chunk..(chunk + 20_000).min(n))
            .map(|i| {
                let d = Decision { deployment: "bench".into(), model: "m1".into(), ..decision(i, at) };
                OutRecord::new(cfg.topics.decisions.clone(), d.user_id.clone().into_bytes(), codec.encode(&d))
                    .header("deployment", "bench")
            })
            .collect();
        kafka::send_all(&producer, &records).await.unwrap();
    }
    println!("  written to the decisions topic in {:.0} s", started.elapsed().as_secs_f64());
    let mut last_report = Instant::now();
    loop {
        let open = instance.metric("switchyard_quality_open_decisions").unwrap_or(0.0) as u64;
        if open >= n {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            println!(
                "    {open} open after {:.0} s, RSS {:.0} MiB",
                started.elapsed().as_secs_f64(),
                instance.rss_mib()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  {n} open in the score stage after {secs:.0} s ({:.0} decisions/s taken in); switchyard RSS {:.0} MiB; store {:.1} bytes on disk per open decision",
        n as f64 / secs,
        instance.rss_mib(),
        dir_bytes(&state.join("store")) as f64 / n as f64
    );

    let mut sent_labels = 0;
    for (round, signal) in [(2, "-TERM"), (3, "-KILL")] {
        let stopped = instance.signal(signal);
        let started = Instant::now();
        instance = Instance::start(&vars, state.join(format!("run-{round}.log")), metrics);
        let caught_up =
            instance.wait_for_log(&["score state caught up", "partitions=12"], started, Duration::from_secs(600));
        // Labels for 10,000 open decisions, sent once it runs again: how long until they are scored.
        let labels: Vec<OutRecord> = (sent_labels..sent_labels + 10_000)
            .map(|k| {
                let i = (k * 7_919) % n;
                let d = decision(i, at);
                let o = Outcome {
                    request_id: d.request_id,
                    user_id: d.user_id,
                    label: 1.0,
                    observed_at: switchyard::clock::now_millis(),
                    source: "bench".into(),
                };
                OutRecord::new(cfg.topics.outcomes.clone(), o.user_id.clone().into_bytes(), codec.encode(&o))
            })
            .collect();
        sent_labels += 10_000;
        kafka::send_all(&producer, &labels).await.unwrap();
        let mut scored_at = None;
        while started.elapsed() < Duration::from_secs(600) {
            if instance.metric("switchyard_quality_labelled_total").unwrap_or(0.0) as u64 >= 10_000 {
                scored_at = Some(started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (after, how) = match signal {
            "-TERM" => ("SIGTERM", "stopped"),
            _ => ("kill -9", "killed"),
        };
        match caught_up {
            Some((took, line)) => {
                let fields: Vec<&str> = line
                    .split(' ')
                    .filter(|f| ["held=", "rebuilt=", "records=", "ms="].iter().any(|p| f.starts_with(p)))
                    .collect();
                println!(
                    "  restart after {after} ({how} in {:.1} s): store caught up {:.1} s after the start ({}); 10,000 labels sent then all scored after {}",
                    stopped.as_secs_f64(),
                    took.as_secs_f64(),
                    fields.join(" "),
                    scored_at.map_or("(not within 600 s)".to_string(), |t| format!("{:.1} s", t.as_secs_f64()))
                );
            }
            None => println!(
                "  restart after {after}: the store did not catch up within 600 s (see {})",
                instance.log.display()
            ),
        }
    }
    instance.signal("-TERM");
    println!("  (topics {prefix}.* left on the broker; logs in {})", state.display());
}
