"""The worker loop: read a batch of model requests, answer each through the user's function, write the
predictions, wait until Kafka has them, then commit the batch's offsets (at least once)."""

import json
import logging
import numbers
import signal
import threading
import time
import traceback

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from .codec import Codec, DecodeError
from .config import WorkerConfig, load_config
from .registry import RegistryError

log = logging.getLogger("switchyard_worker")

#: max.message.bytes of the topics switchyard creates (config/switchyard.toml, "Record sizes").
TOPIC_RECORD_LIMIT = 2_162_688
#: Longest error text put into a Prediction (the decision carries it).
MAX_ERROR_CHARS = 2000
#: Seconds between two logged tracebacks of the user function (the rest are counted).
ERROR_LOG_INTERVAL = 10.0

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def now_ms():
    return int(time.time() * 1000)


def error_text(exc):
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def output_bytes(result):
    """What the user's function returned, as Prediction.output bytes. str is UTF-8 encoded, a number
    becomes its text (0.8731 -> b"0.8731", which switchyard's `score: plain` reads), dict and list become
    JSON. Raises TypeError for anything else (None included); the worker answers that as an error."""
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result)
    if isinstance(result, str):
        return result.encode("utf-8")
    if isinstance(result, bool):
        raise TypeError("the model function returned a bool; return a str, bytes or a number")
    if isinstance(result, numbers.Integral):
        return str(int(result)).encode()
    if isinstance(result, numbers.Real):
        return repr(float(result)).encode()
    if isinstance(result, (dict, list)):
        return json.dumps(result, separators=(",", ":")).encode("utf-8")
    raise TypeError(f"the model function returned {type(result).__name__}; return a str, bytes or a number")


class Metrics:
    """The worker's Prometheus metrics, in a registry of its own (several workers may share a process)."""

    def __init__(self, model):
        self.registry = CollectorRegistry()
        labels = ["model"]
        r = self.registry
        self.requests = Counter("switchyard_worker_requests", "Model requests answered (predictions written, "
                                "errors included)", labels, registry=r).labels(model)
        self.errors = Counter("switchyard_worker_errors", "Predictions written with an error (the function "
                              "raised or returned something unusable)", labels, registry=r).labels(model)
        self.undecodable = Counter("switchyard_worker_undecodable", "Input records that did not decode as a "
                                   "ModelRequest (logged and skipped)", labels, registry=r).labels(model)
        self.delivery_failures = Counter("switchyard_worker_delivery_failures", "Predictions Kafka did not "
                                         "take at the first try (written again)", labels, registry=r).labels(model)
        self.commit_failures = Counter("switchyard_worker_commit_failures", "Offset commits that failed (those "
                                       "requests may be answered again)", labels, registry=r).labels(model)
        self.latency = Histogram("switchyard_worker_latency_seconds", "produced_at - routed_at of each answer "
                                 "(what the deployment's timeout_ms is judged against)", labels, registry=r,
                                 buckets=LATENCY_BUCKETS).labels(model)
        self.predict_seconds = Histogram("switchyard_worker_predict_seconds", "Time in the model function per "
                                         "batch", labels, registry=r, buckets=LATENCY_BUCKETS).labels(model)
        self.batch_size = Histogram("switchyard_worker_batch_size", "Requests handed to the model function "
                                    "per batch", labels, registry=r, buckets=BATCH_BUCKETS).labels(model)


