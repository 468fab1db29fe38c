//! Test harness for integration tests against a real Kafka broker (scripts/kafka.sh start; address in
//! SWITCHYARD_TEST_BOOTSTRAP, default 127.0.0.1:9092). Every test gets its own topics and groups, runs
//! its own switchyard service and demo models in-process, and asserts on records read back from Kafka.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use switchyard::clock;
use switchyard::codec::{AvroRecord, Codec, Request};
use switchyard::config::Config;
use switchyard::control::ops;
use switchyard::kafka::{self, OutRecord};
use switchyard::record::DeploymentSpec;
use switchyard::service::{self, Roles};
use switchyard::shutdown::{Shutdown, ShutdownTrigger};
use switchyard::tools::demo_model::DemoModel;

pub fn bootstrap() -> String {
    std::env::var("SWITCHYARD_TEST_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".to_string())
}

/// Whether a broker answers. Without one a test is skipped with a message when run by hand, and fails
/// when `CI` is set: CI must never pass by skipping.
pub fn broker_available() -> bool {
    let address = bootstrap();
    let first = address.split(',').next().unwrap_or_default().to_string();
    let reachable = std::net::TcpStream::connect_timeout(
        &first.parse().expect("SWITCHYARD_TEST_BOOTSTRAP is host:port"),
        Duration::from_secs(2),
    )
    .is_ok();
    let message =
        format!("no Kafka broker at {address}: start one with `scripts/kafka.sh start` (or run scripts/test.sh)");
    match (reachable, std::env::var_os("CI").is_some()) {
        (true, _) => true,
        (false, true) => panic!("{message}"),
        (false, false) => {
            // Straight to stderr: the test harness captures eprintln! of passing tests.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: {message}");
            false
        }
    }
}

/// The sum of a Prometheus counter's samples (from this process's recorder) whose labels include all
/// of `labels` (`name="value"` pairs).
pub fn counter(name: &str, labels: &[&str]) -> f64 {
    let text = switchyard::telemetry::install().render();
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} ")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A record read back, with its headers.
#[derive(Debug, Clone)]
pub struct Read<T> {
    pub key: Vec<u8>,
    pub headers: HashMap<String, String>,
    pub value: T,
}

