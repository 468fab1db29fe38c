package dev.switchyard.bench;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;

import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericDatumWriter;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryEncoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.io.EncoderFactory;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.processor.PunctuationType;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;

/**
 * The Kafka Streams baseline of scripts/bench: switchyard's routing and join, written with the Processor
 * API. Mode "route": each request is hashed into its cohort (the same murmur3 bucket as switchyard's),
 * and a ModelRequest goes to the serving model's topic plus a Routed record to the routed topic (two
 * records per request). Mode "full": the routed record goes to a state store (RocksDB, changelogged)
 * instead, shadow copies go out too, and predictions from the models' topics are joined back: one
 * Decision per request (TIMEOUT at routed_at + timeout, found by a wall-clock punctuation over an
 * in-memory deadline queue), one ShadowComparison per shadow answer. exactly_once_v2 with the default
 * commit interval (100 ms), one stream thread: Kafka Streams' defaults.
 *
 * Arguments (all required, as --name value): bootstrap, app-id, mode, schemas, requests, routed,
 * decisions, comparisons, model-requests and model-predictions (templates with {model}), deployment,
 * control, candidate, canary-percent, shadow ("" for none), timeout-ms.
 */
public final class StreamsRouter {
    private static final int BUCKETS = 10_000;

    public static void main(String[] argv) throws Exception {
        Map<String, String> args = new HashMap<>();
        for (int i = 0; i + 1 < argv.length; i += 2) {
            args.put(argv[i].replaceFirst("^--", ""), argv[i + 1]);
        }
        Config c = new Config(args);
        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, c.appId);
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, c.bootstrap);
        props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        props.put(StreamsConfig.DEFAULT_KEY_SERDE_CLASS_CONFIG, Serdes.ByteArraySerde.class);
        props.put(StreamsConfig.DEFAULT_VALUE_SERDE_CLASS_CONFIG, Serdes.ByteArraySerde.class);
        props.put(StreamsConfig.STATE_DIR_CONFIG, Files.createTempDirectory("streams-baseline").toString());
        props.put("consumer.auto.offset.reset", "earliest");

        KafkaStreams streams = new KafkaStreams(topology(c), props);
        CountDownLatch done = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            streams.close(Duration.ofSeconds(10));
            done.countDown();
        }));
        streams.start();
        System.out.println("streams-baseline started: " + c.mode);
        done.await();
    }

    static Topology topology(Config c) {
        Topology t = new Topology();
        t.addSource("requests", c.requests);
        List<String> models = new ArrayList<>(List.of(c.control, c.candidate));
        if (!c.shadow.isEmpty()) {
            models.add(c.shadow);
        }
        if (c.mode.equals("route")) {
            t.addProcessor("router", () -> new Router(c, false), "requests");
            t.addSink("routed", c.routed, "router");
        } else {
            List<String> predictions = new ArrayList<>();
            for (String m : models) {
                predictions.add(c.modelPredictions.replace("{model}", m));
            }
            t.addSource("predictions", predictions.toArray(new String[0]));
            t.addProcessor("router", () -> new Router(c, true), "requests", "predictions");
            t.addStateStore(
                    Stores.keyValueStoreBuilder(
                            Stores.persistentKeyValueStore("pending"), Serdes.String(), Serdes.ByteArray()),
                    "router");
            t.addSink("decisions", c.decisions, "router");
            t.addSink("comparisons", c.comparisons, "router");
        }
        for (String m : models) {
            t.addSink("model-" + m, c.modelRequests.replace("{model}", m), "router");
        }
        return t;
    }

    /** Routes requests; in full mode also joins predictions (both arrive here: co-partitioned). */
    static final class Router implements Processor<byte[], byte[], byte[], byte[]> {
        private final Config c;
        private final boolean join;
        private final int threshold;
        private ProcessorContext<byte[], byte[]> context;
        private KeyValueStore<String, byte[]> pending;
        /** (deadline, request id, user key) of requests not decided yet, in routing order. */
        private final ArrayDeque<Object[]> deadlines = new ArrayDeque<>();

        Router(Config c, boolean join) {
            this.c = c;
            this.join = join;
            this.threshold = (int) Math.round(c.canaryPercent * 100);
        }

        @Override
        public void init(ProcessorContext<byte[], byte[]> context) {
            this.context = context;
            if (join) {
                pending = context.getStateStore("pending");
                context.schedule(Duration.ofMillis(100), PunctuationType.WALL_CLOCK_TIME, this::expire);
            }
        }

        @Override
        public void process(Record<byte[], byte[]> record) {
            String topic = context.recordMetadata().map(m -> m.topic()).orElse("");
            if (topic.equals(c.requests)) {
                route(record);
            } else {
                answer(record);
            }
        }

        private void route(Record<byte[], byte[]> record) {
            GenericRecord r;
            try {
                r = c.request.decode(record.value());
            } catch (RuntimeException e) {
                return; // a dead letter in switchyard; the benchmark sends none
            }
            String user = r.get("user_id").toString();
            int bucket = Integer.remainderUnsigned(murmur3(c.deployment + ":" + user), BUCKETS);
            boolean candidate = bucket < threshold;
            String serving = candidate ? c.candidate : c.control;
            long now = System.currentTimeMillis();
            List<String> shadows = new ArrayList<>();
            if (join && !c.shadow.isEmpty()) {
                shadows.add(c.shadow);
            }
            send("model-" + serving, record, modelRequest(r, serving, "PRIMARY", now));
            for (String s : shadows) {
                send("model-" + s, record, modelRequest(r, s, "SHADOW", now));
            }
            GenericRecord routed = new GenericData.Record(c.routedSchema.schema);
            routed.put("request_id", r.get("request_id"));
            routed.put("user_id", r.get("user_id"));
            routed.put("deployment", r.get("deployment"));
            routed.put("strategy", "canary");
            routed.put("cohort", candidate ? "candidate" : "control");
            routed.put("bucket", bucket);
            routed.put("config_version", 1L);
            routed.put("serving_model", serving);
            routed.put("shadow_models", shadows);
            routed.put("timeout_ms", c.timeoutMs);
            routed.put("sent_at", r.get("sent_at"));
            routed.put("routed_at", now);
            routed.put("fallback", null);
            if (join) {
                // The entry: the routed record, then per answer that came in (model, output or error).
                pending.put(r.get("request_id").toString(), Entry.of(c.routedSchema.encode(routed)).bytes());
                deadlines.add(new Object[] {now + c.timeoutMs, r.get("request_id").toString(), record.key()});
            } else {
                send("routed", record, c.routedSchema.encode(routed));
            }
        }

        private GenericRecord modelRequest(GenericRecord r, String model, String role, long now) {
            GenericRecord m = new GenericData.Record(c.modelRequest.schema);
            for (String f : new String[] {"request_id", "user_id", "deployment", "sent_at", "payload", "attributes"}) {
                m.put(f, r.get(f));
            }
            m.put("model", model);
            m.put("role", new GenericData.EnumSymbol(c.modelRequest.schema.getField("role").schema(), role));
            m.put("config_version", 1L);
            m.put("routed_at", now);
            return m;
        }

        private void send(String sink, Record<byte[], byte[]> in, GenericRecord value) {
            send(sink, in, c.codecFor(value).encode(value));
        }

        private void send(String sink, Record<byte[], byte[]> in, byte[] value) {
            context.forward(new Record<>(in.key(), value, System.currentTimeMillis()), sink);
        }

        private void answer(Record<byte[], byte[]> record) {
            GenericRecord p;
            try {
                p = c.prediction.decode(record.value());
            } catch (RuntimeException e) {
                return;
            }
            String id = p.get("request_id").toString();
            byte[] stored = pending.get(id);
            if (stored == null) {
                return; // decided and complete already, or never routed: discarded
            }
            Entry entry = Entry.parse(stored);
            GenericRecord routed = c.routedSchema.decode(entry.routed);
            String model = p.get("model").toString();
            String serving = routed.get("serving_model").toString();
            long routedAt = (Long) routed.get("routed_at");
            long producedAt = (Long) p.get("produced_at");
            if (entry.answers.containsKey(model)) {
                return; // a second answer
            }
            entry.answers.put(model, p);
            if (model.equals(serving) && !entry.decided) {
                entry.decided = true;
                boolean late = producedAt > routedAt + c.timeoutMs;
                decide(record.key(), routed, late ? null : p, late ? "TIMEOUT" : (p.get("error") != null ? "MODEL_ERROR" : "OK"));
            }
            for (Object s : (List<?>) routed.get("shadow_models")) {
                String shadow = s.toString();
                GenericRecord shadowAnswer = entry.answers.get(shadow);
                GenericRecord servingAnswer = entry.answers.get(serving);
                if (shadowAnswer != null && servingAnswer != null && !entry.compared.contains(shadow)) {
                    entry.compared.add(shadow);
                    compare(record.key(), routed, servingAnswer, shadowAnswer);
                }
            }
            if (entry.decided && entry.compared.size() == ((List<?>) routed.get("shadow_models")).size()) {
                pending.delete(id);
            } else {
                pending.put(id, entry.bytes());
            }
        }

        private void decide(byte[] key, GenericRecord routed, GenericRecord p, String status) {
            long now = System.currentTimeMillis();
            GenericRecord d = new GenericData.Record(c.decision.schema);
            d.put("request_id", routed.get("request_id"));
            d.put("user_id", routed.get("user_id"));
            d.put("deployment", routed.get("deployment"));
            d.put("model", routed.get("serving_model"));
            d.put("strategy", routed.get("strategy"));
            d.put("cohort", routed.get("cohort"));
            d.put("bucket", routed.get("bucket"));
            d.put("config_version", routed.get("config_version"));
            d.put("status", new GenericData.EnumSymbol(c.decision.schema.getField("status").schema(), status));
            d.put("output", p == null ? null : p.get("output"));
            d.put("error", p == null ? null : p.get("error"));
            d.put("latency_ms", now - (Long) routed.get("sent_at"));
            d.put("decided_at", now);
            context.forward(new Record<>(key, c.decision.encode(d), now), "decisions");
        }

        private void compare(byte[] key, GenericRecord routed, GenericRecord serving, GenericRecord shadow) {
            long now = System.currentTimeMillis();
            long routedAt = (Long) routed.get("routed_at");
            GenericRecord s = new GenericData.Record(c.comparison.schema);
            Object a = serving.get("output");
            Object b = shadow.get("output");
            s.put("request_id", routed.get("request_id"));
            s.put("deployment", routed.get("deployment"));
            s.put("serving_model", routed.get("serving_model"));
            s.put("serving_output", a);
            s.put("shadow_model", shadow.get("model"));
            s.put("shadow_output", b);
            s.put("agreed", a != null && a.equals(b));
            s.put("serving_latency_ms", (Long) serving.get("produced_at") - routedAt);
            s.put("shadow_latency_ms", (Long) shadow.get("produced_at") - routedAt);
            s.put("compared_at", now);
            context.forward(new Record<>(key, c.comparison.encode(s), now), "comparisons");
        }

        /** Requests past their deadline without a serving answer: TIMEOUT. */
        private void expire(long now) {
            while (!deadlines.isEmpty() && (Long) deadlines.peek()[0] <= now) {
                Object[] due = deadlines.poll();
                String id = (String) due[1];
                byte[] stored = pending.get(id);
                if (stored == null) {
                    continue;
                }
                Entry entry = Entry.parse(stored);
                if (!entry.decided) {
                    entry.decided = true;
                    decide((byte[]) due[2], c.routedSchema.decode(entry.routed), null, "TIMEOUT");
                    pending.put(id, entry.bytes());
                }
            }
        }
    }

    /** A pending request: its routed record, whether it is decided, answers so far, shadows compared. */
    static final class Entry {
        byte[] routed;
        boolean decided;
        final Map<String, GenericRecord> answers = new HashMap<>();
        final java.util.Set<String> compared = new java.util.HashSet<>();
        static Codec predictionCodec;

        static Entry of(byte[] routed) {
            Entry e = new Entry();
            e.routed = routed;
            return e;
        }

        byte[] bytes() {
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            writeBlock(out, routed);
            out.write(decided ? 1 : 0);
            out.write(answers.size());
            for (GenericRecord p : answers.values()) {
                writeBlock(out, predictionCodec.encode(p));
            }
            out.write(compared.size());
            for (String s : compared) {
                writeBlock(out, s.getBytes(StandardCharsets.UTF_8));
            }
            return out.toByteArray();
        }

        static Entry parse(byte[] bytes) {
            ByteBuffer in = ByteBuffer.wrap(bytes);
            Entry e = of(readBlock(in));
            e.decided = in.get() == 1;
            int answers = in.get();
            for (int i = 0; i < answers; i++) {
                GenericRecord p = predictionCodec.decode(readBlock(in));
                e.answers.put(p.get("model").toString(), p);
            }
            int compared = in.get();
            for (int i = 0; i < compared; i++) {
                e.compared.add(new String(readBlock(in), StandardCharsets.UTF_8));
            }
            return e;
        }

        private static void writeBlock(ByteArrayOutputStream out, byte[] block) {
            out.write(ByteBuffer.allocate(4).putInt(block.length).array(), 0, 4);
            out.write(block, 0, block.length);
        }

        private static byte[] readBlock(ByteBuffer in) {
            byte[] block = new byte[in.getInt()];
            in.get(block);
            return block;
        }
    }

    /** Plain Avro binary (switchyard's default framing) of one schema. */
    static final class Codec {
        final Schema schema;
        private final GenericDatumReader<GenericRecord> reader;
        private final GenericDatumWriter<GenericRecord> writer;

        Codec(Path file) {
            try {
                schema = new Schema.Parser().parse(file.toFile());
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
            reader = new GenericDatumReader<>(schema);
            writer = new GenericDatumWriter<>(schema);
        }

        GenericRecord decode(byte[] bytes) {
            try {
                return reader.read(null, DecoderFactory.get().binaryDecoder(bytes, null));
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        }

        byte[] encode(GenericRecord record) {
            try {
                ByteArrayOutputStream out = new ByteArrayOutputStream(256);
                BinaryEncoder encoder = EncoderFactory.get().directBinaryEncoder(out, null);
                writer.write(record, encoder);
                encoder.flush();
                return out.toByteArray();
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        }
    }

    static final class Config {
        final String bootstrap, appId, mode, requests, routed, decisions, comparisons, modelRequests,
                modelPredictions, deployment, control, candidate, shadow;
        final double canaryPercent;
        final long timeoutMs;
        final Codec request, modelRequest, routedSchema, prediction, decision, comparison;

        Config(Map<String, String> a) {
            bootstrap = need(a, "bootstrap");
            appId = need(a, "app-id");
            mode = need(a, "mode");
            requests = need(a, "requests");
            routed = need(a, "routed");
            decisions = need(a, "decisions");
            comparisons = need(a, "comparisons");
            modelRequests = need(a, "model-requests");
            modelPredictions = need(a, "model-predictions");
            deployment = need(a, "deployment");
            control = need(a, "control");
            candidate = need(a, "candidate");
            shadow = a.getOrDefault("shadow", "");
            canaryPercent = Double.parseDouble(need(a, "canary-percent"));
            timeoutMs = Long.parseLong(need(a, "timeout-ms"));
            Path dir = Path.of(need(a, "schemas"));
            request = new Codec(dir.resolve("Request.avsc"));
            modelRequest = new Codec(dir.resolve("ModelRequest.avsc"));
            routedSchema = new Codec(dir.resolve("Routed.avsc"));
            prediction = new Codec(dir.resolve("Prediction.avsc"));
            decision = new Codec(dir.resolve("Decision.avsc"));
            comparison = new Codec(dir.resolve("ShadowComparison.avsc"));
            Entry.predictionCodec = prediction;
        }

        Codec codecFor(GenericRecord r) {
            return r.getSchema().getName().equals("ModelRequest") ? modelRequest : routedSchema;
        }

        private static String need(Map<String, String> a, String name) {
            String v = a.get(name);
            if (v == null) {
                throw new IllegalArgumentException("missing --" + name);
            }
            return v;
        }
    }

    /** switchyard's cohort hash: murmur3 x86 32-bit, seed 0, over the UTF-8 bytes. */
    static int murmur3(String text) {
        byte[] data = text.getBytes(StandardCharsets.UTF_8);
        final int c1 = 0xcc9e2d51, c2 = 0x1b873593;
        int h = 0;
        int blocks = data.length / 4;
        for (int i = 0; i < blocks; i++) {
            int k = (data[4 * i] & 0xff) | (data[4 * i + 1] & 0xff) << 8 | (data[4 * i + 2] & 0xff) << 16
                    | (data[4 * i + 3] & 0xff) << 24;
            k *= c1;
            k = Integer.rotateLeft(k, 15);
            k *= c2;
            h ^= k;
            h = Integer.rotateLeft(h, 13) * 5 + 0xe6546b64;
        }
        int k = 0;
        for (int i = data.length & 3; i > 0; i--) {
            k |= (data[4 * blocks + i - 1] & 0xff) << (8 * (i - 1));
        }
        if ((data.length & 3) != 0) {
            k *= c1;
            k = Integer.rotateLeft(k, 15);
            k *= c2;
            h ^= k;
        }
        h ^= data.length;
        h ^= h >>> 16;
        h *= 0x85ebca6b;
        h ^= h >>> 13;
        h *= 0xc2b2ae35;
        h ^= h >>> 16;
        return h;
    }
}
