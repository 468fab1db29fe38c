//! The one codec: Avro binary for every record, plain or with Confluent Schema Registry framing.
//!
//! The schemas are the files in schemas/, compiled into the binary. Decoding checks that the bytes
//! hold exactly one record of the expected schema (no trailing bytes), so garbage and records of another
//! schema are errors with a reason instead of silently misread data.

pub(crate) mod records;
pub(crate) mod registry;

use std::sync::{Arc, OnceLock};

use apache_avro::Schema;
use serde::Deserialize;

pub use records::{
    AvroRecord, Decision, DecisionStatus, Label, MergeState, Millis, ModelRequest, Outcome, Prediction,
    ROUTED_SOURCE_HEADER, Request, Role, Routed, ScoreState, ScoreStateKind, ScoredDecision, ScoredOutcome,
    ShadowComparison, ShadowScore, parse_routed_source, routed_source,
};
pub use registry::{RegistryConfig, RegistryError, SchemaRegistry};

/// Largest single allocation the Avro decoder may make: a corrupt length prefix in a hostile record must
/// not be able to ask for gigabytes.
const MAX_AVRO_ALLOCATION: usize = 16 * 1024 * 1024;

/// The record types switchyard reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Request,
    ModelRequest,
    Prediction,
    Decision,
    ShadowComparison,
    Routed,
    MergeState,
    Outcome,
    ScoredOutcome,
    ScoreState,
}

impl RecordKind {
    pub const ALL: [RecordKind; 10] = [
        RecordKind::Request,
        RecordKind::ModelRequest,
        RecordKind::Prediction,
        RecordKind::Decision,
        RecordKind::ShadowComparison,
        RecordKind::Routed,
        RecordKind::MergeState,
        RecordKind::Outcome,
        RecordKind::ScoredOutcome,
        RecordKind::ScoreState,
    ];

    /// The record's name, as errors and logs give it.
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Request => "Request",
            RecordKind::ModelRequest => "ModelRequest",
            RecordKind::Prediction => "Prediction",
            RecordKind::Decision => "Decision",
            RecordKind::ShadowComparison => "ShadowComparison",
            RecordKind::Routed => "Routed",
            RecordKind::MergeState => "MergeState",
            RecordKind::Outcome => "Outcome",
            RecordKind::ScoredOutcome => "ScoredOutcome",
            RecordKind::ScoreState => "ScoreState",
        }
    }

    /// The schema file's text, as shipped in schemas/.
    pub fn schema_text(self) -> &'static str {
        match self {
            RecordKind::Request => include_str!("../../schemas/Request.avsc"),
            RecordKind::ModelRequest => include_str!("../../schemas/ModelRequest.avsc"),
            RecordKind::Prediction => include_str!("../../schemas/Prediction.avsc"),
            RecordKind::Decision => include_str!("../../schemas/Decision.avsc"),
            RecordKind::ShadowComparison => include_str!("../../schemas/ShadowComparison.avsc"),
            RecordKind::Routed => include_str!("../../schemas/Routed.avsc"),
            RecordKind::MergeState => include_str!("../../schemas/MergeState.avsc"),
            RecordKind::Outcome => include_str!("../../schemas/Outcome.avsc"),
            RecordKind::ScoredOutcome => include_str!("../../schemas/ScoredOutcome.avsc"),
            RecordKind::ScoreState => include_str!("../../schemas/ScoreState.avsc"),
        }
    }

    pub fn schema(self) -> &'static Schema {
        static SCHEMAS: OnceLock<Vec<Schema>> = OnceLock::new();
        let schemas = SCHEMAS.get_or_init(|| {
            // Set before the first decode; failing means another caller set it first, which is fine.
            let _ = apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION);
            RecordKind::ALL
                .iter()
                .map(|kind| Schema::parse_str(kind.schema_text()).expect("schemas/ files are valid Avro"))
                .collect()
        });
        &schemas[self as usize]
    }

    /// Fields appended to this record since bare Avro records of earlier releases were first kept
    /// readable, oldest first. Only these are ever dropped to read an earlier record: a record cut short
    /// anywhere else stays an error.
    fn appended_fields(self) -> &'static [&'static str] {
        match self {
            RecordKind::Routed => &["hedge_model", "propensity"],
            RecordKind::Decision => &["propensity"],
            _ => &[],
        }
    }

    /// The schemas of earlier releases of this record, newest first: the schema without the fields
    /// appended since ([`Self::appended_fields`], each with a default). A bare Avro record written by an
    /// earlier release ends where those fields begin; read with its writer's schema, they take their
    /// defaults.
    pub fn earlier_schemas(self) -> &'static [Schema] {
        static EARLIER: OnceLock<Vec<Vec<Schema>>> = OnceLock::new();
        let earlier = EARLIER.get_or_init(|| {
            RecordKind::ALL
                .iter()
                .map(|kind| {
                    kind.schema(); // sets the decoder's allocation limit before any decode
                    let mut json: serde_json::Value =
                        serde_json::from_str(kind.schema_text()).expect("schemas/ files are JSON");
                    let mut schemas = Vec::new();
                    for appended in kind.appended_fields().iter().rev() {
                        let fields = json["fields"].as_array_mut().expect("a record schema has fields");
                        let last = fields.pop().expect("an appended field is in the schema");
                        assert_eq!(last["name"], *appended, "{}: appended fields are the schema's last", kind.name());
                        assert!(last.get("default").is_some(), "{}.{appended} has a default", kind.name());
                        let text = serde_json::to_string(&json).expect("JSON serialises");
                        schemas.push(Schema::parse_str(&text).expect("a prefix of a valid schema is valid"));
                    }
                    schemas
                })
                .collect()
        });
        &earlier[self as usize]
    }
}

