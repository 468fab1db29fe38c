//! The records of the contract as Rust types, and their mapping to Avro values.
//!
//! The mapping is written out by hand rather than through serde so that every logical type (timestamps,
//! enums, nullable unions) is explicit and a record from outside can only fail with a [`DecodeError`].

use std::collections::HashMap;

use apache_avro::types::Value;

use super::{DecodeError, RecordKind};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// A prediction request from a producer.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub request_id: String,
    pub user_id: String,
    pub deployment: String,
    pub sent_at: Millis,
    pub payload: Vec<u8>,
    pub attributes: HashMap<String, String>,
}

/// Whether a model's answer is served or only compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    // The index of each symbol in the schema's enum.
    Primary = 0,
    Shadow = 1,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "PRIMARY",
            Role::Shadow => "SHADOW",
        }
    }
}

/// A request as one model worker receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    pub request: Request,
    pub model: String,
    pub role: Role,
    pub config_version: i64,
    pub routed_at: Millis,
}

/// A model worker's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub request_id: String,
    pub model: String,
    pub output: Option<Vec<u8>>,
    pub error: Option<String>,
    pub produced_at: Millis,
}

/// How a decision came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DecisionStatus {
    Ok,
    ModelError,
    Timeout,
    Fallback,
    /// A hedged canary's candidate erred or missed the deadline; control's answer was served.
    Hedged,
}

impl DecisionStatus {
    const SYMBOLS: [&'static str; 5] = ["OK", "MODEL_ERROR", "TIMEOUT", "FALLBACK", "HEDGED"];
    pub const ALL: [DecisionStatus; 5] = [Self::Ok, Self::ModelError, Self::Timeout, Self::Fallback, Self::Hedged];

    pub fn as_str(self) -> &'static str {
        Self::SYMBOLS[self as usize]
    }
}

/// The one answer a request gets.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub request_id: String,
    pub user_id: String,
    pub deployment: String,
    pub model: String,
    pub strategy: String,
    pub cohort: String,
    pub bucket: i32,
    pub config_version: i64,
    pub status: DecisionStatus,
    pub output: Option<Vec<u8>>,
    pub error: Option<String>,
    pub latency_ms: i64,
    pub decided_at: Millis,
    /// The probability with which the request's side was chosen (the share of users the deployment
    /// version gave it); None when an override or a rule chose it. Offline evaluation weighs by it.
    pub propensity: Option<f64>,
}

/// A shadow model's answer next to the served one.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowComparison {
    pub request_id: String,
    pub deployment: String,
    pub serving_model: String,
    pub serving_output: Option<Vec<u8>>,
    pub shadow_model: String,
    pub shadow_output: Option<Vec<u8>>,
    pub agreed: bool,
    pub serving_latency_ms: Option<i64>,
    pub shadow_latency_ms: i64,
    pub compared_at: Millis,
}

/// Internal: what route did with a request; merge's join input.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub request_id: String,
    pub user_id: String,
    pub deployment: String,
    pub strategy: String,
    pub cohort: String,
    pub bucket: i32,
    pub config_version: i64,
    pub serving_model: String,
    pub shadow_models: Vec<String>,
    pub timeout_ms: i64,
    pub sent_at: Millis,
    pub routed_at: Millis,
    pub fallback: Option<Vec<u8>>,
    /// A hedged canary: the shadow model (control) whose answer is served when the serving model errs
    /// or misses the deadline.
    pub hedge_model: Option<String>,
    /// See [`Decision::propensity`].
    pub propensity: Option<f64>,
}

/// Header of a routed record naming the request it was made from, `<partition>:<offset>` of the
/// requests topic: route may write a request's routing more than once (it commits its input offsets
/// after its records, not in a transaction with them), and merge keeps only the first of them.
pub const ROUTED_SOURCE_HEADER: &str = "source";

/// The value of [`ROUTED_SOURCE_HEADER`] for the request at `offset` of requests partition `partition`.
pub fn routed_source(partition: i32, offset: i64) -> String {
    format!("{partition}:{offset}")
}

