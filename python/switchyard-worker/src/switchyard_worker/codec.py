"""Avro records as switchyard writes them: plain Avro binary (the default), or Confluent-framed (magic byte 0,
the 4-byte big-endian schema id, then Avro binary) with codec.framing = "confluent".

With a schema registry (codec.registry_url), predictions are written with the id the registry gave the
kit's Prediction schema (`Codec.register_prediction`), and framed records of any id are read by their
writer's schema, looked up once per id, with Avro schema resolution to the kit's bundled schema (a writer
one version ahead, with a field added, is read). Without one, the fixed ids of codec.schema_ids are
written and expected.

Timestamps (sent_at, routed_at, produced_at) are plain ints, milliseconds since the epoch, as on the wire.
"""

import io
import json
import os
import struct

import fastavro
from fastavro.schema import to_parsing_canonical_form

from .registry import RegistryError, SchemaRegistry, without_logical_types

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")

# Kept under its old name for callers of the module.
_without_logical_types = without_logical_types


def schema_text(name):
    """The bundled .avsc file's text, trimmed: what is registered (switchyard registers its files' text
    trimmed, and a registry that gives ids by the exact text then gives both the same id)."""
    with open(os.path.join(SCHEMA_DIR, f"{name}.avsc")) as f:
        return f.read().strip()


def load_schema(name):
    return fastavro.parse_schema(without_logical_types(json.loads(schema_text(name))))


MODEL_REQUEST = load_schema("ModelRequest")
PREDICTION = load_schema("Prediction")
_CANONICAL = {"ModelRequest": to_parsing_canonical_form(MODEL_REQUEST),
              "Prediction": to_parsing_canonical_form(PREDICTION)}
_READERS = {"ModelRequest": MODEL_REQUEST, "Prediction": PREDICTION}


class DecodeError(ValueError):
    """A record that is not what the schema and framing say."""


class Codec:
    """Encodes Predictions and decodes ModelRequests with one framing; with `registry` (a SchemaRegistry,
    Confluent framing), by the registry's ids."""

    def __init__(self, framing="plain", model_request_schema_id=2, prediction_schema_id=3, registry=None):
        if framing not in ("plain", "confluent"):
            raise ValueError(f"framing {framing!r}: expected plain or confluent")
        if registry is not None and framing != "confluent":
            raise ValueError("a schema registry needs framing = \"confluent\"")
        self.framing = framing
        self.model_request_schema_id = model_request_schema_id
        self.prediction_schema_id = prediction_schema_id
        self.registry = registry
        # (writer id, record name) -> (writer schema, reader schema or None): how to read that id.
        self._plans = {}

    @classmethod
    def from_config(cls, config):
        """The codec of `config`. With a registry_url, the Prediction id is not known until
        `register_prediction` has been called (Worker.run does it first)."""
        if config.registry_url:
            registry = SchemaRegistry(config.registry_url, config.registry_username, config.registry_password)
            return cls("confluent", None, None, registry=registry)
        return cls(config.framing, config.model_request_schema_id, config.prediction_schema_id)

    def register_prediction(self, subject, wait_s=0.0):
        """Registers the bundled Prediction schema (its text, trimmed) under `subject` and writes every
        prediction with the id it gets. Raises registry.IncompatibleSchema on a 409 and
        registry.RegistryUnreachable when the registry stays unreachable for `wait_s`."""
        self.prediction_schema_id = self.registry.register(subject, "Prediction", schema_text("Prediction"), wait_s)
        return self.prediction_schema_id

    def _body(self, data, schema_id, name):
        """The Avro body of `data` and the plan to read it: (writer schema, reader schema or None)."""
        if not data:
            raise DecodeError("empty value")
        if self.framing == "plain":
            return data, _READERS[name], None
        if len(data) < 5:
            raise DecodeError(f"{len(data)} bytes is shorter than the 5-byte Confluent header")
        if data[0] != 0:
            raise DecodeError(f"magic byte is {data[0]}, expected 0")
        found = struct.unpack(">I", data[1:5])[0]
        if self.registry is None:
            if found != schema_id:
                raise DecodeError(f"schema id {found}, expected {schema_id}")
            return data[5:], _READERS[name], None
        plan = self._plans.get((found, name))
        if plan is None:
            try:
                writer = self.registry.writer(found)
            except RegistryError as e:
                raise DecodeError(f"schema id {found}: {e}") from None
            # The kit's own schema (whatever its layout or docs): read directly, no resolution needed.
            if to_parsing_canonical_form(writer) == _CANONICAL[name]:
                plan = (_READERS[name], None)
            else:
                plan = (writer, _READERS[name])
            self._plans[(found, name)] = plan
        return (data[5:],) + plan

    def _frame(self, body, schema_id, name):
        if self.framing == "plain":
            return body
        if schema_id is None:
            raise ValueError(f"no {name} schema id (with a registry: register it first)")
        return b"\x00" + struct.pack(">I", schema_id) + body

    @staticmethod
    def _read(body, writer, reader=None):
        buffer = io.BytesIO(body)
        try:
            record = fastavro.schemaless_reader(buffer, writer, reader)
        except Exception as e:  # fastavro raises many kinds on bad input (EOFError, UnicodeDecodeError, ...)
            text = f"{type(e).__name__}: {e}"
            if reader is not None:
                name = writer.get("name", writer.get("type")) if isinstance(writer, dict) else writer
                text = f"of the writer's schema {name}, resolved to {reader['name']}: {text}"
            raise DecodeError(f"not Avro {text}"[:300] if reader is not None else f"not Avro: {text}"[:300]) from None
        if buffer.tell() != len(body):
            raise DecodeError(f"{len(body) - buffer.tell()} trailing bytes")
        return record

    @staticmethod
    def _write(schema, record):
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schema, record)
        return out.getvalue()

    def decode_model_request(self, data):
        return self._read(*self._body(data, self.model_request_schema_id, "ModelRequest"))

    def encode_model_request(self, record):
        """For tests and local tools: a ModelRequest as switchyard's route writes it (with a registry, give
        the codec the id of switchyard's ModelRequest as model_request_schema_id)."""
        return self._frame(self._write(MODEL_REQUEST, record), self.model_request_schema_id, "ModelRequest")

    def encode_prediction(self, record):
        return self._frame(self._write(PREDICTION, record), self.prediction_schema_id, "Prediction")

    def decode_prediction(self, data):
        return self._read(*self._body(data, self.prediction_schema_id, "Prediction"))
