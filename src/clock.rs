//! The wall clock, in the unit every record carries (milliseconds since the Unix epoch). A part of its
//! own at the bottom of the crate so that route, merge, quality, rollout and control can read the time
//! without importing the Kafka plumbing.

/// Milliseconds since the Unix epoch, from the wall clock.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
