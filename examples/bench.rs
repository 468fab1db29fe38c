//! The benchmark driver of `scripts/bench`: switchyard against a null pipe, Kafka's own perf tools and a
//! Kafka Streams router doing the same routing and join, in one run on the local broker with the same
//! partitions, records and client settings. It prints numbers, and ratios against baselines measured in
//! the same run; nothing passes or fails.
//!
//!   bench run [--quick] --repo DIR --streams-classpath CP [--kafka-tool scripts/kafka.sh]
//!   bench run --latency [--runs 3] [--seconds 30] --repo DIR ...   (latency against the transactional floor)
//!   bench pipe --input T --output T --group G --id ID [--transactional] --batch N [--wait-ms 5]   (the null pipe)
//!
//! Throughput: a backlog of requests is preloaded, then the system under test starts; the rate is taken
//! between the 10% and the 100% mark of its output as a read_committed consumer sees it (start-up and
//! group joins excluded), CPU-seconds (utime + stime of the process under test, from /proc) over the
//! same span, peak RSS (VmHWM) at the end. Latency: requests are sent at a fixed rate (open loop) and
//! each one's send time is compared with when its model request, prediction and decision became
//! visible to a read_committed consumer.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use switchyard::clock;
use switchyard::codec::{Codec, Decision, ModelRequest, Prediction, Request};
use switchyard::config::Config;
use switchyard::kafka::{self, OutRecord, TopicKind};
use switchyard::shutdown::ShutdownTrigger;
use switchyard::tools::loadgen::Loadgen;

const PARTITIONS: i32 = 4;
const USERS: u64 = 100_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    match args.first().map(String::as_str) {
        Some("pipe") => {
            pipe(
                value("--input").expect("--input"),
                value("--output").expect("--output"),
                value("--group").expect("--group"),
                value("--id").expect("--id"),
                flag("--transactional"),
                value("--batch").map_or(500, |b| b.parse().expect("--batch N")),
                Duration::from_millis(value("--wait-ms").map_or(5, |w| w.parse().expect("--wait-ms N"))),
            )
            .await
        }
        Some("models") => models(value("--prefix").expect("--prefix")).await,
        Some("run") => {
            let bench = Bench {
                quick: flag("--quick"),
                repo: value("--repo").expect("--repo"),
                streams_classpath: value("--streams-classpath").expect("--streams-classpath"),
                kafka_tool: value("--kafka-tool"),
                bootstrap: std::env::var("SWITCHYARD_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
                run: format!("b{:06x}", rand::random::<u32>() & 0xff_ffff),
            };
            if flag("--soak") {
                let number = |name: &str| value(name).map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{name} N")));
                let soak = Soak {
                    rate: number("--rate"),
                    minutes: number("--minutes").unwrap_or(60),
                    restart_every: number("--restart-every").unwrap_or(10),
                };
                bench.soak(soak).await;
                return;
            }
            if flag("--scale") {
                let counts = value("--counts").unwrap_or_else(|| "1,10,100,300".into());
                let counts: Vec<usize> =
                    counts.split(',').map(|c| c.trim().parse().expect("--counts N,N,...")).collect();
                bench.scale(&counts, flag("--route-only")).await;
                return;
            }
            if flag("--latency") {
                let number = |name: &str, default: u64| value(name).map_or(default, |v| v.parse().expect("N"));
                bench.latency_against_floor(number("--runs", 3) as usize, number("--seconds", 30)).await;
                return;
            }
            match value("--latency-only") {
                // For tuning: one open-loop run of switchyard at this rate.
                Some(rate) => {
                    let l = bench.latency(System::Switchyard, rate.parse().expect("--latency-only RATE"), 20).await;
                    print_latency("switchyard", &l);
                }
                None => bench.run().await,
            }
        }
        _ => eprintln!("usage: bench run [--quick] --repo DIR --streams-classpath CP | bench pipe ..."),
    }
}

// ---------------------------------------------------------------------------------------------------
// The null pipe: consume → produce → commit, no decoding, hashing or joining.

