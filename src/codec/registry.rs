//! A client of a Confluent Schema Registry (the Confluent REST API: Confluent's registry, Apicurio's
//! `/apis/ccompat/v7`, Karapace): registers switchyard's schemas under their subjects and looks writer
//! schemas up by id, caching both for the life of the process.
//!
//! Blocking HTTP: it is used at start-up, when per-model topics appear, and for a schema id not seen
//! before — never per record once an id is cached. While the registry is unreachable, cached ids keep
//! working; registering at start-up waits for it (up to `codec.registry_wait_ms`, then fails), and a
//! record with an id not yet cached cannot be decoded (it is dead-lettered with the reason, and further
//! lookups fail fast for a few seconds instead of stalling every record behind the same outage).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use apache_avro::Schema;
use base64::Engine;

/// After a failed lookup, lookups of uncached ids fail at once for this long.
const FAIL_FAST: Duration = Duration::from_secs(5);

/// What went wrong talking to the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error(
        "the schema registry refuses switchyard's {record} schema under subject {subject:?} as incompatible with \
         the versions registered before it (the subject's compatibility rule): {message}"
    )]
    Incompatible { subject: String, record: String, message: String },
    #[error("schema id {0} is not in the schema registry")]
    UnknownId(u32),
    #[error("the schema registry answered {status} to {what}: {message}")]
    Refused { status: u16, what: String, message: String },
    #[error("schema id {id} from the schema registry is not a valid Avro schema: {message}")]
    BadSchema { id: u32, message: String },
}

impl RegistryError {
    /// Worth waiting for (the registry may come back), as opposed to an answer.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unreachable { .. })
            || matches!(self, RegistryError::Refused { status, .. } if *status >= 500)
    }
}

/// Where the registry is and how to reach it.
#[derive(Clone)]
pub struct RegistryConfig {
    /// Base URL of the Confluent API, e.g. `http://registry:8081` or `http://apicurio:8080/apis/ccompat/v7`.
    pub url: String,
    pub username: String,
    /// Never logged or printed (the Debug form hides it).
    pub password: String,
    /// How long start-up registration waits for an unreachable registry.
    pub wait: Duration,
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &if self.password.is_empty() { "" } else { "<hidden>" })
            .field("wait", &self.wait)
            .finish()
    }
}

/// A registry client with its caches.
pub struct SchemaRegistry {
    config: RegistryConfig,
    agent: ureq::Agent,
    /// Writer schemas by id.
    writers: RwLock<HashMap<u32, Arc<Schema>>>,
    /// Ids by (subject, schema text) registered by this process.
    registered: Mutex<HashMap<(String, String), u32>>,
    /// Until when lookups of uncached ids fail at once (after a failed one).
    failing_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The registry's error body: `{"error_code": 409, "message": "..."}`.
#[derive(serde::Deserialize)]
struct ErrorBody {
    message: Option<String>,
}

impl SchemaRegistry {
    pub fn new(config: RegistryConfig) -> Result<Self, String> {
        let tls = native_tls::TlsConnector::new().map_err(|e| format!("TLS for the schema registry: {e}"))?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .tls_connector(Arc::new(tls))
            .build();
        Ok(SchemaRegistry {
            config,
            agent,
            writers: RwLock::new(HashMap::new()),
            registered: Mutex::new(HashMap::new()),
            failing_until: Mutex::new(None),
        })
    }

    pub fn url(&self) -> &str {
        &self.config.url
    }

    /// Registers `schema` (Avro schema JSON) under `subject` and returns its id; a schema the subject
    /// already has returns the id it has. `record` names it in errors. Waits for an unreachable
    /// registry up to `wait`.
    pub fn register(&self, subject: &str, record: &str, schema: &str, wait: Duration) -> Result<u32, RegistryError> {
        let key = (subject.to_string(), schema.to_string());
        if let Some(id) = self.registered.lock().expect("not poisoned").get(&key) {
            return Ok(*id);
        }
        let url = format!("{}/subjects/{}/versions", self.base(), encode_path(subject));
        let body = serde_json::json!({ "schema": schema }).to_string();
        let started = Instant::now();
        let mut pause = Duration::from_millis(200);
        let answer = loop {
            let result = self.send(self.request("POST", &url).send_string(&body), &format!("registering {subject}"));
            match result {
                Err(e) if e.is_transient() && started.elapsed() < wait => {
                    tracing::warn!(error = %e, %subject, "schema registry not available; retrying");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(RegistryError::Refused { status: 409, message, .. }) => {
                    return Err(RegistryError::Incompatible {
                        subject: subject.into(),
                        record: record.into(),
                        message,
                    });
                }
                other => break other?,
            }
        };
        let id = answer["id"].as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| RegistryError::Refused {
            status: 200,
            what: format!("registering {subject}"),
            message: answer.to_string(),
        })?;
        self.registered.lock().expect("not poisoned").insert(key, id);
        if let Ok(parsed) = Schema::parse_str(schema) {
            self.writers.write().expect("not poisoned").entry(id).or_insert_with(|| Arc::new(parsed));
        }
        Ok(id)
    }

