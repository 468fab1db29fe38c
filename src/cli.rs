//! The command line: one `switchyard` binary with a subcommand per job.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::codec::Codec;
use crate::config::Config;
use crate::control::{ops, watcher};
use crate::error::{Error, Result};
use crate::record::deployment::Candidate;
use crate::record::plan::{Loss, Plan, PlanState};
use crate::record::{DeploymentSpec, Rule, Side, Strategy};
use crate::service::{self, Roles};
use crate::shutdown::{self, ShutdownTrigger};
use crate::tools::{demo_model::DemoModel, labeller::Labeller, loadgen::Loadgen, watch::Watch};
use crate::{clock, kafka, rollout};

#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about = "Shadow, canary and blue/green rollouts of ML models on Kafka")]
pub struct Cli {
    /// Kafka bootstrap servers (overrides the config file and SWITCHYARD_BOOTSTRAP_SERVERS).
    #[arg(long, global = true)]
    pub bootstrap_servers: Option<String>,
    /// A TOML file layered over the built-in defaults (config/switchyard.toml).
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: route and merge (or one of them).
    Run {
        #[arg(long, value_enum, default_value_t = Roles::All)]
        only: Roles,
        /// Address for /metrics, /healthz and /readyz.
        #[arg(long)]
        metrics_address: Option<String>,
        /// This instance's stable, unique name (names its transactional ids; default: the host name).
        #[arg(long)]
        instance_id: Option<String>,
    },
    /// Write a validated deployment record with the next version.
    Deploy(Box<DeployArgs>),
    /// Show deployments in force, their split, rejected records, and each plan's step and guards.
    Status { deployment: Option<String> },
    /// Make the candidate serve (blue/green: switch; otherwise: candidate becomes control). Ends a plan.
    Promote {
        deployment: String,
        #[arg(long)]
        reason: Option<String>,
        /// A/B/n: the candidate that becomes control (the others stop serving).
        #[arg(long, value_name = "MODEL", conflicts_with = "probation_ms")]
        candidate: Option<String>,
        /// Blue/green: keep the old side warm for this many ms after the switch, and switch back if the
        /// new side's answers score worse on the same labelled requests (needs the `quality` spec).
        #[arg(long, value_name = "MS")]
        probation_ms: Option<u64>,
        /// The probation's guard: '{"loss":"zero_one","margin":0.0,"tau":0.02}' (these are the defaults).
        #[arg(long, value_name = "JSON", requires = "probation_ms")]
        probation_guard: Option<String>,
    },
    /// Send traffic back to control. Ends a plan.
    Rollback {
        deployment: String,
        #[arg(long)]
        reason: Option<String>,
        /// A/B/n: cut only this candidate — its users go back to control, the others keep theirs and a
        /// running plan's step starts again for them.
        #[arg(long, value_name = "MODEL")]
        candidate: Option<String>,
    },
    /// Hold a running rollout plan at its step (the split stays).
    Pause {
        deployment: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Continue a paused rollout plan: its step starts again with fresh evidence.
    Resume {
        deployment: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Every change of a deployment (or of all), accepted or rejected: by whom, why, with the evidence.
    History { deployment: Option<String> },
    /// Estimate what another split would have given, from the decisions of the last `--minutes` and
    /// their scored labels: failure rate and loss under `--candidate-percent` (A/B/n: `--share`), doubly
    /// robust and inverse propensity, with 95% intervals.
    Evaluate {
        deployment: String,
        /// The split to evaluate: the candidate's share of users, 0–100.
        #[arg(long, value_parser = parse_percent, required_unless_present = "share", conflicts_with = "share")]
        candidate_percent: Option<f64>,
        /// A/B/n: MODEL=PERCENT, a candidate's share in the split to evaluate (repeat; control gets the
        /// rest, a candidate not named none).
        #[arg(long, value_parser = parse_share_of)]
        share: Vec<(String, f64)>,
        /// How far back to read decisions.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        /// The loss of scored answers: zero_one, brier, log_loss (classification), absolute, squared
        /// (regression).
        #[arg(long, value_parser = parse_json_enum::<Loss>, default_value = "zero_one")]
        loss: Loss,
    },
    /// Delete a deployment (tombstone).
    Delete { deployment: String },
    /// Create the service's topics.
    CreateTopics,
    /// A stand-in model worker.
    DemoModel {
        #[arg(long, value_parser = parse_model_name)]
        model: String,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Share of requests answered with an error, 0..1.
        #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
        error_rate: f64,
        /// Percentage of payloads on which this model's answer departs from the common one.
        #[arg(long, default_value_t = 10.0, value_parser = parse_percent)]
        disagree_percent: f64,
        /// Answer probabilities that are right (against the labeller's truth) on this share, 0..1.
        #[arg(long, value_parser = parse_share)]
        accuracy: Option<f64>,
    },
    /// The demo's source of truth: writes each request's outcome label after a delay.
    Labeller {
        /// How long after a request was sent its label is written.
        #[arg(long, default_value_t = 2000)]
        delay_ms: u64,
        /// Share of requests that get a label, 0..1.
        #[arg(long, default_value_t = 1.0, value_parser = parse_share)]
        coverage: f64,
        /// A deployment whose requests get a label only when it is positive (labels by absence: pair
        /// with its quality spec's maturity_ms and default_label). Repeatable.
        #[arg(long = "positives-only", value_name = "DEPLOYMENT")]
        positives_only: Vec<String>,
    },
    /// Produce Avro requests.
    Loadgen {
        #[arg(long)]
        deployment: String,
        /// Requests per second.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
        rate: u64,
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Number of distinct users.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
        users: u64,
        /// Prefix of the request ids (random if omitted).
        #[arg(long, default_value = "")]
        run_id: String,
    },
    /// Live view of decisions: split by model, cohort and status, and a sample.
    Watch {
        #[arg(long)]
        deployment: Option<String>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Print every Nth decision.
        #[arg(long, default_value_t = 0)]
        sample: u64,
        #[arg(long)]
        from_beginning: bool,
    },
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    pub deployment: String,
    #[arg(long, value_parser = parse_strategy)]
    pub strategy: Strategy,
    #[arg(long)]
    pub control: String,
    /// The new model; repeat for an A/B/n canary, where each candidate serves --canary-percent of users
    /// (or the plan's step share) in buckets of its own.
    #[arg(long)]
    pub candidate: Vec<String>,
    #[arg(long, default_value_t = 0.0)]
    pub canary_percent: f64,
    #[arg(long, default_value_t = 100.0)]
    pub shadow_percent: f64,
    #[arg(long, value_parser = parse_side, default_value = "control")]
    pub active: Side,
    /// A model that gets shadow copies (repeat for several).
    #[arg(long)]
    pub mirror: Vec<String>,
    #[arg(long)]
    pub salt: Option<String>,
    #[arg(long, default_value_t = crate::record::deployment::DEFAULT_TIMEOUT_MS)]
    pub timeout_ms: u64,
    /// Answer served (status FALLBACK) when the serving model misses the deadline.
    #[arg(long)]
    pub fallback: Option<String>,
    /// A safe canary: requests the candidate serves also go to control, whose answer is served (status
    /// HEDGED) when the candidate errs or misses the deadline.
    #[arg(long)]
    pub hedge: bool,
    /// USER=control|candidate (repeat for several).
    #[arg(long = "override", value_parser = parse_override)]
    pub overrides: Vec<(String, Side)>,
    /// ATTRIBUTE=VALUE[,VALUE...]:control|candidate — requests with that attribute value go to that side,
    /// before the cohort hash (canary, blue/green; repeat for several, first match wins).
    #[arg(long = "rule", value_parser = parse_rule)]
    pub rules: Vec<Rule>,
    /// Score answers against outcome labels: JSON, e.g. '{}' (binary classification, the output is the
    /// probability as text, threshold 0.5) or '{"task":"regression","score":{"json_field":"eta"}}'.
    #[arg(long)]
    pub quality: Option<String>,
    /// A rollout plan (canary): a JSON file, or the JSON itself, e.g.
    /// '{"steps":[{"canary_percent":1,"bake_ms":60000,"min_sample":500,"max_ms":3600000}, ...]}'.
    /// The canary starts at the first step's share; the controller does the rest.
    #[arg(long)]
    pub plan: Option<String>,
    /// Why (shown by `history`).
    #[arg(long)]
    pub reason: Option<String>,
}

fn parse_json_enum<T: serde::de::DeserializeOwned>(s: &str) -> std::result::Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|e| e.to_string())
}

