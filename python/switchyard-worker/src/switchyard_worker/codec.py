"""Avro records as switchyard writes them: plain Avro binary (the default), or Confluent-framed (magic byte 0,
the 4-byte big-endian schema id, then Avro binary) with codec.framing = "confluent".

Timestamps (sent_at, routed_at, produced_at) are plain ints, milliseconds since the epoch, as on the wire.
"""

import io
import json
import os
import struct

import fastavro

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")


def _without_logical_types(node):
    """The schema with logicalType annotations removed, so timestamps stay ints (fastavro would turn them
    into datetimes); the binary encoding is the same."""
    if isinstance(node, dict):
        return {k: _without_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_without_logical_types(v) for v in node]
    return node


def load_schema(name):
    with open(os.path.join(SCHEMA_DIR, f"{name}.avsc")) as f:
        return fastavro.parse_schema(_without_logical_types(json.load(f)))


MODEL_REQUEST = load_schema("ModelRequest")
PREDICTION = load_schema("Prediction")


class DecodeError(ValueError):
    """A record that is not what the schema and framing say."""


class Codec:
    """Encodes Predictions and decodes ModelRequests with one framing."""

    def __init__(self, framing="plain", model_request_schema_id=2, prediction_schema_id=3):
        if framing not in ("plain", "confluent"):
            raise ValueError(f"framing {framing!r}: expected plain or confluent")
        self.framing = framing
        self.model_request_schema_id = model_request_schema_id
        self.prediction_schema_id = prediction_schema_id

    @classmethod
    def from_config(cls, config):
        return cls(config.framing, config.model_request_schema_id, config.prediction_schema_id)

    def _body(self, data, schema_id):
        if not data:
            raise DecodeError("empty value")
        if self.framing == "plain":
            return data
        if len(data) < 5:
            raise DecodeError(f"{len(data)} bytes is shorter than the 5-byte Confluent header")
        if data[0] != 0:
            raise DecodeError(f"magic byte is {data[0]}, expected 0")
        found = struct.unpack(">I", data[1:5])[0]
        if found != schema_id:
            raise DecodeError(f"schema id {found}, expected {schema_id}")
        return data[5:]

    def _frame(self, body, schema_id):
        if self.framing == "plain":
            return body
        return b"\x00" + struct.pack(">I", schema_id) + body

    @staticmethod
    def _read(schema, body):
        buffer = io.BytesIO(body)
        try:
            record = fastavro.schemaless_reader(buffer, schema)
        except Exception as e:  # fastavro raises many kinds on bad input (EOFError, UnicodeDecodeError, ...)
            raise DecodeError(f"not Avro: {type(e).__name__}: {e}") from None
        if buffer.tell() != len(body):
            raise DecodeError(f"{len(body) - buffer.tell()} trailing bytes")
        return record

    @staticmethod
    def _write(schema, record):
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schema, record)
        return out.getvalue()

    def decode_model_request(self, data):
        return self._read(MODEL_REQUEST, self._body(data, self.model_request_schema_id))

    def encode_model_request(self, record):
        """For tests and local tools: a ModelRequest as switchyard's route writes it."""
        return self._frame(self._write(MODEL_REQUEST, record), self.model_request_schema_id)

    def encode_prediction(self, record):
        return self._frame(self._write(PREDICTION, record), self.prediction_schema_id)

    def decode_prediction(self, data):
        return self._read(PREDICTION, self._body(data, self.prediction_schema_id))