async fn pipe(
    input: String,
    output: String,
    group: String,
    id: String,
    transactional: bool,
    batch: usize,
    wait: Duration,
) {
    let config = config_for(&std::env::var("SWITCHYARD_BOOTSTRAP_SERVERS").unwrap_or("127.0.0.1:9092".into()), &group);
    let consumer = kafka::group_consumer(&config, &group, Some(&id)).expect("consumer");
    consumer.subscribe(&[&input]).expect("subscribe");
    let (_trigger, shutdown) = ShutdownTrigger::new();
    let mut txn = transactional.then(|| {
        kafka::txn::TxnProducer::new(&config, "pipe", format!("{group}-{id}"), shutdown.clone()).expect("producer")
    });
    let plain = kafka::producer(&config).expect("producer");
    loop {
        let messages =
            kafka::batch::next_batch(&consumer, batch, wait, Duration::from_millis(200)).await.expect("batch");
        if messages.is_empty() {
            continue;
        }
        let out: Vec<OutRecord> = messages
            .iter()
            .map(|m| {
                OutRecord::new(output.clone(), m.key().unwrap_or_default(), m.payload().unwrap_or_default().to_vec())
            })
            .collect();
        let offsets = kafka::batch_offsets(&messages);
        match txn.as_mut() {
            Some(txn) => {
                if let Err(failure) = txn.commit(&out, &offsets, consumer.group_metadata()).await {
                    panic!("null pipe transaction failed: {}", failure.error);
                }
            }
            None => {
                kafka::send_all(&plain, &out).await.expect("send");
                consumer.commit(&offsets, rdkafka::consumer::CommitMode::Async).expect("commit");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Instant models for the scale run: every model of `prefix`'s topics answered by one process (one
// demo-model process per model would not fit 600 models on this machine).

async fn models(prefix: String) {
    let config = config_for(&std::env::var("SWITCHYARD_BOOTSTRAP_SERVERS").unwrap_or("127.0.0.1:9092".into()), &prefix);
    let codec = config.codec().expect("codec");
    let pattern = &config.topics.model_requests;
    let (before, after) = pattern.split_once("{model}").expect("model topics are named by model");
    let consumer = kafka::group_consumer(&config, &format!("{prefix}-models"), None).expect("consumer");
    let regex = format!("^{}[A-Za-z0-9._-]+{}$", before.replace('.', "\\."), after.replace('.', "\\."));
    consumer.subscribe(&[regex.as_str()]).expect("subscribe");
    let producer = kafka::producer(&config).expect("producer");
    let mut workers: HashMap<String, switchyard::tools::demo_model::DemoModel> = HashMap::new();
    loop {
        let batch = kafka::batch::next_batch(&consumer, 500, Duration::from_millis(5), Duration::from_millis(200))
            .await
            .expect("batch");
        let mut out = Vec::with_capacity(batch.len());
        for message in &batch {
            let Some(model) = message.topic().strip_prefix(before).and_then(|t| t.strip_suffix(after)) else {
                continue;
            };
            let Ok(request) = codec.decode::<ModelRequest>(message.payload().unwrap_or_default()) else { continue };
            let worker = workers.entry(model.to_string()).or_insert_with(|| switchyard::tools::demo_model::DemoModel {
                model: model.to_string(),
                latency: Duration::ZERO,
                error_rate: 0.0,
                disagree_percent: 0.0,
                accuracy: None,
            });
            let answer = codec.encode(&worker.answer(&request));
            out.push(OutRecord::new(config.topics.model_predictions(model), message.key().unwrap_or_default(), answer));
        }
        if !batch.is_empty() {
            kafka::send_all(&producer, &out).await.expect("send");
            consumer.commit(&kafka::batch_offsets(&batch), rdkafka::consumer::CommitMode::Async).expect("commit");
        }
    }
}

// ---------------------------------------------------------------------------------------------------

struct Bench {
    quick: bool,
    repo: String,
    streams_classpath: String,
    kafka_tool: Option<String>,
    bootstrap: String,
    run: String,
}

/// One throughput figure.
#[derive(Debug, Clone, Default)]
struct Throughput {
    /// From the start of the measurement (right after the processes were started) to the first record.
    first_s: f64,
    rate: f64,
    cpu_per_million: f64,
    peak_rss_mib: f64,
}

/// Latencies of one open-loop run, ms: (p50, p99, p99.9) per hop and end to end.
#[derive(Debug, Clone, Default)]
struct Latency {
    rate: u64,
    sent: usize,
    decided: usize,
    route: [f64; 3],
    model: [f64; 3],
    join: [f64; 3],
    end_to_end: [f64; 3],
}

/// A process under test: its CPU time and peak RSS from /proc.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn spawn(name: &str, command: Command, log: &str) -> Proc {
        Proc::spawn_to(name, command, std::fs::File::create(log).expect("log file"))
    }

    fn spawn_appending(name: &str, command: Command, log: &str) -> Proc {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
        Proc::spawn_to(name, command, file)
    }

    fn spawn_to(name: &str, mut command: Command, file: std::fs::File) -> Proc {
        command.stdout(file.try_clone().expect("log")).stderr(file).stdin(Stdio::null());
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name: name.to_string() }
    }

    fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(self.child.id())
    }

    fn peak_rss_mib(&self) -> f64 {
        self.status_mib("VmHWM:")
    }

    fn rss_mib(&self) -> f64 {
        self.status_mib("VmRSS:")
    }

    /// A size field of /proc/<pid>/status (in kB there), in MiB.
    fn status_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    }

    fn stop(mut self) {
        // SIGTERM first: switchyard and Kafka Streams both close cleanly on it.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// switchyard's environment for a run on its own topics, all named after `prefix`.
fn env_for(bootstrap: &str, prefix: &str) -> Vec<(String, String)> {
    switchyard::config::isolated_env(bootstrap, prefix, PARTITIONS)
}

fn config_for(bootstrap: &str, prefix: &str) -> Config {
    Config::load(None, env_for(bootstrap, prefix)).expect("bench config is valid")
}

fn percentiles(mut xs: Vec<f64>) -> [f64; 3] {
    if xs.is_empty() {
        return [f64::NAN; 3];
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| xs[((xs.len() as f64 * q).ceil() as usize).clamp(1, xs.len()) - 1];
    [at(0.5), at(0.99), at(0.999)]
}

/// The systems compared.
#[derive(Debug, Clone, Copy, PartialEq)]
enum System {
    Switchyard,
    Streams,
}

impl Bench {
    fn binary(&self, name: &str) -> String {
        format!("{}/target/release/{name}", self.repo)
    }

    fn log(&self, name: &str) -> String {
        let dir = format!("{}/.bench/{}", self.repo, self.run);
        std::fs::create_dir_all(&dir).expect("log dir");
        format!("{dir}/{name}.log")
    }

    fn count(&self, full: u64, quick: u64) -> u64 {
        if self.quick { quick } else { full }
    }

    async fn run(&self) {
        println!(
            "switchyard benchmark, run {} ({} mode), broker {}",
            self.run,
            if self.quick { "quick" } else { "full" },
            self.bootstrap
        );
        println!("machine: {} cores; {} partitions; requests ~100 bytes of Avro", num_cpus(), PARTITIONS);
        let n_pipe = self.count(400_000, 100_000);
        let n_route = self.count(200_000, 60_000);
        let n_full = self.count(100_000, 30_000);

        println!("\n== broker ceiling (Kafka's own perf tools, {n_pipe} records of 100 bytes)");
        self.kafka_perf(n_pipe).await;

        println!("\n== null pipe: consume -> produce -> commit, no decoding ({n_pipe} records preloaded)");
        let mut throughputs: Vec<(String, Throughput)> = Vec::new();
        let mut latencies: Vec<(String, f64, Latency)> = Vec::new();
        let mut pipe_best_txn = 0.0f64;
        for (label, transactional, batch) in [
            ("plain, commit per 5000", false, 5000),
            ("transactional, per 500", true, 500),
            ("transactional, per 5000", true, 5000),
        ] {
            let t = self.null_pipe(n_pipe, transactional, batch).await;
            print_throughput(&format!("null pipe ({label})"), &t);
            throughputs.push((format!("null pipe ({label})"), t.clone()));
            if transactional {
                pipe_best_txn = pipe_best_txn.max(t.rate);
            }
        }

        println!("\n== route only: canary 10%, no shadow, two records out per request ({n_route} requests preloaded)");
        let route_sy = self.throughput(System::Switchyard, false, n_route).await;
        print_throughput("switchyard route", &route_sy);
        throughputs.push(("switchyard route".into(), route_sy.clone()));
        let route_ks = self.throughput(System::Streams, false, n_route).await;
        print_throughput("kafka-streams route", &route_ks);
        throughputs.push(("kafka-streams route".into(), route_ks.clone()));

        println!(
            "\n== full loop: canary 10% + a shadow copy to a third model, instant models ({n_full} requests preloaded)"
        );
        let full_sy = self.throughput(System::Switchyard, true, n_full).await;
        print_throughput("switchyard full loop", &full_sy);
        throughputs.push(("switchyard full loop".into(), full_sy.clone()));
        let full_ks = self.throughput(System::Streams, true, n_full).await;
        print_throughput("kafka-streams full loop", &full_ks);
        throughputs.push(("kafka-streams full loop".into(), full_ks.clone()));

        println!("\n== latency, open loop, instant models: send -> visible to read_committed (ms: p50 / p99 / p99.9)");
        let shares: &[f64] = if self.quick { &[0.5] } else { &[0.1, 0.5, 0.8] };
        let seconds = if self.quick { 20 } else { 60 };
        for &share in shares {
            let rate = ((full_sy.rate * share) as u64).max(50);
            for system in [System::Switchyard, System::Streams] {
                let l = self.latency(system, rate, seconds).await;
                print_latency(&format!("{system:?} at {:.0}% of switchyard's max", share * 100.0), &l);
                latencies.push((format!("{system:?}"), share, l));
            }
        }
        let plain_hop = self.plain_hop(500, 10).await;
        println!("  one plain Kafka hop at 500/s (acks=all, read_committed reader): {}", fmt3(&plain_hop));

        let results = serde_json::json!({
            "run": self.run,
            "quick": self.quick,
            "throughput": throughputs.iter().map(|(name, t)| serde_json::json!({
                "name": name, "rate": t.rate, "cpu_per_million": t.cpu_per_million, "peak_rss_mib": t.peak_rss_mib,
            })).collect::<Vec<_>>(),
            "latency": latencies.iter().map(|(system, share, l)| serde_json::json!({
                "system": system, "share": share, "rate": l.rate, "end_to_end": l.end_to_end,
                "route": l.route, "model": l.model, "join": l.join,
            })).collect::<Vec<_>>(),
            "plain_hop": plain_hop,
        });
        let file = format!("{}/.bench/{}/results.json", self.repo, self.run);
        std::fs::write(&file, serde_json::to_string_pretty(&results).expect("json")).expect("results file");
        println!("\nresults: {file}");
        println!();
        println!("ratio switchyard/kafka-streams = {:.2}", full_sy.rate / full_ks.rate.max(1e-9));
        println!("ratio switchyard/null-pipe = {:.2}", route_sy.rate / pipe_best_txn.max(1e-9));
    }

    /// Kafka's ProducerPerformance and ConsumerPerformance against a fresh topic.
    async fn kafka_perf(&self, n: u64) {
        let Some(tool) = &self.kafka_tool else {
            println!("  (no --kafka-tool given: skipped)");
            return;
        };
        let topic = format!("{}.perf", self.run);
        let config = config_for(&self.bootstrap, &self.run);
        kafka::ensure_topics(&config, std::slice::from_ref(&topic), TopicKind::Stream).await.expect("topic");
        let producer = Command::new(tool)
            .arg("tool")
            .args(["org.apache.kafka.tools.ProducerPerformance", "--topic", &topic, "--num-records", &n.to_string()])
            .args(["--record-size", "100", "--throughput", "-1", "--producer-props"])
            .arg(format!("bootstrap.servers={}", self.bootstrap))
            .args(["acks=all", "linger.ms=5", "compression.type=lz4"])
            .output()
            .expect("ProducerPerformance runs");
        let out = String::from_utf8_lossy(&producer.stdout);
        println!("  producer (acks=all, linger 5 ms, lz4): {}", out.lines().last().unwrap_or("no output").trim());
        let consumer = Command::new(tool)
            .arg("tool")
            .args(["org.apache.kafka.tools.ConsumerPerformance", "--bootstrap-server", &self.bootstrap])
            .args(["--topic", &topic, "--messages", &n.to_string()])
            .output()
            .expect("ConsumerPerformance runs");
        // A header line of names and a line of values: print them as name = value.
        let out = String::from_utf8_lossy(&consumer.stdout);
        let lines: Vec<&str> = out.lines().filter(|l| l.contains(',')).collect();
        if let [header, values, ..] = lines[..] {
            let pairs: Vec<String> = header
                .split(',')
                .zip(values.split(','))
                .filter(|(name, _)| name.contains("sec"))
                .map(|(name, value)| format!("{} = {}", name.trim(), value.trim()))
                .collect();
            println!("  consumer: {}", pairs.join(", "));
        } else {
            println!("  consumer: {}", out.trim());
        }
    }

    /// Preloads `n` requests of the deployment `bench` into `config`'s requests topic.
    async fn preload(&self, config: &Config, n: u64) {
        self.preload_spread(config, 0..n, &["bench".to_string()]).await
    }

    /// Preloads the requests numbered `keys` into `config`'s requests topic, taking `deployments` in turn.
    async fn preload_spread(&self, config: &Config, keys: std::ops::Range<u64>, deployments: &[String]) {
        let codec = config.codec().expect("codec");
        kafka::ensure_topics(config, std::slice::from_ref(&config.topics.requests), TopicKind::Stream)
            .await
            .expect("topic");
        let producer = kafka::producer(config).expect("producer");
        let (mut i, n) = (keys.start, keys.end);
        let load = Loadgen { deployment: "bench".into(), rate: 0, count: n, users: USERS, run_id: self.run.clone() };
        let mut rng = rand::rng();
        while i < n {
            let chunk: Vec<OutRecord> = (i..(i + 10_000).min(n))
                .map(|k| {
                    let mut r: Request = load.request(k, &mut rng);
                    r.deployment.clone_from(&deployments[k as usize % deployments.len()]);
                    OutRecord::new(config.topics.requests.clone(), r.user_id.as_bytes(), codec.encode(&r))
                })
                .collect();
            kafka::send_all(&producer, &chunk).await.expect("preload");
            i += chunk.len() as u64;
        }
    }

    /// Waits for `n` records on `topic` (read_committed); returns the rate between the 10% and 100% marks
    /// with the CPU the processes used over that span, and their peak RSS.
    async fn measure(&self, config: &Config, topic: &str, n: u64, procs: &[&Proc]) -> Throughput {
        let reader = reader_at(config, &[topic], Offset::Beginning).await;
        let limit = Duration::from_secs(if self.quick { 240 } else { 900 });
        let start = Instant::now();
        let (mut seen, mut mark, mut first) = (0u64, None, None);
        while seen < n {
            if start.elapsed() > limit {
                eprintln!("  {topic}: only {seen} of {n} records after {limit:?}; measuring what there is");
                break;
            }
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await {
                seen += 1;
                first.get_or_insert_with(|| start.elapsed().as_secs_f64());
                if seen == n / 10 {
                    mark = Some((Instant::now(), procs.iter().map(|p| p.cpu_seconds()).sum::<f64>()));
                }
            }
        }
        let (at, cpu) = mark.unwrap_or((start, 0.0));
        let records = seen.saturating_sub(n / 10) as f64;
        let elapsed = at.elapsed().as_secs_f64().max(1e-9);
        let cpu_used = procs.iter().map(|p| p.cpu_seconds()).sum::<f64>() - cpu;
        Throughput {
            first_s: first.unwrap_or(f64::NAN),
            rate: records / elapsed,
            cpu_per_million: cpu_used / records.max(1.0) * 1e6,
            peak_rss_mib: procs.iter().map(|p| p.peak_rss_mib()).sum(),
        }
    }

    async fn null_pipe(&self, n: u64, transactional: bool, batch: usize) -> Throughput {
        let prefix = format!("{}-pipe-{}-{batch}", self.run, if transactional { "txn" } else { "plain" });
        let config = config_for(&self.bootstrap, &prefix);
        let output = format!("{prefix}.out");
        kafka::ensure_topics(&config, std::slice::from_ref(&output), TopicKind::Stream).await.expect("topic");
        self.preload(&config, n).await;
        let mut command = Command::new(self.binary("examples/bench"));
        command
            .args(["pipe", "--input", &config.topics.requests, "--output", &output, "--group", &prefix, "--id", "0"])
            .args(["--batch", &batch.to_string()])
            .env("SWITCHYARD_BOOTSTRAP_SERVERS", &self.bootstrap);
        if transactional {
            command.arg("--transactional");
        }
        let proc = Proc::spawn("null pipe", command, &self.log(&prefix));
        let t = self.measure(&config, &output, n, &[&proc]).await;
        proc.stop();
        t
    }

    /// The deployment of every switchyard run: canary 10%, and in the full loop a shadow copy to v3.
    fn deployment(&self, full: bool) -> String {
        let mirror = if full { r#","mirror":["v3"]"# } else { "" };
        format!(
            r#"{{"version":1,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":10,"timeout_ms":30000{mirror}}}"#
        )
    }

    /// Starts the system under test (and for the full loop three instant demo models) on `prefix`'s
    /// topics; returns the processes, the system's first.
    async fn start(&self, system: System, full: bool, prefix: &str) -> Vec<Proc> {
        self.start_with_metrics(system, full, prefix, None).await
    }

    /// [`Bench::start`], with switchyard's /metrics on `metrics_port` (else on a port of its choosing).
    async fn start_with_metrics(
        &self,
        system: System,
        full: bool,
        prefix: &str,
        metrics_port: Option<u16>,
    ) -> Vec<Proc> {
        let config = config_for(&self.bootstrap, prefix);
        let env = env_for(&self.bootstrap, prefix);
        switchyard::service::ensure_core_topics(&config).await.expect("topics");
        let models: &[&str] = if full { &["v1", "v2", "v3"] } else { &["v1", "v2"] };
        let mut topics: Vec<String> = vec![config.topics.decisions.clone(), config.topics.shadow_comparisons.clone()];
        for m in models {
            topics.push(config.topics.model_requests(m));
            topics.push(config.topics.model_predictions(m));
        }
        kafka::ensure_topics(&config, &topics, TopicKind::Stream).await.expect("topics");
        let mut procs = Vec::new();
        match system {
            System::Switchyard => {
                let spec: switchyard::record::DeploymentSpec =
                    serde_json::from_str(&self.deployment(full)).expect("deployment");
                switchyard::control::ops::deploy(&config, "bench", spec).await.expect("deploy");
                procs.push(self.switchyard(full, prefix, metrics_port));
            }
            System::Streams => {
                let t = &config.topics;
                let mut command = Command::new("java");
                command
                    .args(["-Xmx1g", "-cp", &self.streams_classpath, "dev.switchyard.bench.StreamsRouter"])
                    .args([
                        "--bootstrap",
                        &self.bootstrap,
                        "--app-id",
                        prefix,
                        "--mode",
                        if full { "full" } else { "route" },
                    ])
                    .args(["--schemas", &format!("{}/schemas", self.repo), "--requests", &t.requests])
                    .args(["--routed", &t.routed, "--decisions", &t.decisions, "--comparisons", &t.shadow_comparisons])
                    .args(["--model-requests", &t.model_requests, "--model-predictions", &t.model_predictions])
                    .args(["--deployment", "bench", "--control", "v1", "--candidate", "v2", "--canary-percent", "10"])
                    .args(["--shadow", if full { "v3" } else { "" }, "--timeout-ms", "30000"]);
                procs.push(Proc::spawn("kafka-streams", command, &self.log(&format!("{prefix}-streams"))));
            }
        }
        if full {
            for m in models {
                let mut command = Command::new(self.binary("switchyard"));
                command.args(["demo-model", "--model", m, "--latency-ms", "0"]).envs(env.iter().cloned());
                procs.push(Proc::spawn(m, command, &self.log(&format!("{prefix}-{m}"))));
            }
        }
        procs
    }

    /// One `switchyard run` on `prefix`'s topics (all stages, or route only).
    fn switchyard(&self, full: bool, prefix: &str, metrics_port: Option<u16>) -> Proc {
        let mut command = Command::new(self.binary("switchyard"));
        // BENCH_SWITCHYARD_LOG: switchyard's RUST_LOG, for a look inside (e.g. with SWITCHYARD_KAFKA_DEBUG).
        let log_filter = std::env::var("BENCH_SWITCHYARD_LOG").unwrap_or_else(|_| "warn".into());
        command.args(["run"]).envs(env_for(&self.bootstrap, prefix)).env("RUST_LOG", log_filter);
        if let Some(port) = metrics_port {
            command.env("SWITCHYARD__SERVICE__METRICS_ADDRESS", format!("127.0.0.1:{port}"));
        }
        if !full {
            command.args(["--only", "route"]);
        }
        // Appends: a restarted instance (the soak) keeps the log of the one before.
        let log = self.log(&format!("{prefix}-switchyard"));
        Proc::spawn_appending("switchyard", command, &log)
    }

    async fn throughput(&self, system: System, full: bool, n: u64) -> Throughput {
        let prefix = format!(
            "{}-{}-{}",
            self.run,
            if system == System::Switchyard { "sy" } else { "ks" },
            if full { "full" } else { "route" }
        );
        let config = config_for(&self.bootstrap, &prefix);
        self.preload(&config, n).await;
        let procs = self.start(system, full, &prefix).await;
        let topic = if full { config.topics.decisions.clone() } else { config.topics.routed.clone() };
        let t = self.measure(&config, &topic, n, &procs[..1].iter().collect::<Vec<_>>()).await;
        for p in procs {
            p.stop();
        }
        t
    }

    /// Sends at `rate` for `seconds` and times each request's hops.
    async fn latency(&self, system: System, rate: u64, seconds: u64) -> Latency {
        let prefix = format!("{}-{}-lat{rate}", self.run, if system == System::Switchyard { "sy" } else { "ks" });
        let config = config_for(&self.bootstrap, &prefix);
        let codec = config.codec().expect("codec");
        kafka::ensure_topics(&config, std::slice::from_ref(&config.topics.requests), TopicKind::Stream)
            .await
            .expect("topic");
        let port = free_port();
        let procs = self.start_with_metrics(system, true, &prefix, Some(port)).await;
        let (model_requests, predictions) = (config.topics.model_requests("v1"), config.topics.model_predictions("v1"));
        let reader = reader_at(&config, &[&config.topics.decisions, &model_requests, &predictions], Offset::End).await;
        // Warm up: let the system join its groups and answer a first trickle before measuring.
        let warm = tokio::spawn(load(config.clone(), codec.clone(), rate.min(100), 5, format!("{prefix}-warm")));
        let drain_until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < drain_until {
            let _ = tokio::time::timeout(Duration::from_millis(100), reader.recv()).await;
        }
        let _ = warm.await;
        let rss_start = procs[0].rss_mib();
        let run_id = format!("{prefix}-m");
        let sender = tokio::spawn(load(config.clone(), codec.clone(), rate, seconds, run_id.clone()));
        let mut times: HashMap<String, [Option<f64>; 3]> = HashMap::new();
        let mut sent_at: HashMap<String, i64> = HashMap::new();
        let end = Instant::now() + Duration::from_secs(seconds + 15);
        let expected = (rate * seconds) as usize;
        let mut decided = 0;
        while Instant::now() < end && decided < expected {
            let Ok(Ok(message)) = tokio::time::timeout(Duration::from_millis(100), reader.recv()).await else {
                continue;
            };
            let now = clock::now_millis();
            let bytes = message.payload().unwrap_or_default();
            let topic = message.topic();
            let (id, slot, sent) = if topic == config.topics.decisions {
                let Ok(d) = codec.decode::<Decision>(bytes) else { continue };
                decided += usize::from(d.request_id.starts_with(&run_id));
                let sent = d.decided_at - d.latency_ms;
                (d.request_id, 2, Some(sent))
            } else if topic == model_requests {
                let Ok(r) = codec.decode::<ModelRequest>(bytes) else { continue };
                (r.request.request_id, 0, Some(r.request.sent_at))
            } else {
                let Ok(p) = codec.decode::<Prediction>(bytes) else { continue };
                (p.request_id, 1, None)
            };
            if !id.starts_with(&run_id) {
                continue;
            }
            if let Some(sent) = sent {
                sent_at.insert(id.clone(), sent);
            }
            times.entry(id).or_default()[slot] = Some(now as f64);
        }
        let (_, sent) = sender.await.expect("load");
        let rss_end = procs[0].rss_mib();
        let commits = if system == System::Switchyard { scrape(port).map(|p| commit_summary(&p)) } else { None };
        for p in procs {
            p.stop();
        }
        let mut hops: [Vec<f64>; 4] = Default::default();
        for (id, [routed, predicted, decision]) in &times {
            let Some(&sent) = sent_at.get(id) else { continue };
            let sent = sent as f64;
            if let Some(d) = decision {
                hops[3].push(d - sent);
            }
            if let (Some(r), Some(p), Some(d)) = (routed, predicted, decision) {
                hops[0].push(r - sent);
                hops[1].push(p - r);
                hops[2].push(d - p);
            }
        }
        if system == System::Switchyard {
            println!("  (switchyard RSS {rss_start:.0} MiB after warm-up, {rss_end:.0} MiB at the end)");
            println!("  (batches made durable, mean time: {})", commits.unwrap_or_default());
        }
        let [route, model, join, end_to_end] = hops.map(percentiles);
        Latency { rate, sent: sent as usize, decided, route, model, join, end_to_end }
    }

    /// The full loop for `soak.minutes` at `soak.rate` (default: half the maximum measured first), the
    /// switchyard instance stopped (SIGTERM) and started again every `soak.restart_every` minutes. Prints a
    /// line per minute (RSS, open requests, decisions and TIMEOUTs, end-to-end p50/p99, consumer lag, the
    /// longest gap between decisions) and writes them to `.bench/<run>/soak.json`, plotted by
    /// scripts/bench_plot.py.
    async fn soak(&self, soak: Soak) {
        let rate = match soak.rate {
            Some(rate) => rate,
            None => {
                println!("measuring the full loop's maximum (30,000 requests preloaded) ...");
                let max = self.throughput(System::Switchyard, true, 30_000).await;
                print_throughput("switchyard full loop", &max);
                (max.rate / 2.0) as u64
            }
        };
        println!(
            "soak: the full loop at {rate} requests/s for {} minutes, switchyard restarted every {} minutes",
            soak.minutes, soak.restart_every
        );
        let prefix = format!("{}-soak", self.run);
        let config = config_for(&self.bootstrap, &prefix);
        let codec = config.codec().expect("codec");
        kafka::ensure_topics(&config, std::slice::from_ref(&config.topics.requests), TopicKind::Stream)
            .await
            .expect("topic");
        let port = free_port();
        let mut procs = self.start_with_metrics(System::Switchyard, true, &prefix, Some(port)).await;
        let mut instance = Some(procs.remove(0));
        let mut stopping: Option<tokio::task::JoinHandle<()>> = None;
        let reader = reader_at(&config, &[&config.topics.decisions], Offset::End).await;
        let lag = Lag::new(&config, &prefix);
        let run_id = format!("{prefix}-m");
        let sender = tokio::spawn(load(config.clone(), codec.clone(), rate, soak.minutes * 60, run_id.clone()));
        println!(
            "  {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7}",
            "minute", "RSS MiB", "open", "decided", "TIMEOUT", "p50 ms", "p99 ms", "lag route", "lag merge", "gap s"
        );
        let mut rows = Vec::new();
        let (mut total, mut last_decided_at) = (0usize, None::<i64>);
        // The load's minutes, then up to two more while the backlog drains.
        for minute in 1..=soak.minutes + 2 {
            let draining = minute > soak.minutes;
            let minute_end = Instant::now() + Duration::from_secs(60);
            let (mut delays, mut decided_at, mut timeouts) = (Vec::new(), Vec::new(), 0usize);
            while Instant::now() < minute_end {
                if stopping.as_ref().is_some_and(|s| s.is_finished()) {
                    stopping.take().expect("checked").await.expect("stop");
                    instance = Some(self.switchyard(true, &prefix, Some(port)));
                }
                let Ok(Ok(message)) = tokio::time::timeout(Duration::from_millis(100), reader.recv()).await else {
                    continue;
                };
                let Ok(d) = codec.decode::<Decision>(message.payload().unwrap_or_default()) else { continue };
                if !d.request_id.starts_with(&run_id) {
                    continue;
                }
                delays.push((clock::now_millis() - (d.decided_at - d.latency_ms)) as f64);
                decided_at.push(d.decided_at);
                timeouts += usize::from(d.status == switchyard::codec::DecisionStatus::Timeout);
            }
            decided_at.sort_unstable();
            let gap_ms = last_decided_at
                .into_iter()
                .chain(decided_at.iter().copied())
                .collect::<Vec<_>>()
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or(60_000);
            last_decided_at = decided_at.last().copied().or(last_decided_at);
            total += delays.len();
            let [p50, p99, _] = percentiles(delays.clone());
            let rss = instance.as_ref().map_or(f64::NAN, Proc::rss_mib);
            let open = scrape_gauge(port, "switchyard_pending_requests");
            let (lag_route, lag_merge) = lag.now();
            let restart = !draining && minute % soak.restart_every == 0 && minute < soak.minutes;
            println!(
                "  {minute:>6} {rss:>8.0} {:>8} {:>8} {timeouts:>8} {p50:>8.0} {p99:>8.0} {lag_route:>9} {lag_merge:>9} {:>7.1}{}",
                open.map_or("-".to_string(), |o| format!("{o:.0}")),
                delays.len(),
                gap_ms as f64 / 1000.0,
                if restart {
                    "   <- switchyard restarted"
                } else if draining {
                    "   (draining)"
                } else {
                    ""
                }
            );
            rows.push(serde_json::json!({
                "minute": minute, "rss_mib": rss, "open_requests": open, "decided": delays.len(),
                "timeouts": timeouts, "p50_ms": p50, "p99_ms": p99, "lag_route": lag_route,
                "lag_merge": lag_merge, "gap_s": gap_ms as f64 / 1000.0, "restarted": restart,
                "draining": draining,
            }));
            if restart {
                let old = instance.take().expect("an instance runs");
                stopping = Some(tokio::task::spawn_blocking(move || old.stop()));
            }
            // Merge's lag never falls below one per partition: the marker of route's last transaction.
            if draining && lag_route == 0 && lag_merge <= i64::from(PARTITIONS) && open.unwrap_or(0.0) == 0.0 {
                break;
            }
        }
        let (_, sent) = sender.await.expect("load");
        if let Some(s) = stopping {
            s.await.expect("stop");
        }
        for p in instance.into_iter().chain(procs) {
            p.stop();
        }
        println!("  sent {sent}, decided {total} ({} missing)", sent as i64 - total as i64);
        summarize_soak(&rows, soak.restart_every);
        let file = format!("{}/.bench/{}/soak.json", self.repo, self.run);
        let results = serde_json::json!({
            "run": self.run, "rate": rate, "minutes": soak.minutes, "restart_every": soak.restart_every,
            "sent": sent, "decided": total, "soak": rows,
        });
        std::fs::write(&file, serde_json::to_string_pretty(&results).expect("json")).expect("soak file");
        println!("\nresults: {file}");
        self.plot(&file);
    }

    /// Cost as deployments grow: for each of `counts`, that many canary deployments (10%), each with its
    /// own control and candidate model. Per count: topic creation, route-only and full-loop throughput
    /// from a preloaded backlog spread over every deployment, start-up (process start to first output),
    /// switchyard's peak RSS and CPU, the longest pause in decisions while a second instance joins, and
    /// (at the first count of 50 or more) the controller's CPU with 50 plans running.
    /// With `route_only` (for tuning), only the route figures of each count.
    async fn scale(&self, counts: &[usize], route_only: bool) {
        println!(
            "switchyard scale benchmark, run {}, broker {}, {PARTITIONS} partitions per topic",
            self.run, self.bootstrap
        );
        let mut rows = Vec::new();
        let mut plans_measured = false;
        for &n in counts {
            let plans = !plans_measured && n >= 50;
            plans_measured |= plans;
            let row = self.scale_one(n, plans, route_only).await;
            println!("  {row}");
            rows.push(row);
        }
        println!(
            "\n  {:>11} {:>9} {:>10} {:>10} {:>10} {:>9} {:>10} {:>8} {:>8} {:>11} {:>13}",
            "deployments",
            "topics s",
            "route /s",
            "full /s",
            "start-up s",
            "RSS MiB",
            "CPU-s/M",
            "join s",
            "pause s",
            "decided",
            "CPU-s/min sy/broker"
        );
        for r in &rows {
            let f = |key: &str| r[key].as_f64().unwrap_or(f64::NAN);
            println!(
                "  {:>11} {:>9.1} {:>10.0} {:>10.0} {:>10.1} {:>9.0} {:>10.1} {:>8.1} {:>8.1} {:>11} {:>8.1}/{:.1}",
                r["deployments"].as_u64().unwrap_or(0),
                f("topics_s"),
                f("route_rate"),
                f("full_rate"),
                f("full_first_s"),
                f("full_peak_rss_mib"),
                f("full_cpu_per_million"),
                f("rebalance_assigned_s"),
                f("rebalance_gap_s"),
                format!("{}/{}", r["rebalance_decided"], r["rebalance_sent"]),
                f("cpu_s_per_minute"),
                f("broker_cpu_s_per_minute"),
            );
        }
        let file = format!("{}/.bench/{}/scale.json", self.repo, self.run);
        let results = serde_json::json!({ "run": self.run, "partitions": PARTITIONS, "scale": rows });
        std::fs::write(&file, serde_json::to_string_pretty(&results).expect("json")).expect("scale file");
        println!("\nresults: {file}");
        self.plot(&file);
    }

    async fn scale_one(&self, n: usize, plans: bool, route_only: bool) -> serde_json::Value {
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let (n_route, n_full) = (self.count(200_000, 60_000), self.count(100_000, 30_000));
        println!("\n== {n} deployment(s), {} model topics", 4 * n);

        // Route only.
        let prefix = format!("{}-scale{n}-route", self.run);
        let config = config_for(&self.bootstrap, &prefix);
        self.scale_setup(&config, n, None).await;
        self.preload_spread(&config, 0..n_route, &names).await;
        let proc = self.switchyard(false, &prefix, None);
        let route = self.measure(&config, &config.topics.routed, n_route, &[&proc]).await;
        proc.stop();
        print_throughput(&format!("route, {n} deployment(s)"), &route);
        delete_topics(&self.bootstrap, &prefix).await;
        if route_only {
            return serde_json::json!({ "deployments": n, "route_rate": route.rate,
                "route_cpu_per_million": route.cpu_per_million, "route_peak_rss_mib": route.peak_rss_mib });
        }

        // The full loop.
        let prefix = format!("{}-scale{n}-full", self.run);
        let config = config_for(&self.bootstrap, &prefix);
        let topics_s = self.scale_setup(&config, n, None).await;
        let mut command = Command::new(self.binary("examples/bench"));
        command.args(["models", "--prefix", &prefix]).env("SWITCHYARD_BOOTSTRAP_SERVERS", &self.bootstrap);
        let models = Proc::spawn("models", command, &self.log(&format!("{prefix}-models")));
        let instance = self.switchyard(true, &prefix, None);
        // Start-up: one request, sent as the processes start, until its decision. The load comes after,
        // so that the rate is the running loop's, not that of a backlog drained after a slow start.
        self.preload_spread(&config, 0..1, &names).await;
        let startup = self.measure(&config, &config.topics.decisions, 1, &[]).await;
        println!("  start-up (processes started -> first decision): {:.1} s", startup.first_s);
        self.preload_spread(&config, 1..n_full + 1, &names).await;
        let mut full = self.measure(&config, &config.topics.decisions, n_full + 1, &[&instance]).await;
        full.first_s = startup.first_s;
        print_throughput(&format!("full loop, {n} deployment(s)"), &full);

        // The standing cost at a light load: switchyard's and the broker's CPU over a minute at 200
        // requests/s; once (the first count of at least 50), again with 50 plans running.
        let idle = self.cpu_per_minute(&config, &instance, &names[0]).await;
        println!("  CPU-s per minute at 200 requests/s: switchyard {:.1}, broker {:.1}", idle.0, idle.1);
        let with_plans = if plans {
            self.scale_setup(&config, 50, Some(2)).await;
            let cpu = self.cpu_per_minute(&config, &instance, &names[0]).await;
            println!("  with 50 plans running: switchyard {:.1}, broker {:.1}", cpu.0, cpu.1);
            Some(cpu)
        } else {
            None
        };

        // A second instance joins under load: the longest pause in decisions.
        let (gap_s, assigned_s, decided, sent) = self.rebalance(&config, &prefix, &names[0]).await;
        println!(
            "  a second instance joins at 200 requests/s: assigned partitions after {assigned_s:.1} s; longest pause \
             in decisions {gap_s:.1} s; {decided} of {sent} decided"
        );
        instance.stop();
        models.stop();
        delete_topics(&self.bootstrap, &prefix).await;
        serde_json::json!({
            "deployments": n, "topics_s": topics_s,
            "route_rate": route.rate, "route_first_s": route.first_s, "route_cpu_per_million": route.cpu_per_million,
            "route_peak_rss_mib": route.peak_rss_mib,
            "full_rate": full.rate, "full_first_s": full.first_s, "full_cpu_per_million": full.cpu_per_million,
            "full_peak_rss_mib": full.peak_rss_mib,
            "cpu_s_per_minute": idle.0, "broker_cpu_s_per_minute": idle.1,
            "cpu_s_per_minute_50_plans": with_plans.map(|c| c.0),
            "broker_cpu_s_per_minute_50_plans": with_plans.map(|c| c.1),
            "rebalance_gap_s": gap_s, "rebalance_assigned_s": assigned_s, "rebalance_decided": decided,
            "rebalance_sent": sent,
        })
    }

    /// Creates the core topics and those of `n` deployments `s<i>` (control `m<i>a`, candidate `m<i>b`),
    /// and writes the deployments (version `plan_version` with a plan of two long steps when given, else
    /// version 1 without one). Returns how long creating the topics took, in seconds.
    async fn scale_setup(&self, config: &Config, n: usize, plan_version: Option<i64>) -> f64 {
        let now = clock::now_millis();
        let deployments: Vec<switchyard::record::Deployment> = (0..n)
            .map(|i| {
                let (version, plan) = match plan_version {
                    Some(v) => (
                        v,
                        format!(
                            r#","plan":{{"steps":[{{"canary_percent":10,"bake_ms":3600000,"min_sample":100000000,"max_ms":7200000}},{{"canary_percent":50,"bake_ms":3600000,"min_sample":100000000,"max_ms":7200000}}],"step_started_at":{now}}}"#
                        ),
                    ),
                    None => (1, String::new()),
                };
                let json = format!(
                    r#"{{"version":{version},"strategy":"canary","control":"m{i}a","candidate":"m{i}b","canary_percent":10,"timeout_ms":30000{plan}}}"#
                );
                let spec = switchyard::record::DeploymentSpec::from_json(json.as_bytes()).expect("deployment");
                spec.validate(&format!("s{i}")).expect("valid deployment")
            })
            .collect();
        let started = Instant::now();
        switchyard::service::ensure_core_topics(config).await.expect("topics");
        for chunk in deployments.chunks(100) {
            switchyard::control::ensure_model_topics(config, chunk).await.expect("model topics");
        }
        let topics_s = started.elapsed().as_secs_f64();
        let producer = kafka::producer(config).expect("producer");
        let records: Vec<OutRecord> = deployments
            .iter()
            .map(|d| {
                OutRecord::new(config.topics.deployments.clone(), d.name.as_bytes(), d.spec.to_json().into_bytes())
            })
            .collect();
        kafka::send_all(&producer, &records).await.expect("deployments written");
        topics_s
    }

    /// `instance`'s CPU-seconds over a minute while `deployment` gets 200 requests/s, and the local
    /// broker's (scripts/kafka.sh's single node; NaN when it is not that broker).
    async fn cpu_per_minute(&self, config: &Config, instance: &Proc, deployment: &str) -> (f64, f64) {
        let codec = config.codec().expect("codec");
        let broker = std::fs::read_to_string(format!("{}/.kafka/kafka.pid", self.repo))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .filter(|_| self.bootstrap == "127.0.0.1:9092");
        let broker_cpu = || broker.map_or(f64::NAN, cpu_seconds_of);
        let sender =
            tokio::spawn(load_to(deployment.into(), config.clone(), codec, 200, 70, format!("{}-cpu", self.run)));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (cpu, broker_before) = (instance.cpu_seconds(), broker_cpu());
        tokio::time::sleep(Duration::from_secs(60)).await;
        let used = (instance.cpu_seconds() - cpu, broker_cpu() - broker_before);
        let _ = sender.await;
        used
    }

    /// Sends 200 requests/s of `deployment` for 80 s and starts a second switchyard instance 10 s in.
    /// Returns the longest pause between decisions from then on (s), how long the second instance took
    /// to be assigned partitions by route's and merge's groups (s, NaN if it was not within the run),
    /// and how many requests were decided of those sent.
    async fn rebalance(&self, config: &Config, prefix: &str, deployment: &str) -> (f64, f64, usize, u64) {
        const SECONDS: u64 = 80;
        let codec = config.codec().expect("codec");
        let reader = reader_at(config, &[&config.topics.decisions], Offset::End).await;
        let run_id = format!("{prefix}-join");
        let sender =
            tokio::spawn(load_to(deployment.into(), config.clone(), codec.clone(), 200, SECONDS, run_id.clone()));
        let started = Instant::now();
        let log = self.log(&format!("{prefix}-switchyard-1"));
        let mut joined: Option<(Proc, i64)> = None;
        let (mut assigned_s, mut looked) = (f64::NAN, Instant::now());
        let mut decided_at = Vec::new();
        let end = started + Duration::from_secs(SECONDS + 30);
        while Instant::now() < end && !(sender.is_finished() && decided_at.len() as u64 >= 200 * SECONDS) {
            if joined.is_none() && started.elapsed() >= Duration::from_secs(10) {
                let mut command = Command::new(self.binary("switchyard"));
                command
                    .args(["run"])
                    .envs(env_for(&self.bootstrap, prefix))
                    .env("SWITCHYARD__SERVICE__INSTANCE_ID", format!("{prefix}-1"))
                    .env("RUST_LOG", "warn,switchyard::kafka::batch=info");
                joined = Some((Proc::spawn("switchyard 2", command, &log), clock::now_millis()));
            }
            if let Some((_, joined_at)) =
                joined.as_ref().filter(|_| assigned_s.is_nan() && looked.elapsed().as_secs() >= 1)
            {
                looked = Instant::now();
                // route's and merge's groups (the score stage's is a third when quality is on).
                let lines = std::fs::read_to_string(&log).unwrap_or_default();
                if assignments(&lines) >= 2 {
                    assigned_s = (clock::now_millis() - *joined_at) as f64 / 1000.0;
                }
            }
            let Ok(Ok(message)) = tokio::time::timeout(Duration::from_millis(100), reader.recv()).await else {
                continue;
            };
            let Ok(d) = codec.decode::<Decision>(message.payload().unwrap_or_default()) else { continue };
            if d.request_id.starts_with(&run_id) {
                decided_at.push(d.decided_at);
            }
        }
        let (_, sent) = sender.await.expect("load");
        let (second, joined_at) = joined.expect("the second instance started");
        second.stop();
        decided_at.sort_unstable();
        let gap = decided_at.windows(2).filter(|w| w[1] >= joined_at).map(|w| w[1] - w[0]).max().unwrap_or(0);
        (gap as f64 / 1000.0, assigned_s, decided_at.len(), sent)
    }

    /// Draws `results` with scripts/bench_plot.py when the plotting venv exists (see docs/benchmarks.md).
    fn plot(&self, results: &str) {
        let python = format!("{}/.bench/venv/bin/python", self.repo);
        let png = results.replace(".json", ".png");
        let drawn = std::path::Path::new(&python).exists()
            && Command::new(&python)
                .args([&format!("{}/scripts/bench_plot.py", self.repo), results, &png])
                .status()
                .is_ok_and(|s| s.success());
        if drawn {
            println!("plot: {png}");
        } else {
            println!("plot: {python} scripts/bench_plot.py {results} {png} (a venv with matplotlib)");
        }
    }

    /// One plain hop: a producer (acks=all) to a read_committed consumer, at `rate` for `seconds`.
    async fn plain_hop(&self, rate: u64, seconds: u64) -> [f64; 3] {
        self.hop(rate, seconds, false).await
    }

    /// The transactional floor: one hop through the null pipe (consume what has arrived → produce →
    /// commit the batch and its offsets in one transaction, one producer), send → visible to a
    /// read_committed reader, at `rate` for `seconds`. What any exactly-once pipeline pays for one
    /// transactional hop on this broker, with nothing else to do.
    async fn transactional_floor(&self, rate: u64, seconds: u64) -> [f64; 3] {
        self.hop(rate, seconds, true).await
    }

    /// Send → visible to a read_committed reader at `rate` for `seconds`: of the requests topic itself
    /// (a plain hop), or with `through_pipe` of the transactional null pipe's output.
    async fn hop(&self, rate: u64, seconds: u64, through_pipe: bool) -> [f64; 3] {
        let prefix = format!("{}-hop{rate}{}", self.run, if through_pipe { "-txn" } else { "" });
        let config = config_for(&self.bootstrap, &prefix);
        let codec = config.codec().expect("codec");
        let output = format!("{prefix}.out");
        let topics = [config.topics.requests.clone(), output.clone()];
        kafka::ensure_topics(&config, &topics, TopicKind::Stream).await.expect("topics");
        let pipe = through_pipe.then(|| {
            let mut command = Command::new(self.binary("examples/bench"));
            command
                .args(["pipe", "--input", &config.topics.requests, "--output", &output, "--group", &prefix])
                .args(["--id", "0", "--batch", "5000", "--wait-ms", "0", "--transactional"])
                .env("SWITCHYARD_BOOTSTRAP_SERVERS", &self.bootstrap);
            Proc::spawn("transactional null pipe", command, &self.log(&prefix))
        });
        let read = if through_pipe { &output } else { &config.topics.requests };
        let reader = reader_at(&config, &[read], Offset::End).await;
        if through_pipe {
            // Warm up: the pipe joins its group and commits a first trickle before the measurement.
            let _ = load(config.clone(), codec.clone(), rate.min(100), 3, format!("{prefix}-warm")).await;
            let drain_until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < drain_until {
                let _ = tokio::time::timeout(Duration::from_millis(100), reader.recv()).await;
            }
        }
        let sender = tokio::spawn(load(config.clone(), codec.clone(), rate, seconds, format!("{prefix}-m")));
        let mut delays = Vec::new();
        let end = Instant::now() + Duration::from_secs(seconds + 5);
        while Instant::now() < end {
            let Ok(Ok(message)) = tokio::time::timeout(Duration::from_millis(100), reader.recv()).await else {
                continue;
            };
            let now = clock::now_millis();
            if let Ok(r) = codec.decode::<Request>(message.payload().unwrap_or_default()) {
                delays.push((now - r.sent_at) as f64);
            }
        }
        let _ = sender.await;
        if let Some(pipe) = pipe {
            pipe.stop();
        }
        percentiles(delays)
    }

    /// switchyard's end-to-end latency against the transactional floor measured in the same run, at
    /// 1,000 requests/s and at 10% and 50% of the full loop's maximum (measured first), `runs` times.
    async fn latency_against_floor(&self, runs: usize, seconds: u64) {
        println!("switchyard latency against the transactional floor, run {}, broker {}", self.run, self.bootstrap);
        println!("measuring the full loop's maximum (30,000 requests preloaded) ...");
        let max = self.throughput(System::Switchyard, true, 30_000).await;
        print_throughput("switchyard full loop", &max);
        let rates = [1000, (max.rate * 0.1) as u64, (max.rate * 0.5) as u64];
        println!("\n== send -> visible to read_committed, {seconds} s per measurement (ms: p50 / p99 / p99.9)");
        // (rate, floor p50/p99/p99.9, switchyard p50/p99/p99.9), per measurement.
        type Row = (u64, [f64; 3], [f64; 3]);
        let mut rows: Vec<Row> = Vec::new();
        for run in 1..=runs {
            for &rate in &rates {
                let floor = self.transactional_floor(rate, seconds).await;
                let sy = self.latency(System::Switchyard, rate, seconds).await;
                println!(
                    "  run {run}, {rate}/s: transactional floor {} | switchyard {} (route {} ms p50) | p50 {:.2}x, p99 {:.2}x",
                    fmt3(&floor),
                    fmt3(&sy.end_to_end),
                    sy.route[0].round(),
                    sy.end_to_end[0] / floor[0].max(1e-9),
                    sy.end_to_end[1] / floor[1].max(1e-9)
                );
                rows.push((rate, floor, sy.end_to_end));
            }
        }
        println!("\n== spread over {runs} runs (min - max)");
        let span = |values: Vec<f64>| {
            let (lo, hi) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            format!("{lo:.1} - {hi:.1}")
        };
        for &rate in &rates {
            let at: Vec<_> = rows.iter().filter(|r| r.0 == rate).collect();
            let get = |f: &dyn Fn(&Row) -> f64| span(at.iter().map(|r| f(r)).collect());
            println!(
                "  {rate}/s: floor p50 {} p99 {} | switchyard p50 {} p99 {} | ratio p50 {} p99 {}",
                get(&|r| r.1[0]),
                get(&|r| r.1[1]),
                get(&|r| r.2[0]),
                get(&|r| r.2[1]),
                get(&|r| r.2[0] / r.1[0].max(1e-9)),
                get(&|r| r.2[1] / r.1[1].max(1e-9))
            );
        }
        let mut at_tenth: Vec<f64> =
            rows.iter().filter(|r| r.0 == rates[1]).map(|r| r.2[1] / r.1[1].max(1e-9)).collect();
        at_tenth.sort_by(f64::total_cmp);
        println!();
        println!("ratio latency-p99/transactional-floor-p99 = {:.2}", at_tenth[at_tenth.len() / 2]);
    }
}

/// Sends requests at `rate` for `seconds` (the loadgen's smooth 10 ms slices); returns (run id, sent).
async fn load(config: Config, codec: Codec, rate: u64, seconds: u64, run_id: String) -> (String, u64) {
    load_to("bench".into(), config, codec, rate, seconds, run_id).await
}

/// [`load`] for `deployment`.
async fn load_to(
    deployment: String,
    config: Config,
    codec: Codec,
    rate: u64,
    seconds: u64,
    run_id: String,
) -> (String, u64) {
    let (_trigger, shutdown) = ShutdownTrigger::new();
    let loadgen = Loadgen { deployment, rate, count: rate * seconds, users: USERS, run_id: run_id.clone() };
    let report = loadgen.run(config, codec, shutdown).await.expect("load");
    (run_id, report.sent)
}

async fn reader_at(config: &Config, topics: &[&str], at: Offset) -> StreamConsumer {
    let reader = kafka::reader(config).expect("reader");
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        let partitions = kafka::wait_for_topic(&reader, topic).await.expect("metadata").unwrap_or(PARTITIONS as usize);
        for p in 0..partitions as i32 {
            // "End" as an offset fixed now, so that nothing sent after this call is skipped.
            let offset = match at {
                Offset::End => {
                    let (_, high) = kafka::watermarks(&reader, topic, p).expect("watermarks");
                    Offset::Offset(high)
                }
                other => other,
            };
            assignment.add_partition_offset(topic, p, offset).expect("assign");
        }
    }
    reader.assign(&assignment).expect("assign");
    reader
}

/// What `--soak` runs.
struct Soak {
    rate: Option<u64>,
    minutes: u64,
    restart_every: u64,
}

/// How far route (on the requests) and merge (on the routed records) are behind, from their groups'
/// committed offsets and the partitions' ends. The routed topic is written in transactions, so merge's
/// lag counts the marker that ends each partition's last one: at rest it is one per partition.
struct Lag {
    ends: kafka::LogEnds,
    route: (kafka::GroupOffsets, String),
    merge: (kafka::GroupOffsets, String),
}

impl Lag {
    fn new(config: &Config, prefix: &str) -> Lag {
        let group = |stage: &str| kafka::GroupOffsets::new(config, &format!("{prefix}-{stage}")).expect("group reader");
        Lag {
            ends: kafka::LogEnds::new(config).expect("log ends"),
            route: (group("route"), config.topics.requests.clone()),
            merge: (group("merge"), config.topics.routed.clone()),
        }
    }

    /// (route's lag, merge's lag) in records; -1 where the broker did not answer.
    fn now(&self) -> (i64, i64) {
        let of = |(group, topic): &(kafka::GroupOffsets, String)| -> Option<i64> {
            let partitions: Vec<i32> = (0..PARTITIONS).collect();
            let committed = group.of(topic, &partitions).ok()?;
            partitions.iter().map(|p| Some(self.ends.of(topic, *p).ok()?.1 - committed.get(p)?.unwrap_or(0))).sum()
        };
        (of(&self.route).unwrap_or(-1), of(&self.merge).unwrap_or(-1))
    }
}

/// Per restart segment: RSS at its second minute and at its last, and the p99 range; then whether RSS
/// grew from segment to segment.
fn summarize_soak(rows: &[serde_json::Value], restart_every: u64) {
    let loaded: Vec<&serde_json::Value> = rows.iter().filter(|r| r["draining"] == false).collect();
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let mut ends = Vec::new();
    for (i, segment) in loaded.chunks(restart_every as usize).enumerate() {
        let (second, last) =
            (segment.get(1).map_or(f64::NAN, |r| f(r, "rss_mib")), f(segment[segment.len() - 1], "rss_mib"));
        let p99: Vec<f64> = segment.iter().map(|r| f(r, "p99_ms")).collect();
        let open = segment.iter().map(|r| f(r, "open_requests")).fold(0.0, f64::max);
        println!(
            "  life {}: RSS minute 2 -> {}: {second:.0} -> {last:.0} MiB ({:+.1}%); p99 {:.0}-{:.0} ms; open requests at most {open:.0}",
            i + 1,
            segment.len(),
            100.0 * (last - second) / second,
            p99.iter().copied().fold(f64::INFINITY, f64::min),
            p99.iter().copied().fold(0.0, f64::max)
        );
        ends.push(last);
    }
    if let (Some(first), Some(last)) = (ends.first(), ends.last()) {
        println!(
            "  RSS at the end of the first and the last life: {first:.0} -> {last:.0} MiB ({:+.1}%)",
            100.0 * (last - first) / first
        );
    }
}

/// Deletes every topic named `<prefix>.*` (a scale run's hundreds of topics would otherwise stay).
async fn delete_topics(bootstrap: &str, prefix: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("admin");
    let metadata = admin.inner().fetch_metadata(None, kafka::ADMIN_TIMEOUT).expect("metadata");
    let mine: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|t| t.starts_with(&format!("{prefix}.")))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(kafka::ADMIN_TIMEOUT));
    for chunk in mine.chunks(100) {
        let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
        if let Err(error) = admin.delete_topics(&names, &options).await {
            eprintln!("  deleting {} topics of {prefix}: {error}", names.len());
        }
    }
}