/// The (partition, offset) a [`ROUTED_SOURCE_HEADER`] value names, if it is one.
pub fn parse_routed_source(value: &[u8]) -> Option<(i32, i64)> {
    let (partition, offset) = std::str::from_utf8(value).ok()?.split_once(':')?;
    Some((partition.parse().ok()?, offset.parse().ok()?))
}

/// Internal: how far merge got with one request (its changelog record).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MergeState {
    pub request_id: String,
    pub served_ok: bool,
    pub served_output: Option<Vec<u8>>,
    pub served_latency_ms: Option<i64>,
    pub compared: Vec<String>,
    pub finished: bool,
}

/// Internal: the score stage's state of one request, its changelog record (`schemas/ScoreState.avsc`).
/// It keeps a score per answer, never the answer's bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreState {
    pub state: ScoreStateKind,
    /// The partition the state is kept on (see the schema).
    pub partition: i32,
    /// OPEN, HELD and LABELLED.
    pub decision: Option<ScoredDecision>,
    pub shadows: Vec<ShadowScore>,
    /// HELD, LABELLED and EARLY.
    pub label: Option<Label>,
    /// EARLY: where the label was read (at `partition`).
    pub label_topic: Option<String>,
    pub label_offset: Option<i64>,
}

/// Which of a request's states a [`ScoreState`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreStateKind {
    // The index of each symbol in the schema's enum.
    Open = 0,
    Labelled = 1,
    Early = 2,
    EarlyShadows = 3,
    Held = 4,
}

impl ScoreStateKind {
    const SYMBOLS: [&'static str; 5] = ["OPEN", "LABELLED", "EARLY", "EARLY_SHADOWS", "HELD"];
}

/// What scoring needs of a decision: its ids and the served answer's score.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredDecision {
    pub user_id: String,
    pub deployment: String,
    pub model: String,
    pub cohort: String,
    pub config_version: i64,
    pub status: DecisionStatus,
    pub score: Option<f64>,
    pub decided_at: Millis,
}

/// A shadow model's answer, as scoring needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowScore {
    pub model: String,
    /// It gave an output (not an error).
    pub answered: bool,
    /// The output's score, if it holds one.
    pub score: Option<f64>,
}

/// An outcome label as the score stage keeps it (its request id is the changelog key).
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    pub user_id: String,
    pub label: f64,
    pub observed_at: Millis,
    pub source: String,
}

/// A record type with an Avro schema in schemas/.
pub trait AvroRecord: Sized {
    const KIND: RecordKind;
    fn to_value(&self) -> Value;
    fn from_value(value: Value) -> Result<Self, DecodeError>;
    /// The record read straight from Avro binary written with its current schema, without a value
    /// tree: for records read far more often than the rest. None when the bytes are not exactly
    /// one such record; the codec then reads them the general way (which also knows earlier schemas
    /// and says what is wrong).
    fn read_direct(_body: &[u8]) -> Option<Self> {
        None
    }
}

/// A cursor over Avro binary (the encodings of the specification's "Binary Encoding").
struct Binary<'a>(&'a [u8]);

