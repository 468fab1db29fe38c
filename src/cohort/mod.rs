//! The routing decision: a pure function from (deployment, user id) to the serving model and the shadow
//! copies, and the cohort hash behind it. No I/O here; the route service wraps it with Kafka. The
//! deployment record it reads, and its validation, are `record`.

pub mod hash;

use std::collections::HashMap;

use crate::record::plan::GuardKind;
use crate::record::{Deployment, Rule, Side, Strategy};

/// Where one request goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Route<'a> {
    /// The model whose answer becomes the decision.
    pub serving: &'a str,
    /// The side the serving model belongs to (`control` / `candidate`).
    pub cohort: Side,
    /// A/B/n: the candidate arm serving (index in `spec.candidates`); None for control's users and for
    /// two-arm deployments.
    pub arm: Option<usize>,
    /// The user's canary bucket (0..10000), carried on the decision for audits.
    pub bucket: u16,
    /// Models that get a SHADOW copy; their answers are compared, never served.
    pub shadows: Vec<&'a str>,
    /// A hedged canary's candidate request: control, also among the shadows, whose answer is served
    /// when the candidate's is not.
    pub hedge: Option<&'a str>,
    /// The attribute rule that chose the side, if one did.
    pub rule: Option<&'a Rule>,
    /// The probability that a user drawn at random gets this side under this deployment version (the
    /// share of buckets it owns): the propensity an offline evaluation weighs the decision by. None when
    /// an override or a rule chose the side (not randomised).
    pub propensity: Option<f64>,
}

impl Route<'_> {
    /// The cohort as decisions carry it: the side, `candidate:<model>` for an A/B/n candidate, and for
    /// a request routed by a rule `<side>:rule:<attribute>`.
    pub fn cohort_label(&self) -> String {
        match (self.rule, self.arm) {
            (Some(rule), _) => format!("{}:rule:{}", self.cohort, rule.attribute),
            (None, Some(_)) => format!("{}:{}", self.cohort, self.serving),
            (None, None) => self.cohort.as_str().to_string(),
        }
    }
}