fn parse_share(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&x) { Ok(x) } else { Err(format!("{x} is not a share between 0 and 1")) }
}

fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=100.0).contains(&x) { Ok(x) } else { Err(format!("{x} is not a percentage between 0 and 100")) }
}

fn parse_share_of(s: &str) -> std::result::Result<(String, f64), String> {
    let (model, percent) = s.split_once('=').ok_or("expected MODEL=PERCENT")?;
    Ok((parse_model_name(model)?, parse_percent(percent)?))
}

/// The split `evaluate` judges: a two-arm canary's candidate share, or A/B/n candidates' shares with
/// control taking the rest.
fn evaluation_split(candidate_percent: Option<f64>, shares: &[(String, f64)]) -> Result<Vec<(String, f64)>> {
    if let Some(percent) = candidate_percent {
        return Ok(rollout::offline::two_arm(percent / 100.0));
    }
    let total: f64 = shares.iter().map(|(_, p)| p).sum();
    if total > 100.0 + 1e-9 {
        return Err(Error::Usage(format!("--share: the candidates' shares add up to {total}%, above 100%")));
    }
    let mut split: Vec<(String, f64)> = shares.iter().map(|(m, p)| (format!("candidate:{m}"), p / 100.0)).collect();
    split.push(("control".to_string(), 1.0 - total / 100.0));
    Ok(split)
}