impl<'a> Binary<'a> {
    fn long(&mut self) -> Option<i64> {
        let mut z = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            z |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        None
    }
    fn int(&mut self) -> Option<i32> {
        i32::try_from(self.long()?).ok()
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(taken)
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = usize::try_from(self.long()?).ok()?;
        Some(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }
    fn status(&mut self) -> Option<DecisionStatus> {
        DecisionStatus::ALL.get(usize::try_from(self.long()?).ok()?).copied()
    }
    /// The record read, if the bytes end where it does.
    fn end<T>(self, record: T) -> Option<T> {
        self.0.is_empty().then_some(record)
    }
    fn double(&mut self) -> Option<f64> {
        Some(f64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn boolean(&mut self) -> Option<bool> {
        match self.take(1)?[0] {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }
    /// A union of null and one type: None, or Some(None) for null.
    fn optional<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        match self.long()? {
            0 => Some(None),
            1 => Some(Some(read(self)?)),
            _ => None,
        }
    }
    /// An array's items (blocks of a count, negative when followed by the block's size in bytes).
    fn array<T>(&mut self, mut read: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let mut items = Vec::new();
        loop {
            let count = match self.long()? {
                0 => return Some(items),
                n if n < 0 => {
                    self.long()?;
                    n.unsigned_abs()
                }
                n => n as u64,
            };
            for _ in 0..count {
                items.push(read(self)?);
            }
        }
    }
}

/// Reads named fields out of a decoded record.
struct Fields(HashMap<String, Value>);

impl Fields {
    fn of(value: Value) -> Result<Self, DecodeError> {
        match value {
            Value::Record(fields) => Ok(Fields(fields.into_iter().collect())),
            other => Err(DecodeError::Shape(format!("expected a record, found {other:?}"))),
        }
    }

    fn take(&mut self, name: &'static str) -> Result<Value, DecodeError> {
        self.0.remove(name).ok_or_else(|| DecodeError::Shape(format!("missing field {name}")))
    }

    fn string(&mut self, name: &'static str) -> Result<String, DecodeError> {
        match self.take(name)? {
            Value::String(s) => Ok(s),
            other => Err(wrong(name, "string", &other)),
        }
    }

    fn long(&mut self, name: &'static str) -> Result<i64, DecodeError> {
        match self.take(name)? {
            Value::Long(v) | Value::TimestampMillis(v) => Ok(v),
            Value::Int(v) => Ok(i64::from(v)),
            other => Err(wrong(name, "long", &other)),
        }
    }

    fn int(&mut self, name: &'static str) -> Result<i32, DecodeError> {
        match self.take(name)? {
            Value::Int(v) => Ok(v),
            other => Err(wrong(name, "int", &other)),
        }
    }

    fn boolean(&mut self, name: &'static str) -> Result<bool, DecodeError> {
        match self.take(name)? {
            Value::Boolean(v) => Ok(v),
            other => Err(wrong(name, "boolean", &other)),
        }
    }

    fn bytes(&mut self, name: &'static str) -> Result<Vec<u8>, DecodeError> {
        match self.take(name)? {
            Value::Bytes(v) => Ok(v),
            other => Err(wrong(name, "bytes", &other)),
        }
    }

    fn symbol(&mut self, name: &'static str) -> Result<String, DecodeError> {
        match self.take(name)? {
            Value::Enum(_, symbol) => Ok(symbol),
            other => Err(wrong(name, "enum", &other)),
        }
    }

    fn nullable(&mut self, name: &'static str) -> Result<Option<Value>, DecodeError> {
        match self.take(name)? {
            Value::Union(_, inner) => match *inner {
                Value::Null => Ok(None),
                v => Ok(Some(v)),
            },
            Value::Null => Ok(None),
            other => Ok(Some(other)),
        }
    }

    fn opt_bytes(&mut self, name: &'static str) -> Result<Option<Vec<u8>>, DecodeError> {
        match self.nullable(name)? {
            None => Ok(None),
            Some(Value::Bytes(v)) => Ok(Some(v)),
            Some(other) => Err(wrong(name, "bytes", &other)),
        }
    }

    fn opt_string(&mut self, name: &'static str) -> Result<Option<String>, DecodeError> {
        match self.nullable(name)? {
            None => Ok(None),
            Some(Value::String(v)) => Ok(Some(v)),
            Some(other) => Err(wrong(name, "string", &other)),
        }
    }

    fn opt_long(&mut self, name: &'static str) -> Result<Option<i64>, DecodeError> {
        match self.nullable(name)? {
            None => Ok(None),
            Some(Value::Long(v)) => Ok(Some(v)),
            Some(other) => Err(wrong(name, "long", &other)),
        }
    }

    fn double(&mut self, name: &'static str) -> Result<f64, DecodeError> {
        match self.take(name)? {
            Value::Double(v) => Ok(v),
            other => Err(wrong(name, "double", &other)),
        }
    }

    fn opt_double(&mut self, name: &'static str) -> Result<Option<f64>, DecodeError> {
        match self.nullable(name)? {
            None => Ok(None),
            Some(Value::Double(v)) => Ok(Some(v)),
            Some(other) => Err(wrong(name, "double", &other)),
        }
    }

    fn string_map(&mut self, name: &'static str) -> Result<HashMap<String, String>, DecodeError> {
        match self.take(name)? {
            Value::Map(map) => map
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k, s)),
                    other => Err(wrong(name, "map of strings", &other)),
                })
                .collect(),
            other => Err(wrong(name, "map", &other)),
        }
    }

    fn records(&mut self, name: &'static str) -> Result<Vec<Fields>, DecodeError> {
        match self.take(name)? {
            Value::Array(items) => items.into_iter().map(Fields::of).collect(),
            other => Err(wrong(name, "array of records", &other)),
        }
    }

    fn opt_record(&mut self, name: &'static str) -> Result<Option<Fields>, DecodeError> {
        self.nullable(name)?.map(Fields::of).transpose()
    }

    fn strings(&mut self, name: &'static str) -> Result<Vec<String>, DecodeError> {
        match self.take(name)? {
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(wrong(name, "array of strings", &other)),
                })
                .collect(),
            other => Err(wrong(name, "array", &other)),
        }
    }
}

