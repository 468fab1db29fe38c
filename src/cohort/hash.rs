//! The cohort hash of the contract, reproducible in any language.
//!
//! ```text
//! bucket(salt, user_id)        = murmur3_x86_32(utf8(salt + ":" + user_id), seed 0) mod 10000
//! shadow_bucket(salt, user_id) = murmur3_x86_32(utf8(salt + ":shadow:" + user_id), seed 0) mod 10000
//! ```
//!
//! MurmurHash3 x86_32 is Austin Appleby's reference `MurmurHash3_x86_32` (little-endian blocks), read as
//! an unsigned 32-bit integer. docs/cohort-hash.md and tests/vectors/cohort-hash.csv publish the vectors.

use crate::record::deployment::BUCKETS;

/// MurmurHash3 x86_32 of `data` with `seed`.
pub fn murmur3_x86_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, byte) in tail.iter().enumerate() {
            k |= u32::from(*byte) << (8 * i);
        }
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The hash behind [`bucket`]: murmur3 of `salt + ":" + user_id`.
pub fn cohort_hash(salt: &str, user_id: &str) -> u32 {
    murmur3_x86_32(format!("{salt}:{user_id}").as_bytes(), 0)
}

/// The user's canary bucket, 0..10000.
pub fn bucket(salt: &str, user_id: &str) -> u16 {
    (cohort_hash(salt, user_id) % BUCKETS) as u16
}

/// The user's shadow-sampling bucket, 0..10000, independent of [`bucket`].
pub fn shadow_bucket(salt: &str, user_id: &str) -> u16 {
    (murmur3_x86_32(format!("{salt}:shadow:{user_id}").as_bytes(), 0) % BUCKETS) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_vectors() {
        // Unleash's published vector: murmur3("gr1:123") % 100 + 1 == 73.
        assert_eq!(murmur3_x86_32(b"gr1:123", 0) % 100 + 1, 73);
        assert_eq!(cohort_hash("fraud", "user-1"), 0x28f5_3732);
        assert_eq!(bucket("fraud", "user-1"), 9090);
        assert_eq!(bucket("fraud", "user-42"), 5290);
        assert_eq!(bucket("recs", "alice"), 4290);
        assert_eq!(cohort_hash("fraud", "ünïcode-用户"), 0xa12d_8409);
        assert_eq!(bucket("fraud", "ünïcode-用户"), 4697);
        assert_eq!(shadow_bucket("fraud", "user-1"), 2372);
    }

    #[test]
    fn reference_implementation_edge_cases() {
        // From the reference C implementation's SMHasher verification values.
        assert_eq!(murmur3_x86_32(b"", 0), 0);
        assert_eq!(murmur3_x86_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_x86_32(b"", 0xffff_ffff), 0x81f1_6f39);
        assert_eq!(murmur3_x86_32(&[0xff, 0xff, 0xff, 0xff], 0), 0x7629_3b50);
        assert_eq!(murmur3_x86_32(&[0x21, 0x43, 0x65, 0x87], 0), 0xf55b_516b);
        assert_eq!(murmur3_x86_32(&[0x21, 0x43, 0x65], 0), 0x7e4a_8634);
        assert_eq!(murmur3_x86_32(&[0x21, 0x43], 0), 0xa0f7_b07a);
        assert_eq!(murmur3_x86_32(&[0x21], 0), 0x7266_1cf4);
    }
}
