//! Dead letters: an input record that cannot be processed goes, byte for byte, to the dead-letter topic
//! with the reason and its origin in headers. Nothing is dropped silently.

use rdkafka::message::{Message, OwnedMessage};

use crate::kafka::stage::Refusal;
use crate::kafka::{OutRecord, SourcePos};
use crate::telemetry::Event;

/// Header with the human-readable reason.
pub const REASON_HEADER: &str = "dlq.reason";
/// Header with the machine-readable kind of failure (see [`Kind::as_str`]).
pub const KIND_HEADER: &str = "dlq.kind";
/// Header present (value `dropped`) on a dead letter that could not carry its value.
pub const VALUE_HEADER: &str = "dlq.value";

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
    /// The broker refused what the record turned into (e.g. larger than an output topic allows).
    Unwritable,
    /// An outcome label for a request that already has one.
    DuplicateLabel,
    /// An outcome label whose decision was not found (not decided, or decided more than the window ago).
    NoDecision,
    /// An outcome label that came after its decision matured (and was judged without it).
    LateLabel,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Undecodable => "undecodable",
            Kind::UnknownDeployment => "unknown_deployment",
            Kind::Invalid => "invalid",
            Kind::Oversized => "oversized",
            Kind::Unwritable => "unwritable",
            Kind::DuplicateLabel => "duplicate_label",
            Kind::NoDecision => "no_decision",
            Kind::LateLabel => "late_label",
        }
    }
}

/// A dead letter in the making: the input record and why it is one.
pub struct Letter<'a> {
    pub source: SourcePos,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub kind: Kind,
    pub reason: String,
}

impl<'a> Letter<'a> {
    /// The dead letter of `message`, which keeps its key and value.
    pub fn of(message: &'a OwnedMessage, kind: Kind, reason: String) -> Self {
        Letter { source: SourcePos::of(message), key: message.key(), value: message.payload(), kind, reason }
    }

    /// The dead letter for this input, and the event that counts it once it is committed.
    pub fn record(self, topic: &str) -> (OutRecord, Event) {
        tracing::warn!(topic = %self.source.topic, partition = self.source.partition, offset = self.source.offset,
            kind = self.kind.as_str(), reason = %self.reason, "dead-lettered");
        let record = OutRecord {
            topic: topic.to_string(),
            partition: None,
            key: self.key.unwrap_or_default().to_vec(),
            payload: self.value.map(<[u8]>::to_vec),
            headers: vec![
                (REASON_HEADER, self.reason.into_bytes()),
                (KIND_HEADER, self.kind.as_str().as_bytes().to_vec()),
                ("dlq.topic", self.source.topic.as_bytes().to_vec()),
                ("dlq.partition", self.source.partition.to_string().into_bytes()),
                ("dlq.offset", self.source.offset.to_string().into_bytes()),
            ],
            timestamp: None,
            origin: None,
        };
        (record, Event::DeadLettered { kind: self.kind.as_str() })
    }
}

/// The dead letter for an input whose outputs the broker refused (the stage driver's
/// [`RefusedLetter`](crate::kafka::stage::RefusedLetter)). On the second refusal (the dead letter itself
/// was too large) it goes without its value: the original stays readable at
/// `dlq.topic`/`dlq.partition`/`dlq.offset` for the topic's retention. After that, nothing can be
/// written for it: `None`, logged.
pub fn refused(message: &OwnedMessage, refusal: &Refusal, topic: &str) -> Option<(OutRecord, Event)> {
    let mut this = Letter::of(message, Kind::Unwritable, refusal.reason.clone());
    match refusal.strikes {
        0 | 1 => Some(this.record(topic)),
        2 => {
            this.value = None;
            this.reason.push_str("; the dead letter was refused too, so it carries no value");
            let (record, event) = this.record(topic);
            Some((record.header(VALUE_HEADER, "dropped"), event))
        }
        _ => {
            tracing::error!(topic = %this.source.topic, partition = this.source.partition, offset = this.source.offset,
                reason = %refusal.reason, "not even a dead letter could be written for this record; skipped");
            None
        }
    }
}