fn wrong(field: &str, expected: &str, found: &Value) -> DecodeError {
    DecodeError::Shape(format!("field {field}: expected {expected}, found {found:?}"))
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

fn opt_bytes(v: &Option<Vec<u8>>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(b) => Value::Union(1, Box::new(Value::Bytes(b.clone()))),
    }
}

fn opt_string(v: &Option<String>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(b) => Value::Union(1, Box::new(Value::String(b.clone()))),
    }
}

fn request_fields(r: &Request) -> Vec<(&'static str, Value)> {
    vec![
        ("request_id", s(&r.request_id)),
        ("user_id", s(&r.user_id)),
        ("deployment", s(&r.deployment)),
        ("sent_at", Value::TimestampMillis(r.sent_at)),
        ("payload", Value::Bytes(r.payload.clone())),
        ("attributes", Value::Map(r.attributes.iter().map(|(k, v)| (k.clone(), s(v))).collect())),
    ]
}

fn request_from(f: &mut Fields) -> Result<Request, DecodeError> {
    Ok(Request {
        request_id: f.string("request_id")?,
        user_id: f.string("user_id")?,
        deployment: f.string("deployment")?,
        sent_at: f.long("sent_at")?,
        payload: f.bytes("payload")?,
        attributes: f.string_map("attributes")?,
    })
}

impl AvroRecord for Request {
    const KIND: RecordKind = RecordKind::Request;

    fn to_value(&self) -> Value {
        record(request_fields(self))
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        request_from(&mut Fields::of(value)?)
    }
}

impl AvroRecord for ModelRequest {
    const KIND: RecordKind = RecordKind::ModelRequest;

    fn to_value(&self) -> Value {
        let mut fields = request_fields(&self.request);
        let role_index = match self.role {
            Role::Primary => 0,
            Role::Shadow => 1,
        };
        fields.extend([
            ("model", s(&self.model)),
            ("role", Value::Enum(role_index, self.role.as_str().to_string())),
            ("config_version", Value::Long(self.config_version)),
            ("routed_at", Value::TimestampMillis(self.routed_at)),
        ]);
        record(fields)
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(value)?;
        let request = request_from(&mut f)?;
        let role = match f.symbol("role")?.as_str() {
            "PRIMARY" => Role::Primary,
            "SHADOW" => Role::Shadow,
            other => return Err(DecodeError::Shape(format!("unknown role {other}"))),
        };
        Ok(ModelRequest {
            request,
            model: f.string("model")?,
            role,
            config_version: f.long("config_version")?,
            routed_at: f.long("routed_at")?,
        })
    }
}

impl AvroRecord for Prediction {
    const KIND: RecordKind = RecordKind::Prediction;

