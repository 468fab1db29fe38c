//! The library's error type. Errors about data from outside (records, deployment records) never end
//! up here: they are dead-lettered or rejected where they occur. What reaches this type stops a command
//! or a service task.

use rdkafka::error::KafkaError;

use crate::config::ConfigError;
use crate::record::InvalidDeployment;
use crate::record::moves::MoveError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A Kafka call that failed, with what switchyard was doing (see [`During`]).
    #[error("Kafka, {doing}: {source}")]
    KafkaDuring { doing: String, source: KafkaError },
    #[error(
        "cannot reach Kafka at {servers} within 5 s ({detail}): check --bootstrap-servers (or \
         SWITCHYARD_BOOTSTRAP_SERVERS / kafka.bootstrap_servers), that the broker runs, that its advertised \
         listeners are reachable from here, and the security settings under [kafka.options]"
    )]
    Unreachable { servers: String, detail: String },
    #[error(
        "Kafka at {servers} refused the credentials ({detail}): check sasl.mechanism, sasl.username and \
         sasl.password (or the client certificate) under [kafka.options] / SWITCHYARD_KAFKA_*"
    )]
    Authentication { servers: String, detail: String },
    #[error("topic {0:?} does not exist and topics.create is off")]
    MissingTopic(String),
    #[error("invalid deployment record: {0}")]
    Deployment(#[from] InvalidDeployment),
    #[error(transparent)]
    Move(#[from] MoveError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// A command-line argument that makes no sense.
    #[error("{0}")]
    Usage(String),
    /// Topics joined by partition whose partition counts differ.
    #[error("{0}")]
    PartitionMismatch(String),
    /// A service task that stopped with an error: which one.
    #[error("{task}: {source}")]
    Task { task: &'static str, source: Box<Error> },
    /// A service task that panicked: a bug.
    #[error("the {task} task panicked ({detail}): this is a bug in switchyard, please report it with the log")]
    Panicked { task: &'static str, detail: String },
    /// Topics the cluster cannot replicate as configured.
    #[error("{0}")]
    Replication(String),
    #[error("stalled: {0}")]
    Stalled(String),
    /// The score stage's store on local disk.
    #[error("{0}")]
    Store(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Names what was being done when a Kafka call failed: `consumer.subscribe(..).during("subscribing merge")?`.
pub trait During<T> {
    fn during(self, doing: impl Into<String>) -> Result<T>;
}

impl<T> During<T> for std::result::Result<T, KafkaError> {
    fn during(self, doing: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::KafkaDuring { doing: doing.into(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kafka_error_says_what_was_being_done() {
        let failed: std::result::Result<(), KafkaError> = Err(KafkaError::Canceled);
        let error = failed.during("reading merge's committed offsets").unwrap_err();
        assert_eq!(error.to_string(), "Kafka, reading merge's committed offsets: KafkaError (Client dropped)");
        let task = Error::Task { task: "route", source: Box::new(error) };
        assert!(task.to_string().starts_with("route: Kafka, reading"), "{task}");
    }
}
