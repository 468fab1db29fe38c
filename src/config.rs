//! The one config loader: built-in defaults (config/switchyard.toml), a file, environment variables and
//! flags, in that order. Every section rejects unknown keys, so a typo is an error at start.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::codec::{Codec, Framing, RecordKind, RegistryConfig, SchemaIds, SchemaRegistry};

const DEFAULTS: &str = include_str!("../config/switchyard.toml");
const ENV_SETTING_PREFIX: &str = "SWITCHYARD__";
const ENV_KAFKA_PREFIX: &str = "SWITCHYARD_KAFKA_";

/// librdkafka options that switchyard sets itself; setting them in `[kafka.options]` would silently
/// change delivery guarantees, so it is an error.
const MANAGED_OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "auto.offset.reset",
    "partitioner",
    "enable.idempotence",
    "transactional.id",
    "partition.assignment.strategy",
    "group.instance.id",
];

/// Largest record switchyard's producers write (librdkafka `message.max.bytes`) unless `[kafka.options]`
/// sets one: the default of [`Config::record_limit`], which the Kafka clients apply. Above Kafka's 1 MiB
/// default on purpose: a request the broker accepted (up to about 1 MiB) must fit into a dead letter byte
/// for byte, and a shadow comparison carries two answers.
pub const RECORD_LIMIT: usize = 2 * 1024 * 1024;

/// Room a model request needs beyond its request (model name up to 200 bytes, role, version, routing
/// time, framing), and a decision, comparison or changelog record beyond the answers it carries.
const RECORD_OVERHEAD: usize = 4096;

/// Room a score changelog entry (`ScoreState`, quality::changelog) needs beyond the ids its decision
/// carries (a request's, at most `service.max_request_bytes`): fixed fields, a label's source, and a score
/// and a name per shadow model (about 220 bytes each with names of up to 200 bytes: 250 of them fit). It
/// keeps no answer's bytes, so `max_prediction_bytes` does not count.
pub const SCORE_STATE_ROOM: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin} is not valid TOML: {message}")]
    Toml { origin: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: Topics,
    pub service: ServiceConfig,
    pub quality: QualityConfig,
    pub codec: CodecConfig,
}

/// The score stage: outcome labels joined to decisions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityConfig {
    /// How long a decision waits for its label.
    pub window_ms: u64,
    /// How long a label waits for its decision.
    pub early_wait_ms: u64,
    /// Most requests held per instance; past it the ones due first are dropped (counted).
    pub max_open: u64,
    /// Where the score stage's store lives (a directory per group and instance under it).
    pub state_dir: String,
    /// The store's block cache, MiB.
    pub cache_mb: u64,
    /// The store's write buffers, MiB.
    pub write_buffer_mb: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    /// Raw librdkafka settings for every client.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    pub requests: String,
    pub deployments: String,
    pub history: String,
    pub routed: String,
    pub merge_changelog: String,
    pub forwarded_predictions: String,
    pub decisions: String,
    pub shadow_comparisons: String,
    pub outcomes: String,
    pub scored_outcomes: String,
    pub score_changelog: String,
    pub dead_letter: String,
    pub model_requests: String,
    pub model_predictions: String,
    pub create: bool,
    pub partitions: i32,
    pub replication_factor: i32,
}

impl Topics {
    /// The topic records of `kind` are written to (the pattern for the per-model topics).
    pub fn of(&self, kind: RecordKind) -> &str {
        match kind {
            RecordKind::Request => &self.requests,
            RecordKind::ModelRequest => &self.model_requests,
            RecordKind::Prediction => &self.model_predictions,
            RecordKind::Decision => &self.decisions,
            RecordKind::ShadowComparison => &self.shadow_comparisons,
            RecordKind::Routed => &self.routed,
            RecordKind::MergeState => &self.merge_changelog,
            RecordKind::Outcome => &self.outcomes,
            RecordKind::ScoredOutcome => &self.scored_outcomes,
            RecordKind::ScoreState => &self.score_changelog,
        }
    }

    pub fn model_requests(&self, model: &str) -> String {
        self.model_requests.replace("{model}", model)
    }

    pub fn model_predictions(&self, model: &str) -> String {
        self.model_predictions.replace("{model}", model)
    }