/// Decides where a request from `user_id` goes under `deployment`.
///
/// - single: control serves.
/// - shadow: control serves; the candidate gets a copy if the user is in the shadow sample.
/// - canary: the candidate serves users with `bucket < round(canary_percent * 100)`; an A/B/n canary's
///   candidates each serve the users in their own buckets (`record::arms`).
/// - blue_green: the `active` side serves everyone.
/// - overrides pin a user to a side under canary and blue/green (the strategies where the candidate
///   serves anyone); under single and shadow nobody but control is ever served.
/// - attribute rules, in order, send a request whose attribute has one of their values to their side,
///   under canary and blue/green, unless an override pins the user.
/// - mirror models get a copy under every strategy, sampled like shadow.
/// - blue/green on probation: the side switched away from gets a copy, sampled like shadow.
/// - canary whose plan has the disagreement guard: the model not serving a request (the candidate for
///   control's users, control for the candidate's) gets a copy, sampled like shadow — the guard's pairs.
/// - hedged canary: every request the candidate serves also goes to control (one copy, whatever else
///   would copy it there), which stands in when the candidate errs or misses the deadline.
pub fn route<'a>(deployment: &'a Deployment, user_id: &str, attributes: &HashMap<String, String>) -> Route<'a> {
    let spec = &deployment.spec;
    let bucket = hash::bucket(&deployment.salt, user_id);
    let override_side = spec.overrides.get(user_id).copied();
    let rule = match (override_side, spec.strategy) {
        (None, Strategy::Canary | Strategy::BlueGreen) => {
            spec.rules.iter().find(|r| attributes.get(&r.attribute).is_some_and(|value| r.values.contains(value)))
        }
        _ => None,
    };
    let pinned = override_side.or(rule.map(|r| r.side));
    // An A/B/n record pins users to control only (validated).
    let arm = match (pinned, spec.strategy) {
        (None, Strategy::Canary) => crate::record::arms::arm_of(&deployment.arms, bucket),
        _ => None,
    };
    let cohort = match spec.strategy {
        Strategy::Single | Strategy::Shadow => Side::Control,
        Strategy::Canary if !deployment.arms.is_empty() => {
            if arm.is_some() {
                Side::Candidate
            } else {
                Side::Control
            }
        }
        Strategy::Canary => {
            pinned.unwrap_or(if bucket < deployment.canary_threshold { Side::Candidate } else { Side::Control })
        }
        Strategy::BlueGreen => pinned.unwrap_or(spec.active),
    };
    let serving = match arm {
        Some(i) => spec.candidates[i].model.as_str(),
        None => deployment.model_for(cohort),
    };

    let mut shadows = Vec::new();
    let warm =
        spec.probation.as_ref().map(|_| spec.control.as_str()).filter(|&old| old != deployment.model_for(cohort));
    let pairs = spec.strategy == Strategy::Canary
        && spec.plan.as_ref().is_some_and(|p| p.guards.contains(&GuardKind::Disagreement));
    let wants_copies = spec.strategy == Strategy::Shadow || !spec.mirror.is_empty() || warm.is_some() || pairs;
    if wants_copies && hash::shadow_bucket(&deployment.salt, user_id) < deployment.shadow_threshold {
        if spec.strategy == Strategy::Shadow {
            shadows.extend(spec.candidate.as_deref());
        }
        if pairs {
            let other = if cohort == Side::Candidate { Side::Control } else { Side::Candidate };
            shadows.push(deployment.model_for(other));
        }
        shadows.extend(warm);
        shadows.extend(spec.mirror.iter().map(String::as_str));
    }
    let hedge =
        (spec.hedge && spec.strategy == Strategy::Canary && cohort == Side::Candidate).then_some(spec.control.as_str());
    if let Some(control) = hedge.filter(|control| !shadows.contains(control)) {
        shadows.push(control);
    }

    let propensity = match (pinned, spec.strategy) {
        (Some(_), _) => None,
        (None, Strategy::Canary) => {
            let buckets = f64::from(crate::record::deployment::BUCKETS);
            let share = f64::from(deployment.canary_threshold) / buckets;
            Some(match arm {
                Some(i) => deployment.arms[i].iter().map(|[start, end]| f64::from(end - start)).sum::<f64>() / buckets,
                None if cohort == Side::Candidate => share,
                None => 1.0 - share,
            })
        }
        (None, _) => Some(1.0),
    };

    Route { serving, cohort, arm, bucket, shadows, hedge, rule, propensity }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::DeploymentSpec;
    use proptest::prelude::*;
    use std::sync::LazyLock;

    static NONE: LazyLock<HashMap<String, String>> = LazyLock::new(HashMap::new);

    #[test]
    fn attribute_rules_route_before_the_hash_and_show_in_the_cohort() {
        let d = deployment(
            r#"{"version":1,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":0,
                "overrides":{"vip":"control"},
                "rules":[{"attribute":"country","values":["DE","AT"],"side":"candidate"},
                         {"attribute":"test","values":["1"],"side":"control"}]}"#,
        );
        let attrs = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let de = route(&d, "u1", &attrs(&[("country", "DE")]));
        assert_eq!((de.serving, de.cohort_label().as_str()), ("v2", "candidate:rule:country"));
        assert_eq!(
            route(&d, "u1", &attrs(&[("country", "FR")])).cohort_label(),
            "control",
            "no rule matched: the hash"
        );
        assert_eq!(route(&d, "vip", &attrs(&[("country", "DE")])).serving, "v1", "an override wins over a rule");
        let hundred = deployment(
            r#"{"version":1,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":100,
                "rules":[{"attribute":"test","values":["1"],"side":"control"}]}"#,
        );
        let test = route(&hundred, "u1", &attrs(&[("test", "1")]));
        assert_eq!((test.serving, test.cohort_label().as_str()), ("v1", "control:rule:test"));
        let shadow = deployment(
            r#"{"version":1,"strategy":"shadow","control":"v1","candidate":"v2",
                "rules":[{"attribute":"country","values":["DE"],"side":"candidate"}]}"#,
        );
        assert_eq!(
            route(&shadow, "u1", &attrs(&[("country", "DE")])).serving,
            "v1",
            "shadow never serves the candidate"
        );
    }

    fn deployment(json: &str) -> Deployment {
        DeploymentSpec::from_json(json.as_bytes()).unwrap().validate("fraud").unwrap()
    }

    #[test]
    fn a_canary_judged_on_disagreement_copies_each_request_of_the_shadow_sample_to_the_other_model() {
        let canary = |guards: &str, shadow_percent: f64| {
            deployment(&format!(
                r#"{{"version":2,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":30,
                    "shadow_percent":{shadow_percent},"mirror":["v3"],
                    "plan":{{"steps":[{{"canary_percent":30,"bake_ms":1,"min_sample":1,"max_ms":10}}],
                             "guards":{guards},"step_started_at":1}}}}"#
            ))
        };
        let judged = canary(r#"["error_rate","disagreement"]"#, 100.0);
        let (mut control, mut candidate) = (0, 0);
        for i in 0..2_000 {
            let r = route(&judged, &format!("u{i}"), &NONE);
            match r.cohort {
                Side::Control => {
                    control += 1;
                    assert_eq!((r.serving, r.shadows.as_slice()), ("v1", &["v2", "v3"][..]));
                }
                Side::Candidate => {
                    candidate += 1;
                    assert_eq!((r.serving, r.shadows.as_slice()), ("v2", &["v1", "v3"][..]));
                }
            }
        }
        assert!(control > 0 && candidate > 0);
        let unjudged = canary(r#"["error_rate"]"#, 100.0);
        assert!((0..200).all(|i| route(&unjudged, &format!("u{i}"), &NONE).shadows == ["v3"]), "mirrors only");
        let sampled = canary(r#"["disagreement"]"#, 10.0);
        let paired = (0..2_000).filter(|i| route(&sampled, &format!("u{i}"), &NONE).shadows.len() == 2).count();
        assert!((100..300).contains(&paired), "the shadow sample: {paired} of 2,000");
    }

    #[test]
    fn a_hedged_canary_copies_each_candidate_request_to_control_once() {
        let hedged = |guards: &str| {
            deployment(&format!(
                r#"{{"version":2,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":30,
                    "hedge":true,"mirror":["v3"],"overrides":{{"vip":"candidate"}},
                    "plan":{{"steps":[{{"canary_percent":30,"bake_ms":1,"min_sample":1,"max_ms":10}}],
                             "guards":{guards},"step_started_at":1}}}}"#
            ))
        };
        for d in [hedged(r#"["error_rate"]"#), hedged(r#"["disagreement"]"#)] {
            let (mut control, mut candidate) = (0, 0);
            for user in (0..2_000).map(|i| format!("u{i}")).chain(["vip".to_string()]) {
                let r = route(&d, &user, &NONE);
                if r.cohort == Side::Candidate {
                    candidate += 1;
                    assert_eq!(r.hedge, Some("v1"));
                    assert_eq!(r.shadows.iter().filter(|m| **m == "v1").count(), 1, "{:?}", r.shadows);
                } else {
                    control += 1;
                    assert_eq!(r.hedge, None, "control's own users need no stand-in");
                }
            }
            assert!(control > 1_000 && candidate > 400, "{control} / {candidate}");
        }
        assert_eq!(route(&canary(100.0), "u1", &NONE).hedge, None, "only when asked for");
    }

    fn canary(percent: f64) -> Deployment {
        deployment(&format!(
            r#"{{"version":1,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":{percent}}}"#
        ))
    }

    #[test]
    fn the_propensity_is_the_share_of_the_side_and_none_when_not_randomised() {
        let d = deployment(
            r#"{"version":1,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":12.5,
                "overrides":{"vip":"candidate"},"rules":[{"attribute":"country","values":["DE"],"side":"control"}]}"#,
        );
        let by_side = |user: &str| {
            let r = route(&d, user, &NONE);
            (r.cohort, r.propensity)
        };
        let sides: Vec<_> = (0..400).map(|i| by_side(&format!("u{i}"))).collect();
        assert!(sides.contains(&(Side::Candidate, Some(0.125))) && sides.contains(&(Side::Control, Some(0.875))));
        assert!(sides.iter().all(|(side, p)| *p == Some(if *side == Side::Candidate { 0.125 } else { 0.875 })));
        assert_eq!(by_side("vip"), (Side::Candidate, None));
        let de: HashMap<String, String> = [("country".to_string(), "DE".to_string())].into();
        assert_eq!(route(&d, "u1", &de).propensity, None);
        assert_eq!(route(&canary(0.0), "u1", &NONE).propensity, Some(1.0));
        let single = deployment(r#"{"version":1,"strategy":"single","control":"v1"}"#);
        assert_eq!(route(&single, "u1", &NONE).propensity, Some(1.0));
    }

    /// Three candidates at 10% each: every arm serves its own buckets, the decision's cohort names the
    /// candidate, the propensity is the arm's share; an override pins to control.
    #[test]
    fn an_abn_canary_serves_each_candidate_its_own_buckets() {
        let d = deployment(
            r#"{"version":1,"strategy":"canary","control":"v1","mirror":["m"],"overrides":{"vip":"control"},
                "candidates":[{"model":"v2","percent":10},{"model":"v3","percent":10},{"model":"v4","percent":12.5}]}"#,
        );
        let mut served: HashMap<String, usize> = HashMap::new();
        for i in 0..20_000 {
            let r = route(&d, &format!("u{i}"), &NONE);
            let (label, want, share) = match r.bucket {
                0..1000 => ("candidate:v2", "v2", 0.1),
                1000..2000 => ("candidate:v3", "v3", 0.1),
                2000..3250 => ("candidate:v4", "v4", 0.125),
                _ => ("control", "v1", 0.675),
            };
            assert_eq!((r.serving, r.cohort_label().as_str(), r.propensity), (want, label, Some(share)));
            assert_eq!(r.shadows, ["m"]);
            *served.entry(label.to_string()).or_default() += 1;
        }
        for (label, share) in [("candidate:v2", 0.1), ("candidate:v3", 0.1), ("candidate:v4", 0.125)] {
            let got = served[label] as f64 / 20_000.0;
            assert!((got - share).abs() < 0.01, "{label}: {got}");
        }
        let vip = route(&d, "vip", &NONE);
        assert_eq!((vip.serving, vip.cohort_label().as_str(), vip.propensity), ("v1", "control", None));
        assert_eq!(d.models(), ["v1", "v2", "v3", "v4", "m"]);
    }

    #[test]
    fn single_serves_control_without_copies() {
        let d = deployment(r#"{"version":1,"strategy":"single","control":"v1"}"#);
        for user in ["user-1", "user-42", "", "ünïcode"] {
            let r = route(&d, user, &NONE);
            assert_eq!((r.serving, r.cohort), ("v1", Side::Control));
            assert!(r.shadows.is_empty());
        }
    }

    #[test]
    fn canary_follows_the_published_buckets() {
        // bucket("fraud", "user-1") = 9090, bucket("fraud", "user-42") = 5290.
        let d = canary(90.91);
        assert_eq!(route(&d, "user-1", &NONE).serving, "v2");
        assert_eq!(route(&d, "user-1", &NONE).bucket, 9090);
        let d = canary(90.90);
        assert_eq!(route(&d, "user-1", &NONE).serving, "v1");
        assert_eq!(route(&d, "user-42", &NONE).serving, "v2");
        assert_eq!(route(&canary(52.90), "user-42", &NONE).cohort, Side::Control);
        assert_eq!(route(&canary(52.91), "user-42", &NONE).cohort, Side::Candidate);
    }

    #[test]
    fn canary_zero_and_hundred_are_absolute() {
        for i in 0..2000 {
            let user = format!("u{i}");
            assert_eq!(route(&canary(0.0), &user, &NONE).serving, "v1");
            assert_eq!(route(&canary(100.0), &user, &NONE).serving, "v2");
        }
    }

    #[test]
    fn canary_share_is_close_to_the_percent() {
        let d = canary(10.0);
        let n = 20_000;
        let served = (0..n).filter(|i| route(&d, &format!("user-{i}"), &NONE).cohort == Side::Candidate).count();
        let share = served as f64 / n as f64;
        assert!((0.09..0.11).contains(&share), "share {share}");
    }

    #[test]
    fn overrides_pin_users_under_canary_and_blue_green_only() {
        let d = deployment(
            r#"{"version":1,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":0,
                "overrides":{"vip":"candidate"}}"#,
        );
        assert_eq!(route(&d, "vip", &NONE).serving, "v2");
        assert_eq!(route(&d, "other", &NONE).serving, "v1");
        let d = deployment(
            r#"{"version":1,"strategy":"blue_green","control":"v1","candidate":"v2","active":"candidate",
                "overrides":{"vip":"control"}}"#,
        );
        assert_eq!(route(&d, "vip", &NONE).serving, "v1");
        assert_eq!(route(&d, "other", &NONE).serving, "v2");
        let d = deployment(
            r#"{"version":1,"strategy":"shadow","control":"v1","candidate":"v2","overrides":{"vip":"candidate"}}"#,
        );
        assert_eq!(route(&d, "vip", &NONE).serving, "v1");
    }

    #[test]
    fn on_probation_the_old_side_gets_a_copy_of_what_it_no_longer_serves() {
        let d = deployment(
            r#"{"version":3,"strategy":"blue_green","control":"b","candidate":"g","active":"candidate",
                "overrides":{"vip":"control"},"quality":{},"probation":{"started_at":1,"duration_ms":60000}}"#,
        );
        for i in 0..500 {
            let r = route(&d, &format!("user-{i}"), &NONE);
            assert_eq!((r.serving, r.shadows), ("g", vec!["b"]));
        }
        let pinned = route(&d, "vip", &NONE);
        assert_eq!((pinned.serving, pinned.shadows.len()), ("b", 0), "no copy to the model that served");
    }

    #[test]
    fn blue_green_switches_everyone() {
        let green =
            deployment(r#"{"version":1,"strategy":"blue_green","control":"b","candidate":"g","active":"candidate"}"#);
        let blue = deployment(r#"{"version":2,"strategy":"blue_green","control":"b","candidate":"g"}"#);
        for i in 0..500 {
            let user = format!("user-{i}");
            assert_eq!(route(&green, &user, &NONE).serving, "g");
            assert_eq!(route(&green, &user, &NONE).cohort, Side::Candidate);
            assert_eq!(route(&blue, &user, &NONE).serving, "b");
            assert!(route(&blue, &user, &NONE).shadows.is_empty());
        }
    }

    #[test]
    fn shadow_copies_sampled_users_to_candidate_and_mirrors() {
        let d = deployment(
            r#"{"version":1,"strategy":"shadow","control":"v1","candidate":"v2","shadow_percent":23.72,"mirror":["v3"]}"#,
        );
        // shadow_bucket("fraud", "user-1") = 2372: just outside 23.72%.
        let r = route(&d, "user-1", &NONE);
        assert_eq!(r.serving, "v1");
        assert!(r.shadows.is_empty());
        let d = deployment(
            r#"{"version":1,"strategy":"shadow","control":"v1","candidate":"v2","shadow_percent":23.73,"mirror":["v3"]}"#,
        );
        assert_eq!(route(&d, "user-1", &NONE).shadows, vec!["v2", "v3"]);
    }

    #[test]
    fn mirror_works_with_every_strategy() {
        let d = deployment(
            r#"{"version":1,"strategy":"canary","control":"v1","candidate":"v2","canary_percent":50,"mirror":["v3"]}"#,
        );
        let mut served = std::collections::HashSet::new();
        for i in 0..200 {
            let r = route(&d, &format!("u{i}"), &NONE);
            assert_eq!(r.shadows, vec!["v3"]);
            assert_ne!(r.serving, "v3");
            served.insert(r.serving);
        }
        assert_eq!(served.len(), 2);
        let d = deployment(
            r#"{"version":1,"strategy":"blue_green","control":"v1","candidate":"v2","active":"candidate","mirror":["v3"]}"#,
        );
        assert_eq!(route(&d, "x", &NONE).shadows, vec!["v3"]);
        assert_eq!(route(&d, "x", &NONE).serving, "v2");
    }

    #[test]
    fn salt_reshuffles_cohorts() {
        let a = canary(50.0);
        let mut b = a.clone();
        b.salt = "other".into();
        let moved = (0..1000).filter(|i| {
            let u = format!("u{i}");
            route(&a, &u, &NONE).cohort != route(&b, &u, &NONE).cohort
        });
        assert!(moved.count() > 300);
    }

    proptest! {
        #[test]
        fn ramp_up_is_monotone(user in ".{0,40}", low in 0u32..=10_000, high in 0u32..=10_000) {
            let (low, high) = (low.min(high), low.max(high));
            let a = canary(f64::from(low) / 100.0);
            let b = canary(f64::from(high) / 100.0);
            if route(&a, &user, &NONE).cohort == Side::Candidate {
                prop_assert_eq!(route(&b, &user, &NONE).cohort, Side::Candidate);
            }
        }

        #[test]
        fn serving_model_is_never_a_shadow(user in ".{0,40}", percent in 0u32..=10_000, strategy in 0usize..4) {
            let strategy = ["single", "shadow", "canary", "blue_green"][strategy];
            let candidate = if strategy == "single" { "" } else { r#","candidate":"v2""# };
            let d = deployment(&format!(
                r#"{{"version":1,"strategy":"{strategy}","control":"v1"{candidate},"canary_percent":{},"mirror":["v3"]}}"#,
                f64::from(percent) / 100.0
            ));
            let r = route(&d, &user, &NONE);
            prop_assert!(!r.shadows.contains(&r.serving));
            prop_assert_eq!(r.serving, d.model_for(r.cohort));
            prop_assert_eq!(r.bucket, hash::bucket("fraud", &user));
            prop_assert!(r.bucket < 10_000);
        }
    }
}