    /// The writer schema of `id`, cached after the first lookup.
    pub fn writer(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(schema) = self.writers.read().expect("not poisoned").get(&id) {
            return Ok(schema.clone());
        }
        if let Some(until) = *self.failing_until.lock().expect("not poisoned")
            && Instant::now() < until
        {
            return Err(RegistryError::Unreachable {
                url: self.config.url.clone(),
                message: "a lookup failed less than 5 s ago; not retried yet".into(),
            });
        }
        let url = format!("{}/schemas/ids/{id}", self.base());
        let answer = match self.send(self.request("GET", &url).call(), &format!("looking up schema id {id}")) {
            Ok(answer) => answer,
            Err(RegistryError::Refused { status: 404, .. }) => return Err(RegistryError::UnknownId(id)),
            Err(e) => {
                if e.is_transient() {
                    *self.failing_until.lock().expect("not poisoned") = Some(Instant::now() + FAIL_FAST);
                }
                return Err(e);
            }
        };
        let text = answer["schema"].as_str().unwrap_or_default();
        let schema =
            Arc::new(Schema::parse_str(text).map_err(|e| RegistryError::BadSchema { id, message: e.to_string() })?);
        self.writers.write().expect("not poisoned").insert(id, schema.clone());
        Ok(schema)
    }

    fn base(&self) -> &str {
        self.config.url.trim_end_matches('/')
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let request =
            self.agent.request(method, url).set("Accept", "application/vnd.schemaregistry.v1+json, application/json");
        let request = if method == "POST" {
            request.set("Content-Type", "application/vnd.schemaregistry.v1+json")
        } else {
            request
        };
        if self.config.username.is_empty() {
            request
        } else {
            let pair = format!("{}:{}", self.config.username, self.config.password);
            request.set("Authorization", &format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))
        }
    }

    fn send(
        &self,
        result: Result<ureq::Response, ureq::Error>,
        what: &str,
    ) -> Result<serde_json::Value, RegistryError> {
        match result {
            Ok(response) => {
                let text = response.into_string().map_err(|e| self.unreachable(e.to_string()))?;
                serde_json::from_str(&text).map_err(|e| RegistryError::Refused {
                    status: 200,
                    what: what.into(),
                    message: format!("not JSON ({e}): {}", truncate(&text)),
                })
            }
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                let message = serde_json::from_str::<ErrorBody>(&text)
                    .ok()
                    .and_then(|b| b.message)
                    .unwrap_or_else(|| truncate(&text).to_string());
                Err(RegistryError::Refused { status, what: what.into(), message })
            }
            // The transport error names the URL, which holds no credentials (they go in a header).
            Err(ureq::Error::Transport(t)) => Err(self.unreachable(t.to_string())),
        }
    }

    fn unreachable(&self, message: String) -> RegistryError {
        RegistryError::Unreachable { url: self.config.url.clone(), message }
    }
}

fn truncate(text: &str) -> &str {
    let end = text.char_indices().nth(300).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

/// Percent-encodes a subject for a URL path (subjects may hold `{`, `}` and other reserved characters).
fn encode_path(subject: &str) -> String {
    let mut out = String::with_capacity(subject.len());
    for byte in subject.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_percent_encoded_and_the_password_never_printed() {
        assert_eq!(encode_path("model.{model}.requests-value"), "model.%7Bmodel%7D.requests-value");
        assert_eq!(encode_path("decisions-value"), "decisions-value");
        let config = RegistryConfig {
            url: "http://r:8081".into(),
            username: "svc".into(),
            password: "s3cr3t-pw".into(),
            wait: Duration::from_secs(1),
        };
        assert!(!format!("{config:?}").contains("s3cr3t-pw"));
        let registry = SchemaRegistry::new(config).unwrap();
        assert!(!format!("{registry:?}").contains("s3cr3t-pw"));
    }

    #[test]
    fn an_unreachable_registry_is_an_error_that_fails_fast_after_the_first_lookup() {
        // Port 9 (discard) on localhost: nothing listens; connection refused at once.
        let registry = SchemaRegistry::new(RegistryConfig {
            url: "http://127.0.0.1:9".into(),
            username: String::new(),
            password: String::new(),
            wait: Duration::ZERO,
        })
        .unwrap();
        let first = registry.writer(7).unwrap_err();
        assert!(first.is_transient(), "{first}");
        let started = Instant::now();
        let second = registry.writer(8).unwrap_err();
        assert!(second.to_string().contains("not retried yet"), "{second}");
        assert!(started.elapsed() < Duration::from_millis(50));
        let registering = registry.register("s-value", "Request", "\"string\"", Duration::ZERO).unwrap_err();
        assert!(registering.is_transient(), "{registering}");
    }
}
