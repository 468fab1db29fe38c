//! The rollout controller inside `switchyard run`: one instance at a time follows the decisions of every
//! partition, judges each running plan's step, and writes the plan's changes to the deployments topic;
//! it also writes the history entry of every deployments-topic record.
//!
//! - **One writer.** Every instance joins the consumer group `<group_id>-controller` on the
//!   deployments topic (one partition); the member that holds the partition leads. It writes through
//!   the transactional id `<group_id>-controller`, shared by all instances: a new leader's producer
//!   fences the old one, and its offset commits carry the group generation (KIP-447), so a deposed
//!   leader cannot write.
//! - **History exactly once.** Each history entry is committed in the transaction that commits the
//!   group's position after its record; a new leader rebuilds the registry from the records before that
//!   position and continues after it.
//! - **Acting on what is in force.** The leader judges only when it has read the deployments topic to
//!   its end, and after writing a change it waits until it has read it back: it never acts twice on
//!   the same version. A change is the next version of the record; if an operator's record took that
//!   version first, the change is rejected (and shows so in the history) and the plan ended anyway.
//! - **Evidence after a restart.** A step's evidence is a pure function of its version's decisions
//!   ([`StepEvidence`]): a new leader reads them again from the step's start. A block of them is scored
//!   only once route and merge have settled past it ([`Settled`]): however late a failover, a dead
//!   instance or a backlog makes some decisions, they are all in before the guards see the block.
//! - **Counters after the commit.** Changes are counted, and a gauge moved to "ended", only once the
//!   transaction that writes them has committed; an instance that stops leading sets the step gauge of
//!   every deployment it reported to 0 (the dashboard takes the maximum over instances).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::block_in_place;

use super::decide;
use super::evidence::{Observation, PlanEvidence};
use super::feed::{Feed, Progress};
use super::history;
use super::probation::ProbationEvidence;
use super::settle::Settled;
use crate::clock;
use crate::codec::{Codec, Decision, Millis, ScoredOutcome, ShadowComparison};
use crate::config::Config;
use crate::control::Registry;
use crate::error::{During, Error};
use crate::kafka::batch::GroupWatch;
use crate::kafka::txn::TxnProducer;
use crate::kafka::{self, ADMIN_TIMEOUT, OutRecord};
use crate::record::plan::{GuardKind, PlanState};
use crate::record::{Deployment, DeploymentSpec};
use crate::shutdown::Shutdown;
use crate::telemetry;

/// How often the leader judges the plans.
const TICK: Duration = Duration::from_millis(500);
/// Most decisions read per tick.
const DECISIONS_PER_TICK: usize = 200_000;

/// Runs until shutdown.
pub async fn run(config: Config, codec: Codec, mut shutdown: Shutdown) -> Result<(), Error> {
    let topic = config.topics.deployments.clone();
    let group = format!("{}-controller", config.service.group_id);
    let mut consumer = kafka::group_consumer(&config, &group, Some(&config.service.instance()))?;
    match kafka::partition_count(&consumer, &topic)? {
        Some(1) => {}
        other => {
            tracing::error!(topic = %topic, partitions = ?other,
                "the rollout controller needs a deployments topic of exactly one partition; plans will not be driven");
            return Ok(());
        }
    }
    consumer.subscribe(&[&topic])?;
    let mut leader: Option<Leader> = None;
    let mut inbox = Vec::new();
    let mut next_tick = Instant::now();
    loop {
        telemetry::stage_alive("controller");
        tokio::select! {
            _ = shutdown.recv() => break,
            received = tokio::time::timeout(Duration::from_millis(100), consumer.recv()) => match received {
                Ok(Ok(message)) => inbox.push(message.detach()),
                Ok(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    // The consumer is unusable (seen: fenced by its own instance id after the group
                    // coordinator's broker died): join again with a new one.
                    tracing::error!(%code, %group, "the controller's consumer cannot go on; joining the group again with a new one");
                    if let Some(old) = leader.take() {
                        old.stand_down();
                    }
                    inbox.clear();
                    kafka::rejoin(&config, &group, &[&topic], &mut consumer)?;
                }
                Ok(Err(error)) => tracing::warn!(%error, "controller: deployments topic read failed"),
                Err(_) => {}
            },
        }
        if Instant::now() < next_tick {
            continue;
        }
        next_tick = Instant::now() + TICK;
        if !leads(&consumer, &topic) {
            if let Some(old) = leader.take() {
                old.stand_down();
                tracing::info!("rollout controller handed over to another instance");
            }
            inbox.clear();
            continue;
        }
        if leader.is_none() {
            match Leader::start(&config, &codec, &consumer, &shutdown).await {
                Ok(started) => leader = Some(started),
                Err(error) => {
                    tracing::warn!(%error, "cannot take over as rollout controller; retrying");
                    continue;
                }
            }
        }
        let current = leader.as_mut().expect("set above");
        if let Err(error) = current.tick(&consumer, std::mem::take(&mut inbox)).await {
            tracing::warn!(%error, "rollout controller's write failed; starting over from the committed position");
            leader.take().expect("leads").stand_down();
        }
    }
    if let Some(old) = leader {
        old.stand_down();
    }
    telemetry::stage_stopped("controller");
    // A static member leaves its group only when it says so: the next leader takes over at once.
    consumer.unsubscribe();
    Ok(())
}

