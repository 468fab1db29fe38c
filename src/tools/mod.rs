//! Tools around the service: a stand-in model worker, a load generator, a demo labeller and a live view
//! of decisions.

pub mod demo_model;
pub mod labeller;
pub mod loadgen;
pub(crate) mod watch;
