//! The score stage inside `switchyard run`: reads decisions, shadow comparisons and outcome labels
//! (co-partitioned by user id), joins them ([`Join`]) and writes one scored record per labelled answer,
//! exactly once: each batch's scored records, dead letters and changelog records commit with its
//! input offsets in one transaction (the stage driver route and merge run on, [`TxnStage::drive`]). The join's state
//! is in a compacted changelog topic, one record per open request: after a restart or rebalance it is
//! read back instead of the inputs, so a long window does not mean re-reading weeks of decisions.
//!
//! Only deployments whose record has a `quality` spec are followed.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use super::changelog;
use super::join::{Effect, Join, JoinConfig, Rejected};
use super::store::{DiskConfig, DiskStates, States};
use crate::clock;
use crate::codec::{Codec, Decision, Outcome, ShadowComparison};
use crate::config::Config;
use crate::control::SharedRegistry;
use crate::dead_letter::{self, Kind, Letter};
use crate::error::{Error, Result};
use crate::kafka::partitioner::partition_for_key;
use crate::kafka::{self, GroupWatch, OutRecord, Outbox, Placed, SourcePos, Stage, TxnStage};
use crate::record::quality::QualitySpec;
use crate::shutdown::Shutdown;
use crate::telemetry::{self, Event};

const TICK: Duration = Duration::from_millis(200);

fn join_config(config: &Config) -> JoinConfig {
    JoinConfig {
        window_ms: config.quality.window_ms as i64,
        early_wait_ms: config.quality.early_wait_ms as i64,
        max_open: config.quality.max_open,
    }
}

/// Checks that the topics the stage joins by partition agree (they are created with the core topics).
async fn topics(config: &Config) -> Result<()> {
    let t = &config.topics;
    let reader = kafka::reader(config)?;
    let topics = [t.decisions.as_str(), t.shadow_comparisons.as_str(), t.outcomes.as_str(), t.score_changelog.as_str()];
    kafka::same_partition_count(&reader, &topics, "the score stage").await?;
    let joined = [t.decisions.as_str(), t.shadow_comparisons.as_str(), t.outcomes.as_str()];
    for problem in
        short_retention(&kafka::topic_config_ms(config, &joined, "retention.ms").await?, config.quality.window_ms)
    {
        tracing::error!("{problem}");
    }
    Ok(())
}

/// What is wrong with topics that keep records for less than the window.
pub fn short_retention(retentions: &[(String, i64)], window_ms: u64) -> Vec<String> {
    retentions
        .iter()
        .filter(|(_, ms)| *ms >= 0 && (*ms as u64) < window_ms)
        .map(|(topic, ms)| {
            format!(
                "topic {topic} keeps records for {ms} ms, less than quality.window_ms ({window_ms}): after a restart \
                 the score stage may find its inputs gone, and labels later than {ms} ms meet no decision; set its \
                 retention.ms to at least {window_ms} (or -1)"
            )
        })
        .collect()
}

/// The store's directory of this instance: `<quality.state_dir>/<group_id>-score-<instance>`.
pub fn store_dir(config: &Config) -> std::path::PathBuf {
    let s = &config.service;
    std::path::Path::new(&config.quality.state_dir).join(format!("{}-score-{}", s.group_id, s.instance()))
}

/// Opens this instance's store (waiting up to 30 s for a previous process to let it go).
pub fn open_store(config: &Config) -> Result<DiskStates> {
    let q = &config.quality;
    let disk = DiskConfig {
        dir: store_dir(config),
        cache_bytes: q.cache_mb << 20,
        write_buffer_bytes: q.write_buffer_mb << 20,
    };
    DiskStates::open(&disk, Duration::from_secs(30)).map_err(Error::Store)
}

/// What a catch-up did: changelog records read, partitions rebuilt from the start.
#[derive(Debug, Default, Clone, Copy)]
pub struct CaughtUp {
    pub records: u64,
    pub rebuilt: usize,
}

