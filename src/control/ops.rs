//! What the control-plane commands do: write validated deployment records with the next version, and
//! describe what is in force.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rdkafka::producer::FutureProducer;

use super::registry::Registry;
use super::watcher;
use crate::clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kafka::{self, OutRecord};
use crate::record::moves;
use crate::record::plan::QualityGuard;
use crate::record::probation::{self, Probation};
use crate::record::{Change, Deployment, DeploymentSpec, Strategy};

/// Validates `spec` against the record in force and writes it. Returns the deployment as written.
pub async fn write(config: &Config, registry: &Registry, name: &str, spec: DeploymentSpec) -> Result<Deployment> {
    if let Some(current) = registry.get(name)
        && spec.version <= current.version()
    {
        return Err(
            crate::record::InvalidDeployment::StaleVersion { got: spec.version, current: current.version() }.into()
        );
    }
    let deployment = spec.validate(name)?;
    super::ensure_model_topics(config, [&deployment]).await?;
    let producer: FutureProducer = kafka::producer(config)?;
    let record =
        OutRecord::new(config.topics.deployments.clone(), name.as_bytes(), deployment.spec.to_json().into_bytes());
    kafka::send_all(&producer, &[record]).await?;
    Ok(deployment)
}

/// An operator's change: `operator:<login>` (from `USER`), and why.
pub fn operator_change(reason: String) -> Change {
    let actor = match std::env::var("USER") {
        Ok(user) if !user.is_empty() => format!("operator:{user}"),
        _ => "operator".to_string(),
    };
    Change { actor, reason, figures: None, arms: Vec::new() }
}

/// Writes `spec` as the next version of `name` (the version in `spec` is replaced).
pub async fn deploy(config: &Config, name: &str, mut spec: DeploymentSpec) -> Result<Deployment> {
    let registry = watcher::snapshot(config).await?;
    spec.version = registry.next_version(name);
    write(config, &registry, name, spec).await
}

/// An operator's move on a deployment in force.
#[derive(Debug, Clone, PartialEq)]
pub enum Move {
    /// The candidate (A/B/n: the one named) takes over.
    Promote(Option<String>),
    /// A blue/green switch on probation for this long (ms), judged by this guard.
    PromoteOnProbation(u64, QualityGuard),
    Rollback,
    /// A/B/n: one candidate stops serving.
    Cut(String),
    Pause,
    Resume,
}

impl Move {
    fn as_str(&self) -> &'static str {
        match self {
            Move::Promote(_) => "promote",
            Move::PromoteOnProbation(..) => "promote on probation",
            Move::Rollback => "rollback",
            Move::Cut(_) => "rollback of one candidate",
            Move::Pause => "pause",
            Move::Resume => "resume",
        }
    }
}

/// Writes the next version of `name` after `what`, as the operator's change with `reason`.
pub async fn apply_move(config: &Config, name: &str, what: Move, reason: Option<String>) -> Result<Deployment> {
    let registry = watcher::snapshot(config).await?;
    let current = registry.get(name).ok_or_else(|| moves::MoveError::Unknown(name.to_string()))?;
    let version = registry.next_version(name);
    let mut next = match what {
        Move::Promote(None) => moves::promote(&current.spec, version),
        Move::Promote(Some(ref model)) => moves::promote_candidate(&current.spec, version, model),
        Move::PromoteOnProbation(duration_ms, ref quality_guard) => {
            let probation = Probation {
                started_at: clock::now_millis(),
                duration_ms,
                quality_guard: quality_guard.clone(),
                alpha: probation::DEFAULT_ALPHA,
            };
            moves::promote_on_probation(&current.spec, version, probation)
        }
        Move::Rollback => moves::rollback(&current.spec, version),
        Move::Cut(ref model) => moves::cut(&current.spec, version, model, clock::now_millis()),
        Move::Pause => moves::pause(&current.spec, version),
        Move::Resume => moves::resume(&current.spec, version, clock::now_millis()),
    }?;
    next.change = Some(operator_change(reason.unwrap_or_else(|| what.as_str().to_string())));
    write(config, &registry, name, next).await
}

/// Deletes a deployment with a tombstone.
pub async fn delete(config: &Config, name: &str) -> Result<()> {
    let producer: FutureProducer = kafka::producer(config)?;
    let mut record = OutRecord::new(config.topics.deployments.clone(), name.as_bytes(), Vec::new());
    record.payload = None;
    kafka::send_all(&producer, &[record]).await?;
    Ok(())
}