fn leads(consumer: &StreamConsumer<GroupWatch>, topic: &str) -> bool {
    consumer.assignment().is_ok_and(|a| a.elements().iter().any(|e| e.topic() == topic && e.partition() == 0))
}

struct Leader {
    config: Config,
    codec: Codec,
    producer: TxnProducer,
    /// Where the deployments topic ends, its own last transaction included (see [`kafka::LogEnds`]):
    /// judging before that transaction's changes are read would judge the same step again.
    ends: kafka::LogEnds,
    registry: Registry,
    /// The next deployments-topic offset to write history for.
    next_offset: i64,
    /// The offset committed with the last transaction.
    committed: i64,
    /// Per deployment with a running plan: its step's evidence.
    evidence: HashMap<String, PlanEvidence>,
    /// Per deployment on probation: its paired evidence.
    probations: HashMap<String, ProbationEvidence>,
    feed: Option<Feed>,
    /// Route's and merge's progress, and how far it has settled, while `feed` is open.
    progress: Option<(Progress, Settled)>,
    /// Scored outcomes, while a running plan has a guard on labels or a deployment is on probation.
    scored: Option<Feed>,
    /// Shadow comparisons, while a running plan has the disagreement guard.
    comparisons: Option<Feed>,
    /// Deployments whose rollout gauges this leader set.
    reported: HashSet<String>,
    /// The changes in the transaction under way, counted once it commits: (deployment, actor, ended).
    uncommitted: Vec<(String, String, bool)>,
}

impl Leader {
    /// Fences any earlier leader, then rebuilds the registry from the records before the group's
    /// committed position and reads on from there.
    async fn start(
        config: &Config,
        codec: &Codec,
        consumer: &StreamConsumer<GroupWatch>,
        shutdown: &Shutdown,
    ) -> Result<Leader, Error> {
        let topic = &config.topics.deployments;
        let producer = TxnProducer::new(
            config,
            "controller",
            format!("{}-controller", config.service.group_id),
            shutdown.clone(),
        )?;
        let committed = block_in_place(|| consumer.committed(ADMIN_TIMEOUT))
            .during("reading the controller's committed position")?
            .elements()
            .iter()
            .find(|e| e.topic() == topic && e.partition() == 0)
            .and_then(|e| if let Offset::Offset(n) = e.offset() { Some(n) } else { None })
            .unwrap_or(0);
        let mut registry = Registry::default();
        if committed > 0 {
            let (reader, _) = crate::control::watcher::open(config).await?;
            let targets = HashMap::from([(0, committed)]);
            replay_until(&reader, topic, &targets, committed, &mut registry).await?;
        }
        block_in_place(|| consumer.seek(topic, 0, Offset::Offset(committed), ADMIN_TIMEOUT))
            .during("moving to the controller's committed position")?;
        tracing::info!(
            from_offset = committed,
            deployments = registry.deployments().count(),
            "this instance is the rollout controller"
        );
        Ok(Leader {
            config: config.clone(),
            codec: codec.clone(),
            producer,
            ends: kafka::LogEnds::new(config)?,
            registry,
            next_offset: committed,
            committed,
            evidence: HashMap::new(),
            probations: HashMap::new(),
            feed: None,
            progress: None,
            scored: None,
            comparisons: None,
            reported: HashSet::new(),
            uncommitted: Vec::new(),
        })
    }

