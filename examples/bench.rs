//! The benchmark driver of `scripts/bench`: switchyard against a null pipe, Kafka's own perf tools and a
//! Kafka Streams router doing the same routing and join, in one run on the local broker with the same
//! partitions, records and client settings. It prints numbers, and ratios against baselines measured in
//! the same run; nothing passes or fails.
//!
//!   bench run [--quick] --repo DIR --streams-classpath CP [--kafka-tool scripts/kafka.sh]
//!   bench pipe --input T --output T --group G --id ID [--transactional] --batch N   (the null pipe)
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
            )
            .await
        }
        Some("run") => {
            let bench = Bench {
                quick: flag("--quick"),
                repo: value("--repo").expect("--repo"),
                streams_classpath: value("--streams-classpath").expect("--streams-classpath"),
                kafka_tool: value("--kafka-tool"),
                bootstrap: std::env::var("SWITCHYARD_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
                run: format!("b{:06x}", rand::random::<u32>() & 0xff_ffff),
            };
            if let Some(minutes) = value("--soak-minutes") {
                let rate = value("--rate").expect("--soak-minutes needs --rate").parse().expect("--rate N");
                bench.soak(rate, minutes.parse().expect("--soak-minutes N")).await;
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

async fn pipe(input: String, output: String, group: String, id: String, transactional: bool, batch: usize) {
    let config = config_for(&std::env::var("SWITCHYARD_BOOTSTRAP_SERVERS").unwrap_or("127.0.0.1:9092".into()), &group);
    let consumer = kafka::group_consumer(&config, &group, Some(&id)).expect("consumer");
    consumer.subscribe(&[&input]).expect("subscribe");
    let (_trigger, shutdown) = ShutdownTrigger::new();
    let mut txn = transactional
        .then(|| kafka::txn::TxnProducer::new(&config, format!("{group}-{id}"), shutdown.clone()).expect("producer"));
    let plain = kafka::producer(&config).expect("producer");
    loop {
        let messages = kafka::batch::next_batch(&consumer, batch, Duration::from_millis(5), Duration::from_millis(200))
            .await
            .expect("batch");
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
    fn spawn(name: &str, mut command: Command, log: &str) -> Proc {
        let file = std::fs::File::create(log).expect("log file");
        command.stdout(file.try_clone().expect("log")).stderr(file).stdin(Stdio::null());
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name: name.to_string() }
    }

    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at ") ".
        let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the state field's start.
        (ticks(11) + ticks(12)) / clock_ticks()
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

    /// Preloads `n` requests of `deployment` into `config`'s requests topic.
    async fn preload(&self, config: &Config, n: u64) {
        let codec = config.codec().expect("codec");
        kafka::ensure_topics(config, std::slice::from_ref(&config.topics.requests), TopicKind::Stream)
            .await
            .expect("topic");
        let producer = kafka::producer(config).expect("producer");
        let load = Loadgen { deployment: "bench".into(), rate: 0, count: n, users: USERS, run_id: self.run.clone() };
        let mut rng = rand::rng();
        let mut i = 0;
        while i < n {
            let chunk: Vec<OutRecord> = (i..(i + 10_000).min(n))
                .map(|k| {
                    let r: Request = load.request(k, &mut rng);
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
        let (mut seen, mut mark) = (0u64, None);
        while seen < n {
            if start.elapsed() > limit {
                eprintln!("  {topic}: only {seen} of {n} records after {limit:?}; measuring what there is");
                break;
            }
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await {
                seen += 1;
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
                let mut command = Command::new(self.binary("switchyard"));
                command.args(["run"]).envs(env.iter().cloned()).env("RUST_LOG", "warn");
                if !full {
                    command.args(["--only", "route"]);
                }
                procs.push(Proc::spawn("switchyard", command, &self.log(&format!("{prefix}-switchyard"))));
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
        let procs = self.start(system, true, &prefix).await;
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
        }
        let [route, model, join, end_to_end] = hops.map(percentiles);
        Latency { rate, sent: sent as usize, decided, route, model, join, end_to_end }
    }

    /// The full loop at `rate` for `minutes`: switchyard's RSS every minute, and the change between the
    /// second and the last minute (the issue's bound: ±10% between minutes 2 and 10 at 50% load).
    async fn soak(&self, rate: u64, minutes: u64) {
        let prefix = format!("{}-soak", self.run);
        let config = config_for(&self.bootstrap, &prefix);
        let codec = config.codec().expect("codec");
        kafka::ensure_topics(&config, std::slice::from_ref(&config.topics.requests), TopicKind::Stream)
            .await
            .expect("topic");
        let procs = self.start(System::Switchyard, true, &prefix).await;
        let sender = tokio::spawn(load(config.clone(), codec.clone(), rate, minutes * 60, format!("{prefix}-m")));
        let mut rss = Vec::new();
        for minute in 1..=minutes {
            tokio::time::sleep(Duration::from_secs(60)).await;
            rss.push(procs[0].rss_mib());
            println!("  minute {minute:>2}: switchyard RSS {:.0} MiB", rss[rss.len() - 1]);
        }
        let _ = sender.await;
        for p in procs {
            p.stop();
        }
        if rss.len() >= 2 {
            let (second, last) = (rss[1], rss[rss.len() - 1]);
            println!(
                "  RSS minute 2 -> minute {minutes}: {second:.0} -> {last:.0} MiB ({:+.1}%)",
                100.0 * (last - second) / second
            );
        }
    }

    /// One plain hop: a producer (acks=all) to a read_committed consumer, at `rate` for `seconds`.
    async fn plain_hop(&self, rate: u64, seconds: u64) -> [f64; 3] {
        let prefix = format!("{}-hop", self.run);
        let config = config_for(&self.bootstrap, &prefix);
        let codec = config.codec().expect("codec");
        kafka::ensure_topics(&config, std::slice::from_ref(&config.topics.requests), TopicKind::Stream)
            .await
            .expect("topic");
        let reader = reader_at(&config, &[&config.topics.requests], Offset::End).await;
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
        percentiles(delays)
    }
}

/// Sends requests at `rate` for `seconds` (the loadgen's smooth 10 ms slices); returns (run id, sent).
async fn load(config: Config, codec: Codec, rate: u64, seconds: u64, run_id: String) -> (String, u64) {
    let (_trigger, shutdown) = ShutdownTrigger::new();
    let loadgen =
        Loadgen { deployment: "bench".into(), rate, count: rate * seconds, users: USERS, run_id: run_id.clone() };
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
                    let (_, high) = reader.fetch_watermarks(topic, p, kafka::ADMIN_TIMEOUT).expect("watermarks");
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
