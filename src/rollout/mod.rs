//! Rollouts that drive themselves: a ramp plan in the deployment record, guards judged with
//! anytime-valid statistics, and a controller that advances, promotes, pauses or rolls back by itself
//! and leaves an audit history.
//!
//! Pure:
//! - [`guard`]: e-processes that stay valid when checked after every batch: the exact one-sided 2×2
//!   rate test (errors, timeouts, latency exceedances), the sample-ratio test, the false-alarm budget.
//! - [`probation`]: the paired evidence of a blue/green probation, and what it means.
//! - [`plan`]: what a step's evidence means for the plan (the plan itself, as the record carries it, is
//!   `record::plan`).
//! - [`evidence`]: a step's decisions turned into the guards' statistics, deterministically.
//! - [`settle`]: when every decision of a block of routing time is in — from route's and merge's
//!   progress, not from a wait.
//! - [`decide`]: the next deployment record the controller writes, with actor, reason and figures.
//! - [`history`]: the audit entry of each deployments-topic record, and its rendering.
//! - [`offline`]: what another split would have given, estimated from the logged decisions and their
//!   propensities (inverse propensity, doubly robust), for `switchyard evaluate`.
//!
//! Kafka:
//! - [`feed`]: reads the decisions of every partition from a point in time; route's and merge's progress.
//! - [`controller`]: the one leader among the instances that drives the plans and writes the history.
//! - [`report`]: what `status`, `history` and `evaluate` read and print.

pub(crate) mod bandit;
pub(crate) mod controller;
pub(crate) mod decide;
pub(crate) mod evidence;
pub(crate) mod feed;
pub(crate) mod guard;
pub mod history;
pub mod offline;
pub(crate) mod plan;
pub(crate) mod probation;
pub(crate) mod report;
pub(crate) mod settle;

use crate::record::figures::{Counts, GuardFigures};
use crate::record::plan::GuardKind;

/// One guard's line: its e-value against its threshold and each arm's bad share.
pub fn describe_guard(g: &GuardFigures) -> String {
    let rate = |c: &Counts| {
        if g.guard == GuardKind::SampleRatio {
            format!("{} users", c.n)
        } else if matches!(g.guard, GuardKind::Quality | GuardKind::PairedQuality) {
            format!("{} labelled", c.n)
        } else {
            format!("{}/{} ({:.2}%)", c.bad, c.n, 100.0 * c.bad as f64 / c.n.max(1) as f64)
        }
    };
    let what = match (g.guard, g.latency_ms) {
        (GuardKind::Latency, Some(ms)) => format!("latency > {ms} ms"),
        (GuardKind::Latency, None) => "latency (threshold not fixed yet)".to_string(),
        (GuardKind::Quality | GuardKind::PairedQuality, _) => match g.mean_loss {
            Some((a, b)) => format!("{} ({a:.3} vs {b:.3})", g.guard.as_str()),
            None => g.guard.as_str().to_string(),
        },
        (guard, _) => guard.as_str().to_string(),
    };
    format!(
        "{what:<22} e = {:<10.3} fires at {:<8.1} control {}  candidate {}",
        g.e_value,
        g.threshold,
        rate(&g.control),
        rate(&g.candidate)
    )
}
