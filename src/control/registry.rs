//! The deployments in force, built by applying deployments-topic records in order.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};

use crate::record::{Deployment, DeploymentSpec, InvalidDeployment};

/// How many rejected records `status` can show.
const REJECTIONS_KEPT: usize = 100;

/// The registry shared by the watcher (writer) and route (readers).
pub type SharedRegistry = Arc<RwLock<Registry>>;

/// A record that was not put in force, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub deployment: String,
    pub version: Option<u64>,
    pub reason: String,
    /// Offset of the record on the deployments topic.
    pub offset: i64,
}

/// What applying one record did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Installed(Arc<Deployment>),
    Deleted(String),
    /// The same version with the same content again (a replay): harmless, nothing changes.
    Unchanged,
    Rejected(Rejection),
}

#[derive(Debug, Default, Clone)]
pub struct Registry {
    deployments: BTreeMap<String, Arc<Deployment>>,
    /// Highest version seen per deployment, in force or not, so the next write can go above it.
    highest_seen: BTreeMap<String, u64>,
    rejected: VecDeque<Rejection>,
}

impl Registry {
    pub fn shared() -> SharedRegistry {
        Arc::new(RwLock::new(Registry::default()))
    }

    pub fn get(&self, name: &str) -> Option<Arc<Deployment>> {
        self.deployments.get(name).cloned()
    }

    pub fn deployments(&self) -> impl Iterator<Item = &Arc<Deployment>> {
        self.deployments.values()
    }

    pub fn rejected(&self) -> impl Iterator<Item = &Rejection> {
        self.rejected.iter()
    }

    /// The record that puts the config in force for `name` back at the end of the deployments topic.
    ///
    /// Compaction keeps only the last record per key. When that record was rejected (bad JSON, a stale
    /// version, the same version with other content), a reader starting after compaction would see only
    /// it, and disagree with the instances that rejected it. Writing the config in force again after a
    /// rejection makes the last record the one in force; applying it is a harmless replay.
    pub fn record_in_force(&self, name: &str) -> Option<Vec<u8>> {
        self.deployments.get(name).map(|d| d.spec.to_json().into_bytes())
    }

    /// The version a new record for `name` must at least have.
    pub fn next_version(&self, name: &str) -> u64 {
        let in_force = self.deployments.get(name).map_or(0, |d| d.version());
        in_force.max(self.highest_seen.get(name).copied().unwrap_or(0)) + 1
    }

    /// Applies one deployments-topic record (`value` None is a tombstone).
    pub fn apply(&mut self, key: Option<&[u8]>, value: Option<&[u8]>, offset: i64) -> Outcome {
        let name = match key.map(std::str::from_utf8) {
            Some(Ok(name)) => name.to_string(),
            Some(Err(_)) => {
                return self.reject(
                    String::from_utf8_lossy(key.unwrap_or_default()).into_owned(),
                    None,
                    "key is not UTF-8".into(),
                    offset,
                );
            }
            None => {
                return self.reject(
                    String::new(),
                    None,
                    "record has no key (the key is the deployment name)".into(),
                    offset,
                );
            }
        };
        let Some(value) = value else {
            return match self.deployments.remove(&name) {
                Some(_) => Outcome::Deleted(name),
                None => Outcome::Unchanged,
            };
        };
        let spec = match DeploymentSpec::from_json(value) {
            Ok(spec) => spec,
            Err(e) => return self.reject(name, None, e.to_string(), offset),
        };
        let version = spec.version;
        let seen = self.highest_seen.entry(name.clone()).or_default();
        *seen = (*seen).max(version);
        if let Some(current) = self.deployments.get(&name) {
            if version == current.version() && spec == current.spec {
                return Outcome::Unchanged;
            }
            if version <= current.version() {
                let reason = InvalidDeployment::StaleVersion { got: version, current: current.version() }.to_string();
                return self.reject(name, Some(version), reason, offset);
            }
        }
        match spec.validate(&name) {
            Ok(deployment) => {
                let deployment = Arc::new(deployment);
                self.deployments.insert(name, deployment.clone());
                Outcome::Installed(deployment)
            }
            Err(e) => self.reject(name, Some(version), e.to_string(), offset),
        }
    }