/// Brings the store of `join` up to the changelog partitions `assigned`: each from the offset its
/// checkpoint says the store reflects; a partition without a usable checkpoint (none, before the log's
/// start, past its end, or older than the changelog keeps tombstones, `tombstones_ms`: a tombstone read
/// since might be gone) is wiped and rebuilt from the whole changelog. Writes checkpoints as it goes (an
/// interrupted rebuild resumes) and at the end.
pub async fn catch_up(
    config: &Config,
    codec: &Codec,
    specs: &HashMap<String, QualitySpec>,
    assigned: &[i32],
    tombstones_ms: i64,
    join: &mut Join<DiskStates>,
) -> Result<CaughtUp> {
    // Early shadow answers in an old entry do not name their deployment: the only spec, if one.
    let old_spec_of = |deployment: Option<&str>| match deployment {
        Some(name) => specs.get(name).cloned().unwrap_or_default(),
        None if specs.len() == 1 => specs.values().next().cloned().unwrap_or_default(),
        None => QualitySpec::default(),
    };
    let spec_of = |deployment: &str| specs.get(deployment).cloned().unwrap_or_default();
    let topic = &config.topics.score_changelog;
    let reader = kafka::reader(config)?;
    kafka::batch::locate(&reader, topic)?;
    let now = clock::now_millis();
    join.states().assign(assigned);
    // A broker set up anew under the same address has a new cluster id: what the store holds is of
    // another changelog.
    if let Some(cluster) = reader.client().fetch_cluster_id(kafka::ADMIN_TIMEOUT)
        && join.states().belong_to(&cluster).map_err(Error::Store)?
    {
        tracing::warn!(%cluster, "the score state store was written from another Kafka cluster: wiped, rebuilt from the changelog");
    }
    let mut from = TopicPartitionList::new();
    let mut targets = HashMap::new();
    let mut done = CaughtUp::default();
    for (partition, (low, high)) in kafka::log_ends(config, topic, assigned.iter().copied())? {
        let checkpoint = join.states().checkpoint(partition).map_err(Error::Store)?;
        let start = match checkpoint {
            Some(c) if c.offset >= low && c.offset <= high && now - c.written_at <= tombstones_ms => c.offset,
            _ => {
                let wiped = join.states().wipe(partition).map_err(Error::Store)?;
                tracing::info!(
                    partition,
                    ?checkpoint,
                    low,
                    high,
                    wiped,
                    "rebuilding the score state of a partition from the changelog"
                );
                done.rebuilt += 1;
                low
            }
        };
        from.add_partition_offset(topic, partition, Offset::Offset(start))?;
        if start < high {
            targets.insert(partition, high);
        }
    }
    reader.assign(&from)?;
    let started = std::time::Instant::now();
    // Where each partition has been read to, written with the store's changes every 20,000 records.
    let mut read_to: HashMap<i32, i64> = HashMap::new();
    let mut since_check = 0;
    loop {
        // Positions are checked every 10,000 records (and when none arrives): asking per record costs
        // more than reading it.
        if since_check == 0 && kafka::batch::caught_up(&reader, topic, &targets) {
            break;
        }
        let Ok(message) = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await else {
            since_check = 0;
            continue;
        };
        since_check = (since_check + 1) % 10_000;
        let message = message?;
        let id = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        read_to.insert(message.partition(), message.offset() + 1);
        done.records += 1;
        let entry = match message.payload() {
            None => None,
            Some(value) => match changelog::decode(&id, value, codec, old_spec_of) {
                Ok(entry) => Some(entry),
                Err(error) => {
                    tracing::warn!(offset = message.offset(), %error, "unreadable score changelog record skipped");
                    continue;
                }
            },
        };
        join.replay(message.partition(), &id, entry, spec_of, now);
        if done.records % 20_000 == 0 {
            let checkpoints: Vec<(i32, i64)> = read_to.iter().map(|(p, o)| (*p, *o)).collect();
            join.states().commit(&checkpoints, now).map_err(Error::Store)?;
        }
    }
    // Every partition is read to its end as it stood at the start (past records the reader skipped:
    // transaction markers, aborted records); records written since were written by no one (the
    // partitions are this instance's now).
    let ends: Vec<(i32, i64)> = (from.elements().iter())
        .map(|e| {
            let start = if let Offset::Offset(o) = e.offset() { o } else { 0 };
            let end = targets.get(&e.partition()).copied().unwrap_or(start);
            (e.partition(), end.max(read_to.get(&e.partition()).copied().unwrap_or(0)))
        })
        .collect();
    join.states().commit(&ends, now).map_err(Error::Store)?;
    tracing::info!(
        held = join.open(),
        partitions = assigned.len(),
        rebuilt = done.rebuilt,
        records = done.records,
        ms = started.elapsed().as_millis() as u64,
        "score state caught up with the changelog"
    );
    Ok(done)
}

