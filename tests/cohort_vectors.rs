//! The cohort hash against the published vectors (tests/vectors/cohort-hash.csv), computed with an
//! independent MurmurHash3 implementation. The same file is what other teams test their ports against.

use switchyard::cohort::hash::{bucket, cohort_hash, shadow_bucket};

/// Splits one RFC 4180 CSV line (quoted fields, doubled quotes inside them).
fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let (mut quoted, mut chars) = (false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                out.last_mut().unwrap().push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(String::new()),
            (c, _) => out.last_mut().unwrap().push(c),
        }
    }
    out
}

#[test]
fn every_published_vector_matches() {
    let text = include_str!("vectors/cohort-hash.csv");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("salt,user_id,murmur3_x86_32,bucket,shadow_bucket"));
    let mut checked = 0;
    for line in lines.filter(|l| !l.is_empty()) {
        let f = fields(line);
        assert_eq!(f.len(), 5, "{line}");
        let (salt, user) = (&f[0], &f[1]);
        assert_eq!(cohort_hash(salt, user).to_string(), f[2], "hash of {salt:?}:{user:?}");
        assert_eq!(bucket(salt, user).to_string(), f[3], "bucket of {salt:?}:{user:?}");
        assert_eq!(shadow_bucket(salt, user).to_string(), f[4], "shadow bucket of {salt:?}:{user:?}");
        checked += 1;
    }
    assert_eq!(checked, 1096);
}