/// How many "partitions assigned" lines of a switchyard log gave the instance at least one partition.
fn assignments(log: &str) -> usize {
    let plain = |line: &str| {
        // Drops the terminal's colour codes (ESC [ ... m).
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| *c == 'm');
            } else {
                out.push(c);
            }
        }
        out
    };
    log.lines()
        .filter(|l| l.contains("partitions assigned"))
        .map(plain)
        .filter(|l| !l.trim_end().ends_with("partitions=0"))
        .count()
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("address").port()
}

/// The /metrics page on `port` (None while the instance is down).
fn scrape(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut page = String::new();
    stream.read_to_string(&mut page).ok()?;
    Some(page)
}

/// A sample (`name` with its labels as printed, e.g. `x_sum{stage="merge"}`) from a /metrics page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// An unlabelled gauge from the /metrics page on `port` (None while the instance is down).
fn scrape_gauge(port: u16, name: &str) -> Option<f64> {
    sample(&scrape(port)?, name)
}

/// Each stage's batches made durable and their mean duration (`switchyard_commit_seconds`), from a
/// /metrics page: "route 412 batches, 8.1 ms; merge ...".
fn commit_summary(page: &str) -> String {
    let stages = ["route", "merge", "score"].iter().filter_map(|stage| {
        let count = sample(page, &format!("switchyard_commit_seconds_count{{stage=\"{stage}\"}}"))?;
        let sum = sample(page, &format!("switchyard_commit_seconds_sum{{stage=\"{stage}\"}}"))?;
        let mean = |step: &str| {
            let labels = format!("{{stage=\"{stage}\",step=\"{step}\"}}");
            let count = sample(page, &format!("switchyard_transaction_step_seconds_count{labels}"))?;
            let sum = sample(page, &format!("switchyard_transaction_step_seconds_sum{labels}"))?;
            Some(format!("{step} {:.1}", sum / count.max(1.0) * 1000.0))
        };
        let steps: Vec<String> = ["produce", "send_offsets", "commit"].iter().filter_map(|s| mean(s)).collect();
        let steps = if steps.is_empty() { String::new() } else { format!(" ({} ms)", steps.join(", ")) };
        Some(format!("{stage} {count:.0} batches, {:.1} ms{steps}", sum / count.max(1.0) * 1000.0))
    });
    stages.collect::<Vec<_>>().join("; ")
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn fmt3(x: &[f64; 3]) -> String {
    format!("{:.1} / {:.1} / {:.1} ms", x[0], x[1], x[2])
}

fn print_throughput(name: &str, t: &Throughput) {
    println!(
        "  {name:<40} {:>9.0} /s   {:>6.1} CPU-s per million   peak RSS {:>6.0} MiB",
        t.rate, t.cpu_per_million, t.peak_rss_mib
    );
}

fn print_latency(name: &str, l: &Latency) {
    println!(
        "  {name:<44} {} /s: {} of {} decided; end to end {}; route {}; model {}; join {}",
        l.rate,
        l.decided,
        l.sent,
        fmt3(&l.end_to_end),
        fmt3(&l.route),
        fmt3(&l.model),
        fmt3(&l.join)
    );
}

/// The CPU-seconds process `pid` has used (0 when it is gone).
fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the state field's start.
    (ticks(11) + ticks(12)) / clock_ticks()
}