    fn to_value(&self) -> Value {
        record(vec![
            ("request_id", s(&self.request_id)),
            ("model", s(&self.model)),
            ("output", opt_bytes(&self.output)),
            ("error", opt_string(&self.error)),
            ("produced_at", Value::TimestampMillis(self.produced_at)),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(value)?;
        Ok(Prediction {
            request_id: f.string("request_id")?,
            model: f.string("model")?,
            output: f.opt_bytes("output")?,
            error: f.opt_string("error")?,
            produced_at: f.long("produced_at")?,
        })
    }
}

impl AvroRecord for Decision {
    const KIND: RecordKind = RecordKind::Decision;

    fn to_value(&self) -> Value {
        record(vec![
            ("request_id", s(&self.request_id)),
            ("user_id", s(&self.user_id)),
            ("deployment", s(&self.deployment)),
            ("model", s(&self.model)),
            ("strategy", s(&self.strategy)),
            ("cohort", s(&self.cohort)),
            ("bucket", Value::Int(self.bucket)),
            ("config_version", Value::Long(self.config_version)),
            ("status", Value::Enum(self.status as u32, self.status.as_str().to_string())),
            ("output", opt_bytes(&self.output)),
            ("error", opt_string(&self.error)),
            ("latency_ms", Value::Long(self.latency_ms)),
            ("decided_at", Value::TimestampMillis(self.decided_at)),
            ("propensity", opt_double(self.propensity)),
        ])
    }

    /// The score stage reads every decision.
    fn read_direct(body: &[u8]) -> Option<Self> {
        let mut b = Binary(body);
        let decision = Decision {
            request_id: b.string()?,
            user_id: b.string()?,
            deployment: b.string()?,
            model: b.string()?,
            strategy: b.string()?,
            cohort: b.string()?,
            bucket: b.int()?,
            config_version: b.long()?,
            status: b.status()?,
            output: b.optional(Binary::bytes)?,
            error: b.optional(Binary::string)?,
            latency_ms: b.long()?,
            decided_at: b.long()?,
            propensity: b.optional(Binary::double)?,
        };
        b.end(decision)
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(value)?;
        let status = status_of(&f.symbol("status")?)?;
        Ok(Decision {
            request_id: f.string("request_id")?,
            user_id: f.string("user_id")?,
            deployment: f.string("deployment")?,
            model: f.string("model")?,
            strategy: f.string("strategy")?,
            cohort: f.string("cohort")?,
            bucket: f.int("bucket")?,
            config_version: f.long("config_version")?,
            status,
            output: f.opt_bytes("output")?,
            error: f.opt_string("error")?,
            latency_ms: f.long("latency_ms")?,
            decided_at: f.long("decided_at")?,
            propensity: f.opt_double("propensity")?,
        })
    }
}

/// What happened after a request: its label (`schemas/Outcome.avsc`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub request_id: String,
    pub user_id: String,
    pub label: f64,
    pub observed_at: Millis,
    pub source: String,
}

impl AvroRecord for Outcome {
    const KIND: RecordKind = RecordKind::Outcome;

    fn to_value(&self) -> Value {
        record(vec![
            ("request_id", s(&self.request_id)),
            ("user_id", s(&self.user_id)),
            ("label", Value::Double(self.label)),
            ("observed_at", Value::TimestampMillis(self.observed_at)),
            ("source", s(&self.source)),
        ])
    }

    /// The score stage reads every label.
    fn read_direct(body: &[u8]) -> Option<Self> {
        let mut b = Binary(body);
        let outcome = Outcome {
            request_id: b.string()?,
            user_id: b.string()?,
            label: b.double()?,
            observed_at: b.long()?,
            source: b.string()?,
        };
        b.end(outcome)
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(value)?;
        Ok(Outcome {
            request_id: f.string("request_id")?,
            user_id: f.string("user_id")?,
            label: f.double("label")?,
            observed_at: f.long("observed_at")?,
            source: f.string("source")?,
        })
    }
}

/// One labelled answer with its losses (`schemas/ScoredOutcome.avsc`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredOutcome {
    pub request_id: String,
    pub user_id: String,
    pub deployment: String,
    pub model: String,
    pub role: String,
    pub cohort: String,
    pub config_version: i64,
    pub status: String,
    pub score: Option<f64>,
    pub label: f64,
    pub zero_one: Option<f64>,
    pub brier: Option<f64>,
    pub log_loss: Option<f64>,
    pub absolute_error: Option<f64>,
    pub squared_error: Option<f64>,
    pub label_delay_ms: i64,
    pub decided_at: Millis,
    pub observed_at: Millis,
    pub source: String,
}

