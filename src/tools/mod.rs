//! Tools around the service: a stand-in model worker, a load generator and a live view of decisions.

pub mod demo_model;
pub mod loadgen;
pub mod watch;
