//! Rollouts that drive themselves (issue: ramp plans, anytime-valid guards, automatic promotion and
//! rollback). This is its first part: the guard statistics and the plan's step rule, pure and tested. The plan in the
//! deployment record, the controller inside `switchyard run` and the history topic build on it.
//!
//! - [`guard`]: e-processes that stay valid when checked after every batch: the exact one-sided 2×2
//!   rate test (errors, timeouts, latency exceedances), the sample-ratio test, and the false-alarm budget.
//! - [`plan`]: ramp steps and what the plan does next, from the time and the guards' evidence.
//!
//! Not wired yet: deployment records do not take a plan, and nothing runs one.

pub mod guard;
pub mod plan;
