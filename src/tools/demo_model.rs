//! `switchyard demo-model`: a stand-in model worker that honours the worker contract — read
//! `model.<m>.requests`, answer with a Prediction carrying the same request_id and record key on
//! `model.<m>.predictions`.
//!
//! Its answer is a deterministic function of model name and payload ([`output`]), so a test can tell
//! which model answered; its failures are a deterministic function of model and request id ([`fails`]).

use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;

use crate::clock;
use crate::codec::{Codec, ModelRequest, Prediction};
use crate::cohort::hash::murmur3_x86_32;
use crate::config::Config;
use crate::error::Result;
use crate::kafka::{self, OutRecord};
use crate::shutdown::Shutdown;

#[derive(Debug, Clone)]
pub struct DemoModel {
    pub model: String,
    /// Time each batch of requests takes to answer.
    pub latency: Duration,
    /// Share (0..=1) of requests answered with an error instead of an output.
    pub error_rate: f64,
    /// Percentage (0..=100) of payloads on which this model departs from the shared base answer.
    pub disagree_percent: f64,
    /// With it, the answer is a probability that is on the right side of 0.5 for this share (0..=1) of
    /// payloads, judged against [`truth`] (what `switchyard labeller` reports); `disagree_percent` is
    /// then unused.
    pub accuracy: Option<f64>,
}

/// Share of payloads whose truth is positive.
const POSITIVE_RATE: f64 = 0.3;

/// The truth about a payload: what really happened, as the demo labeller reports it.
pub fn truth(payload: &[u8]) -> bool {
    unit(murmur3_x86_32(&[payload, b":truth"].concat(), 0)) < POSITIVE_RATE
}

/// A probability from a model that is right (on the truth's side of 0.5) on `accuracy` of payloads.
pub fn scored_output(model: &str, payload: &[u8], accuracy: f64) -> Vec<u8> {
    let hash = |what: &str| unit(murmur3_x86_32(&[model.as_bytes(), what.as_bytes(), payload].concat(), 0));
    let right = hash(":right:") < accuracy;
    let says_positive = truth(payload) == right;
    let u = hash(":score:") * 0.4999;
    let score = if says_positive { 0.5 + u } else { u };
    format!("{score:.4}").into_bytes()
}

fn unit(hash: u32) -> f64 {
    f64::from(hash % 10_000) / 10_000.0
}

/// The demo model's answer: a score in [0, 1) as text. Models share the base score of a payload except
/// on a model-specific `disagree_percent` of payloads, where the score is the model's own.
pub fn output(model: &str, payload: &[u8], disagree_percent: f64) -> Vec<u8> {
    let own = murmur3_x86_32(&[model.as_bytes(), b":", payload].concat(), 0);
    let disagree = f64::from(own % 10_000) < disagree_percent * 100.0;
    let score = if disagree { unit(own.rotate_left(16)) } else { unit(murmur3_x86_32(payload, 0)) };
    format!("{score:.4}").into_bytes()
}

/// Whether the demo model fails on `request_id`.
pub fn fails(model: &str, request_id: &str, error_rate: f64) -> bool {
    f64::from(murmur3_x86_32(format!("{model}:error:{request_id}").as_bytes(), 0) % 10_000) < error_rate * 10_000.0
}

impl DemoModel {
    pub fn answer(&self, request: &ModelRequest) -> Prediction {
        let produced_at = clock::now_millis();
        if fails(&self.model, &request.request.request_id, self.error_rate) {
            return Prediction {
                request_id: request.request.request_id.clone(),
                model: self.model.clone(),
                output: None,
                error: Some("demo model failure".into()),
                produced_at,
            };
        }
        Prediction {
            request_id: request.request.request_id.clone(),
            model: self.model.clone(),
            output: Some(match self.accuracy {
                Some(accuracy) => scored_output(&self.model, &request.request.payload, accuracy),
                None => output(&self.model, &request.request.payload, self.disagree_percent),
            }),
            error: None,
            produced_at,
        }
    }