    /// A librdkafka subscription regex matching every per-model predictions topic.
    pub fn model_predictions_regex(&self) -> String {
        let (before, after) = self.model_predictions.split_once("{model}").unwrap_or((&self.model_predictions, ""));
        format!("^{}[A-Za-z0-9._-]+{}$", regex_escape(before), regex_escape(after))
    }
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c.to_string() } else { format!("\\{c}") })
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub group_id: String,
    pub instance_id: String,
    pub metrics_address: String,
    pub batch_size: usize,
    pub batch_wait_ms: u64,
    pub max_pending: usize,
    pub max_request_bytes: usize,
    pub max_prediction_bytes: usize,
    pub orphan_ttl_ms: u64,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecConfig {
    pub framing: FramingKind,
    pub schema_ids: SchemaIds,
    /// The Confluent API of a schema registry; empty: the ids of `schema_ids`.
    pub registry_url: String,
    pub registry_username: String,
    /// A secret: never logged (Debug hides it).
    pub registry_password: String,
    pub registry_wait_ms: u64,
}

impl std::fmt::Debug for CodecConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodecConfig")
            .field("framing", &self.framing)
            .field("schema_ids", &self.schema_ids)
            .field("registry_url", &self.registry_url)
            .field("registry_username", &self.registry_username)
            .field("registry_password", &if self.registry_password.is_empty() { "" } else { "<hidden>" })
            .field("registry_wait_ms", &self.registry_wait_ms)
            .finish()
    }
}

impl ServiceConfig {
    /// The configured instance id, or the host name.
    pub fn instance(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "switchyard".to_string())
    }

    /// The transactional id of one stage of this instance.
    pub fn transactional_id(&self, stage: &str) -> String {
        self.transactional_id_of(stage, &self.instance())
    }

    /// The transactional id of `stage` in the instance named `instance` (one that died is fenced by it).
    pub fn transactional_id_of(&self, stage: &str, instance: &str) -> String {
        format!("{}-{stage}-{instance}", self.group_id)
    }
}

/// `codec.framing`: how record values are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FramingKind {
    /// Avro binary.
    Plain,
    /// Magic byte 0, the 4-byte schema id from `[codec.schema_ids]`, Avro binary.
    Confluent,
}

impl CodecConfig {
    /// Checks the settings without contacting anything.
    fn check(&self) -> Result<(), ConfigError> {
        let url = self.registry_url.trim();
        if url.is_empty() {
            return Ok(());
        }
        if self.framing != FramingKind::Confluent {
            return Err(ConfigError::Invalid("codec.registry_url needs codec.framing = \"confluent\"".into()));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::Invalid(format!(
                "codec.registry_url {url:?} must start with http:// or https://"
            )));
        }
        if url.contains('@') {
            return Err(ConfigError::Invalid(
                "codec.registry_url must not hold credentials: use codec.registry_username / registry_password".into(),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The codec of `[codec]`. With `codec.registry_url`, registers switchyard's schemas first (each under
    /// `<topic>-value` of the topic it is written to; the per-model topics' records under the topic
    /// pattern's subject, e.g. `model.{model}.requests-value`), waiting up to `codec.registry_wait_ms` for
    /// an unreachable registry: blocking.
    pub fn codec(&self) -> Result<Codec, ConfigError> {
        let c = &self.codec;
        c.check()?;
        Ok(match c.framing {
            FramingKind::Plain => Codec::new(Framing::Plain),
            FramingKind::Confluent if c.registry_url.trim().is_empty() => {
                Codec::new(Framing::Confluent(c.schema_ids.clone()))
            }
            FramingKind::Confluent => {
                let wait = std::time::Duration::from_millis(c.registry_wait_ms);
                let registry = SchemaRegistry::new(RegistryConfig {
                    url: c.registry_url.trim().to_string(),
                    username: c.registry_username.clone(),
                    password: c.registry_password.clone(),
                    wait,
                })
                .map_err(ConfigError::Invalid)?;
                Codec::with_registry(registry, |kind| format!("{}-value", self.topics.of(kind)), wait)
                    .map_err(|e| ConfigError::Invalid(format!("codec: {e}")))?
            }
        })
    }
}

/// Parses TOML; an error names the line and column, never the line's text: a config file's line may
/// hold a password.
fn parse_toml(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| {
        let at = e.span().map_or(String::new(), |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: ")
        });
        ConfigError::Toml { origin: origin.to_string(), message: format!("{at}{}", e.message().trim_end()) }
    })
}

/// Deep-merges `overlay` into `base`.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Reads an environment value as a TOML scalar (number, boolean) where it is one, else as a string.
fn env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) if !matches!(t.get("v"), Some(toml::Value::Table(_))) => t.remove("v").expect("just parsed"),
        _ => toml::Value::String(raw.to_string()),
    }
}

