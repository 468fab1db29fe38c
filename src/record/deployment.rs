//! The deployment record: what operators write to the compacted deployments topic, and its validation.
//!
//! A [`DeploymentSpec`] is the JSON as written; [`Deployment`] is a validated spec with its defaults
//! resolved. Only a `Deployment` reaches the router, so routing never has to re-check anything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::figures::Figures;
use super::plan::{InvalidPlan, Plan};
use super::probation::{InvalidProbation, Probation};
use super::quality::QualitySpec;

/// Number of cohort buckets; a percentage with two decimals maps onto it exactly (`p * 100`). The
/// cohort hash (`cohort::hash`) spreads users over these buckets.
pub const BUCKETS: u32 = 10_000;

/// Buckets below this threshold are inside a share of `percent` (0..=100, two decimals).
pub fn threshold(percent: f64) -> u16 {
    (percent * 100.0).round().clamp(0.0, f64::from(BUCKETS)) as u16
}

/// Longest model name accepted; model names become part of Kafka topic names (max 249 characters).
const MAX_MODEL_NAME: usize = 200;
/// Upper bound on `timeout_ms`: a request held longer than this is a configuration mistake.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// Deadline used when a record does not set `timeout_ms`.
pub const DEFAULT_TIMEOUT_MS: u64 = 1_000;

/// How a deployment chooses the serving model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Control only.
    Single,
    /// Control serves everyone; the candidate gets copies.
    Shadow,
    /// A sticky share of users is served by the candidate.
    Canary,
    /// Everyone is served by the `active` side.
    BlueGreen,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Single => "single",
            Strategy::Shadow => "shadow",
            Strategy::Canary => "canary",
            Strategy::BlueGreen => "blue_green",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of the two sides of a deployment: also the cohort name carried by decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    #[default]
    Control,
    Candidate,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Control => "control",
            Side::Candidate => "candidate",
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_shadow_percent() -> f64 {
    100.0
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

/// The deployment record exactly as it travels on the deployments topic (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Monotonic version; a record not above the version in force is ignored.
    pub version: u64,
    pub strategy: Strategy,
    /// The current model; always required.
    pub control: String,
    /// The new model; required by every strategy but `single`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    /// Canary: share of users served by the candidate, 0–100 in steps of 0.01.
    #[serde(default)]
    pub canary_percent: f64,
    /// Canary with several candidates (A/B/n), instead of `candidate` and `canary_percent`: each with
    /// its share and the buckets it owns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
    /// Shadow and mirror: share of users whose requests are copied.
    #[serde(default = "default_shadow_percent")]
    pub shadow_percent: f64,
    /// Blue/green: which side serves everyone.
    #[serde(default)]
    pub active: Side,
    /// Extra models that get shadow copies under any strategy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirror: Vec<String>,
    /// Cohort salt; defaults to the deployment name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// Deadline for the serving model's prediction.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Served (status FALLBACK) when the serving model does not answer by the deadline; without it
    /// such a request gets a TIMEOUT decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Canary only, a safe canary: each request the candidate serves is also sent to control, and when
    /// the candidate errs or misses the deadline the user gets control's answer (status HEDGED). The
    /// guards still count the candidate's failure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hedge: bool,
    /// Users forced to one side (canary and blue/green).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, Side>,
    /// Attribute rules, tried in order before the cohort hash (canary and blue/green); an override
    /// wins over them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// How outputs are scored against outcome labels (default: binary classification, the output is
    /// the probability as plain text, threshold 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<QualitySpec>,
    /// A rollout plan the controller drives (canary only). A record without one has none: an
    /// operator's own change ends a plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    /// Blue/green, after the switch to the candidate: for a while the control side keeps a copy of
    /// every request in the shadow sample and a paired quality guard may switch back (see
    /// `rollout::probation`). `promote --probation` sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probation: Option<Probation>,
    /// Who wrote this version and why; `history` shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
}

