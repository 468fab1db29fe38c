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
    #[error("{0}")]
    Usage(String),
    #[error("stalled: {0}")]
    Stalled(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