/// The quality spec of each deployment that has one.
fn specs(registry: &SharedRegistry) -> HashMap<String, QualitySpec> {
    let registry = registry.read().expect("registry lock is never poisoned");
    registry.deployments().filter_map(|d| d.spec.quality.clone().map(|q| (d.name.clone(), q))).collect()
}

/// The score stage's hooks for the stage driver.
struct Score {
    config: Config,
    codec: Codec,
    registry: SharedRegistry,
    /// Partition count of the joined topics: an outcome must be on its key's partition.
    partitions: usize,
    join: Join<DiskStates>,
    /// How long the changelog keeps tombstones (its `delete.retention.ms`).
    tombstones_ms: i64,
    /// The quality specs in force for the current batch, and when it is fed.
    specs: HashMap<String, QualitySpec>,
    now: i64,
    /// When the store's checkpoints were last marked current.
    touched: i64,
}

impl Stage for Score {
    /// Brings the store up to the changelog partitions of the assignment.
    async fn restore(&mut self, consumer: &StreamConsumer<GroupWatch>) -> Result<()> {
        let decisions = &self.config.topics.decisions;
        let assigned: Vec<i32> =
            consumer.assignment()?.elements_for_topic(decisions).iter().map(|e| e.partition()).collect();
        let specs = specs(&self.registry);
        catch_up(&self.config, &self.codec, &specs, &assigned, self.tombstones_ms, &mut self.join).await?;
        Ok(())
    }

    /// Reads the states the batch's labels will meet ahead, in parallel ([`States::prefetch`]).
    fn begin(&mut self, now: i64, batch: &[OwnedMessage]) {
        self.specs = specs(&self.registry);
        self.now = now;
        let outcomes = &self.config.topics.outcomes;
        let keys = (batch.iter().filter(|m| m.topic() == *outcomes))
            .filter_map(|m| Some((m.partition(), self.codec.decode::<Outcome>(m.payload()?).ok()?.request_id)))
            .collect();
        self.join.states().prefetch(keys);
    }

    /// Every record made from an input names it (changelog states, scored records, dead letters): one
    /// the broker refuses dead-letters that input, and the rest flows.
    fn feed(&mut self, index: usize, message: &OwnedMessage, out: &mut Outbox) {
        let mut fx = Vec::new();
        self.join_input(index, message, &mut fx, out);
        self.write(fx, Some(index), out);
    }

    /// Decisions that matured or passed their window, labels that waited for their decision in vain.
    fn tick(&mut self, _now: i64, _: &StreamConsumer<GroupWatch>, out: &mut Outbox) {
        let mut fx = Vec::new();
        let specs = &self.specs;
        self.join.expire(self.now, |d| specs.get(d).cloned().unwrap_or_default(), &mut fx);
        self.write(fx, None, out);
    }