    /// No longer the leader (handed over, failed, or stopping): another instance reports the plans now.
    fn stand_down(self) {
        for deployment in &self.reported {
            telemetry::rollout_ended(deployment);
        }
    }

    /// Applies the records read, judges the plans if the deployments topic has been read to its end,
    /// and commits history entries, changes and the position in one transaction.
    async fn tick(&mut self, consumer: &StreamConsumer<GroupWatch>, inbox: Vec<OwnedMessage>) -> Result<(), Error> {
        let topic = self.config.topics.deployments.clone();
        let mut out = Vec::new();
        for message in inbox {
            if message.partition() != 0 || message.offset() < self.next_offset {
                continue; // read again after a seek
            }
            let outcome = self.registry.apply(message.key(), message.payload(), message.offset());
            let name = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
            let at = message.timestamp().to_millis().unwrap_or_else(clock::now_millis);
            if let Some(entry) = history::entry(&name, message.payload(), message.offset(), at, &outcome) {
                let value = serde_json::to_vec(&entry).expect("history entries serialise");
                out.push(OutRecord::new(self.config.topics.history.clone(), name.into_bytes(), value));
            }
            self.next_offset = message.offset() + 1;
        }
        let position = consumer
            .position()
            .ok()
            .and_then(|p| p.find_partition(&topic, 0).map(|e| e.offset()))
            .and_then(|o| if let Offset::Offset(n) = o { Some(n) } else { None })
            .unwrap_or(0);
        let (_, end) = block_in_place(|| self.ends.of(&topic, 0)).during("finding where the deployments topic ends")?;
        if self.next_offset.max(position) >= end {
            self.judge(&mut out).await?;
        }
        if out.is_empty() && self.next_offset == self.committed {
            return Ok(());
        }
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(&topic, 0, Offset::Offset(self.next_offset))?;
        let changes = std::mem::take(&mut self.uncommitted);
        self.producer.commit(&out, &offsets, consumer.group_metadata()).await.map_err(|failure| {
            Error::KafkaDuring { doing: "committing the controller's changes".into(), source: failure.error }
        })?;
        self.committed = self.next_offset;
        for (deployment, actor, ended) in changes {
            telemetry::rollout_change(&deployment, &actor);
            if ended {
                telemetry::rollout_ended(&deployment);
            }
        }
        Ok(())
    }

    /// Follows the decisions (and scored outcomes) of the running plans' steps and of blue/green
    /// probations, and adds the change of every one whose verdict is in.
    async fn judge(&mut self, out: &mut Vec<OutRecord>) -> Result<(), Error> {
        let (running, on_probation) = self.in_judgement();
        self.open_feeds(&reads(&running, &on_probation))?;
        self.read_evidence().await?;
        let now = clock::now_millis();
        let settled = match (self.feed.as_ref(), self.progress.as_mut()) {
            (Some(feed), Some((progress, settled))) => settled.advance(now, &mut progress.with(feed))?,
            _ => None,
        };
        let labels_by = self.scored.as_mut().map(|f| f.read_through(now));
        for d in &running {
            let e = self.evidence.get_mut(&d.name).expect("kept by in_judgement");
            if let Some(settled) = settled {
                e.score_until(settled);
            }
            if let Some(labels_by) = labels_by {
                e.score_coverage_until(labels_by, d.spec.timeout_ms);
            }
            let plan = d.spec.plan.as_ref().expect("running");
            self.reported.insert(d.name.clone());
            let candidate = d.spec.candidate.as_deref().unwrap_or_default();
            telemetry::rollout(&d.name, candidate, plan.step, &e.figures(plan.step), e.late());
            let next = decide::next_record(d, e, now, self.registry.next_version(&d.name));
            self.write_change(d, next, out);
        }
        for d in &on_probation {
            let Some(e) = self.probations.get(&d.name) else { continue };
            self.reported.insert(d.name.clone());
            let candidate = d.spec.candidate.as_deref().unwrap_or_default();
            telemetry::rollout(&d.name, candidate, 0, &[e.figures()], 0);
            let next = decide::probation_record(d, e, now, self.registry.next_version(&d.name));
            self.write_change(d, next, out);
        }
        Ok(())
    }

