"""Worker configuration, read the way switchyard reads its own.

Layers, later wins:
  1. defaults (switchyard's, from config/switchyard.toml, plus the worker's own);
  2. the TOML file named by SWITCHYARD_CONFIG (the file you give switchyard with --config);
  3. environment variables:
       SWITCHYARD_BOOTSTRAP_SERVERS (or SWITCHYARD__KAFKA__BOOTSTRAP_SERVERS)
       SWITCHYARD__TOPICS__MODEL_REQUESTS / SWITCHYARD__TOPICS__MODEL_PREDICTIONS   ({model} is replaced)
       SWITCHYARD__TOPICS__CREATE / __PARTITIONS / __REPLICATION_FACTOR
       SWITCHYARD__SERVICE__GROUP_ID (the worker's group is <group_id>-model-<model>, as demo-model's)
       SWITCHYARD__SERVICE__MAX_PREDICTION_BYTES
       SWITCHYARD__CODEC__FRAMING (plain | confluent), SWITCHYARD__CODEC__SCHEMA_IDS__MODEL_REQUEST / __PREDICTION
       SWITCHYARD__CODEC__REGISTRY_URL, __REGISTRY_USERNAME, __REGISTRY_PASSWORD, __REGISTRY_WAIT_MS
       SWITCHYARD_KAFKA_<OPTION> (a librdkafka option, dots as underscores: SWITCHYARD_KAFKA_SECURITY_PROTOCOL)
       SWITCHYARD_WORKER_BATCH_SIZE, SWITCHYARD_WORKER_BATCH_WAIT_MS, SWITCHYARD_WORKER_GROUP_ID,
       SWITCHYARD_WORKER_METRICS_HOST, SWITCHYARD_WORKER_METRICS_PORT (0: any free port; -1: no endpoint)
  4. keyword arguments given to Worker(...) / serve(...).
"""

import os
import re
from dataclasses import dataclass, field, fields, replace

from .registry import check_url

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

#: librdkafka options the worker sets itself; giving them in [kafka.options] or SWITCHYARD_KAFKA_* is an
#: error (as in switchyard), not silently overridden.
MANAGED_OPTIONS = frozenset({
    "bootstrap.servers", "group.id", "group.instance.id", "enable.auto.commit", "enable.auto.offset.store",
    "isolation.level", "partitioner", "transactional.id",
})

MODEL_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


@dataclass
class WorkerConfig:
    """Everything a worker needs besides the function. `model` names the topics and the consumer group."""

    model: str
    bootstrap_servers: str = "127.0.0.1:9092"
    #: Topic name patterns; {model} is replaced by the model name (switchyard's [topics] settings).
    model_requests: str = "model.{model}.requests"
    model_predictions: str = "model.{model}.predictions"
    #: Create the two topics when missing, as switchyard does (topics.create, partitions, replication_factor).
    create_topics: bool = True
    partitions: int = 4
    replication_factor: int = 1
    #: switchyard's service.group_id; the worker's consumer group is "<group_id>-model-<model>" unless
    #: `consumer_group` is given.
    group_id: str = "switchyard"
    consumer_group: str = ""
    #: Largest prediction value merge joins (service.max_prediction_bytes); a larger answer is replaced by
    #: an error answer instead of being dead-lettered by merge (which would leave its request to time out).
    max_prediction_bytes: int = 1_000_000
    #: codec.framing: "plain" (Avro binary, switchyard's default) or "confluent" (magic byte 0, schema id).
    framing: str = "plain"
    model_request_schema_id: int = 2
    prediction_schema_id: int = 3
    #: codec.registry_url: the Confluent REST API of a schema registry (needs framing "confluent"). Set, the
    #: Prediction schema is registered at start under "<predictions topic>-value" and its id written;
    #: ModelRequests of any id are read by their writer's schema from the registry. The fixed ids above
    #: are not used then.
    registry_url: str = ""
    registry_username: str = ""
    #: Never logged or printed (not in repr).
    registry_password: str = field(default="", repr=False)
    #: How long the start waits for an unreachable registry before it fails.
    registry_wait_ms: int = 60_000
    #: Most requests handed to the function at once.
    batch_size: int = 500
    #: After the first request of a batch, how long to wait for more (0: take what has arrived).
    batch_wait_ms: int = 0
    #: Prometheus endpoint; port 0 picks a free port (see Worker.metrics_port), -1 serves none.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9100
    #: librdkafka options for both clients (security.protocol, sasl.*, ssl.*, ...).
    kafka_options: dict = field(default_factory=dict)

    @property
    def requests_topic(self):
        return self.model_requests.replace("{model}", self.model)

    @property
    def predictions_topic(self):
        return self.model_predictions.replace("{model}", self.model)

    @property
    def group(self):
        return self.consumer_group or f"{self.group_id}-model-{self.model}"

    def validate(self):
        if not MODEL_NAME.match(self.model or ""):
            raise ValueError(f"model name {self.model!r}: 1-200 characters of [A-Za-z0-9._-]")
        if self.framing not in ("plain", "confluent"):
            raise ValueError(f"codec framing {self.framing!r}: expected plain or confluent")
        self.registry_url = self.registry_url.strip()
        if self.registry_url:
            if self.framing != "confluent":
                raise ValueError('codec registry_url needs codec framing = "confluent"')
            self.registry_url = check_url(self.registry_url)
        if self.registry_wait_ms < 0:
            raise ValueError(f"registry_wait_ms {self.registry_wait_ms}: must not be negative")
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size}: must be at least 1")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms {self.batch_wait_ms}: must not be negative")
        managed = sorted(MANAGED_OPTIONS & set(self.kafka_options))
        if managed:
            raise ValueError(f"kafka options {', '.join(managed)} are set by the worker itself; remove them")
        return self