/// Environment variables that give a run its own topics and groups, all named after `prefix`, with
/// `partitions` partitions per topic: runs side by side on one broker (tests, benchmarks) never meet.
pub fn isolated_env(bootstrap: &str, prefix: &str, partitions: i32) -> Vec<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Isolated {
        topics: Vec<(String, String)>,
    }
    let isolated: Isolated = serde_json::from_str(include_str!("../config/isolated-topics.json"))
        .expect("config/isolated-topics.json is valid");
    let mut env = vec![("SWITCHYARD_BOOTSTRAP_SERVERS".to_string(), bootstrap.to_string())];
    env.extend(
        isolated.topics.iter().map(|(key, name)| (format!("SWITCHYARD__TOPICS__{key}"), format!("{prefix}.{name}"))),
    );
    env.extend([
        ("SWITCHYARD__TOPICS__PARTITIONS".to_string(), partitions.to_string()),
        ("SWITCHYARD__SERVICE__GROUP_ID".to_string(), prefix.to_string()),
        ("SWITCHYARD__SERVICE__INSTANCE_ID".to_string(), format!("{prefix}-0")),
        ("SWITCHYARD__SERVICE__METRICS_ADDRESS".to_string(), "127.0.0.1:0".to_string()),
        // The score stage's store: per group (and instance) under one directory outside the checkout.
        (
            "SWITCHYARD__QUALITY__STATE_DIR".to_string(),
            std::env::temp_dir().join("switchyard-state").display().to_string(),
        ),
    ]);
    env
}

impl Config {
    /// Loads defaults, then `file`, then the given environment.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut table = parse_toml(DEFAULTS, "built-in defaults")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
            merge(&mut table, parse_toml(&text, &path.display().to_string())?);
        }
        for (key, raw) in env {
            let overlay = if let Some(path) = key.strip_prefix(ENV_SETTING_PREFIX) {
                let mut parts: Vec<String> = path.split("__").map(str::to_lowercase).collect();
                // librdkafka options are strings, whatever they look like (`linger.ms=5`).
                let mut value = if parts.starts_with(&["kafka".into(), "options".into()]) {
                    toml::Value::String(raw)
                } else {
                    env_value(&raw)
                };
                while let Some(last) = parts.pop() {
                    let mut t = toml::Table::new();
                    t.insert(last, value);
                    value = toml::Value::Table(t);
                }
                match value {
                    toml::Value::Table(t) => t,
                    _ => continue,
                }
            } else if key == "SWITCHYARD_BOOTSTRAP_SERVERS" {
                parse_toml(&format!("kafka.bootstrap_servers = {}", toml::Value::String(raw)), &key)?
            } else if let Some(option) = key.strip_prefix(ENV_KAFKA_PREFIX) {
                let option = option.to_lowercase().replace('_', ".");
                let mut options = toml::Table::new();
                options.insert(option, toml::Value::String(raw));
                let mut kafka = toml::Table::new();
                kafka.insert("options".into(), toml::Value::Table(options));
                let mut t = toml::Table::new();
                t.insert("kafka".into(), toml::Value::Table(kafka));
                t
            } else {
                continue;
            };
            merge(&mut table, overlay);
        }
        let config: Config =
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        for key in self.kafka.options.keys() {
            if MANAGED_OPTIONS.contains(&key.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "kafka option {key:?} is managed by switchyard and cannot be set in [kafka.options]"
                )));
            }
        }
        for (name, pattern) in
            [("model_requests", &self.topics.model_requests), ("model_predictions", &self.topics.model_predictions)]
        {
            if pattern.matches("{model}").count() != 1 {
                return Err(ConfigError::Invalid(format!(
                    "topics.{name} must contain {{model}} exactly once, got {pattern:?}"
                )));
            }
        }
        if self.topics.partitions < 1 {
            return Err(ConfigError::Invalid("topics.partitions must be at least 1".into()));
        }
        if self.topics.replication_factor < 1 && self.topics.replication_factor != -1 {
            return Err(ConfigError::Invalid(
                "topics.replication_factor must be -1 (the brokers' default.replication.factor) or at least 1".into(),
            ));
        }
        self.check_record_sizes()?;
        if self.service.batch_size == 0 || self.service.max_pending == 0 {
            return Err(ConfigError::Invalid("service.batch_size and service.max_pending must be at least 1".into()));
        }
        self.codec.check()?;
        Ok(())
    }
}

impl Config {
    /// The producers' record limit: `message.max.bytes` from `[kafka.options]`, or switchyard's default.
    pub fn record_limit(&self) -> Result<usize, ConfigError> {
        match self.kafka.options.get("message.max.bytes") {
            None => Ok(RECORD_LIMIT),
            Some(text) => text
                .parse()
                .map_err(|_| ConfigError::Invalid(format!("kafka option message.max.bytes is not a number: {text:?}"))),
        }
    }

