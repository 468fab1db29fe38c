//! `switchyard labeller`: the demo's source of truth. It reads the requests topic and, `delay` after each
//! request was sent, writes its outcome label — [`demo_model::truth`] of the payload — to the outcomes
//! topic, keyed by user id with Kafka's murmur2 partitioner (co-partitioned with the decisions). A
//! `coverage` share of requests gets a label; the rest never does. For the deployments named in
//! `positives_only`, only positive outcomes are written (chargebacks: the honest payments never get a
//! label; their deployment's quality spec says what absence means). At least once: offsets are
//! committed after the labels of the requests before them are written.

use std::collections::VecDeque;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::demo_model::truth;
use crate::clock;
use crate::codec::{Codec, Outcome, Request};
use crate::cohort::hash::murmur3_x86_32;
use crate::config::Config;
use crate::error::Result;
use crate::kafka::{self, OutRecord};
use crate::shutdown::Shutdown;

#[derive(Debug, Clone)]
pub struct Labeller {
    /// How long after a request was sent its label is written.
    pub delay: Duration,
    /// Share (0..=1) of requests that get a label.
    pub coverage: f64,
    /// Deployments whose requests get a label only when it is positive.
    pub positives_only: Vec<String>,
}

impl Labeller {
    /// The label of `request`, if it gets one: deterministic in its request id.
    pub fn label(&self, request: &Request) -> Option<Outcome> {
        let draw = f64::from(murmur3_x86_32(format!("label:{}", request.request_id).as_bytes(), 0) % 10_000);
        let positive = truth(&request.payload);
        if !positive && self.positives_only.contains(&request.deployment) {
            return None;
        }
        (draw < self.coverage * 10_000.0).then(|| Outcome {
            request_id: request.request_id.clone(),
            user_id: request.user_id.clone(),
            label: f64::from(u8::from(positive)),
            observed_at: request.sent_at + self.delay.as_millis() as i64,
            source: "demo-labeller".into(),
        })
    }

    pub async fn run(self, config: Config, codec: Codec, shutdown: Shutdown) -> Result<()> {
        let topic = config.topics.outcomes.clone();
        if config.topics.create {
            kafka::ensure_topics(&config, &[topic.clone(), config.topics.requests.clone()], kafka::TopicKind::Stream)
                .await?;
        }
        let consumer = kafka::group_consumer(&config, &format!("{}-labeller", config.service.group_id), None)?;
        consumer.subscribe(&[config.topics.requests.as_str()])?;
        let producer = kafka::producer(&config)?;
        // (due at, label or none, where its request is): FIFO, since every label waits the same delay.
        let mut queue: VecDeque<(i64, Option<OutRecord>, (i32, i64))> = VecDeque::new();
        tracing::info!(%topic, delay_ms = self.delay.as_millis() as u64, coverage = self.coverage, "labeller running");
        while !shutdown.is_triggered() {
            let batch =
                kafka::batch::next_batch(&consumer, 500, Duration::from_millis(5), Duration::from_millis(100)).await?;
            for message in &batch {
                let position = (message.partition(), message.offset());
                let record = codec.decode::<Request>(message.payload().unwrap_or_default()).ok().and_then(|r| {
                    self.label(&r).map(|o| OutRecord::new(topic.clone(), o.user_id.as_bytes(), codec.encode(&o)))
                });
                let due =
                    message.timestamp().to_millis().unwrap_or_else(clock::now_millis) + self.delay.as_millis() as i64;
                queue.push_back((due, record, position));
            }
            let now = clock::now_millis();
            let ready = queue.iter().take_while(|(due, ..)| *due <= now).count();
            if ready == 0 {
                continue;
            }
            let done: Vec<_> = queue.drain(..ready).collect();
            let records: Vec<OutRecord> = done.iter().filter_map(|(_, r, _)| r.clone()).collect();
            if !kafka::send_all_retrying(&producer, &records, &shutdown).await {
                break;
            }
            let mut offsets = TopicPartitionList::new();
            for (_, _, (partition, offset)) in &done {
                let _ = offsets.add_partition_offset(&config.topics.requests, *partition, Offset::Offset(offset + 1));
            }
            if let Err(error) = consumer.commit(&offsets, CommitMode::Async) {
                tracing::warn!(%error, "offset commit failed; some labels may be written twice");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn labels_follow_coverage_and_carry_the_truth() {
        let labeller =
            Labeller { delay: Duration::from_millis(2_000), coverage: 0.8, positives_only: vec!["late".into()] };
        let requests: Vec<Request> = (0..10_000)
            .map(|i| Request {
                request_id: format!("r{i}"),
                user_id: format!("u{}", i % 50),
                deployment: "fraud".into(),
                sent_at: 1_000,
                payload: format!("p{i}").into_bytes(),
                attributes: HashMap::new(),
            })
            .collect();
        let labels: Vec<Outcome> = requests.iter().filter_map(|r| labeller.label(r)).collect();
        assert!((7_800..8_200).contains(&labels.len()), "{}", labels.len());
        let first = labels.iter().find(|o| o.request_id == "r0").or(labels.first()).unwrap();
        let request = requests.iter().find(|r| r.request_id == first.request_id).unwrap();
        assert_eq!(first.label, f64::from(u8::from(truth(&request.payload))));
        assert_eq!((first.observed_at, first.user_id.as_str()), (3_000, request.user_id.as_str()));
        assert_eq!(labeller.label(request), Some(first.clone()), "deterministic");
        let late: Vec<Outcome> = requests
            .iter()
            .map(|r| Request { deployment: "late".into(), ..r.clone() })
            .filter_map(|r| labeller.label(&r))
            .collect();
        assert!(late.iter().all(|o| o.label == 1.0), "only positives for a positives-only deployment");
        assert_eq!(late.len(), labels.iter().filter(|o| o.label == 1.0).count());
    }
}
