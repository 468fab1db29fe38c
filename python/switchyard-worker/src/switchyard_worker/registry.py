"""A small client of a Confluent Schema Registry (the Confluent REST API: Confluent's registry, Apicurio's
`/apis/ccompat/v7`, Karapace), the same behaviour as switchyard's own (src/codec/registry.rs):

- `register(subject, record, schema_text, wait_s)`: POST /subjects/<subject>/versions; a schema the subject
  already has returns its id. An unreachable registry (or a 5xx answer) is retried for `wait_s`; a 409 (the
  subject's compatibility rule refuses the schema) raises IncompatibleSchema with the registry's message.
- `writer(schema_id)`: GET /schemas/ids/<id>, parsed with fastavro, cached for the life of the process.
  After a lookup failed because the registry was unreachable, lookups of ids not cached yet fail at once
  for 5 s instead of each waiting for the same outage.

Plain urllib: no dependency beyond the kit's. HTTP basic auth with `username`/`password`; the password is
sent in a header only, and never logged or printed (repr hides it). An https:// URL is verified against the
system's CA store (OpenSSL's default paths; a private CA through SSL_CERT_FILE).
"""

import base64
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import fastavro

log = logging.getLogger("switchyard_worker")

#: After a lookup failed with the registry unreachable, lookups of uncached ids fail at once this long.
FAIL_FAST_S = 5.0
#: Seconds one HTTP exchange may take (switchyard's: 10 s).
TIMEOUT_S = 10.0


class RegistryError(RuntimeError):
    """Talking to the schema registry went wrong."""

    transient = False


class RegistryUnreachable(RegistryError):
    transient = True

    def __init__(self, url, message):
        super().__init__(f"schema registry {url} is unreachable: {message}")


class IncompatibleSchema(RegistryError):
    def __init__(self, subject, record, message):
        self.subject, self.record, self.message = subject, record, message
        super().__init__(f"the schema registry refuses the kit's {record} schema under subject {subject!r} as "
                         f"incompatible with the versions registered before it (the subject's compatibility "
                         f"rule): {message}")


class UnknownSchemaId(RegistryError):
    def __init__(self, schema_id):
        self.schema_id = schema_id
        super().__init__(f"schema id {schema_id} is not in the schema registry")


class RegistryRefused(RegistryError):
    def __init__(self, status, what, message):
        self.status, self.message = status, message
        self.transient = status >= 500
        super().__init__(f"the schema registry answered {status} to {what}: {message}")


class BadSchema(RegistryError):
    def __init__(self, schema_id, message):
        super().__init__(f"schema id {schema_id} from the schema registry is not a usable Avro schema: {message}")


def check_url(url):
    """The settings' checks, as switchyard's (no network): http(s), no credentials in the URL."""
    url = (url or "").strip()
    if not (url.startswith("http://") or url.startswith("https://")):
        raise ValueError(f"codec registry_url {url!r} must start with http:// or https://")
    if "@" in url:
        raise ValueError("codec registry_url must not hold credentials: use registry_username / registry_password")
    return url