    /// Every request switchyard admits must fit into its model requests and the score changelog's entries
    /// (its ids), and every answer into the decision, comparison (two answers) and merge changelog
    /// records made from it; otherwise a record the service accepted could never be written.
    fn check_record_sizes(&self) -> Result<(), ConfigError> {
        let limit = self.record_limit()?;
        let s = &self.service;
        // A model request needs only RECORD_OVERHEAD beyond its request, a score changelog entry more.
        let largest = [s.max_request_bytes + SCORE_STATE_ROOM, 2 * s.max_prediction_bytes + RECORD_OVERHEAD];
        if largest.iter().any(|bytes| *bytes > limit) {
            return Err(ConfigError::Invalid(format!(
                "service.max_request_bytes ({}) + {SCORE_STATE_ROOM} (a score changelog entry) and 2 x \
                 service.max_prediction_bytes ({}) + {RECORD_OVERHEAD} must not exceed the producer's \
                 message.max.bytes ({limit}): lower them or raise message.max.bytes (and the topics' \
                 max.message.bytes)",
                s.max_request_bytes, s.max_prediction_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_error_names_the_line_not_its_text() {
        let text = "[kafka.options]\n\"sasl.password\" = \"hunter2-secret\n";
        let error = parse_toml(text, "f.toml").unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("f.toml") && error.contains("line 2"), "{error}");
    }

    #[test]
    fn isolated_env_gives_every_topic_a_name_of_its_own() {
        let defaults = parse_toml(DEFAULTS, "defaults").unwrap();
        let env: std::collections::HashMap<String, String> = isolated_env("b:9092", "run7", 3).into_iter().collect();
        let topics = defaults["topics"].as_table().unwrap();
        let names: Vec<&String> = topics.iter().filter(|(_, v)| v.is_str()).map(|(k, _)| k).collect();
        assert!(names.len() >= 14, "{names:?}");
        for name in names {
            let key = format!("SWITCHYARD__TOPICS__{}", name.to_uppercase());
            assert!(
                env.get(&key).is_some_and(|v| v.starts_with("run7.")),
                "{key} missing from config/isolated-topics.json"
            );
        }
        let config = Config::load(None, isolated_env("b:9092", "run7", 3)).unwrap();
        assert_eq!(config.topics.model_predictions("m"), "run7.model.m.predictions");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_load() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.kafka.bootstrap_servers, "127.0.0.1:9092");
        assert_eq!(c.topics.model_requests("fraud-v1"), "model.fraud-v1.requests");
        assert_eq!(c.topics.model_predictions_regex(), r"^model\.[A-Za-z0-9._-]+\.predictions$");
    }

    #[test]
    fn layers_override_in_order() {
        let dir = std::env::temp_dir().join(format!("switchyard-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[topics]\ndecisions = \"from-file\"\npartitions = 8\n[service]\nbatch_size = 7\n")
            .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("SWITCHYARD__SERVICE__BATCH_SIZE", "9"),
                ("SWITCHYARD_BOOTSTRAP_SERVERS", "broker:1"),
                ("SWITCHYARD_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
                ("SWITCHYARD__KAFKA__OPTIONS__linger.ms", "5"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.topics.decisions, "from-file");
        assert_eq!(c.topics.partitions, 8);
        assert_eq!(c.service.batch_size, 9);
        assert_eq!(c.kafka.bootstrap_servers, "broker:1");
        assert_eq!(c.kafka.options.get("security.protocol").map(String::as_str), Some("SASL_SSL"));
        assert_eq!(c.kafka.options.get("linger.ms").map(String::as_str), Some("5"), "a number, as librdkafka takes it");
        assert_eq!(c.topics.requests, "requests", "untouched defaults stay");
    }

    #[test]
    fn mistakes_are_errors() {
        let bad = [
            ("SWITCHYARD__TOPICS__DECISONS", "typo"),
            ("SWITCHYARD_KAFKA_GROUP_ID", "mine"),
            ("SWITCHYARD__TOPICS__MODEL_REQUESTS", "no-placeholder"),
            ("SWITCHYARD__CODEC__FRAMING", "protobuf"),
            ("SWITCHYARD__SERVICE__BATCH_SIZE", "many"),
            ("SWITCHYARD_KAFKA_GROUP_INSTANCE_ID", "x"),
            ("SWITCHYARD__SERVICE__MAX_REQUEST_BYTES", "2097152"),
            ("SWITCHYARD__SERVICE__MAX_PREDICTION_BYTES", "1048576"),
            ("SWITCHYARD_KAFKA_MESSAGE_MAX_BYTES", "1000000"),
        ];
        for (key, value) in bad {
            assert!(Config::load(None, env(&[(key, value)])).is_err(), "{key}={value} was accepted");
        }
    }
}