    fn reject(&mut self, deployment: String, version: Option<u64>, reason: String, offset: i64) -> Outcome {
        let rejection = Rejection { deployment, version, reason, offset };
        if self.rejected.len() == REJECTIONS_KEPT {
            self.rejected.pop_front();
        }
        self.rejected.push_back(rejection.clone());
        Outcome::Rejected(rejection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(r: &mut Registry, name: &str, json: &str) -> Outcome {
        r.apply(Some(name.as_bytes()), Some(json.as_bytes()), 0)
    }

    #[test]
    fn versions_only_move_forward_and_replays_are_harmless() {
        let mut r = Registry::default();
        let v1 = r#"{"version":1,"strategy":"single","control":"a"}"#;
        assert!(matches!(apply(&mut r, "d", v1), Outcome::Installed(_)));
        assert_eq!(apply(&mut r, "d", v1), Outcome::Unchanged);
        assert!(matches!(
            apply(&mut r, "d", r#"{"version":2,"strategy":"single","control":"b"}"#),
            Outcome::Installed(_)
        ));
        let stale = apply(&mut r, "d", r#"{"version":2,"strategy":"single","control":"c"}"#);
        assert!(matches!(&stale, Outcome::Rejected(rej) if rej.reason.contains("not greater")), "{stale:?}");
        assert_eq!(r.get("d").unwrap().spec.control, "b");
        assert_eq!(r.next_version("d"), 3);
    }

    #[test]
    fn invalid_records_keep_the_last_good_config() {
        let mut r = Registry::default();
        apply(&mut r, "d", r#"{"version":1,"strategy":"single","control":"a"}"#);
        for bad in [
            "not json",
            r#"{"version":5,"strategy":"canary","control":"a"}"#,
            r#"{"version":6,"strategy":"single","control":"a","x":1}"#,
        ] {
            assert!(matches!(apply(&mut r, "d", bad), Outcome::Rejected(_)));
        }
        assert_eq!(r.get("d").unwrap().version(), 1);
        assert_eq!(r.rejected().count(), 3);
        assert_eq!(r.next_version("d"), 6, "next version goes above rejected (but parsed) ones too");
        assert!(matches!(r.apply(None, Some(b"{}"), 9), Outcome::Rejected(_)));
    }

    #[test]
    fn the_record_in_force_written_again_is_a_harmless_replay() {
        let mut r = Registry::default();
        apply(&mut r, "d", r#"{"version":2,"strategy":"canary","control":"a","candidate":"b","canary_percent":10}"#);
        let rejected = apply(
            &mut r,
            "d",
            r#"{"version":2,"strategy":"canary","control":"a","candidate":"b","canary_percent":50}"#,
        );
        assert!(matches!(rejected, Outcome::Rejected(_)));
        let again = r.record_in_force("d").expect("d is in force");
        assert_eq!(r.apply(Some(b"d"), Some(&again), 9), Outcome::Unchanged);
        // What a reader that sees only the written-back record (after compaction) puts in force.
        let mut fresh = Registry::default();
        assert!(matches!(fresh.apply(Some(b"d"), Some(&again), 9), Outcome::Installed(_)));
        assert_eq!(fresh.get("d").unwrap().spec, r.get("d").unwrap().spec);
        assert_eq!(r.record_in_force("other"), None);
    }

    #[test]
    fn tombstone_deletes() {
        let mut r = Registry::default();
        apply(&mut r, "d", r#"{"version":4,"strategy":"single","control":"a"}"#);
        assert_eq!(r.apply(Some(b"d"), None, 1), Outcome::Deleted("d".into()));
        assert!(r.get("d").is_none());
        assert_eq!(r.next_version("d"), 5);
    }
}