/// Why bytes could not be read as a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty value")]
    Empty,
    #[error("not Avro of the expected schema: {0}")]
    Avro(String),
    #[error("{0} trailing bytes after the record: wrong schema or corrupt value")]
    Trailing(usize),
    #[error("record does not match the schema: {0}")]
    Shape(String),
    #[error("Confluent framing: {0}")]
    Framing(String),
}

/// Schema Registry ids written into (and expected in) framed records, one per record type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaIds {
    pub request: u32,
    pub model_request: u32,
    pub prediction: u32,
    pub decision: u32,
    pub shadow_comparison: u32,
    pub routed: u32,
    pub merge_state: u32,
    pub outcome: u32,
    pub scored_outcome: u32,
    pub score_state: u32,
}

impl SchemaIds {
    pub fn set(&mut self, kind: RecordKind, id: u32) {
        let slot = match kind {
            RecordKind::Request => &mut self.request,
            RecordKind::ModelRequest => &mut self.model_request,
            RecordKind::Prediction => &mut self.prediction,
            RecordKind::Decision => &mut self.decision,
            RecordKind::ShadowComparison => &mut self.shadow_comparison,
            RecordKind::Routed => &mut self.routed,
            RecordKind::MergeState => &mut self.merge_state,
            RecordKind::Outcome => &mut self.outcome,
            RecordKind::ScoredOutcome => &mut self.scored_outcome,
            RecordKind::ScoreState => &mut self.score_state,
        };
        *slot = id;
    }

    pub fn id(&self, kind: RecordKind) -> u32 {
        match kind {
            RecordKind::Request => self.request,
            RecordKind::ModelRequest => self.model_request,
            RecordKind::Prediction => self.prediction,
            RecordKind::Decision => self.decision,
            RecordKind::ShadowComparison => self.shadow_comparison,
            RecordKind::Routed => self.routed,
            RecordKind::MergeState => self.merge_state,
            RecordKind::Outcome => self.outcome,
            RecordKind::ScoredOutcome => self.scored_outcome,
            RecordKind::ScoreState => self.score_state,
        }
    }
}

/// How Avro bytes are wrapped on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Framing {
    /// Bare Avro binary (the default).
    #[default]
    Plain,
    /// Magic byte 0, a 4-byte big-endian schema id, then Avro binary.
    Confluent(SchemaIds),
}