    pub async fn run(self, config: Config, codec: Codec, shutdown: Shutdown) -> Result<()> {
        let input = config.topics.model_requests(&self.model);
        let output_topic = config.topics.model_predictions(&self.model);
        if config.topics.create {
            kafka::ensure_topics(&config, &[input.clone(), output_topic.clone()], kafka::TopicKind::Stream).await?;
        }
        let consumer =
            kafka::group_consumer(&config, &format!("{}-model-{}", config.service.group_id, self.model), None)?;
        consumer.subscribe(&[input.as_str()])?;
        let producer = kafka::producer(&config)?;
        tracing::info!(model = %self.model, %input, output = %output_topic, "demo model answering");
        while !shutdown.is_triggered() {
            let batch =
                kafka::batch::next_batch(&consumer, 500, Duration::from_millis(5), Duration::from_millis(200)).await?;
            if batch.is_empty() {
                continue;
            }
            tokio::time::sleep(self.latency).await;
            let mut out = Vec::with_capacity(batch.len());
            for message in &batch {
                match codec.decode::<ModelRequest>(message.payload().unwrap_or_default()) {
                    Ok(request) => out.push(OutRecord::new(
                        output_topic.clone(),
                        message.key().unwrap_or_default(),
                        codec.encode(&self.answer(&request)),
                    )),
                    Err(error) => {
                        tracing::warn!(offset = message.offset(), %error, "skipping a request that does not decode")
                    }
                }
            }
            if !kafka::send_all_retrying(&producer, &out, &shutdown).await {
                break;
            }
            // At least once: offsets only after the answers are acknowledged (merge drops duplicates).
            if let Err(error) = consumer.commit(&kafka::batch_offsets(&batch), CommitMode::Async) {
                tracing::warn!(%error, "offset commit failed; some requests may be answered twice");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_depend_on_model_and_payload() {
        let same = (0..1000).filter(|i| {
            let p = format!("payload-{i}");
            output("v1", p.as_bytes(), 0.0) == output("v2", p.as_bytes(), 0.0)
        });
        assert_eq!(same.count(), 1000, "0% disagreement: models agree everywhere");
        let differ = (0..1000)
            .filter(|i| {
                let p = format!("payload-{i}");
                output("v1", p.as_bytes(), 0.0) != output("v2", p.as_bytes(), 100.0)
            })
            .count();
        assert!(differ > 990, "100% disagreement tells the models apart ({differ}/1000)");
        let some = (0..10_000)
            .filter(|i| output("v1", format!("{i}").as_bytes(), 0.0) != output("v3", format!("{i}").as_bytes(), 10.0))
            .count();
        assert!((800..1200).contains(&some), "{some}");
    }

    #[test]
    fn accuracy_is_measured_against_the_truth() {
        let n = 20_000;
        let right = |accuracy: f64| {
            (0..n)
                .filter(|i| {
                    let payload = format!("payload-{i}");
                    let score: f64 =
                        String::from_utf8(scored_output("m", payload.as_bytes(), accuracy)).unwrap().parse().unwrap();
                    assert!((0.0..1.0).contains(&score));
                    (score >= 0.5) == truth(payload.as_bytes())
                })
                .count() as f64
                / n as f64
        };
        assert!((right(0.9) - 0.9).abs() < 0.01, "{}", right(0.9));
        assert!((right(0.85) - 0.85).abs() < 0.01, "{}", right(0.85));
        let positives = (0..n).filter(|i| truth(format!("payload-{i}").as_bytes())).count() as f64 / n as f64;
        assert!((positives - POSITIVE_RATE).abs() < 0.01, "{positives}");
    }

    #[test]
    fn failures_follow_the_rate() {
        let n = (0..10_000).filter(|i| fails("m", &format!("r{i}"), 0.2)).count();
        assert!((1800..2200).contains(&n), "{n}");
        assert!(!(0..1000).any(|i| fails("m", &format!("r{i}"), 0.0)));
    }
}