def _as_bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _env_text(value):
    """switchyard parses environment values as TOML values: a quoted string loses its quotes."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


# (environment variable, TOML section, TOML key, WorkerConfig field, converter)
_SETTINGS = [
    ("SWITCHYARD__KAFKA__BOOTSTRAP_SERVERS", "kafka", "bootstrap_servers", "bootstrap_servers", str),
    ("SWITCHYARD__TOPICS__MODEL_REQUESTS", "topics", "model_requests", "model_requests", str),
    ("SWITCHYARD__TOPICS__MODEL_PREDICTIONS", "topics", "model_predictions", "model_predictions", str),
    ("SWITCHYARD__TOPICS__CREATE", "topics", "create", "create_topics", _as_bool),
    ("SWITCHYARD__TOPICS__PARTITIONS", "topics", "partitions", "partitions", int),
    ("SWITCHYARD__TOPICS__REPLICATION_FACTOR", "topics", "replication_factor", "replication_factor", int),
    ("SWITCHYARD__SERVICE__GROUP_ID", "service", "group_id", "group_id", str),
    ("SWITCHYARD__SERVICE__MAX_PREDICTION_BYTES", "service", "max_prediction_bytes", "max_prediction_bytes", int),
    ("SWITCHYARD__CODEC__FRAMING", "codec", "framing", "framing", str),
    ("SWITCHYARD__CODEC__REGISTRY_URL", "codec", "registry_url", "registry_url", str),
    ("SWITCHYARD__CODEC__REGISTRY_USERNAME", "codec", "registry_username", "registry_username", str),
    ("SWITCHYARD__CODEC__REGISTRY_PASSWORD", "codec", "registry_password", "registry_password", str),
    ("SWITCHYARD__CODEC__REGISTRY_WAIT_MS", "codec", "registry_wait_ms", "registry_wait_ms", int),
]
_WORKER_ENV = [
    ("SWITCHYARD_WORKER_BATCH_SIZE", "batch_size", int),
    ("SWITCHYARD_WORKER_BATCH_WAIT_MS", "batch_wait_ms", int),
    ("SWITCHYARD_WORKER_GROUP_ID", "consumer_group", str),
    ("SWITCHYARD_WORKER_METRICS_HOST", "metrics_host", str),
    ("SWITCHYARD_WORKER_METRICS_PORT", "metrics_port", int),
]


def load_config(model, environ=None, **overrides):
    """The configuration of the worker for `model`: defaults, SWITCHYARD_CONFIG file, environment, then
    `overrides` (any WorkerConfig field)."""
    env = os.environ if environ is None else environ
    values = {}
    options = {}

    path = env.get("SWITCHYARD_CONFIG")
    if path:
        if tomllib is None:
            raise RuntimeError("SWITCHYARD_CONFIG needs Python 3.11+ (tomllib)")
        with open(path, "rb") as f:
            table = tomllib.load(f)
        for _, section, key, name, convert in _SETTINGS:
            if key in table.get(section, {}):
                values[name] = convert(table[section][key])
        ids = table.get("codec", {}).get("schema_ids", {})
        if "model_request" in ids:
            values["model_request_schema_id"] = int(ids["model_request"])
        if "prediction" in ids:
            values["prediction_schema_id"] = int(ids["prediction"])
        options.update({k: str(v) for k, v in table.get("kafka", {}).get("options", {}).items()})

    for variable, _, _, name, convert in _SETTINGS:
        if variable in env:
            values[name] = convert(_env_text(env[variable]))
    if "SWITCHYARD_BOOTSTRAP_SERVERS" in env:
        values["bootstrap_servers"] = _env_text(env["SWITCHYARD_BOOTSTRAP_SERVERS"])
    if "SWITCHYARD__CODEC__SCHEMA_IDS__MODEL_REQUEST" in env:
        values["model_request_schema_id"] = int(env["SWITCHYARD__CODEC__SCHEMA_IDS__MODEL_REQUEST"])
    if "SWITCHYARD__CODEC__SCHEMA_IDS__PREDICTION" in env:
        values["prediction_schema_id"] = int(env["SWITCHYARD__CODEC__SCHEMA_IDS__PREDICTION"])
    for variable, value in env.items():
        if variable.startswith("SWITCHYARD_KAFKA_"):
            options[variable[len("SWITCHYARD_KAFKA_"):].lower().replace("_", ".")] = _env_text(value)
    for variable, name, convert in _WORKER_ENV:
        if variable in env:
            values[name] = convert(_env_text(env[variable]))

    known = {f.name for f in fields(WorkerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown worker settings: {', '.join(unknown)}")
    if "kafka_options" in overrides:
        options.update(overrides.pop("kafka_options") or {})
    values.update(overrides)
    return replace(WorkerConfig(model=model), kafka_options=options, **values).validate()