    /// The deployments with a running plan and those on probation, with evidence kept for each (that of
    /// a version no longer in force dropped, a new one started).
    fn in_judgement(&mut self) -> (Vec<Deployment>, Vec<Deployment>) {
        let running: Vec<_> = self
            .registry
            .deployments()
            .filter(|d| d.spec.plan.as_ref().is_some_and(|p| p.state == PlanState::Running))
            .map(|d| Deployment::clone(d))
            .collect();
        let on_probation: Vec<_> =
            self.registry.deployments().filter(|d| d.spec.probation.is_some()).map(|d| Deployment::clone(d)).collect();
        self.evidence.retain(|name, e| running.iter().any(|d| d.name == *name && e.covers(d)));
        self.probations.retain(|name, e| on_probation.iter().any(|d| d.name == *name && d.version() == e.version));
        for d in &running {
            if !self.evidence.contains_key(&d.name) {
                self.evidence.insert(d.name.clone(), PlanEvidence::new(d).expect("a running plan"));
            }
        }
        for d in &on_probation {
            if !self.probations.contains_key(&d.name)
                && let Some(e) = ProbationEvidence::new(d)
            {
                self.probations.insert(d.name.clone(), e);
            }
        }
        (running, on_probation)
    }

    /// Opens the feeds `reads` needs (from its start: a new leader reads the step again) and closes the
    /// others: nothing is read while nothing is judged.
    fn open_feeds(&mut self, reads: &Reads) -> Result<(), Error> {
        if !reads.decisions {
            self.feed = None;
            self.progress = None;
        } else if self.feed.is_none() {
            let topic = &self.config.topics.decisions;
            self.feed = Some(Feed::open(&self.config, self.codec.clone(), topic, reads.from)?);
            self.progress = Some((Progress::new(&self.config)?, Settled::default()));
        }
        if !reads.labels {
            self.scored = None;
        } else if self.scored.is_none() {
            let topic = &self.config.topics.scored_outcomes;
            self.scored = Some(Feed::open(&self.config, self.codec.clone(), topic, reads.from)?);
        }
        if !reads.comparisons {
            self.comparisons = None;
        } else if self.comparisons.is_none() {
            let topic = &self.config.topics.shadow_comparisons;
            self.comparisons = Some(Feed::open(&self.config, self.codec.clone(), topic, reads.from)?);
        }
        Ok(())
    }