class Worker:
    """A switchyard model worker around one function.

    `predict(request) -> answer` is called once per request; or `predict_batch(requests) -> answers` once
    per batch (a list of the same length; an element that is an Exception answers its request with an
    error). `request` is a dict with the ModelRequest fields: request_id, user_id, deployment, sent_at
    (ms), payload (bytes), attributes (dict), model, role ("PRIMARY" | "SHADOW"), config_version,
    routed_at (ms). An answer is str, bytes, a number, or a dict/list (sent as JSON). An exception answers
    that request with Prediction.error = "<ExceptionType>: <message>"; the other requests are not affected
    (when predict_batch raises, each request of the batch is retried alone to find the failing ones).

    Settings: see `WorkerConfig` and `config.load_config` (environment as switchyard reads it); keyword
    arguments override them, or pass a ready `config`.
    """

    def __init__(self, model, predict=None, *, predict_batch=None, config=None, **settings):
        if (predict is None) == (predict_batch is None):
            raise TypeError("give exactly one of predict (one request) or predict_batch (a list of requests)")
        if config is not None and settings:
            raise TypeError("give either config or keyword settings, not both")
        self.config = (config if config is not None else load_config(model, **settings)).validate()
        if self.config.model != model:
            raise ValueError(f"config is for model {self.config.model!r}, not {model!r}")
        self.model = model
        self.predict = predict
        self.predict_batch = predict_batch
        self.codec = Codec.from_config(self.config)
        self.metrics = Metrics(model)
        self.metrics_port = None
        self._stop = threading.Event()
        self._signals = 0
        self._last_error_log = 0.0
        self._errors_unlogged = 0
        self.answered = 0
        self.batches = 0

    # lifecycle ------------------------------------------------------------------------------------------
    def stop(self):
        """Ask the loop to stop after the batch in hand (what SIGTERM does)."""
        self._stop.set()

    def _on_signal(self, signum, frame):
        self._signals += 1
        if self._signals > 1:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopping without committing")
        log.info("%s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        self.stop()

    def run(self):
        """Serve until stop() or SIGTERM/SIGINT: then the batch in hand is answered, flushed and committed,
        and the consumer leaves its group. With a schema registry, first registers the Prediction schema
        (raises registry.RegistryError, before anything else is started, when that fails)."""
        c = self.config
        self.register_schemas()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        server = None
        consumer = None
        producer = None
        try:
            if c.metrics_port >= 0:
                server, _ = start_http_server(c.metrics_port, c.metrics_host, registry=self.metrics.registry)
                self.metrics_port = server.server_port
            if c.create_topics:
                self._ensure_topics()
            consumer = Consumer(self._consumer_settings())
            producer = Producer(self._producer_settings())
            consumer.subscribe([c.requests_topic])
            log.info("model %s answering: %s -> %s (group %s, batches of up to %d, metrics on %s)",
                     self.model, c.requests_topic, c.predictions_topic, c.group, c.batch_size,
                     f"{c.metrics_host}:{self.metrics_port}" if server else "none")
            while not self._stop.is_set():
                batch = self._next_batch(consumer)
                if batch and not self._handle(batch, consumer, producer):
                    break
        finally:
            if producer is not None:
                producer.flush(10)
            if consumer is not None:
                consumer.close()
            if server is not None:
                server.shutdown()
                server.server_close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("model %s stopped: answered %d requests in %d batches", self.model, self.answered,
                     self.batches)

    def register_schemas(self):
        """With a schema registry (codec.registry_url): registers the kit's Prediction schema under the
        predictions topic's subject, "<topic>-value", waiting up to registry_wait_ms for an unreachable
        registry; every prediction is written with the id it gets. run() calls it first. Raises
        registry.IncompatibleSchema when the subject's compatibility rule refuses the schema (409) and
        registry.RegistryUnreachable when the registry stays unreachable."""
        c = self.config
        if self.codec.registry is None or self.codec.prediction_schema_id is not None:
            return
        subject = f"{c.predictions_topic}-value"
        try:
            schema_id = self.codec.register_prediction(subject, c.registry_wait_ms / 1000)
        except RegistryError as e:
            log.error("model %s cannot start: %s", self.model, e)
            raise
        log.info("Prediction schema registered under subject %s: id %d (schema registry %s); model requests "
                 "are read by their writer's schema id", subject, schema_id, c.registry_url)

    # Kafka ----------------------------------------------------------------------------------------------
    def _base_settings(self):
        settings = {"bootstrap.servers": self.config.bootstrap_servers}
        settings.update(self.config.kafka_options)
        return settings

    def _consumer_settings(self):
        s = self._base_settings()
        s.setdefault("session.timeout.ms", "10000")
        s.setdefault("heartbeat.interval.ms", "2000")
        s.setdefault("topic.metadata.refresh.interval.ms", "1000")
        s.update({
            "group.id": self.config.group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # Requests of aborted route transactions must not be answered.
            "isolation.level": "read_committed",
        })
        return s

    def _producer_settings(self):
        s = self._base_settings()
        s.setdefault("linger.ms", "0")
        s.setdefault("compression.type", "lz4")
        s.setdefault("message.max.bytes", "2097152")
        s.update({
            "enable.idempotence": True,
            # Kafka's Java partitioner: the answer lands on the partition merge joins it on (no forwarding).
            "partitioner": "murmur2_random",
        })
        return s

    def _ensure_topics(self):
        c = self.config
        admin = AdminClient(self._base_settings())
        names = sorted({c.requests_topic, c.predictions_topic})
        new = [NewTopic(n, num_partitions=c.partitions, replication_factor=c.replication_factor,
                        config={"max.message.bytes": str(TOPIC_RECORD_LIMIT)}) for n in names]
        for name, future in admin.create_topics(new, request_timeout=30).items():
            try:
                future.result()
                log.info("created topic %s (%d partitions)", name, c.partitions)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    def _next_batch(self, consumer):
        first = consumer.poll(0.2)
        if first is None:
            return []
        batch = [first]
        if self.config.batch_size > 1:
            batch += consumer.consume(self.config.batch_size - 1, self.config.batch_wait_ms / 1000)
        good = []
        for msg in batch:
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer: %s", err)
        return good

    # one batch --------------------------------------------------------------------------------------------
    def _handle(self, batch, consumer, producer):
        """Answers, writes and commits one batch; False when the worker must stop without committing."""
        requests, keys = [], []
        for msg in batch:
            try:
                requests.append(self.codec.decode_model_request(msg.value()))
                keys.append(msg.key())
            except DecodeError as e:
                self.metrics.undecodable.inc()
                log.warning("skipping a record that is not a ModelRequest (%s [%d] offset %d): %s",
                            msg.topic(), msg.partition(), msg.offset(), e)
        records = []
        if requests:
            # Taken before the function sees the requests (it may change them).
            ids = [r["request_id"] for r in requests]
            routed = [r["routed_at"] for r in requests]
            started = time.perf_counter()
            answers = self._answers(requests)
            self.metrics.predict_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(requests))
            for request_id, routed_at, key, answer in zip(ids, routed, keys, answers):
                records.append((key, self._prediction(request_id, answer), routed_at))
        if records and not self._write(producer, records):
            return False
        self._commit(consumer, batch)
        self.batches += 1
        return True

    def _answers(self, requests):
        """One answer (a result or an Exception) per request."""
        if self.predict is not None:
            answers = []
            for request in requests:
                try:
                    answers.append(self.predict(request))
                except Exception as e:
                    self._log_error(e)
                    answers.append(e)
            return answers
        try:
            return self._call_batch(requests)
        except Exception as e:
            if len(requests) == 1:
                self._log_error(e)
                return [e]
        # The batch failed as a whole: answer each request alone, so one bad request fails alone.
        answers = []
        for request in requests:
            try:
                answers.append(self._call_batch([request])[0])
            except Exception as e:
                self._log_error(e)
                answers.append(e)
        return answers

    def _call_batch(self, requests):
        answers = list(self.predict_batch(requests))
        if len(answers) != len(requests):
            raise ValueError(f"predict_batch returned {len(answers)} answers for {len(requests)} requests")
        return answers

    def _log_error(self, exc):
        now = time.monotonic()
        if now - self._last_error_log < ERROR_LOG_INTERVAL:
            self._errors_unlogged += 1
            return
        more = f" ({self._errors_unlogged} more since the last one logged)" if self._errors_unlogged else ""
        log.warning("the model function failed; the request is answered with the error%s:\n%s", more,
                    "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
        self._last_error_log = now
        self._errors_unlogged = 0

    def _prediction(self, request_id, answer):
        """A Prediction record (a dict) for one answer."""
        output, error = None, None
        if isinstance(answer, BaseException):
            error = error_text(answer)
        else:
            try:
                output = output_bytes(answer)
            except TypeError as e:
                self._log_error(e)
                error = error_text(e)
        record = {"request_id": request_id, "model": self.model, "output": output, "error": error,
                  "produced_at": now_ms()}
        size = len(self.codec.encode_prediction(record))
        if size > self.config.max_prediction_bytes:
            # merge would dead-letter it and the request would time out: answer with the reason instead.
            record["output"] = None
            record["error"] = (f"ValueError: the answer is {size} bytes, more than max_prediction_bytes "
                               f"({self.config.max_prediction_bytes})")
        return record

    def _write(self, producer, records):
        """Writes the predictions and waits until Kafka has every one; retries the ones it refused. False if
        the worker is stopping and they could not all be written (nothing is committed then)."""
        topic = self.config.predictions_topic
        pending = records
        attempt = 0
        while pending:
            attempt += 1
            failed = []

            def delivered(err, msg, item):
                if err is not None:
                    failed.append((item, err))

            for item in pending:
                key, record, _ = item
                value = self.codec.encode_prediction(record)
                while True:
                    try:
                        producer.produce(topic, key=key, value=value,
                                         on_delivery=lambda err, msg, item=item: delivered(err, msg, item))
                        break
                    except BufferError:
                        producer.poll(0.1)
            while producer.flush(5) > 0:
                log.warning("waiting for Kafka to take the predictions of this batch")
            if not failed:
                break
            self.metrics.delivery_failures.inc(len(failed))
            log.warning("Kafka refused %d predictions (%s); writing them again", len(failed), failed[0][1])
            pending = []
            for (key, record, routed_at), err in failed:
                if err.code() == KafkaError.MSG_SIZE_TOO_LARGE and record["output"] is not None:
                    record = dict(record, output=None, error=f"KafkaError: the broker refused the answer: {err}")
                pending.append((key, record, routed_at))
            if self._stop.is_set() and attempt >= 3:
                log.error("stopping with %d predictions unwritten; their requests are answered after the "
                          "restart", len(pending))
                return False
            time.sleep(min(5.0, 0.2 * attempt))
        # Counted once Kafka has them: the counters add up to what readers of the predictions topic see.
        errors = 0
        for _, record, routed_at in records:
            if record["error"] is not None:
                errors += 1
            self.metrics.latency.observe(max(0, record["produced_at"] - routed_at) / 1000)
        self.metrics.requests.inc(len(records))
        self.metrics.errors.inc(errors)
        self.answered += len(records)
        return True

    def _commit(self, consumer, batch):
        offsets = {}
        for msg in batch:
            tp = (msg.topic(), msg.partition())
            offsets[tp] = max(offsets.get(tp, -1), msg.offset() + 1)
        try:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)
        except KafkaException as e:
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (%s); some requests may be answered twice (merge keeps the "
                        "first answer)", e)


def serve(model, predict=None, *, predict_batch=None, **settings):
    """Serve `predict` (or `predict_batch`) as the model `model` until SIGTERM or Ctrl-C. Settings as for
    Worker. Logs to stderr at INFO unless logging is configured already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = Worker(model, predict, predict_batch=predict_batch, **settings)
    try:
        worker.run()
    except RegistryError:
        raise SystemExit(1) from None   # logged by run(): the subject and the registry's message
    return worker
