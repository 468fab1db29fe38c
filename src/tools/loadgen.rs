//! `switchyard loadgen`: produces Avro requests at a steady rate, keyed by user id.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::clock;
use crate::codec::{Codec, Request};
use crate::config::Config;
use crate::error::Result;
use crate::kafka::{self, OutRecord};
use crate::shutdown::Shutdown;

#[derive(Debug, Clone)]
pub struct Loadgen {
    pub deployment: String,
    /// Requests per second.
    pub rate: u64,
    pub count: u64,
    /// Distinct users, `user-0` .. `user-{users-1}`.
    pub users: u64,
    /// Prefix of every request_id (a random one if empty), so runs never collide.
    pub run_id: String,
}

/// What a load run did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub sent: u64,
    pub elapsed: Duration,
}

impl Loadgen {
    /// The `i`th request of this run: deterministic except for `sent_at`.
    pub fn request(&self, i: u64, rng: &mut impl Rng) -> Request {
        let user = rng.random_range(0..self.users.max(1));
        let amount: u32 = rng.random_range(1..100_000);
        Request {
            request_id: format!("{}-{i}", self.run_id),
            user_id: format!("user-{user}"),
            deployment: self.deployment.clone(),
            sent_at: clock::now_millis(),
            payload: format!(r#"{{"amount":{amount},"n":{i}}}"#).into_bytes(),
            attributes: HashMap::from([("source".to_string(), "loadgen".to_string())]),
        }
    }

    pub async fn run(mut self, config: Config, codec: Codec, shutdown: Shutdown) -> Result<Report> {
        if self.run_id.is_empty() {
            self.run_id = format!("{:08x}", rand::rng().random::<u32>());
        }
        if config.topics.create {
            kafka::ensure_topics(&config, std::slice::from_ref(&config.topics.requests), kafka::TopicKind::Stream)
                .await?;
        }
        let producer = kafka::producer(&config)?;
        // A Send generator, so that a load can run on a spawned task.
        let mut rng = StdRng::from_rng(&mut rand::rng());
        let start = Instant::now();
        // Send in 10 ms slices so the rate is smooth without a timer per record.
        let slice = Duration::from_millis(10);
        let mut sent = 0;
        while sent < self.count && !shutdown.is_triggered() {
            let due = ((start.elapsed().as_secs_f64() + slice.as_secs_f64()) * self.rate as f64) as u64;
            let batch: Vec<OutRecord> = (sent..due.min(self.count))
                .map(|i| {
                    let request = self.request(i, &mut rng);
                    OutRecord::new(config.topics.requests.clone(), request.user_id.as_bytes(), codec.encode(&request))
                })
                .collect();
            if !kafka::send_all_retrying(&producer, &batch, &shutdown).await {
                break;
            }
            sent += batch.len() as u64;
            tokio::time::sleep(slice).await;
        }
        let report = Report { sent, elapsed: start.elapsed() };
        tracing::info!(run_id = %self.run_id, sent, seconds = report.elapsed.as_secs_f64(), "loadgen done");
        Ok(report)
    }
}
