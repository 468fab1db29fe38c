//! `switchyard watch`: a live view of the decisions topic — the split per deployment, model and status,
//! and a sample of decisions as they arrive — and of the scored outcomes: each model's quality as its
//! labels arrive, for deployments with a `quality` spec.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::codec::{Codec, Decision, ScoredOutcome};
use crate::config::Config;
use crate::error::Result;
use crate::kafka;
use crate::quality::metrics::QualityFigures;
use crate::shutdown::Shutdown;

#[derive(Debug, Clone)]
pub struct Watch {
    pub deployment: Option<String>,
    /// Stop after this long.
    pub duration: Duration,
    /// Print every `sample`th decision (0: none).
    pub sample: u64,
    /// Read the topic from its beginning instead of from now.
    pub from_beginning: bool,
}

/// Counts of decisions by (deployment, model, cohort, status).
pub type Split = BTreeMap<(String, String, String, String), u64>;

/// Quality by (deployment, model, role).
type Quality = BTreeMap<(String, String, String), QualityFigures>;

fn render_quality(quality: &Quality, registry: &crate::control::Registry) -> String {
    let mut out = String::new();
    for ((deployment, model, role), f) in quality {
        let Some(spec) = registry.get(deployment).and_then(|d| d.spec.quality.clone()) else { continue };
        out.push_str(&format!("  {deployment:<12} {model:<14} {role:<8} {}\n", f.describe(spec.task)));
    }
    out
}

fn render(split: &Split) -> String {
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    for ((deployment, ..), n) in split {
        *totals.entry(deployment).or_default() += n;
    }
    let mut out = String::new();
    for ((deployment, model, cohort, status), n) in split {
        let share = 100.0 * *n as f64 / totals[deployment.as_str()] as f64;
        out.push_str(&format!("  {deployment:<12} {model:<14} {cohort:<10} {status:<12} {n:>7}  {share:6.2}%\n"));
    }
    out
}

impl Watch {
    pub async fn run(self, config: Config, codec: Codec, shutdown: Shutdown) -> Result<Split> {
        let consumer = kafka::reader(&config)?;
        let topic = &config.topics.decisions;
        let mut assignment = TopicPartitionList::new();
        for topic in [topic, &config.topics.scored_outcomes] {
            let partitions = kafka::partition_count(&consumer, topic)?.unwrap_or(0);
            for p in 0..partitions as i32 {
                assignment.add_partition_offset(
                    topic,
                    p,
                    if self.from_beginning { Offset::Beginning } else { Offset::End },
                )?;
            }
        }
        consumer.assign(&assignment)?;
        let (mut registry, mut last_snapshot) = (crate::control::watcher::snapshot(&config).await?, Instant::now());
        let mut quality = Quality::new();
        let mut split = Split::new();
        let (start, mut last_print, mut seen) = (Instant::now(), Instant::now(), 0u64);
        while start.elapsed() < self.duration && !shutdown.is_triggered() {
            if last_print.elapsed() >= Duration::from_secs(2) {
                println!("decisions so far ({seen}):\n{}", render(&split));
                if !quality.is_empty() {
                    println!("quality so far (labelled answers):\n{}", render_quality(&quality, &registry));
                }
                last_print = Instant::now();
            }
            let Ok(Ok(message)) = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await else {
                continue;
            };
            if message.topic() != topic.as_str() {
                let Ok(s) = codec.decode::<ScoredOutcome>(message.payload().unwrap_or_default()) else { continue };
                if self.deployment.as_ref().is_none_or(|name| *name == s.deployment) {
                    // A deployment (or its quality spec) newer than the snapshot: read the topic again, at
                    // most every few seconds.
                    let known =
                        |r: &crate::control::Registry| r.get(&s.deployment).is_some_and(|d| d.spec.quality.is_some());
                    if !known(&registry) && last_snapshot.elapsed() >= Duration::from_secs(2) {
                        registry = crate::control::watcher::snapshot(&config).await.unwrap_or(registry);
                        last_snapshot = Instant::now();
                    }
                    if let Some(spec) = registry.get(&s.deployment).and_then(|d| d.spec.quality.clone()) {
                        quality
                            .entry((s.deployment.clone(), s.model.clone(), s.role.clone()))
                            .or_default()
                            .add(&s, &spec);
                    }
                }
                continue;
            }
            let Ok(d) = codec.decode::<Decision>(message.payload().unwrap_or_default()) else { continue };
            if self.deployment.as_ref().is_some_and(|name| *name != d.deployment) {
                continue;
            }
            seen += 1;
            if self.sample > 0 && seen % self.sample == 0 {
                println!(
                    "  decision {} user={} bucket={} -> {} ({}, v{}) {} output={} latency={}ms",
                    d.request_id,
                    d.user_id,
                    d.bucket,
                    d.model,
                    d.cohort,
                    d.config_version,
                    d.status.as_str(),
                    d.output.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
                    d.latency_ms
                );
            }
            *split.entry((d.deployment, d.model, d.cohort, d.status.as_str().to_string())).or_default() += 1;
        }
        println!("decisions ({seen}):\n{}", render(&split));
        if !quality.is_empty() {
            println!("quality (labelled answers):\n{}", render_quality(&quality, &registry));
        }
        Ok(split)
    }
}