    /// The batch's changes go to the store, with the changelog offsets they reflect.
    fn committed(&mut self, records: &[OutRecord], placed: &[Placed]) {
        let changelog = &self.config.topics.score_changelog;
        let mut ends: HashMap<i32, i64> = HashMap::new();
        for (record, (partition, offset)) in records.iter().zip(placed) {
            if record.topic == *changelog {
                let end = ends.entry(*partition).or_default();
                *end = (*end).max(offset + 1);
            }
        }
        let ends: Vec<(i32, i64)> = ends.into_iter().collect();
        if let Err(error) = self.join.states().commit(&ends, self.now) {
            // The transaction is in the changelog, not in the store: a restart reads it back from there.
            tracing::error!(%error, "cannot write the score state store; stopping (a restart catches up from the changelog)");
            std::process::exit(74);
        }
    }

    fn after(&mut self, _: &StreamConsumer<GroupWatch>) {
        telemetry::open_decisions(self.join.open());
        if self.now - self.touched >= 60_000 {
            self.touched = self.now;
            if let Err(error) = self.join.states().touch_checkpoints(self.now) {
                tracing::warn!(%error, "cannot mark the score state store's checkpoints current");
            }
        }
    }
}

/// Runs the score stage until shutdown; each batch is one transaction (see [`TxnStage::drive`]).
pub async fn run(config: Config, codec: Codec, registry: SharedRegistry, shutdown: Shutdown) -> Result<()> {
    if let Err(error) = topics(&config).await {
        // Routing and decisions go on without scores.
        tracing::error!(%error, "the score stage cannot run: no outcome labels are joined");
        return Ok(());
    }
    // Opening may wait for a previous process's lock and replays a journal: off the async workers.
    let states = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || open_store(&config))
            .await
            .map_err(|e| Error::Store(format!("opening the score state store: {e}")))??
    };
    let t = &config.topics;
    let tombstones_ms = kafka::topic_config_ms(&config, &[t.score_changelog.as_str()], "delete.retention.ms")
        .await?
        .first()
        .map_or(DEFAULT_DELETE_RETENTION_MS, |(_, ms)| *ms);
    let inputs = [t.decisions.as_str(), t.shadow_comparisons.as_str(), t.outcomes.as_str()];
    let mut stage = TxnStage::new(&config, "score", &inputs, kafka::Output::Transactional, shutdown)?;
    let partitions = kafka::partition_count(stage.consumer(), &t.decisions)?.unwrap_or(1);
    let join = Join::new(join_config(&config), states);
    let mut score = Score {
        config,
        codec,
        registry,
        partitions,
        join,
        tombstones_ms,
        specs: HashMap::new(),
        now: clock::now_millis(),
        touched: clock::now_millis(),
    };
    stage.drive(&mut score, TICK, dead_letter::refused).await?;
    stage.close().await;
    if let Err(error) = score.join.states().sync() {
        tracing::warn!(%error, "cannot flush the score state store at stop (a restart catches up from the changelog)");
    }
    Ok(())
}

/// Kafka's default `delete.retention.ms` (a day), if the changelog's cannot be read.
const DEFAULT_DELETE_RETENTION_MS: i64 = 86_400_000;

impl Score {
    /// The join's effects as records (made from the input at `origin`, if one) and events.
    fn write(&self, fx: Vec<Effect>, origin: Option<usize>, out: &mut Outbox) {
        for effect in fx {
            let (record, event) = output(effect, &self.config, &self.codec);
            out.records.extend(record.map(|record| OutRecord { origin, ..record }));
            out.events.extend(event);
        }
    }