/// Encodes and decodes every record type with one framing.
///
/// With a schema registry, records are written with the ids switchyard's schemas were registered under,
/// and framed records of any other id are read by their writer's schema from the registry, resolved to
/// switchyard's (Avro schema resolution: added fields with defaults, removed fields, promotions) — so
/// producers, workers and switchyard instances can move to a new schema version one at a time.
#[derive(Debug, Clone, Default)]
pub struct Codec {
    framing: Framing,
    registry: Option<Arc<SchemaRegistry>>,
}

impl Codec {
    pub fn new(framing: Framing) -> Self {
        Codec { framing, registry: None }
    }

    /// Confluent framing with the ids `registry` gives switchyard's schemas: each record type's schema
    /// is registered under the subject of the topic it is written to (`<topic>-value`, Confluent's
    /// TopicNameStrategy; `subject(kind)` names it), or found there if the subject already has it.
    /// Fails on a schema the subject's compatibility rule refuses, and when the registry stays
    /// unreachable for `wait`.
    pub fn with_registry(
        registry: SchemaRegistry,
        subject: impl Fn(RecordKind) -> String,
        wait: std::time::Duration,
    ) -> Result<Self, RegistryError> {
        let mut ids = SchemaIds::default();
        for kind in RecordKind::ALL {
            let subject = subject(kind);
            let id = registry.register(&subject, kind.name(), kind.schema_text().trim(), wait)?;
            tracing::info!(record = kind.name(), %subject, id, registry = registry.url(), "schema registered");
            ids.set(kind, id);
        }
        Ok(Codec { framing: Framing::Confluent(ids), registry: Some(Arc::new(registry)) })
    }

    pub fn has_registry(&self) -> bool {
        self.registry.is_some()
    }

    /// Registers `kind`'s schema under `subject` too (the subject of a per-model topic), if this codec
    /// has a registry. Records keep the id they are written with; this makes the topic's subject name
    /// the schema, for tools that look schemas up by topic.
    pub fn register_subject(&self, kind: RecordKind, subject: &str) -> Result<(), RegistryError> {
        let Some(registry) = &self.registry else { return Ok(()) };
        let id = registry.register(subject, kind.name(), kind.schema_text().trim(), std::time::Duration::ZERO)?;
        tracing::info!(record = kind.name(), %subject, id, "schema registered");
        Ok(())
    }

