//! The audit history: one entry per deployments-topic record — accepted, rejected or deleted — with who
//! wrote it, why, and the controller's evidence. The controller writes it exactly once per record (in the
//! transaction that commits its position on the deployments topic); `switchyard history` renders it.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::codec::Millis;
use crate::control::registry::Outcome;
use crate::record::{Change, DeploymentSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Accepted,
    Rejected,
    Deleted,
}

/// One history record (JSON, keyed by deployment name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub deployment: String,
    /// Where the record is on the deployments topic.
    pub offset: i64,
    /// When it was written (the record's timestamp).
    pub at: Millis,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    /// Who wrote it and why, as the record says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
    /// The split it put in force, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
}

/// The history entry for one deployments-topic record and what applying it did; None for a replay of
/// the record in force (a write-back after a rejection), which changes nothing.
pub fn entry(name: &str, value: Option<&[u8]>, offset: i64, at: Millis, outcome: &Outcome) -> Option<Entry> {
    let spec = value.and_then(|v| DeploymentSpec::from_json(v).ok());
    let (verdict, rejected, split) = match outcome {
        Outcome::Unchanged => return None,
        Outcome::Installed(d) => (Verdict::Accepted, None, Some(crate::control::ops::describe_split(d))),
        Outcome::Deleted(_) => (Verdict::Deleted, None, None),
        Outcome::Rejected(r) => (Verdict::Rejected, Some(r.reason.clone()), None),
    };
    Some(Entry {
        deployment: name.to_string(),
        offset,
        at,
        verdict,
        version: spec.as_ref().map(|s| s.version),
        rejected,
        change: spec.and_then(|s| s.change),
        split,
    })
}

/// Renders entries, oldest first.
pub fn render(entries: &[Entry]) -> String {
    let mut out = String::new();
    for e in entries {
        let version = e.version.map_or("-".to_string(), |v| format!("v{v}"));
        let verdict = match e.verdict {
            Verdict::Accepted => "accepted",
            Verdict::Rejected => "REJECTED",
            Verdict::Deleted => "deleted",
        };
        let actor = e.change.as_ref().map_or("-", |c| c.actor.as_str());
        let _ = writeln!(out, "{}  {version:<5} {verdict:<8} by {actor}  (offset {})", utc(e.at), e.offset);
        if let Some(c) = &e.change {
            let _ = writeln!(out, "    why: {}", c.reason);
        }
        if let Some(reason) = &e.rejected {
            let _ = writeln!(out, "    rejected: {reason}");
        }
        if let Some(split) = &e.split {
            let _ = writeln!(out, "    split: {split}");
        }
        let figures = e.change.iter().flat_map(|c| c.figures.iter().chain(&c.arms));
        for figures in figures {
            let candidate = figures.candidate.as_ref().map_or("candidate".to_string(), |m| format!("candidate {m}"));
            let _ = writeln!(
                out,
                "    step {}: {} control, {} {candidate} users",
                figures.step, figures.users.0, figures.users.1
            );
            for g in &figures.guards {
                let _ = writeln!(out, "      {}", crate::rollout::describe_guard(g));
            }
        }
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for milliseconds since the epoch.
pub fn utc(ms: Millis) -> String {
    let (days, rest) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (rest / 3_600_000, rest / 60_000 % 60, rest / 1000 % 60, rest % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Registry;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_795_694_645_123), "2026-11-26T12:04:05.123Z");
    }

    #[test]
    fn each_record_gets_its_entry_and_a_replay_none() {
        let mut registry = Registry::default();
        let good = br#"{"version":2,"strategy":"canary","control":"a","candidate":"b","canary_percent":5,
                        "change":{"actor":"operator:ana","reason":"try b"}}"#;
        let outcome = registry.apply(Some(b"fraud"), Some(good), 7);
        let accepted = entry("fraud", Some(good), 7, 1000, &outcome).unwrap();
        assert_eq!((accepted.verdict, accepted.version), (Verdict::Accepted, Some(2)));
        assert_eq!(accepted.change.as_ref().unwrap().actor, "operator:ana");
        let outcome = registry.apply(Some(b"fraud"), Some(good), 8);
        assert_eq!(entry("fraud", Some(good), 8, 1001, &outcome), None, "a replay is no change");
        let bad = br#"{"version":2,"strategy":"canary","control":"a","candidate":"c","canary_percent":5}"#;
        let outcome = registry.apply(Some(b"fraud"), Some(bad), 9);
        let rejected = entry("fraud", Some(bad), 9, 1002, &outcome).unwrap();
        assert_eq!(rejected.verdict, Verdict::Rejected);
        let text = render(&[accepted, rejected]);
        assert!(text.contains("v2    accepted by operator:ana") && text.contains("why: try b"), "{text}");
        assert!(text.contains("REJECTED") && text.contains("not greater than the version in force"), "{text}");
    }
}