/// One test's private switchyard: topics, service, models.
pub struct Env {
    /// The environment variables that give a `switchyard` process this test's topics and groups.
    pub vars: Vec<(String, String)>,
    pub config: Config,
    pub codec: Codec,
    trigger: ShutdownTrigger,
    shutdown: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Env {
    /// Fresh topics named `<test>-<random>.*`; nothing running yet. None (the test is skipped) when no
    /// broker runs and `CI` is not set.
    pub async fn new(test: &str) -> Option<Env> {
        Env::with(test, &[]).await
    }

    /// Like [`Env::new`], with more environment settings (`SWITCHYARD__...`) for every process.
    pub async fn with(test: &str, extra: &[(&str, &str)]) -> Option<Env> {
        if !broker_available() {
            return None;
        }
        // Logs of the in-process services, when asked for with RUST_LOG.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let prefix = format!("{test}-{:08x}", rand::random::<u32>());
        let mut env = switchyard::config::isolated_env(&bootstrap(), &prefix, 3);
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::load(None, env.clone()).expect("test config is valid");
        service::ensure_core_topics(&config).await.expect("topics can be created");
        let (trigger, shutdown) = ShutdownTrigger::new();
        Some(Env { vars: env, codec: config.codec().unwrap(), config, trigger, shutdown, tasks: Vec::new() })
    }

    /// Starts route and merge in this process.
    pub fn start_service(&mut self) {
        self.start_instance(&self.config.service.instance_id.clone());
    }

    /// Starts route and merge in this process as instance `id` (more than one scale out).
    pub fn start_instance(&mut self, id: &str) {
        let mut config = self.config.clone();
        config.service.instance_id = id.to_string();
        let (trigger, shutdown) = (self.trigger.clone(), self.shutdown.clone());
        self.tasks.push(tokio::spawn(async move {
            service::run(config, Roles::All, trigger, shutdown).await.expect("service runs");
        }));
    }

    /// Starts a demo model worker.
    pub fn start_model(&mut self, model: &str, latency_ms: u64, error_rate: f64, disagree_percent: f64) {
        self.start_worker(DemoModel {
            model: model.into(),
            latency: Duration::from_millis(latency_ms),
            error_rate,
            disagree_percent,
            accuracy: None,
        });
    }

    /// Starts a demo model worker configured by the caller.
    pub fn start_worker(&mut self, worker: DemoModel) {
        let (config, codec, shutdown) = (self.config.clone(), self.codec.clone(), self.shutdown.clone());
        self.tasks.push(tokio::spawn(async move {
            worker.run(config, codec, shutdown).await.expect("demo model runs");
        }));
    }

    /// Starts the demo labeller (the truth of each request, `delay` after it was sent).
    pub fn start_labeller(&mut self, delay: Duration) {
        let labeller = switchyard::tools::labeller::Labeller { delay, coverage: 1.0, positives_only: Vec::new() };
        let (config, codec, shutdown) = (self.config.clone(), self.codec.clone(), self.shutdown.clone());
        self.tasks.push(tokio::spawn(async move {
            labeller.run(config, codec, shutdown).await.expect("labeller runs");
        }));
    }

    /// Writes a deployment record (JSON without a version) as the next version, like `switchyard deploy`.
    pub async fn deploy(&self, name: &str, json: &str) -> u64 {
        let mut value: serde_json::Value = serde_json::from_str(json).unwrap();
        value["version"] = 1.into();
        let spec: DeploymentSpec = serde_json::from_value(value).unwrap();
        ops::deploy(&self.config, name, spec).await.expect("deploy").version()
    }

    pub async fn produce(&self, records: Vec<OutRecord>) {
        let producer = kafka::producer(&self.config).unwrap();
        kafka::send_all(&producer, &records).await.expect("records produced");
    }

    pub async fn send(&self, requests: &[Request]) {
        let records = requests
            .iter()
            .map(|r| OutRecord::new(self.config.topics.requests.clone(), r.user_id.as_bytes(), self.codec.encode(r)))
            .collect();
        self.produce(records).await;
    }

    /// Reads `topic` from the beginning until `expected` records arrived, then keeps reading for
    /// `settle` so that extra (duplicate) records would be seen too. Panics after `limit`.
    pub async fn read_raw(
        &self,
        topic: &str,
        expected: usize,
        limit: Duration,
        settle: Duration,
    ) -> Vec<Read<Vec<u8>>> {
        let consumer: StreamConsumer = kafka::reader(&self.config).unwrap();
        let partitions = kafka::partition_count(&consumer, topic).unwrap().expect("topic exists");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let start = Instant::now();
        let mut out = Vec::new();
        let mut reached: Option<Instant> = None;
        loop {
            if out.len() >= expected && reached.is_none() {
                reached = Some(Instant::now());
            }
            if reached.is_some_and(|at| at.elapsed() >= settle) {
                return out;
            }
            if start.elapsed() > limit {
                panic!("{topic}: {} of {expected} records after {limit:?}", out.len());
            }
            let Ok(message) = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await else { continue };
            let message = message.expect("read");
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Read {
                key: message.key().unwrap_or_default().to_vec(),
                headers,
                value: message.payload().unwrap_or_default().to_vec(),
            });
        }
    }

    pub async fn read<T: AvroRecord>(
        &self,
        topic: &str,
        expected: usize,
        limit: Duration,
        settle: Duration,
    ) -> Vec<Read<T>> {
        self.read_raw(topic, expected, limit, settle)
            .await
            .into_iter()
            .map(|r| Read {
                value: self.codec.decode::<T>(&r.value).expect("switchyard wrote a valid record"),
                key: r.key,
                headers: r.headers,
            })
            .collect()
    }

    /// Starts a `switchyard run` process as instance `id`, its log in `log`.
    pub fn spawn_instance(&self, id: &str, log: &std::path::Path) -> std::process::Child {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "--instance-id", id])
            .envs(self.vars.iter().cloned())
            .env("RUST_LOG", "info,rdkafka=warn,librdkafka=error")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }

    /// Runs the `switchyard` binary with this test's environment; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .envs(self.vars.iter().cloned())
            .env("RUST_LOG", "error")
            .output()
            .expect("switchyard binary runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    pub async fn stop(self) {
        self.trigger.trigger();
        for task in self.tasks {
            task.await.expect("task ended cleanly");
        }
    }
}

/// Requests for `deployment` from `users` distinct users, `count` in all.
pub fn requests(deployment: &str, run: &str, count: usize, users: usize) -> Vec<Request> {
    (0..count)
        .map(|i| Request {
            request_id: format!("{run}-{i}"),
            user_id: format!("user-{}", i % users),
            deployment: deployment.to_string(),
            sent_at: clock::now_millis(),
            payload: format!("payload-{run}-{i}").into_bytes(),
            attributes: HashMap::new(),
        })
        .collect()
}