    /// Feeds one input record to the join, or dead-letters it.
    fn join_input(&mut self, index: usize, message: &OwnedMessage, fx: &mut Vec<Effect>, out: &mut Outbox) {
        let (config, codec, specs, partitions, now, join) =
            (&self.config, &self.codec, &self.specs, self.partitions, self.now, &mut self.join);
        let t = &config.topics;
        let value = message.payload().unwrap_or_default();
        let mut reject = |kind, reason: String| {
            out.push_from(index, Some(Letter::of(message, kind, reason).record(&t.dead_letter)));
        };
        let scored_by_none = |deployment: Option<&[u8]>| {
            specs.is_empty() || deployment.is_some_and(|d| !specs.keys().any(|name| name.as_bytes() == d))
        };
        if message.topic() == t.decisions {
            // Most decisions belong to deployments without a quality spec: their `deployment` header says
            // so without decoding them.
            let deployment =
                message.headers().and_then(|h| h.iter().find(|h| h.key == "deployment")).and_then(|h| h.value);
            if scored_by_none(deployment) {
                return;
            }
            if let Ok(d) = codec.decode::<Decision>(value)
                && let Some(spec) = specs.get(&d.deployment)
            {
                join.on_decision(d, message.partition(), spec, fx);
            }
        } else if message.topic() == t.shadow_comparisons {
            if scored_by_none(None) {
                return;
            }
            if let Ok(c) = codec.decode::<ShadowComparison>(value)
                && let Some(spec) = specs.get(&c.deployment)
            {
                join.on_shadow(c, message.partition(), spec, now, fx);
            }
        } else {
            let outcome = match codec.decode::<Outcome>(value) {
                Ok(outcome) => outcome,
                Err(error) => return reject(Kind::Undecodable, format!("outcome: {error}")),
            };
            if outcome.request_id.is_empty() {
                return reject(Kind::Invalid, "outcome without a request_id".into());
            }
            let home = partition_for_key(message.key().unwrap_or_default(), partitions);
            if home != message.partition() {
                return reject(
                    Kind::Invalid,
                    format!(
                        "outcome on partition {} but its key belongs to partition {home}: write outcomes keyed by user id \
                         with Kafka's murmur2 partitioner (confluent-kafka: partitioner=murmur2_random), or they never \
                         meet their decisions",
                        message.partition()
                    ),
                );
            }
            let spec_of = |deployment: &str| specs.get(deployment).cloned().unwrap_or_default();
            join.on_outcome(outcome, SourcePos::of(message), spec_of, now, fx);
        }
    }
}

/// The record and the event an effect becomes.
fn output(effect: Effect, config: &Config, codec: &Codec) -> (Option<OutRecord>, Option<Event>) {
    let t = &config.topics;
    match effect {
        Effect::Scored(s) => {
            let record = OutRecord::new(t.scored_outcomes.clone(), s.user_id.as_bytes(), codec.encode(&s))
                .header("model", s.model.as_str())
                .header("role", s.role.as_str());
            (Some(record), Some(Event::Scored(Box::new(s))))
        }
        Effect::Rejected { outcome, source, why, reason } => {
            let kind = match why {
                Rejected::Malformed => Kind::Invalid,
                Rejected::Duplicate => Kind::DuplicateLabel,
                Rejected::NoDecision => Kind::NoDecision,
                Rejected::Late => Kind::LateLabel,
            };
            let value = codec.encode(&outcome);
            let letter = Letter { source, key: Some(outcome.user_id.as_bytes()), value: Some(&value), kind, reason };
            let (record, event) = letter.record(&t.dead_letter);
            (Some(record), Some(event))
        }
        Effect::Unlabelled { deployment, model, cohort } => {
            (None, Some(Event::Unlabelled { deployment, model, cohort, evicted: false }))
        }
        Effect::Evicted { deployment, model, cohort } => {
            (None, Some(Event::Unlabelled { deployment, model, cohort, evicted: true }))
        }
        Effect::State { request_id, partition, entry } => {
            let mut record = OutRecord::new(t.score_changelog.clone(), request_id.into_bytes(), Vec::new());
            // None: a tombstone, compaction forgets the request.
            record.payload = entry.map(|e| changelog::encode(&e, codec));
            record.partition = Some(partition);
            (Some(record), None)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn inputs_kept_shorter_than_the_window_are_named() {
        let retentions =
            [("decisions".to_string(), 86_400_000), ("outcomes".to_string(), -1), ("ok".to_string(), 604_800_000)];
        let problems = super::short_retention(&retentions, 604_800_000);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("topic decisions keeps records for 86400000 ms"), "{problems:?}");
    }
}
