//! Kafka's default partitioner for keyed records, as the Java client computes it (and librdkafka's
//! `murmur2_random`): `(murmur2(key) & 0x7fffffff) % partitions`. merge uses it to tell a prediction that
//! arrived on another partition than its key's (a worker on another partitioner) and where it belongs.

/// Kafka's murmur2 (MurmurHash2, seed 0x9747b28c), as `org.apache.kafka.common.utils.Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// The partition Kafka's default partitioner gives `key` among `partitions`.
pub fn partition_for_key(key: &[u8], partitions: usize) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) as usize % partitions.max(1)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Java client's values, as librdkafka's own unit test (rdmurmur2.c) lists them.
    #[test]
    fn murmur2_matches_the_java_client() {
        let unaligned = b"PreAmbleWillBeRemoved,ThePrePartThatIs";
        let cases: [(&[u8], u32); 11] = [
            (b"kafka", 0xd067cf64),
            (b"giberish123456789", 0x8f552b0c),
            (b"1234", 0x9fc97b14),
            (b"234", 0xe7c009ca),
            (b"34", 0x873930da),
            (b"4", 0x5a4b5ca1),
            (unaligned, 0x78424f1c),
            (&unaligned[1..], 0x4a62b377),
            (&unaligned[2..], 0xe0e4e09e),
            (&unaligned[3..], 0x62b8b43f),
            (b"", 0x106e08d9),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key), expected, "{:?}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn partitions_are_in_range_and_positive() {
        assert_eq!(partition_for_key(b"kafka", 1), 0);
        for n in 1..20 {
            for key in [&b"a"[..], b"user-1", b"giberish123456789"] {
                assert!((0..n as i32).contains(&partition_for_key(key, n)));
            }
        }
        // 0xd067cf64 & 0x7fffffff = 0x5067cf64 = 1348980580; mod 4 = 0, mod 3 = 1.
        assert_eq!((partition_for_key(b"kafka", 4), partition_for_key(b"kafka", 3)), (0, 1));
    }
}