    /// The record's bytes. Written straight from its value tree ([`write_value`]): the trees are built
    /// by switchyard in schema order, so apache-avro's schema walk and validation on every encode (a
    /// fifth of merge's CPU in a profile) buy nothing; byte-identical to `to_avro_datum` (tested).
    pub fn encode<T: AvroRecord>(&self, record: &T) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        if let Framing::Confluent(ids) = &self.framing {
            out.push(0);
            out.extend_from_slice(&ids.id(T::KIND).to_be_bytes());
        }
        write_value(&record.to_value(), &mut out);
        out
    }

    /// A [`ModelRequest`] copying the request whose value is `request` — bytes this codec decoded as a
    /// whole [`Request`] — built by appending the model request's own four fields to the request's Avro
    /// body: its first six fields are the request's, in order. The same bytes as encoding the record
    /// (tested), without building and re-encoding the request once per copy. `None` when the request was
    /// written with another schema than switchyard's (another registry id): then only encoding the
    /// record gives a model request of switchyard's schema.
    pub fn model_request_from(
        &self,
        request: &[u8],
        model: &str,
        role: Role,
        config_version: i64,
        routed_at: Millis,
    ) -> Option<Vec<u8>> {
        let (header, body) = match &self.framing {
            Framing::Plain => (None, request),
            Framing::Confluent(ids) => {
                if request.get(1..5) != Some(&ids.id(RecordKind::Request).to_be_bytes()[..]) {
                    return None;
                }
                (Some(ids.id(RecordKind::ModelRequest)), &request[5..])
            }
        };
        let mut out = Vec::with_capacity(request.len() + model.len() + 24);
        if let Some(id) = header {
            out.push(0);
            out.extend_from_slice(&id.to_be_bytes());
        }
        out.extend_from_slice(body);
        write_long(&mut out, model.len() as i64);
        out.extend_from_slice(model.as_bytes());
        write_long(&mut out, role as i64);
        write_long(&mut out, config_version);
        write_long(&mut out, routed_at);
        Some(out)
    }

    pub fn decode<T: AvroRecord>(&self, bytes: &[u8]) -> Result<T, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        let (body, writer) = match &self.framing {
            Framing::Plain => (bytes, None),
            Framing::Confluent(ids) => {
                if bytes.len() < 5 {
                    return Err(DecodeError::Framing(format!(
                        "{} bytes is shorter than the 5-byte header",
                        bytes.len()
                    )));
                }
                if bytes[0] != 0 {
                    return Err(DecodeError::Framing(format!("magic byte is {}, expected 0", bytes[0])));
                }
                let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                let expected = ids.id(T::KIND);
                let writer = match &self.registry {
                    _ if id == expected => None,
                    Some(registry) => {
                        Some(registry.writer(id).map_err(|e| DecodeError::Framing(format!("schema id {id}: {e}")))?)
                    }
                    None => return Err(DecodeError::Framing(format!("schema id {id}, expected {expected}"))),
                };
                (&bytes[5..], writer)
            }
        };
        if writer.is_none()
            && let Some(record) = T::read_direct(body)
        {
            return Ok(record);
        }
        let read = |writer: Option<&Schema>| {
            let mut reader = body;
            let value = match writer {
                None => apache_avro::from_avro_datum(T::KIND.schema(), &mut reader, None),
                Some(writer) => apache_avro::from_avro_datum(writer, &mut reader, Some(T::KIND.schema())),
            }
            .map_err(|e| DecodeError::Avro(e.to_string()))?;
            if !reader.is_empty() {
                return Err(DecodeError::Trailing(reader.len()));
            }
            Ok(value)
        };
        let value = match (read(writer.as_deref()), &writer) {
            (Ok(value), _) => value,
            // Bare Avro names no writer's schema: a record an earlier version wrote lacks the fields
            // added since (see `RecordKind::earlier_schemas`).
            (Err(e), None) => T::KIND.earlier_schemas().iter().find_map(|earlier| read(Some(earlier)).ok()).ok_or(e)?,
            (Err(e), Some(_)) => return Err(e),
        };
        T::from_value(value)
    }
}