fn parse_model_name(s: &str) -> std::result::Result<String, String> {
    if crate::record::deployment::is_valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!("model name {s:?} must be 1-200 characters of [A-Za-z0-9._-]"))
    }
}

fn parse_strategy(s: &str) -> std::result::Result<Strategy, String> {
    parse_json_enum(s)
}

fn parse_side(s: &str) -> std::result::Result<Side, String> {
    parse_json_enum(s)
}

fn parse_rule(s: &str) -> std::result::Result<Rule, String> {
    let (matching, side) = s.rsplit_once(':').ok_or("expected ATTRIBUTE=VALUE[,VALUE...]:control|candidate")?;
    let (attribute, values) =
        matching.split_once('=').ok_or("expected ATTRIBUTE=VALUE[,VALUE...]:control|candidate")?;
    Ok(Rule {
        attribute: attribute.to_string(),
        values: values.split(',').map(str::to_string).collect(),
        side: parse_side(side)?,
    })
}

fn parse_override(s: &str) -> std::result::Result<(String, Side), String> {
    let (user, side) = s.split_once('=').ok_or("expected USER=control|candidate")?;
    Ok((user.to_string(), parse_side(side)?))
}

/// A plan from `--plan`: a file, or JSON when it starts with `{`; it starts at its first step now.
fn parse_plan(text: &str) -> Result<Plan> {
    let json = if text.trim_start().starts_with('{') {
        text.to_string()
    } else {
        std::fs::read_to_string(text)
            .map_err(|source| Error::Io { context: format!("cannot read the plan file {text:?}"), source })?
    };
    let mut plan: Plan = serde_json::from_str(&json).map_err(|e| Error::Usage(format!("--plan: {e}")))?;
    plan.step = 0;
    plan.step_started_at = clock::now_millis();
    plan.state = PlanState::Running;
    plan.validate().map_err(|e| Error::Usage(format!("--plan: {e}")))?;
    Ok(plan)
}

