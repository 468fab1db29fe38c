//! Hostile input for the decoder, kept as tests: every truncation and every single-bit flip of valid
//! records, hand-made length-prefix attacks, and random bytes (proptest). The decoder must return an
//! error or a record that re-encodes to the same bytes — never panic, never allocate what a length
//! prefix claims. cargo-fuzz needs a nightly toolchain this project does not assume; these cases are
//! what a fuzzing corpus would pin down.

use std::collections::HashMap;

use proptest::prelude::*;
use switchyard::codec::{AvroRecord, Codec, Decision, DecisionStatus, Framing, Prediction, Request, Routed};
use switchyard::config::Config;

fn request() -> Request {
    Request {
        request_id: "req-0001".into(),
        user_id: "user-ünï-42".into(),
        deployment: "fraud".into(),
        sent_at: 1_764_000_000_000,
        payload: b"{\"amount\":12}".to_vec(),
        attributes: HashMap::from([("k".to_string(), "v".to_string())]),
    }
}

fn prediction() -> Prediction {
    Prediction {
        request_id: "req-0001".into(),
        model: "fraud-v2".into(),
        output: Some(b"0.42".to_vec()),
        error: None,
        produced_at: 5,
    }
}

/// Plain Avro, and Confluent framing with the default schema ids of config/switchyard.toml.
fn codecs() -> Vec<Codec> {
    let ids = Config::load(None, Vec::new()).expect("defaults load").codec.schema_ids;
    vec![Codec::default(), Codec::new(Framing::Confluent(ids))]
}

/// Decoding either fails or yields a record that encodes back to exactly these bytes.
fn consistent<T: AvroRecord + std::fmt::Debug>(codec: &Codec, bytes: &[u8]) -> bool {
    match codec.decode::<T>(bytes) {
        Ok(record) => codec.encode(&record) == bytes,
        Err(_) => true,
    }
}

#[test]
fn every_truncation_is_an_error() {
    for codec in codecs() {
        let bytes = codec.encode(&request());
        for len in 0..bytes.len() {
            assert!(codec.decode::<Request>(&bytes[..len]).is_err(), "prefix of {len} bytes decoded");
        }
        let bytes = codec.encode(&prediction());
        for len in 0..bytes.len() {
            assert!(codec.decode::<Prediction>(&bytes[..len]).is_err(), "prefix of {len} bytes decoded");
        }
    }
}

#[test]
fn every_bit_flip_is_an_error_or_a_consistent_record() {
    for codec in codecs() {
        let bytes = codec.encode(&request());
        for i in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[i / 8] ^= 1 << (i % 8);
            assert!(consistent::<Request>(&codec, &flipped), "bit {i}");
            assert!(consistent::<Routed>(&codec, &flipped), "bit {i} as Routed");
        }
    }
}

#[test]
fn hostile_length_prefixes_are_refused_without_allocating_them() {
    let codec = Codec::default();
    let cases: Vec<Vec<u8>> = vec![
        vec![0xfe, 0xff, 0xff, 0xff, 0x0f], // string length ~2^31
        vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], // length near i64::MAX
        vec![0x01],                         // negative length (-1)
        vec![0x02, b'a', 0xfe, 0xff, 0xff, 0xff, 0x0f], // second field huge
        vec![0xff; 16],                     // unterminated varint
    ];
    for bytes in &cases {
        assert!(codec.decode::<Request>(bytes).is_err(), "{bytes:?}");
        assert!(codec.decode::<Prediction>(bytes).is_err(), "{bytes:?}");
    }
    // A map claiming a billion entries.
    let mut bytes = codec.encode(&request());
    // The record ends with the attributes map: count, "k", "v", end of map (1 + 2 + 2 + 1 bytes).
    bytes.truncate(bytes.len() - 6);
    bytes.extend_from_slice(&[0x80, 0xa8, 0xd6, 0xb9, 0x07]);
    assert!(codec.decode::<Request>(&bytes).is_err());
}

#[test]
fn records_of_another_schema_are_refused() {
    let codec = Codec::default();
    let decision = Decision {
        request_id: "r".into(),
        user_id: "u".into(),
        deployment: "d".into(),
        model: "m".into(),
        strategy: "canary".into(),
        cohort: "control".into(),
        bucket: 1,
        config_version: 1,
        status: DecisionStatus::Ok,
        output: None,
        error: None,
        latency_ms: 1,
        decided_at: 1,
        propensity: None,
    };
    assert!(codec.decode::<Request>(&codec.encode(&decision)).is_err());
    assert!(codec.decode::<Request>(&codec.encode(&prediction())).is_err());
    assert!(codec.decode::<Prediction>(&codec.encode(&request())).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for codec in codecs() {
            prop_assert!(consistent::<Request>(&codec, &bytes));
            prop_assert!(consistent::<Prediction>(&codec, &bytes));
            prop_assert!(consistent::<Routed>(&codec, &bytes));
        }
    }

    #[test]
    fn mutated_valid_records_never_panic(index in 0usize..64, value in any::<u8>(), cut in 0usize..64) {
        for codec in codecs() {
            let mut bytes = codec.encode(&request());
            let i = index % bytes.len();
            bytes[i] = value;
            bytes.truncate(bytes.len() - cut.min(bytes.len()));
            prop_assert!(consistent::<Request>(&codec, &bytes));
        }
    }
}