/// Avro binary of a value tree whose records list their fields in schema order (as every `to_value`
/// of switchyard's records does): the same bytes as `apache_avro::to_avro_datum` with the schema.
fn write_value(value: &apache_avro::types::Value, out: &mut Vec<u8>) {
    use apache_avro::types::Value;
    let bytes = |out: &mut Vec<u8>, b: &[u8]| {
        write_long(out, b.len() as i64);
        out.extend_from_slice(b);
    };
    match value {
        Value::Null => {}
        Value::Boolean(b) => out.push(u8::from(*b)),
        Value::Int(n) | Value::Date(n) | Value::TimeMillis(n) => write_long(out, i64::from(*n)),
        Value::Long(n)
        | Value::TimestampMillis(n)
        | Value::TimestampMicros(n)
        | Value::TimeMicros(n)
        | Value::LocalTimestampMillis(n)
        | Value::LocalTimestampMicros(n) => write_long(out, *n),
        Value::Float(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Double(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bytes(b) | Value::Fixed(_, b) => bytes(out, b),
        Value::String(s) => bytes(out, s.as_bytes()),
        Value::Enum(index, _) => write_long(out, i64::from(*index)),
        Value::Union(index, inner) => {
            write_long(out, i64::from(*index));
            write_value(inner, out);
        }
        Value::Array(items) => {
            if !items.is_empty() {
                write_long(out, items.len() as i64);
                items.iter().for_each(|v| write_value(v, out));
            }
            out.push(0);
        }
        Value::Map(entries) => {
            if !entries.is_empty() {
                write_long(out, entries.len() as i64);
                for (k, v) in entries {
                    bytes(out, k.as_bytes());
                    write_value(v, out);
                }
            }
            out.push(0);
        }
        Value::Record(fields) => fields.iter().for_each(|(_, v)| write_value(v, out)),
        other => unreachable!("switchyard's records hold no {other:?}"),
    }
}

/// An Avro long (and int, and enum index): zig-zag, then 7 bits a byte, lowest first.
fn write_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_model_request_built_from_the_request_bytes_is_the_encoded_record() {
        for codec in all_framings() {
            for (model, role, version, routed_at) in [
                ("v1", Role::Primary, 3, 1_700_000_000_456),
                ("fraud-model-ß", Role::Shadow, 1 << 40, -5),
                ("", Role::Primary, 0, 0),
            ] {
                let request = request();
                let bytes = codec.encode(&request);
                let built = codec.model_request_from(&bytes, model, role, version, routed_at).unwrap();
                let record = ModelRequest { request, model: model.into(), role, config_version: version, routed_at };
                assert_eq!(built, codec.encode(&record), "{model} {role:?} {version} {routed_at}");
                assert_eq!(codec.decode::<ModelRequest>(&built).unwrap(), record);
            }
        }
    }

    fn request() -> Request {
        Request {
            request_id: "r-1".into(),
            user_id: "user-42".into(),
            deployment: "fraud".into(),
            sent_at: 1_700_000_000_123,
            payload: vec![0, 1, 2, 255],
            attributes: HashMap::from([("country".to_string(), "DE".to_string())]),
        }
    }

    fn all_framings() -> Vec<Codec> {
        let ids = SchemaIds {
            request: 1,
            model_request: 2,
            prediction: 3,
            decision: 4,
            shadow_comparison: 5,
            routed: 6,
            merge_state: 7,
            outcome: 8,
            scored_outcome: 9,
            score_state: 10,
        };
        vec![Codec::default(), Codec::new(Framing::Confluent(ids))]
    }

    /// A rolling upgrade reads records the previous version wrote: bare Avro without the fields added
    /// since (Routed's hedge_model and propensity, Decision's propensity, each a null union: one byte).
    #[test]
    fn records_written_before_fields_were_added_still_decode() {
        let codec = Codec::default();
        let routed = Routed {
            request_id: "r".into(),
            user_id: "u".into(),
            deployment: "d".into(),
            strategy: "single".into(),
            cohort: "control".into(),
            bucket: 1,
            config_version: 2,
            serving_model: "a".into(),
            shadow_models: vec![],
            timeout_ms: 500,
            sent_at: 1,
            routed_at: 2,
            fallback: Some(b"0.5".to_vec()),
            hedge_model: None,
            propensity: None,
        };
        let bytes = codec.encode(&routed);
        for dropped in 1..=2 {
            let old = &bytes[..bytes.len() - dropped];
            assert_eq!(codec.decode::<Routed>(old).unwrap(), routed, "without the last {dropped} field(s)");
        }
        assert!(codec.decode::<Routed>(&bytes[..bytes.len() - 3]).is_err(), "cut into fallback: an error");
        let decision = Decision {
            request_id: "r".into(),
            user_id: "u".into(),
            deployment: "d".into(),
            model: "m".into(),
            strategy: "canary".into(),
            cohort: "control".into(),
            bucket: 3,
            config_version: 4,
            status: DecisionStatus::Ok,
            output: Some(b"0.9".to_vec()),
            error: None,
            latency_ms: 12,
            decided_at: 13,
            propensity: None,
        };
        let bytes = codec.encode(&decision);
        assert_eq!(codec.decode::<Decision>(&bytes[..bytes.len() - 1]).unwrap(), decision);
        assert_eq!(RecordKind::Routed.earlier_schemas().len(), 2, "without propensity; without hedge_model too");
        assert!(RecordKind::Request.earlier_schemas().is_empty(), "a cut Request is an error, not an old one");
    }

    fn round_trip<T: AvroRecord + PartialEq + std::fmt::Debug>(record: T) {
        // One value tree for both: a map's order is its HashMap's (a clone keeps it).
        let value = record.to_value();
        let reference = apache_avro::to_avro_datum(T::KIND.schema(), value.clone()).unwrap();
        let mut written = Vec::new();
        write_value(&value, &mut written);
        assert_eq!(written, reference, "{record:?}: the same bytes as apache-avro");
        for codec in all_framings() {
            let bytes = codec.encode(&record);
            assert_eq!(codec.decode::<T>(&bytes).unwrap(), record);
        }
        // A record read straight from its bytes reads as the value tree does, and a cut or extended
        // one is left to the general reading.
        let direct = T::read_direct(&written);
        let hot = matches!(T::KIND, RecordKind::Decision | RecordKind::Outcome | RecordKind::ScoreState);
        assert_eq!(direct.is_some(), hot, "{record:?}: the score stage's records are read straight");
        if let Some(direct) = direct {
            let general = apache_avro::from_avro_datum(T::KIND.schema(), &mut &written[..], None).unwrap();
            assert_eq!(direct, T::from_value(general).unwrap());
            for cut in 0..written.len() {
                assert!(T::read_direct(&written[..cut]).is_none(), "{record:?} cut at {cut}");
            }
            assert!(T::read_direct(&[&written[..], &[0]].concat()).is_none());
        }
    }

    #[test]
    fn every_schema_file_parses_and_is_compiled_in() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let mut files = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let schema = Schema::parse_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(RecordKind::ALL.iter().any(|k| k.schema() == &schema), "{} is not used", path.display());
            files += 1;
        }
        assert_eq!(files, RecordKind::ALL.len());
    }

    #[test]
    fn every_record_round_trips() {
        round_trip(request());
        round_trip(Request { attributes: HashMap::new(), ..request() });
        let many = (0..40).map(|i| (format!("k{i}"), "v".repeat(i))).collect();
        round_trip(Request { attributes: many, payload: vec![7; 300], sent_at: -1, ..request() });
        round_trip(ModelRequest {
            request: request(),
            model: "fraud-v2".into(),
            role: Role::Shadow,
            config_version: 3,
            routed_at: 5,
        });
        round_trip(Prediction {
            request_id: "r".into(),
            model: "m".into(),
            output: Some(b"0.5".to_vec()),
            error: None,
            produced_at: 9,
        });
        round_trip(Prediction {
            request_id: "r".into(),
            model: "m".into(),
            output: None,
            error: Some("boom".into()),
            produced_at: 9,
        });
        for status in [
            DecisionStatus::Ok,
            DecisionStatus::ModelError,
            DecisionStatus::Timeout,
            DecisionStatus::Fallback,
            DecisionStatus::Hedged,
        ] {
            round_trip(Decision {
                request_id: "r".into(),
                user_id: "u".into(),
                deployment: "d".into(),
                model: "m".into(),
                strategy: "canary".into(),
                cohort: "candidate".into(),
                bucket: 9999,
                config_version: 4,
                status,
                output: None,
                error: Some("late".into()),
                latency_ms: 12,
                decided_at: 13,
                propensity: Some(0.25),
            });
        }
        round_trip(ShadowComparison {
            request_id: "r".into(),
            deployment: "d".into(),
            serving_model: "a".into(),
            serving_output: None,
            shadow_model: "b".into(),
            shadow_output: Some(vec![1]),
            agreed: false,
            serving_latency_ms: None,
            shadow_latency_ms: 7,
            compared_at: 8,
        });
        round_trip(Routed {
            request_id: "r".into(),
            user_id: "u".into(),
            deployment: "d".into(),
            strategy: "shadow".into(),
            cohort: "control".into(),
            bucket: 1,
            config_version: 2,
            serving_model: "a".into(),
            shadow_models: vec!["b".into(), "c".into()],
            timeout_ms: 500,
            sent_at: 1,
            routed_at: 2,
            fallback: Some(b"0.5".to_vec()),
            hedge_model: Some("a".into()),
            propensity: Some(0.9),
        });
        round_trip(MergeState {
            request_id: "r".into(),
            served_ok: true,
            served_output: Some(vec![1]),
            served_latency_ms: Some(3),
            compared: vec!["b".into()],
            finished: false,
        });
        round_trip(MergeState { request_id: "r".into(), ..MergeState::default() });
        round_trip(Outcome {
            request_id: "r-1".into(),
            user_id: "u".into(),
            label: 1.0,
            observed_at: 1_700_000_100_000,
            source: "chargebacks".into(),
        });
        let scored = ScoredOutcome {
            request_id: "r-1".into(),
            user_id: "u".into(),
            deployment: "fraud".into(),
            model: "v2".into(),
            role: "serving".into(),
            cohort: "candidate".into(),
            config_version: 3,
            status: "OK".into(),
            score: Some(0.8731),
            label: 1.0,
            zero_one: Some(0.0),
            brier: Some(0.016),
            log_loss: Some(0.1357),
            absolute_error: None,
            squared_error: None,
            label_delay_ms: 86_400_000,
            decided_at: 1_700_000_000_000,
            observed_at: 1_700_086_400_000,
            source: "chargebacks".into(),
        };
        round_trip(scored.clone());
        round_trip(ScoredOutcome { score: None, zero_one: None, brier: None, log_loss: None, ..scored });
        let decided = ScoredDecision {
            user_id: "u".into(),
            deployment: "fraud".into(),
            model: "v2".into(),
            cohort: "candidate".into(),
            config_version: 3,
            status: DecisionStatus::Ok,
            score: Some(0.25),
            decided_at: 1_700_000_000_000,
        };
        let shadows = vec![
            ShadowScore { model: "v3".into(), answered: true, score: Some(0.5) },
            ShadowScore { model: "v4".into(), answered: false, score: None },
        ];
        let label = Label { user_id: String::new(), label: 1.0, observed_at: 5, source: "chargebacks".into() };
        let open = ScoreState {
            state: ScoreStateKind::Open,
            partition: 2,
            decision: Some(decided.clone()),
            shadows: shadows.clone(),
            label: None,
            label_topic: None,
            label_offset: None,
        };
        round_trip(open.clone());
        // Every status a decision can have, HEDGED included, in a state kept for scoring.
        for status in DecisionStatus::ALL {
            round_trip(ScoreState { decision: Some(ScoredDecision { status, ..decided.clone() }), ..open.clone() });
        }
        round_trip(ScoreState {
            state: ScoreStateKind::Labelled,
            decision: Some(ScoredDecision { status: DecisionStatus::Timeout, score: None, ..decided }),
            label: Some(label.clone()),
            ..open.clone()
        });
        round_trip(ScoreState {
            state: ScoreStateKind::Early,
            decision: None,
            shadows: Vec::new(),
            label: Some(Label { user_id: "u".into(), ..label }),
            label_topic: Some("outcomes".into()),
            label_offset: Some(77),
            ..open.clone()
        });
        round_trip(ScoreState { state: ScoreStateKind::EarlyShadows, decision: None, ..open });
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let codec = Codec::default();
        assert_eq!(codec.decode::<Request>(&[]), Err(DecodeError::Empty));
        let bytes = codec.encode(&request());
        assert!(codec.decode::<Request>(&bytes[..bytes.len() - 3]).is_err(), "truncated");
        let mut longer = bytes.clone();
        longer.push(7);
        assert_eq!(codec.decode::<Request>(&longer), Err(DecodeError::Trailing(1)));
        // A Prediction is not a Request.
        let prediction = codec.encode(&Prediction {
            request_id: "r".into(),
            model: "m".into(),
            output: None,
            error: None,
            produced_at: 1,
        });
        assert!(codec.decode::<Request>(&prediction).is_err());
        // A huge length prefix must not allocate it.
        assert!(codec.decode::<Request>(&[0xfe, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }

    #[test]
    fn confluent_framing_checks_header() {
        let framed = &all_framings()[1];
        let bytes = framed.encode(&request());
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 1]);
        assert!(matches!(framed.decode::<Request>(&bytes[..3]), Err(DecodeError::Framing(_))));
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] = 1;
        assert!(matches!(framed.decode::<Request>(&wrong_magic), Err(DecodeError::Framing(_))));
        let mut wrong_id = bytes.clone();
        wrong_id[4] = 9;
        assert!(matches!(framed.decode::<Request>(&wrong_id), Err(DecodeError::Framing(_))));
        assert!(Codec::default().decode::<Request>(&bytes).is_err(), "framed bytes are not plain Avro");
    }
}