impl DeployArgs {
    /// The record these arguments describe (version 0: the next one is set when it is written).
    fn spec(&self) -> Result<DeploymentSpec> {
        let plan = self.plan.as_deref().map(parse_plan).transpose()?;
        let quality = self
            .quality
            .as_deref()
            .map(|q| serde_json::from_str(q).map_err(|e| Error::Usage(format!("--quality: {e}"))))
            .transpose()?;
        let canary_percent = plan.as_ref().map_or(self.canary_percent, |p| p.current().canary_percent);
        let reason = self.reason.clone().unwrap_or_else(|| match &plan {
            Some(p) => format!("deploy with a plan of {} steps", p.steps.len()),
            None => "deploy".to_string(),
        });
        // One candidate: the two-arm record; several: each its share, in list order (arms::layout).
        let (candidate, candidates, canary_percent) = match self.candidate.as_slice() {
            [] => (None, Vec::new(), canary_percent),
            [one] => (Some(one.clone()), Vec::new(), canary_percent),
            several => (
                None,
                several
                    .iter()
                    .map(|model| Candidate { model: model.clone(), percent: canary_percent, buckets: Vec::new() })
                    .collect(),
                0.0,
            ),
        };
        Ok(DeploymentSpec {
            probation: None,
            version: 0,
            strategy: self.strategy,
            control: self.control.clone(),
            candidate,
            candidates,
            canary_percent,
            shadow_percent: self.shadow_percent,
            active: self.active,
            mirror: self.mirror.clone(),
            salt: self.salt.clone(),
            timeout_ms: self.timeout_ms,
            fallback: self.fallback.clone(),
            hedge: self.hedge,
            overrides: self.overrides.iter().cloned().collect(),
            rules: self.rules.clone(),
            quality,
            plan,
            change: Some(ops::operator_change(reason)),
        })
    }
}

async fn moved(config: &Config, name: &str, what: ops::Move, reason: Option<String>) -> Result<()> {
    let d = ops::apply_move(config, name, what, reason).await?;
    println!("{} version {} written: {}", d.name, d.version(), ops::describe_split(&d));
    Ok(())
}

/// The configuration of this invocation: the flags join the one loader as its last layer.
fn load_config(cli: &Cli) -> Result<Config> {
    let mut flags = Vec::new();
    if let Some(servers) = &cli.bootstrap_servers {
        flags.push(("SWITCHYARD_BOOTSTRAP_SERVERS".to_string(), servers.clone()));
    }
    if let Command::Run { metrics_address, instance_id, .. } = &cli.command {
        if let Some(address) = metrics_address {
            flags.push(("SWITCHYARD__SERVICE__METRICS_ADDRESS".to_string(), quoted(address)));
        }
        if let Some(id) = instance_id {
            flags.push(("SWITCHYARD__SERVICE__INSTANCE_ID".to_string(), quoted(id)));
        }
    }
    Ok(Config::load(cli.config.as_deref(), std::env::vars().chain(flags))?)
}