    /// Hands what the open feeds have now to the evidence of the version each record was made under.
    async fn read_evidence(&mut self) -> Result<(), Error> {
        let (evidence, probations) = (&mut self.evidence, &mut self.probations);
        if let Some(scored) = self.scored.as_mut() {
            scored
                .drain(
                    Duration::from_millis(1),
                    DECISIONS_PER_TICK,
                    |s: &ScoredOutcome| s.observed_at,
                    |s| {
                        let version = s.config_version as u64;
                        if let Some(e) = evidence.get_mut(&s.deployment).filter(|e| e.accepts(version)) {
                            e.add_scored(&s);
                        }
                        if let Some(e) = probations.get_mut(&s.deployment).filter(|e| e.version == version) {
                            e.add(&s);
                        }
                    },
                )
                .await?;
        }
        if let Some(comparisons) = self.comparisons.as_mut() {
            comparisons
                .drain(
                    Duration::from_millis(1),
                    DECISIONS_PER_TICK,
                    |c: &ShadowComparison| c.compared_at,
                    |c| {
                        if let Some(e) = evidence.get_mut(&c.deployment) {
                            e.add_comparison(&c);
                        }
                    },
                )
                .await?;
        }
        if let Some(feed) = self.feed.as_mut() {
            feed.drain(
                Duration::from_millis(10),
                DECISIONS_PER_TICK,
                |d: &Decision| d.decided_at,
                |decision| {
                    let e = evidence.get_mut(&decision.deployment);
                    if let Some(e) = e.filter(|e| e.accepts(decision.config_version as u64))
                        && let Some(observation) = Observation::of(&decision)
                    {
                        e.add(observation);
                    }
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Adds the controller's next record for `d`, if it has one and it is valid.
    fn write_change(&mut self, d: &Deployment, next: Option<DeploymentSpec>, out: &mut Vec<OutRecord>) {
        let Some(next) = next else { return };
        if let Err(error) = next.clone().validate(&d.name) {
            tracing::error!(deployment = %d.name, %error, "the controller's next record is invalid; not written");
            return;
        }
        let change = next.change.as_ref().expect("decide sets the change");
        tracing::info!(deployment = %d.name, version = next.version, actor = %change.actor,
            reason = %change.reason, "rollout controller writes a change");
        let ended = next.plan.is_none() && next.probation.is_none();
        self.uncommitted.push((d.name.clone(), change.actor.clone(), ended));
        out.push(OutRecord::new(
            self.config.topics.deployments.clone(),
            d.name.as_bytes(),
            next.to_json().into_bytes(),
        ));
    }
}

/// What the leader must read to judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reads {
    /// The decisions: while a plan runs.
    decisions: bool,
    /// The scored outcomes: while a running plan has a guard on labels, or a deployment is on probation.
    labels: bool,
    /// The shadow comparisons: while a running plan has the disagreement guard.
    comparisons: bool,
    /// From the earliest start of a running step or a probation (None: nothing to judge).
    from: Option<Millis>,
}

fn reads(running: &[Deployment], on_probation: &[Deployment]) -> Reads {
    let plans = || running.iter().filter_map(|d| d.spec.plan.as_ref());
    let on_labels = |g: &GuardKind| matches!(g, GuardKind::Quality | GuardKind::Coverage);
    Reads {
        decisions: !running.is_empty(),
        labels: !on_probation.is_empty() || plans().any(|p| p.guards.iter().any(on_labels)),
        comparisons: plans().any(|p| p.guards.contains(&GuardKind::Disagreement)),
        from: plans()
            .map(|p| p.step_started_at)
            .chain(on_probation.iter().filter_map(|d| d.spec.probation.as_ref().map(|p| p.started_at)))
            .min(),
    }
}

/// Applies the records of the deployments topic before `until`.
async fn replay_until(
    reader: &StreamConsumer,
    topic: &str,
    targets: &HashMap<i32, i64>,
    until: i64,
    registry: &mut Registry,
) -> Result<(), Error> {
    while !kafka::batch::caught_up(reader, topic, targets) {
        if let Ok(message) = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await {
            let message = message?;
            if message.offset() < until {
                registry.apply(message.key(), message.payload(), message.offset());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::DeploymentSpec;

    fn deployment(json: &str) -> Deployment {
        DeploymentSpec::from_json(json.as_bytes()).unwrap().validate("d").unwrap()
    }

    fn plan(step_started_at: i64, guards: &str) -> Deployment {
        deployment(&format!(
            r#"{{"version":2,"strategy":"canary","control":"a","candidate":"b","canary_percent":5,"quality":{{}},
                "plan":{{"steps":[{{"canary_percent":5,"bake_ms":1000,"min_sample":10,"max_ms":60000}}],
                         "guards":{guards},"step":0,"step_started_at":{step_started_at},"state":"running"}}}}"#
        ))
    }

    #[test]
    fn the_leader_reads_only_what_it_judges_from_the_earliest_start() {
        let none = Reads { decisions: false, labels: false, comparisons: false, from: None };
        assert_eq!(reads(&[], &[]), none, "nothing to judge");
        let rates = plan(5_000, r#"["error_rate","sample_ratio"]"#);
        assert_eq!(reads(std::slice::from_ref(&rates), &[]), Reads { decisions: true, from: Some(5_000), ..none });
        let labels = plan(3_000, r#"["error_rate","quality"]"#);
        assert_eq!(
            reads(&[rates.clone(), labels], &[]),
            Reads { decisions: true, labels: true, from: Some(3_000), ..none }
        );
        let pairs = plan(4_000, r#"["disagreement"]"#);
        assert_eq!(
            reads(&[rates, pairs], &[]),
            Reads { decisions: true, comparisons: true, from: Some(4_000), ..none }
        );
        let probation = deployment(
            r#"{"version":3,"strategy":"blue_green","control":"a","candidate":"b","active":"candidate","quality":{},
                "probation":{"started_at":1000,"duration_ms":60000}}"#,
        );
        assert_eq!(
            reads(&[], &[probation]),
            Reads { labels: true, from: Some(1_000), ..none },
            "a probation judges labels only"
        );
    }
}