fn opt_double(v: Option<f64>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(x) => Value::Union(1, Box::new(Value::Double(x))),
    }
}

impl AvroRecord for ScoredOutcome {
    const KIND: RecordKind = RecordKind::ScoredOutcome;

    fn to_value(&self) -> Value {
        record(vec![
            ("request_id", s(&self.request_id)),
            ("user_id", s(&self.user_id)),
            ("deployment", s(&self.deployment)),
            ("model", s(&self.model)),
            ("role", s(&self.role)),
            ("cohort", s(&self.cohort)),
            ("config_version", Value::Long(self.config_version)),
            ("status", s(&self.status)),
            ("score", opt_double(self.score)),
            ("label", Value::Double(self.label)),
            ("zero_one", opt_double(self.zero_one)),
            ("brier", opt_double(self.brier)),
            ("log_loss", opt_double(self.log_loss)),
            ("absolute_error", opt_double(self.absolute_error)),
            ("squared_error", opt_double(self.squared_error)),
            ("label_delay_ms", Value::Long(self.label_delay_ms)),
            ("decided_at", Value::TimestampMillis(self.decided_at)),
            ("observed_at", Value::TimestampMillis(self.observed_at)),
            ("source", s(&self.source)),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(value)?;
        Ok(ScoredOutcome {
            request_id: f.string("request_id")?,
            user_id: f.string("user_id")?,
            deployment: f.string("deployment")?,
            model: f.string("model")?,
            role: f.string("role")?,
            cohort: f.string("cohort")?,
            config_version: f.long("config_version")?,
            status: f.string("status")?,
            score: f.opt_double("score")?,
            label: f.double("label")?,
            zero_one: f.opt_double("zero_one")?,
            brier: f.opt_double("brier")?,
            log_loss: f.opt_double("log_loss")?,
            absolute_error: f.opt_double("absolute_error")?,
            squared_error: f.opt_double("squared_error")?,
            label_delay_ms: f.long("label_delay_ms")?,
            decided_at: f.long("decided_at")?,
            observed_at: f.long("observed_at")?,
            source: f.string("source")?,
        })
    }
}

impl AvroRecord for ShadowComparison {
    const KIND: RecordKind = RecordKind::ShadowComparison;

    fn to_value(&self) -> Value {
        record(vec![
            ("request_id", s(&self.request_id)),
            ("deployment", s(&self.deployment)),
            ("serving_model", s(&self.serving_model)),
            ("serving_output", opt_bytes(&self.serving_output)),
            ("shadow_model", s(&self.shadow_model)),
            ("shadow_output", opt_bytes(&self.shadow_output)),
            ("agreed", Value::Boolean(self.agreed)),
            ("serving_latency_ms", opt_long(self.serving_latency_ms)),
            ("shadow_latency_ms", Value::Long(self.shadow_latency_ms)),
            ("compared_at", Value::TimestampMillis(self.compared_at)),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(value)?;
        Ok(ShadowComparison {
            request_id: f.string("request_id")?,
            deployment: f.string("deployment")?,
            serving_model: f.string("serving_model")?,
            serving_output: f.opt_bytes("serving_output")?,
            shadow_model: f.string("shadow_model")?,
            shadow_output: f.opt_bytes("shadow_output")?,
            agreed: f.boolean("agreed")?,
            serving_latency_ms: f.opt_long("serving_latency_ms")?,
            shadow_latency_ms: f.long("shadow_latency_ms")?,
            compared_at: f.long("compared_at")?,
        })
    }
}

impl AvroRecord for Routed {
    const KIND: RecordKind = RecordKind::Routed;

    fn to_value(&self) -> Value {
        record(vec![
            ("request_id", s(&self.request_id)),
            ("user_id", s(&self.user_id)),
            ("deployment", s(&self.deployment)),
            ("strategy", s(&self.strategy)),
            ("cohort", s(&self.cohort)),
            ("bucket", Value::Int(self.bucket)),
            ("config_version", Value::Long(self.config_version)),
            ("serving_model", s(&self.serving_model)),
            ("shadow_models", Value::Array(self.shadow_models.iter().map(|m| s(m)).collect())),
            ("timeout_ms", Value::Long(self.timeout_ms)),
            ("sent_at", Value::TimestampMillis(self.sent_at)),
            ("routed_at", Value::TimestampMillis(self.routed_at)),
            ("fallback", opt_bytes(&self.fallback)),
            ("hedge_model", opt_string(&self.hedge_model)),
            ("propensity", opt_double(self.propensity)),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(value)?;
        Ok(Routed {
            request_id: f.string("request_id")?,
            user_id: f.string("user_id")?,
            deployment: f.string("deployment")?,
            strategy: f.string("strategy")?,
            cohort: f.string("cohort")?,
            bucket: f.int("bucket")?,
            config_version: f.long("config_version")?,
            serving_model: f.string("serving_model")?,
            shadow_models: f.strings("shadow_models")?,
            timeout_ms: f.long("timeout_ms")?,
            sent_at: f.long("sent_at")?,
            routed_at: f.long("routed_at")?,
            fallback: f.opt_bytes("fallback")?,
            hedge_model: f.opt_string("hedge_model")?,
            propensity: f.opt_double("propensity")?,
        })
    }
}

fn opt_long(v: Option<i64>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(Value::Long(v))),
    }
}

impl AvroRecord for MergeState {
    const KIND: RecordKind = RecordKind::MergeState;

    fn to_value(&self) -> Value {
        record(vec![
            ("request_id", s(&self.request_id)),
            ("served_ok", Value::Boolean(self.served_ok)),
            ("served_output", opt_bytes(&self.served_output)),
            ("served_latency_ms", opt_long(self.served_latency_ms)),
            ("compared", Value::Array(self.compared.iter().map(|m| s(m)).collect())),
            ("finished", Value::Boolean(self.finished)),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(value)?;
        Ok(MergeState {
            request_id: f.string("request_id")?,
            served_ok: f.boolean("served_ok")?,
            served_output: f.opt_bytes("served_output")?,
            served_latency_ms: f.opt_long("served_latency_ms")?,
            compared: f.strings("compared")?,
            finished: f.boolean("finished")?,
        })
    }
}

fn status_of(symbol: &str) -> Result<DecisionStatus, DecodeError> {
    match symbol {
        "OK" => Ok(DecisionStatus::Ok),
        "MODEL_ERROR" => Ok(DecisionStatus::ModelError),
        "TIMEOUT" => Ok(DecisionStatus::Timeout),
        "FALLBACK" => Ok(DecisionStatus::Fallback),
        "HEDGED" => Ok(DecisionStatus::Hedged),
        other => Err(DecodeError::Shape(format!("unknown status {other}"))),
    }
}

impl AvroRecord for ScoreState {
    const KIND: RecordKind = RecordKind::ScoreState;

    /// The score stage reads a state for every label it joins: straight from the bytes, this is a
    /// fifth of what the value tree cost (most of a label's decoding).
    fn read_direct(body: &[u8]) -> Option<Self> {
        let mut b = Binary(body);
        let state = match b.long()? {
            0 => ScoreStateKind::Open,
            1 => ScoreStateKind::Labelled,
            2 => ScoreStateKind::Early,
            3 => ScoreStateKind::EarlyShadows,
            4 => ScoreStateKind::Held,
            _ => return None,
        };
        let partition = b.int()?;
        let decision = b.optional(|b| {
            Some(ScoredDecision {
                user_id: b.string()?,
                deployment: b.string()?,
                model: b.string()?,
                cohort: b.string()?,
                config_version: b.long()?,
                status: b.status()?,
                score: b.optional(Binary::double)?,
                decided_at: b.long()?,
            })
        })?;
        let shadows = b.array(|b| {
            Some(ShadowScore { model: b.string()?, answered: b.boolean()?, score: b.optional(Binary::double)? })
        })?;
        let label = b.optional(|b| {
            Some(Label { user_id: b.string()?, label: b.double()?, observed_at: b.long()?, source: b.string()? })
        })?;
        let label_topic = b.optional(Binary::string)?;
        let label_offset = b.optional(Binary::long)?;
        b.end(ScoreState { state, partition, decision, shadows, label, label_topic, label_offset })
    }

    fn to_value(&self) -> Value {
        let decision = match &self.decision {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(d) => Value::Union(
                1,
                Box::new(record(vec![
                    ("user_id", s(&d.user_id)),
                    ("deployment", s(&d.deployment)),
                    ("model", s(&d.model)),
                    ("cohort", s(&d.cohort)),
                    ("config_version", Value::Long(d.config_version)),
                    ("status", Value::Enum(d.status as u32, d.status.as_str().to_string())),
                    ("score", opt_double(d.score)),
                    ("decided_at", Value::TimestampMillis(d.decided_at)),
                ])),
            ),
        };
        let shadows = self
            .shadows
            .iter()
            .map(|sh| {
                record(vec![
                    ("model", s(&sh.model)),
                    ("answered", Value::Boolean(sh.answered)),
                    ("score", opt_double(sh.score)),
                ])
            })
            .collect();
        let label = match &self.label {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(l) => Value::Union(
                1,
                Box::new(record(vec![
                    ("user_id", s(&l.user_id)),
                    ("label", Value::Double(l.label)),
                    ("observed_at", Value::TimestampMillis(l.observed_at)),
                    ("source", s(&l.source)),
                ])),
            ),
        };
        let kind = self.state as usize;
        record(vec![
            ("state", Value::Enum(kind as u32, ScoreStateKind::SYMBOLS[kind].to_string())),
            ("partition", Value::Int(self.partition)),
            ("decision", decision),
            ("shadows", Value::Array(shadows)),
            ("label", label),
            ("label_topic", opt_string(&self.label_topic)),
            ("label_offset", opt_long(self.label_offset)),
        ])
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let mut f = Fields::of(value)?;
        let state = match f.symbol("state")?.as_str() {
            "OPEN" => ScoreStateKind::Open,
            "LABELLED" => ScoreStateKind::Labelled,
            "EARLY" => ScoreStateKind::Early,
            "EARLY_SHADOWS" => ScoreStateKind::EarlyShadows,
            "HELD" => ScoreStateKind::Held,
            other => return Err(DecodeError::Shape(format!("unknown state {other}"))),
        };
        let partition = f.int("partition")?;
        let decision = match f.opt_record("decision")? {
            None => None,
            Some(mut d) => Some(ScoredDecision {
                user_id: d.string("user_id")?,
                deployment: d.string("deployment")?,
                model: d.string("model")?,
                cohort: d.string("cohort")?,
                config_version: d.long("config_version")?,
                status: status_of(&d.symbol("status")?)?,
                score: d.opt_double("score")?,
                decided_at: d.long("decided_at")?,
            }),
        };
        let shadows = f
            .records("shadows")?
            .into_iter()
            .map(|mut sh| {
                Ok(ShadowScore {
                    model: sh.string("model")?,
                    answered: sh.boolean("answered")?,
                    score: sh.opt_double("score")?,
                })
            })
            .collect::<Result<_, DecodeError>>()?;
        let label = match f.opt_record("label")? {
            None => None,
            Some(mut l) => Some(Label {
                user_id: l.string("user_id")?,
                label: l.double("label")?,
                observed_at: l.long("observed_at")?,
                source: l.string("source")?,
            }),
        };
        Ok(ScoreState {
            state,
            partition,
            decision,
            shadows,
            label,
            label_topic: f.opt_string("label_topic")?,
            label_offset: f.opt_long("label_offset")?,
        })
    }
}