def without_logical_types(node):
    """The schema with logicalType annotations removed, so timestamps stay ints (fastavro would turn them
    into datetimes); the binary encoding is the same."""
    if isinstance(node, dict):
        return {k: without_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [without_logical_types(v) for v in node]
    return node


def _truncate(text, limit=300):
    return text if len(text) <= limit else text[:limit - 3] + "..."


class SchemaRegistry:
    """A registry client with its caches (registered ids, writer schemas by id). Thread-safe."""

    def __init__(self, url, username="", password="", timeout_s=TIMEOUT_S):
        self.url = check_url(url)
        self.username = username or ""
        self._password = password or ""
        self.timeout_s = timeout_s
        self._registered = {}      # (subject, schema text) -> id
        self._writers = {}         # id -> parsed fastavro schema (logical types removed)
        self._failing_until = 0.0  # monotonic time until which uncached lookups fail at once
        self._lock = threading.Lock()
        #: HTTP exchanges made (for tests and diagnostics).
        self.requests_made = 0

    def __repr__(self):
        return (f"SchemaRegistry(url={self.url!r}, username={self.username!r}, "
                f"password={'<hidden>' if self._password else ''!r})")

    @property
    def base(self):
        return self.url.rstrip("/")

    # the two operations ---------------------------------------------------------------------------------
    def register(self, subject, record, schema_text, wait_s=0.0):
        """Registers `schema_text` under `subject` and returns its id (the id it has if the subject has it
        already). `record` names the schema in errors. Waits up to `wait_s` for an unreachable registry."""
        key = (subject, schema_text)
        if key in self._registered:
            return self._registered[key]
        what = f"registering {subject}"
        url = f"{self.base}/subjects/{urllib.parse.quote(subject, safe='')}/versions"
        body = json.dumps({"schema": schema_text}).encode()
        started = time.monotonic()
        pause = 0.2
        while True:
            try:
                answer = self._send("POST", url, what, body)
                break
            except RegistryRefused as e:
                if e.status == 409:
                    raise IncompatibleSchema(subject, record, e.message) from None
                if not (e.transient and time.monotonic() - started < wait_s):
                    raise
                error = e
            except RegistryUnreachable as e:
                if time.monotonic() - started >= wait_s:
                    raise
                error = e
            # The last try comes when the wait is over.
            sleep = min(pause, max(0.0, wait_s - (time.monotonic() - started)))
            log.warning("schema registry not available (%s); registering %s again in %.1f s", error, subject, sleep)
            time.sleep(sleep)
            pause = min(pause * 2, 5.0)
        schema_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(schema_id, int) or isinstance(schema_id, bool) or not 0 <= schema_id < 2 ** 32:
            raise RegistryRefused(200, what, f"no schema id in the answer: {_truncate(json.dumps(answer))}")
        self._registered[key] = schema_id
        try:
            parsed = self._parse(schema_id, schema_text)
            with self._lock:
                self._writers.setdefault(schema_id, parsed)
        except BadSchema:
            pass
        return schema_id

    def writer(self, schema_id):
        """The writer schema of `schema_id` (parsed by fastavro, logical types removed), looked up once."""
        found = self._writers.get(schema_id)
        if found is not None:
            return found
        if time.monotonic() < self._failing_until:
            raise RegistryUnreachable(self.url, f"a lookup failed less than {FAIL_FAST_S:g} s ago; not retried yet")
        try:
            answer = self._send("GET", f"{self.base}/schemas/ids/{schema_id}", f"looking up schema id {schema_id}")
        except RegistryRefused as e:
            if e.status == 404:
                raise UnknownSchemaId(schema_id) from None
            if e.transient:
                self._failing_until = time.monotonic() + FAIL_FAST_S
            raise
        except RegistryUnreachable:
            self._failing_until = time.monotonic() + FAIL_FAST_S
            raise
        if not isinstance(answer, dict) or not isinstance(answer.get("schema"), str):
            raise BadSchema(schema_id, f"no schema in the answer: {_truncate(json.dumps(answer))}")
        kind = answer.get("schemaType", "AVRO")
        if kind != "AVRO":
            raise BadSchema(schema_id, f"a {kind} schema, not Avro")
        parsed = self._parse(schema_id, answer["schema"])
        with self._lock:
            return self._writers.setdefault(schema_id, parsed)

    # HTTP -----------------------------------------------------------------------------------------------
    @staticmethod
    def _parse(schema_id, text):
        try:
            return fastavro.parse_schema(without_logical_types(json.loads(text)))
        except Exception as e:  # JSON errors, fastavro's SchemaParseException, ...
            raise BadSchema(schema_id, _truncate(f"{type(e).__name__}: {e}")) from None

    def _send(self, method, url, what, body=None):
        headers = {"Accept": "application/vnd.schemaregistry.v1+json, application/json"}
        if body is not None:
            headers["Content-Type"] = "application/vnd.schemaregistry.v1+json"
        if self.username:
            pair = f"{self.username}:{self._password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        self.requests_made += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace") if e.fp is not None else ""
            try:
                message = json.loads(text).get("message") or _truncate(text)
            except (ValueError, AttributeError):
                message = _truncate(text) or e.reason
            raise RegistryRefused(e.code, what, message) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            # The error names the URL at most, which holds no credentials (they go in a header).
            reason = getattr(e, "reason", None) or e
            raise RegistryUnreachable(self.url, f"{type(reason).__name__}: {reason}" if str(reason) else
                                      type(reason).__name__) from None
        try:
            return json.loads(text)
        except ValueError as e:
            raise RegistryRefused(200, what, f"not JSON ({e}): {_truncate(text)}") from None