/// A TOML string literal: an id like `123` stays a string.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// Runs one command to completion.
impl Command {
    /// Commands that talk to Kafka: they check first that it answers, to say so clearly if not.
    fn needs_kafka(&self) -> bool {
        !matches!(
            self,
            Command::Run { .. }
                | Command::DemoModel { .. }
                | Command::Labeller { .. }
                | Command::Loadgen { .. }
                | Command::Watch { .. }
        )
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    let config = load_config(&cli)?;
    let codec = config.codec()?;
    let (trigger, shutdown) = ShutdownTrigger::new();
    if let Command::Deploy(args) = &cli.command {
        // A record that can never be valid is refused before Kafka is asked anything (with the broker
        // away, the user would hear only that it cannot be reached).
        DeploymentSpec { version: 1, ..args.spec()? }.validate(&args.deployment)?;
    }
    if cli.command.needs_kafka() {
        kafka::check_reachable(&config).await?;
    }
    match cli.command {
        Command::Run { only, .. } => {
            shutdown::on_signals(trigger.clone());
            service::run(config, only, trigger, shutdown).await
        }
        Command::Deploy(args) => {
            let name = args.deployment.clone();
            let d = ops::deploy(&config, &name, args.spec()?).await?;
            println!("{} version {} written: {}", d.name, d.version(), ops::describe_split(&d));
            Ok(())
        }
        Command::Status { deployment } => status(&config, &codec, deployment.as_deref()).await,
        Command::Promote { deployment, reason, candidate, probation_ms, probation_guard } => {
            let what = match probation_ms {
                None => ops::Move::Promote(candidate),
                Some(ms) => {
                    let guard = match probation_guard {
                        Some(json) => {
                            serde_json::from_str(&json).map_err(|e| Error::Usage(format!("--probation-guard: {e}")))?
                        }
                        None => Default::default(),
                    };
                    ops::Move::PromoteOnProbation(ms, guard)
                }
            };
            moved(&config, &deployment, what, reason).await
        }
        Command::Rollback { deployment, reason, candidate: None } => {
            moved(&config, &deployment, ops::Move::Rollback, reason).await
        }
        Command::Rollback { deployment, reason, candidate: Some(model) } => {
            moved(&config, &deployment, ops::Move::Cut(model), reason).await
        }
        Command::Pause { deployment, reason } => moved(&config, &deployment, ops::Move::Pause, reason).await,
        Command::Resume { deployment, reason } => moved(&config, &deployment, ops::Move::Resume, reason).await,
        Command::History { deployment } => {
            let entries = rollout::report::read_history(&config, deployment.as_deref()).await?;
            print!("{}", rollout::report::render_history(&entries));
            Ok(())
        }
        Command::Evaluate { deployment, candidate_percent, share, minutes, loss } => {
            let since = clock::now_millis() - (minutes * 60_000) as i64;
            let split = evaluation_split(candidate_percent, &share)?;
            let text = rollout::report::evaluate(&config, &codec, &deployment, &split, since, loss).await?;
            print!("{text}");
            Ok(())
        }
        Command::Delete { deployment } => {
            ops::delete(&config, &deployment).await?;
            println!("{deployment} deleted");
            Ok(())
        }
        Command::CreateTopics => service::ensure_core_topics(&config).await,
        Command::DemoModel { model, latency_ms, error_rate, disagree_percent, accuracy } => {
            shutdown::on_signals(trigger);
            let worker =
                DemoModel { model, latency: Duration::from_millis(latency_ms), error_rate, disagree_percent, accuracy };
            worker.run(config, codec, shutdown).await
        }
        Command::Labeller { delay_ms, coverage, positives_only } => {
            shutdown::on_signals(trigger);
            let labeller = Labeller { delay: Duration::from_millis(delay_ms), coverage, positives_only };
            labeller.run(config, codec, shutdown).await
        }
        Command::Loadgen { deployment, rate, count, users, run_id } => {
            shutdown::on_signals(trigger);
            let report = Loadgen { deployment, rate, count, users, run_id }.run(config, codec, shutdown).await?;
            println!(
                "sent {} requests in {:.2}s ({:.0}/s)",
                report.sent,
                report.elapsed.as_secs_f64(),
                report.sent as f64 / report.elapsed.as_secs_f64().max(1e-9)
            );
            Ok(())
        }
        Command::Watch { deployment, seconds, sample, from_beginning } => {
            shutdown::on_signals(trigger);
            Watch { deployment, duration: Duration::from_secs(seconds), sample, from_beginning }
                .run(config, codec, shutdown)
                .await?;
            Ok(())
        }
    }
}

/// `switchyard status [NAME]`: the deployments in force, each plan's, probation's and quality's
/// figures, and the instance leading the controller.
async fn status(config: &Config, codec: &Codec, deployment: Option<&str>) -> Result<()> {
    let registry = watcher::snapshot(config).await?;
    let mut details = BTreeMap::new();
    for d in registry.deployments().filter(|d| deployment.is_none_or(|name| d.name == name)) {
        let mut detail = rollout::report::plan_status(config, codec, d).await?;
        detail.push_str(&rollout::report::probation_status(config, codec, d).await?);
        detail.push_str(&rollout::report::quality_status(config, codec, d).await?);
        details.insert(d.name.clone(), detail);
    }
    // One write: a reader that stops early (`status | grep -q`) must not make a second one fail.
    let mut out = ops::render_status(&registry, deployment, &details)?;
    out.push_str(&rollout::report::controller_status(config));
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluate_takes_a_candidate_share_or_each_ab_n_candidates_share() {
        let two = evaluation_split(Some(30.0), &[]).unwrap();
        assert_eq!(two, [("control".to_string(), 0.7), ("candidate".to_string(), 0.3)]);
        let shares = [parse_share_of("v2=50").unwrap(), parse_share_of("v3=12.5").unwrap()];
        let abn = evaluation_split(None, &shares).unwrap();
        assert_eq!(
            abn,
            [("candidate:v2".to_string(), 0.5), ("candidate:v3".to_string(), 0.125), ("control".to_string(), 0.375)]
        );
        assert!(evaluation_split(None, &[("a".into(), 60.0), ("b".into(), 50.0)]).is_err());
        assert!(parse_share_of("v2").is_err() && parse_share_of("v 2=5").is_err() && parse_share_of("v2=101").is_err());
    }
}