/// Routes a request by one of its attributes, before the cohort hash: a request whose `attribute` has
/// one of `values` goes to `side`. Its decision's cohort says so (`candidate:rule:<attribute>`), and
/// rollout guards leave it out (it was not randomised).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub attribute: String,
    pub values: Vec<String>,
    pub side: Side,
}

/// One arm of an A/B/n canary: a candidate model, its share, and the cohort buckets it owns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    pub model: String,
    /// Share of users it serves, 0–100 in steps of 0.01.
    pub percent: f64,
    /// The buckets it owns, as `[start, end)` ranges whose widths add up to `percent × 100`. Empty: laid
    /// out in list order from bucket 0 (each arm after the ones before it). switchyard's own moves
    /// (`arms::reassign`) always write them, so that a share that grows keeps its users in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<[u16; 2]>,
}

/// Most candidates an A/B/n canary may have.
pub const MAX_CANDIDATES: usize = 20;

/// Most attribute rules a deployment may have.
pub const MAX_RULES: usize = 100;

/// Who made a change, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// `operator` (`operator:<user>` from the CLI), `plan`, or `guard:<name>`.
    pub actor: String,
    pub reason: String,
    /// The controller's evidence: its step's users and guard statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub figures: Option<Figures>,
    /// An A/B/n plan's evidence instead: each candidate's figures against control.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arms: Vec<Figures>,
}

/// A validated deployment, ready for routing.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    pub name: String,
    pub spec: DeploymentSpec,
    /// `spec.salt`, or the deployment name.
    pub salt: String,
    /// Candidate buckets: `bucket < canary_threshold` serves the candidate. A/B/n: the candidates'
    /// buckets together.
    pub canary_threshold: u16,
    /// A/B/n: the buckets of each of `spec.candidates`, in list order (see `arms`); empty otherwise.
    pub arms: Vec<super::arms::Ranges>,
    /// Shadow-sampling buckets: `shadow_bucket < shadow_threshold` gets copies.
    pub shadow_threshold: u16,
}

impl Deployment {
    pub fn version(&self) -> u64 {
        self.spec.version
    }

    pub fn strategy(&self) -> Strategy {
        self.spec.strategy
    }

    /// The model that serves `side`; `single` and a missing candidate fall back to control.
    pub fn model_for(&self, side: Side) -> &str {
        match (side, &self.spec.candidate) {
            (Side::Candidate, Some(candidate)) => candidate,
            _ => &self.spec.control,
        }
    }

    /// The share of users the candidate serves, in percent (overrides and rules aside): the canary's
    /// share, 100 for blue/green with the candidate active, else 0.
    pub fn candidate_percent(&self) -> f64 {
        match self.spec.strategy {
            Strategy::Canary => f64::from(self.canary_threshold) / 100.0,
            Strategy::BlueGreen if self.spec.active == Side::Candidate => 100.0,
            _ => 0.0,
        }
    }

    /// Every model this deployment can send requests to (control, candidates, mirrors).
    pub fn models(&self) -> Vec<&str> {
        let mut models = vec![self.spec.control.as_str()];
        models.extend(self.spec.candidate.as_deref());
        models.extend(self.spec.candidates.iter().map(|c| c.model.as_str()));
        models.extend(self.spec.mirror.iter().map(String::as_str));
        models
    }
}