/// How traffic is split under `d`, in words.
pub fn describe_split(d: &Deployment) -> String {
    let spec = &d.spec;
    let candidate = spec.candidate.as_deref().unwrap_or("-");
    let serving = match spec.strategy {
        Strategy::Single => format!("100.00% -> {} (control)", spec.control),
        Strategy::Shadow => format!("100.00% -> {} (control); {candidate} gets copies", spec.control),
        Strategy::Canary if !spec.candidates.is_empty() => {
            let mut arms: Vec<String> =
                spec.candidates.iter().map(|c| format!("{:.2}% -> {} (candidate)", c.percent, c.model)).collect();
            let share = f64::from(d.canary_threshold) / 100.0;
            arms.push(format!("{:.2}% -> {} (control)", 100.0 - share, spec.control));
            arms.join(", ")
        }
        Strategy::Canary => {
            let share = f64::from(d.canary_threshold) / 100.0;
            format!("{:.2}% -> {candidate} (candidate), {:.2}% -> {} (control)", share, 100.0 - share, spec.control)
        }
        Strategy::BlueGreen => format!("100.00% -> {} ({} active)", d.model_for(spec.active), spec.active),
    };
    let mut copies = Vec::new();
    if spec.strategy == Strategy::Shadow {
        copies.extend(spec.candidate.iter().cloned());
    }
    copies.extend(spec.mirror.iter().cloned());
    let mut text = serving;
    if spec.hedge {
        let _ = write!(text, "; hedged: {} answers when {candidate} fails", spec.control);
    }
    if !copies.is_empty() {
        let _ = write!(
            text,
            "; shadow copies of {:.2}% of users -> {}",
            f64::from(d.shadow_threshold) / 100.0,
            copies.join(", ")
        );
    }
    if !spec.overrides.is_empty() {
        let _ = write!(text, "; {} user override(s)", spec.overrides.len());
    }
    for rule in &spec.rules {
        let _ = write!(text, "; {} in [{}] -> {}", rule.attribute, rule.values.join(", "), rule.side);
    }
    text
}

/// The `status` report: deployments in force, their versions and split, and rejected records;
/// `detail` adds lines after a deployment's own (its plan).
pub fn render_status(registry: &Registry, only: Option<&str>, detail: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut shown = 0;
    for d in registry.deployments().filter(|d| only.is_none_or(|name| d.name == name)) {
        shown += 1;
        let _ = writeln!(
            out,
            "{}  version {}  strategy {}  timeout {} ms  salt {:?}",
            d.name,
            d.version(),
            d.strategy(),
            d.spec.timeout_ms,
            d.salt
        );
        let _ = writeln!(out, "  split: {}", describe_split(d));
        let _ = writeln!(out, "  record: {}", d.spec.to_json());
        out.push_str(detail.get(&d.name).map_or("", String::as_str));
    }
    if let Some(name) = only {
        if shown == 0 {
            return Err(Error::Usage(format!("deployment {name:?} is not in force")));
        }
    } else if shown == 0 {
        out.push_str("no deployments in force\n");
    }
    let rejected: Vec<_> = registry.rejected().filter(|r| only.is_none_or(|name| r.deployment == name)).collect();
    if !rejected.is_empty() {
        let _ = writeln!(out, "rejected records ({}):", rejected.len());
        for r in rejected {
            let version = r.version.map_or("-".to_string(), |v| v.to_string());
            let _ = writeln!(out, "  {:?} version {version} at offset {}: {}", r.deployment, r.offset, r.reason);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lists_split_and_rejections() {
        let mut r = Registry::default();
        r.apply(Some(b"fraud"), Some(br#"{"version":3,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":10,"mirror":["v3"]}"#), 0);
        r.apply(
            Some(b"fraud"),
            Some(br#"{"version":4,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":300}"#),
            1,
        );
        let text = render_status(&r, None, &BTreeMap::new()).unwrap();
        assert!(text.contains("fraud  version 3  strategy canary"), "{text}");
        assert!(
            text.contains("10.00% -> v2 (candidate), 90.00% -> v1 (control); shadow copies of 100.00% of users -> v3"),
            "{text}"
        );
        assert!(text.contains("version 4 at offset 1: canary_percent must be between 0 and 100"), "{text}");
        assert!(render_status(&r, Some("other"), &BTreeMap::new()).is_err());
        r.apply(
            Some(b"fraud"),
            Some(
                br#"{"version":5,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":5,"hedge":true}"#,
            ),
            2,
        );
        let text = render_status(&r, None, &BTreeMap::new()).unwrap();
        assert!(text.contains("95.00% -> v1 (control); hedged: v1 answers when v2 fails"), "{text}");
    }
}
