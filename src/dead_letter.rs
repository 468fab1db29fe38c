//! Dead letters: an input record that cannot be processed goes, byte for byte, to the dead-letter topic
//! with the reason and its origin in headers. Nothing is dropped silently.

use crate::kafka::{OutRecord, SourcePos};
use crate::telemetry;

/// Header with the human-readable reason.
pub const REASON_HEADER: &str = "dlq.reason";
/// Header with the machine-readable kind of failure (see [`Kind::as_str`]).
pub const KIND_HEADER: &str = "dlq.kind";

/// What was wrong with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The value is not a record of the expected schema (empty, garbage, truncated, other schema).
    Undecodable,
    /// The request names a deployment that is not in force.
    UnknownDeployment,
    /// The record decodes but breaks a rule (e.g. empty request_id).
    Invalid,
    /// The value is larger than switchyard accepts.
    Oversized,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Undecodable => "undecodable",
            Kind::UnknownDeployment => "unknown_deployment",
            Kind::Invalid => "invalid",
            Kind::Oversized => "oversized",
        }
    }
}

/// Builds the dead letter for one input record and counts it.
pub fn letter(
    topic: &str,
    source: &SourcePos,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    kind: Kind,
    reason: &str,
) -> OutRecord {
    tracing::warn!(topic = %source.topic, partition = source.partition, offset = source.offset, kind = kind.as_str(), %reason, "dead-lettered");
    telemetry::dead_lettered(kind.as_str());
    OutRecord {
        topic: topic.to_string(),
        partition: None,
        key: key.unwrap_or_default().to_vec(),
        payload: value.map(<[u8]>::to_vec),
        headers: vec![
            (REASON_HEADER, reason.as_bytes().to_vec()),
            (KIND_HEADER, kind.as_str().as_bytes().to_vec()),
            ("dlq.topic", source.topic.as_bytes().to_vec()),
            ("dlq.partition", source.partition.to_string().into_bytes()),
            ("dlq.offset", source.offset.to_string().into_bytes()),
        ],
    }
}