/// Why a deployment record was not put in force.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidDeployment {
    #[error("value is not valid JSON for a deployment record: {0}")]
    Json(String),
    #[error("deployment name {0:?} is invalid: use 1-200 characters of [A-Za-z0-9._-]")]
    Name(String),
    #[error("version must be at least 1")]
    ZeroVersion,
    #[error("version {got} is not greater than the version in force ({current})")]
    StaleVersion { got: u64, current: u64 },
    #[error("{field} {name:?} is not a valid model name: use 1-200 characters of [A-Za-z0-9._-]")]
    ModelName { field: &'static str, name: String },
    #[error("candidates (A/B/n): {0}")]
    Candidates(String),
    #[error("strategy {0} needs a candidate model")]
    MissingCandidate(Strategy),
    #[error("strategy single takes no candidate (got {0:?}); use shadow, canary or blue_green")]
    UnexpectedCandidate(String),
    #[error("candidate must differ from control ({0:?})")]
    CandidateIsControl(String),
    #[error("mirror model {0:?} is listed twice or is also control/candidate")]
    DuplicateMirror(String),
    #[error("{field} must be between 0 and 100 in steps of 0.01, got {value}")]
    Percent { field: &'static str, value: f64 },
    #[error("timeout_ms must be between 1 and {MAX_TIMEOUT_MS}, got {0}")]
    Timeout(u64),
    #[error("override for an empty user id")]
    EmptyOverride,
    #[error("fallback is {0} bytes; at most {MAX_FALLBACK_BYTES} (it is carried in routing records and decisions)")]
    Fallback(usize),
    #[error("rules: at most {MAX_RULES}, each with an attribute name and at least one value (rule {0})")]
    Rule(usize),
    #[error("{0}")]
    Quality(String),
    #[error("hedge makes a safe canary: strategy must be canary, not {0}")]
    HedgeStrategy(Strategy),
    #[error("a plan drives a canary: strategy must be canary, not {0}")]
    PlanStrategy(Strategy),
    #[error("plan: {0}")]
    Plan(#[from] InvalidPlan),
    #[error("canary_percent {got} is not the share of the plan's current step {step} ({want})")]
    PlanShare { got: f64, step: usize, want: f64 },
    #[error("canary_percent {got} is outside the bandit's bounds ({floor} to {ceiling})")]
    BanditShare { got: f64, floor: f64, ceiling: f64 },
    #[error("{0}")]
    Probation(#[from] InvalidProbation),
}

/// Largest fallback answer: it travels in every routing record of the deployment and in each decision
/// that serves it, which must stay far below the record limit.
pub const MAX_FALLBACK_BYTES: usize = 65_536;

/// Kafka topic names allow `[A-Za-z0-9._-]`; model and deployment names share that rule so every
/// per-model topic name is legal.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MODEL_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_percent(field: &'static str, value: f64) -> Result<u16, InvalidDeployment> {
    let scaled = value * 100.0;
    if !(0.0..=100.0).contains(&value) || (scaled - scaled.round()).abs() > 1e-6 {
        return Err(InvalidDeployment::Percent { field, value });
    }
    Ok(threshold(value))
}

fn check_model(field: &'static str, name: &str) -> Result<(), InvalidDeployment> {
    if is_valid_name(name) { Ok(()) } else { Err(InvalidDeployment::ModelName { field, name: name.to_string() }) }
}

impl DeploymentSpec {
    /// Parses the JSON value of a deployments-topic record.
    pub fn from_json(bytes: &[u8]) -> Result<Self, InvalidDeployment> {
        serde_json::from_slice(bytes).map_err(|e| {
            let mut message = e.to_string();
            if message.starts_with("unknown field") {
                // A field a newer switchyard knows: records using it need every instance upgraded first.
                message.push_str(&format!(
                    " (switchyard {} does not know it: if a newer version wrote it, upgrade every instance \
                     before writing records that use it)",
                    env!("CARGO_PKG_VERSION")
                ));
            }
            InvalidDeployment::Json(message)
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a deployment spec always serialises")
    }

    /// Checks every rule of the contract except version ordering, which needs the record in force.
    pub fn validate(self, name: &str) -> Result<Deployment, InvalidDeployment> {
        if !is_valid_name(name) {
            return Err(InvalidDeployment::Name(name.to_string()));
        }
        if self.version == 0 {
            return Err(InvalidDeployment::ZeroVersion);
        }
        check_model("control", &self.control)?;
        let arms = self.validate_candidates()?;
        match (&self.candidate, self.strategy) {
            (None, Strategy::Canary) if !self.candidates.is_empty() => {}
            (None, Strategy::Single) => {}
            (Some(candidate), Strategy::Single) => {
                return Err(InvalidDeployment::UnexpectedCandidate(candidate.clone()));
            }
            (None, strategy) => return Err(InvalidDeployment::MissingCandidate(strategy)),
            (Some(candidate), _) => {
                check_model("candidate", candidate)?;
                if *candidate == self.control {
                    return Err(InvalidDeployment::CandidateIsControl(candidate.clone()));
                }
            }
        }
        let mut seen: Vec<&str> = vec![&self.control];
        seen.extend(self.candidate.as_deref());
        seen.extend(self.candidates.iter().map(|c| c.model.as_str()));
        for mirror in &self.mirror {
            check_model("mirror", mirror)?;
            if seen.contains(&mirror.as_str()) {
                return Err(InvalidDeployment::DuplicateMirror(mirror.clone()));
            }
            seen.push(mirror);
        }
        let canary_threshold = if arms.is_empty() {
            check_percent("canary_percent", self.canary_percent)?
        } else {
            arms.iter().flatten().map(|[start, end]| end - start).sum()
        };
        let shadow_threshold = check_percent("shadow_percent", self.shadow_percent)?;
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(InvalidDeployment::Timeout(self.timeout_ms));
        }
        if let Some(fallback) = self.fallback.as_ref().filter(|f| f.len() > MAX_FALLBACK_BYTES) {
            return Err(InvalidDeployment::Fallback(fallback.len()));
        }
        if self.overrides.keys().any(String::is_empty) {
            return Err(InvalidDeployment::EmptyOverride);
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if i >= MAX_RULES || rule.attribute.is_empty() || rule.values.is_empty() {
                return Err(InvalidDeployment::Rule(i + 1));
            }
        }
        if self.hedge && self.strategy != Strategy::Canary {
            return Err(InvalidDeployment::HedgeStrategy(self.strategy));
        }
        if let Some(quality) = &self.quality {
            quality.validate().map_err(InvalidDeployment::Quality)?;
        }
        if let Some(plan) = &self.plan {
            if self.strategy != Strategy::Canary {
                return Err(InvalidDeployment::PlanStrategy(self.strategy));
            }
            plan.validate()?;
            if let Some(bandit) = &plan.bandit {
                // The bandit moves the share within its bounds; the step's share is only where it began.
                let (floor, ceiling) = (bandit.floor_percent, 100.0 - bandit.floor_percent);
                if canary_threshold < threshold(floor) || canary_threshold > threshold(ceiling) {
                    return Err(InvalidDeployment::BanditShare { got: self.canary_percent, floor, ceiling });
                }
            } else if !self.candidates.is_empty() {
                let want = plan.current().canary_percent;
                if let Some(c) = self.candidates.iter().find(|c| threshold(c.percent) != threshold(want)) {
                    return Err(InvalidDeployment::Candidates(format!(
                        "{} serves {}%, not the share of the plan's current step {} ({want}%): a step's share is \
                         each candidate's",
                        c.model,
                        c.percent,
                        plan.step + 1
                    )));
                }
            } else {
                let want = plan.current().canary_percent;
                if threshold(want) != canary_threshold {
                    return Err(InvalidDeployment::PlanShare { got: self.canary_percent, step: plan.step + 1, want });
                }
            }
        }
        if let Some(probation) = &self.probation {
            if self.strategy != Strategy::BlueGreen || self.active != Side::Candidate {
                return Err(InvalidProbation::NotASwitch.into());
            }
            if self.quality.is_none() {
                return Err(InvalidProbation::NoQuality.into());
            }
            probation.validate()?;
        }
        let salt = self.salt.clone().unwrap_or_else(|| name.to_string());
        let mut spec = self;
        if let Some(plan) = spec.plan.as_mut().filter(|_| !arms.is_empty()) {
            // The budget splits α over the candidates the plan started with: later cuts keep the count.
            plan.candidates.get_or_insert(spec.candidates.len());
        }
        Ok(Deployment { name: name.to_string(), spec, salt, canary_threshold, shadow_threshold, arms })
    }

    /// An A/B/n canary's own rules; its arms' buckets (none without candidates).
    fn validate_candidates(&self) -> Result<Vec<super::arms::Ranges>, InvalidDeployment> {
        if self.candidates.is_empty() {
            return Ok(Vec::new());
        }
        let fail = |why: String| Err(InvalidDeployment::Candidates(why));
        if self.strategy != Strategy::Canary {
            return fail(format!(
                "several candidates make an A/B/n canary: strategy must be canary, not {}",
                self.strategy
            ));
        }
        if self.candidate.is_some() || self.canary_percent != 0.0 {
            return fail("they replace candidate and canary_percent: set one or the other".into());
        }
        if self.candidates.len() > MAX_CANDIDATES {
            return fail(format!("at most {MAX_CANDIDATES}, got {}", self.candidates.len()));
        }
        for (i, c) in self.candidates.iter().enumerate() {
            check_model("candidate", &c.model)?;
            if c.model == self.control || self.candidates[..i].iter().any(|o| o.model == c.model) {
                return fail(format!("{:?} is listed twice or is also control", c.model));
            }
            check_percent("candidates' percent", c.percent)?;
        }
        let total: u32 = self.candidates.iter().map(|c| u32::from(threshold(c.percent))).sum();
        if total > BUCKETS {
            return fail(format!("their shares add up to {}%, above 100%", f64::from(total) / 100.0));
        }
        if self.hedge {
            return fail("hedge takes a single candidate".into());
        }
        if self.overrides.values().any(|side| *side != Side::Control)
            || self.rules.iter().any(|r| r.side != Side::Control)
        {
            return fail(
                "overrides and rules may pin users to control only (which candidate would \"candidate\" be?)".into(),
            );
        }
        if let Some(plan) = &self.plan {
            if plan.guards.contains(&super::plan::GuardKind::Disagreement) {
                return fail("the disagreement guard takes a single candidate".into());
            }
            if let Some(bandit) = &plan.bandit {
                // Every arm, control included, keeps its floor (control's is checked with the total).
                let floor = threshold(bandit.floor_percent);
                if u32::from(floor) * (self.candidates.len() as u32 + 1) > BUCKETS {
                    return fail(format!(
                        "a bandit's floor of {}% for each of {} arms is more than 100%",
                        bandit.floor_percent,
                        self.candidates.len() + 1
                    ));
                }
                if let Some(c) = self.candidates.iter().find(|c| threshold(c.percent) < floor) {
                    return fail(format!(
                        "{} serves {}%, below the bandit's floor of {}%",
                        c.model, c.percent, bandit.floor_percent
                    ));
                }
            }
            let widest = plan.steps.iter().map(|s| threshold(s.canary_percent)).max().unwrap_or(0);
            if u32::from(widest) * self.candidates.len() as u32 > BUCKETS {
                return fail(format!(
                    "the plan's widest step gives each of {} candidates {}%: more than 100% together",
                    self.candidates.len(),
                    f64::from(widest) / 100.0
                ));
            }
            if plan.candidates.is_some_and(|k| k < self.candidates.len()) {
                return fail(
                    "plan.candidates counts the candidates the plan started with: not fewer than are left".into(),
                );
            }
        }
        super::arms::layout(&self.candidates).map_err(InvalidDeployment::Candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Deployment, InvalidDeployment> {
        DeploymentSpec::from_json(json.as_bytes())?.validate("fraud")
    }

    #[test]
    fn contract_example_is_valid() {
        let d = parse(
            r#"{"version":3,"strategy":"canary","control":"fraud-v1","candidate":"fraud-v2",
                "canary_percent":10.0,"shadow_percent":100.0,"active":"control","mirror":["fraud-v3"],
                "salt":"fraud","timeout_ms":500,"overrides":{"user-42":"candidate"}}"#,
        )
        .unwrap();
        assert_eq!(d.canary_threshold, 1000);
        assert_eq!(d.shadow_threshold, 10_000);
        assert_eq!(d.models(), vec!["fraud-v1", "fraud-v2", "fraud-v3"]);
        assert_eq!(d.spec.overrides.get("user-42"), Some(&Side::Candidate));
    }

    #[test]
    fn defaults_fill_in() {
        let d = parse(r#"{"version":1,"strategy":"single","control":"m1"}"#).unwrap();
        assert_eq!(d.salt, "fraud");
        assert_eq!(d.spec.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(d.shadow_threshold, 10_000);
        assert_eq!(d.canary_threshold, 0);
        assert_eq!(d.spec.active, Side::Control);
    }

    #[test]
    fn rejects_each_broken_rule() {
        let big_fallback =
            format!(r#"{{"version":1,"strategy":"single","control":"m","fallback":"{}"}}"#, "x".repeat(70_000));
        let cases = [
            (r#"{"version":1,"strategy":"single""#, "not valid JSON"),
            (r#"{"version":1,"strategy":"single","control":"m","colour":"red"}"#, "unknown field"),
            (r#"{"version":1,"strategy":"single","control":"m","colour":"red"}"#, "upgrade every instance"),
            (r#"{"version":1,"strategy":"rainbow","control":"m"}"#, "unknown variant"),
            (r#"{"version":0,"strategy":"single","control":"m"}"#, "at least 1"),
            (r#"{"version":1,"strategy":"canary","control":"m"}"#, "needs a candidate"),
            (r#"{"version":1,"strategy":"single","control":"m","candidate":"n"}"#, "takes no candidate"),
            (r#"{"version":1,"strategy":"canary","control":"m","candidate":"m"}"#, "must differ"),
            (r#"{"version":1,"strategy":"single","control":"a b"}"#, "not a valid model name"),
            (r#"{"version":1,"strategy":"single","control":""}"#, "not a valid model name"),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidate":"n","canary_percent":100.5}"#,
                "between 0 and 100",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidate":"n","canary_percent":-1}"#,
                "between 0 and 100",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidate":"n","canary_percent":10.005}"#,
                "steps of 0.01",
            ),
            (
                r#"{"version":1,"strategy":"shadow","control":"m","candidate":"n","shadow_percent":101}"#,
                "shadow_percent",
            ),
            (r#"{"version":1,"strategy":"single","control":"m","mirror":["m"]}"#, "listed twice"),
            (r#"{"version":1,"strategy":"single","control":"m","mirror":["x","x"]}"#, "listed twice"),
            (r#"{"version":1,"strategy":"single","control":"m","timeout_ms":0}"#, "timeout_ms"),
            (r#"{"version":1,"strategy":"single","control":"m","overrides":{"":"control"}}"#, "empty user"),
            (&big_fallback, "at most 65536"),
            (r#"{"version":1,"strategy":"single","control":"m","overrides":{"u":"blue"}}"#, "unknown variant"),
            (r#"{"version":1,"strategy":"blue_green","control":"m","candidate":"n","hedge":true}"#, "hedge makes"),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidate":"n","canary_percent":5,"plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":1}],"step_started_at":1,"bandit":{}}}"#,
                "not the sample_ratio guard",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidate":"n","canary_percent":2,"plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":1}],"step_started_at":1,"guards":["error_rate"],"bandit":{}}}"#,
                "outside the bandit's bounds (5 to 95)",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidate":"n","canary_percent":5,"plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":1}],"step_started_at":1,"guards":["error_rate"],"bandit":{"reward":"quality"}}}"#,
                "reward quality needs the quality guard",
            ),
            (
                r#"{"version":1,"strategy":"shadow","control":"m","candidate":"n","plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":1}],"step_started_at":1}}"#,
                "strategy must be canary",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidate":"n","canary_percent":10,"plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":1}],"step_started_at":1}}"#,
                "not the share of the plan's current step 1 (5)",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidate":"n","canary_percent":5,"plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":1}]}}"#,
                "plan: step_started_at is required",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidate":"n","change":{"actor":"x"}}"#,
                "missing field `reason`",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidate":"n","rules":[{"attribute":"c","values":[],"side":"candidate"}]}"#,
                "rules: at most 100",
            ),
            (r#"{"version":1,"strategy":"single","control":"m","quality":{"threshold":1.5}}"#, "quality.threshold"),
            (r#"{"version":1,"strategy":"single","control":"m","quality":{"task":"ranking"}}"#, "unknown variant"),
            (
                r#"{"version":1,"strategy":"shadow","control":"m","candidates":[{"model":"a","percent":1}]}"#,
                "strategy must be canary",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidate":"n","candidates":[{"model":"a","percent":1}]}"#,
                "replace candidate and canary_percent",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidates":[{"model":"a","percent":1},{"model":"a","percent":1}]}"#,
                "listed twice",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidates":[{"model":"m","percent":1}]}"#,
                "also control",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidates":[{"model":"a","percent":60},{"model":"b","percent":50}]}"#,
                "add up to 110%",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidates":[{"model":"a","percent":1}],"overrides":{"u":"candidate"}}"#,
                "pin users to control only",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidates":[{"model":"a","percent":1}],"hedge":true}"#,
                "hedge takes a single candidate",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidates":[{"model":"a","percent":1,"buckets":[[0,50]]}]}"#,
                "hold 50 of 10000",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidates":[{"model":"a","percent":5},{"model":"b","percent":6}],"plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":1}],"step_started_at":1}}"#,
                "b serves 6%, not the share of the plan's current step 1 (5%)",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidates":[{"model":"a","percent":5},{"model":"b","percent":5}],"plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":1},{"canary_percent":60,"bake_ms":0,"min_sample":1,"max_ms":1}],"step_started_at":1}}"#,
                "widest step gives each of 2 candidates 60%",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidates":[{"model":"a","percent":5},{"model":"b","percent":5}],"plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":1}],"guards":["disagreement"],"step_started_at":1}}"#,
                "the disagreement guard takes a single candidate",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidates":[{"model":"a","percent":5},{"model":"b","percent":4}],"plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":1}],"guards":["error_rate"],"step_started_at":1,"bandit":{}}}"#,
                "b serves 4%, below the bandit's floor of 5%",
            ),
            (
                r#"{"version":1,"strategy":"canary","control":"m","candidates":[{"model":"a","percent":30},{"model":"b","percent":30}],"plan":{"steps":[{"canary_percent":5,"bake_ms":0,"min_sample":1,"max_ms":1}],"guards":["error_rate"],"step_started_at":1,"bandit":{"floor_percent":40}}}"#,
                "floor of 40% for each of 3 arms",
            ),
        ];
        for (json, reason) in cases {
            let err = parse(json).expect_err(json).to_string();
            assert!(err.contains(reason), "{json}: {err:?} lacks {reason:?}");
        }
    }

    #[test]
    fn rejects_bad_deployment_names() {
        let spec = DeploymentSpec::from_json(br#"{"version":1,"strategy":"single","control":"m"}"#).unwrap();
        assert!(matches!(spec.clone().validate("has space"), Err(InvalidDeployment::Name(_))));
        assert!(matches!(spec.validate(""), Err(InvalidDeployment::Name(_))));
    }

    #[test]
    fn thresholds_map_two_decimals_exactly() {
        assert_eq!(threshold(0.0), 0);
        assert_eq!(threshold(0.01), 1);
        assert_eq!(threshold(10.0), 1000);
        assert_eq!(threshold(33.33), 3333);
        assert_eq!(threshold(100.0), 10_000);
    }

    #[test]
    fn json_round_trip_keeps_meaning() {
        let d = parse(r#"{"version":7,"strategy":"blue_green","control":"a","candidate":"b","active":"candidate"}"#)
            .unwrap();
        let again = DeploymentSpec::from_json(d.spec.to_json().as_bytes()).unwrap();
        assert_eq!(again, d.spec);
    }

    /// The record's JSON is a contract with every instance and every tool that writes it: each field of
    /// each part (plan, probation, quality, the change's figures), and each default, written exactly
    /// as before. Parsing does not validate, so one record can carry every part.
    #[test]
    fn the_written_form_is_pinned() {
        let cases = [
            (
                r#"{"version":5,"strategy":"canary","control":"a","candidate":"b","canary_percent":10,"candidates":[{"model":"x","percent":5,"buckets":[[0,500]]}],"shadow_percent":50,"active":"candidate","mirror":["c"],"salt":"s","timeout_ms":700,"fallback":"0.1","overrides":{"u":"candidate"},"rules":[{"attribute":"country","values":["DE"],"side":"control"}],"quality":{"task":"regression","score":{"json_field":"p"},"threshold":0.3},"plan":{"steps":[{"canary_percent":10,"bake_ms":1,"min_sample":2,"max_ms":3}],"guards":["error_rate","quality","coverage"],"alpha":0.1,"quality_guard":{"loss":"brier","margin":0.01,"tau":0.5,"coverage_wait_ms":9},"latency_threshold_ms":44,"on_alarm":"pause","on_end":"hold","step":0,"step_started_at":77,"state":"paused","candidates":3},"probation":{"started_at":1,"duration_ms":2,"quality_guard":{"loss":"log_loss"},"alpha":0.2},"change":{"actor":"guard:x","reason":"why","figures":{"candidate":"x","step":2,"users":[3,4],"guards":[{"guard":"paired_quality","e_value":1.5,"threshold":20.0,"control":{"n":1,"bad":0},"candidate":{"n":2,"bad":1},"latency_ms":5,"mean_loss":[0.1,0.2]}]},"arms":[{"step":1,"users":[1,1],"guards":[]}]}}"#,
                r#"{"version":5,"strategy":"canary","control":"a","candidate":"b","canary_percent":10.0,"candidates":[{"model":"x","percent":5.0,"buckets":[[0,500]]}],"shadow_percent":50.0,"active":"candidate","mirror":["c"],"salt":"s","timeout_ms":700,"fallback":"0.1","overrides":{"u":"candidate"},"rules":[{"attribute":"country","values":["DE"],"side":"control"}],"quality":{"task":"regression","score":{"json_field":"p"},"threshold":0.3},"plan":{"steps":[{"canary_percent":10.0,"bake_ms":1,"min_sample":2,"max_ms":3}],"guards":["error_rate","quality","coverage"],"alpha":0.1,"quality_guard":{"loss":"brier","margin":0.01,"tau":0.5,"coverage_wait_ms":9},"latency_threshold_ms":44,"on_alarm":"pause","on_end":"hold","step":0,"step_started_at":77,"state":"paused","candidates":3},"probation":{"started_at":1,"duration_ms":2,"quality_guard":{"loss":"log_loss","margin":0.0,"tau":0.02,"coverage_wait_ms":60000},"alpha":0.2},"change":{"actor":"guard:x","reason":"why","figures":{"candidate":"x","step":2,"users":[3,4],"guards":[{"guard":"paired_quality","e_value":1.5,"threshold":20.0,"control":{"n":1,"bad":0},"candidate":{"n":2,"bad":1},"latency_ms":5,"mean_loss":[0.1,0.2]}]},"arms":[{"step":1,"users":[1,1],"guards":[]}]}}"#,
            ),
            (
                r#"{"version":1,"strategy":"blue_green","control":"a","candidate":"b","quality":{},"plan":{"steps":[{"canary_percent":10,"bake_ms":1,"min_sample":2,"max_ms":3}]},"probation":{"started_at":1,"duration_ms":2}}"#,
                r#"{"version":1,"strategy":"blue_green","control":"a","candidate":"b","canary_percent":0.0,"shadow_percent":100.0,"active":"control","timeout_ms":1000,"quality":{"task":"binary_classification","score":"plain","threshold":0.5},"plan":{"steps":[{"canary_percent":10.0,"bake_ms":1,"min_sample":2,"max_ms":3}],"guards":["error_rate","timeout_rate","latency","sample_ratio"],"alpha":0.05,"on_alarm":"rollback","on_end":"promote","step":0,"step_started_at":0,"state":"running"},"probation":{"started_at":1,"duration_ms":2,"quality_guard":{"loss":"zero_one","margin":0.0,"tau":0.02,"coverage_wait_ms":60000},"alpha":0.05}}"#,
            ),
        ];
        for (written, expected) in cases {
            assert_eq!(DeploymentSpec::from_json(written.as_bytes()).unwrap().to_json(), expected);
        }
    }
}
