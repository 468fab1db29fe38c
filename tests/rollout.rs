//! Rollouts that drive themselves, on a real broker: plans walked to promotion, guards rolling back a
//! failing and a slow candidate, no traffic pausing, and the controller killed mid-plan.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::Env;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use switchyard::clock;
use switchyard::codec::{Decision, DecisionStatus, Request};
use switchyard::control::watcher;
use switchyard::kafka::{self, OutRecord};
use switchyard::record::plan::PlanState;
use switchyard::record::{Deployment, DeploymentSpec, Strategy};
use switchyard::rollout::history::{Entry, Verdict};

/// A canary deployment of `candidate` next to `control` (`models`) with a plan over `steps` (canary
/// percents); `extra` is added to the plan's fields (e.g. `,"guards":[...]`).
async fn deploy_plan(
    env: &Env,
    name: &str,
    models: (&str, &str),
    steps: &[f64],
    bake_ms: u64,
    max_ms: u64,
    extra: &str,
) {
    let spec = plan_spec(name, models, steps, bake_ms, max_ms, extra);
    switchyard::control::ops::deploy(&env.config, name, spec).await.expect("deploy");
}

/// The record [`deploy_plan`] writes.
fn plan_spec(
    name: &str,
    (control, candidate): (&str, &str),
    steps: &[f64],
    bake_ms: u64,
    max_ms: u64,
    extra: &str,
) -> DeploymentSpec {
    let steps: Vec<String> = steps
        .iter()
        .map(|p| format!(r#"{{"canary_percent":{p},"bake_ms":{bake_ms},"min_sample":20,"max_ms":{max_ms}}}"#))
        .collect();
    let json = format!(
        r#"{{"version":1,"strategy":"canary","control":"{control}","candidate":"{candidate}","canary_percent":{},
            "timeout_ms":2000,"plan":{{"steps":[{}],"step_started_at":{}{extra}}},
            "change":{{"actor":"operator:test","reason":"start {name}"}}}}"#,
        steps_first(&steps),
        steps.join(","),
        clock::now_millis()
    );
    DeploymentSpec::from_json(json.as_bytes()).unwrap()
}

fn steps_first(steps: &[String]) -> f64 {
    let v: serde_json::Value = serde_json::from_str(&steps[0]).unwrap();
    v["canary_percent"].as_f64().unwrap()
}

/// Sends requests for each of `deployments` at about `rate` per second each, from `users` users each,
/// until `stop` is set.
fn traffic(env: &Env, deployments: &[&str], rate: u64, users: u64) -> tokio::sync::watch::Sender<bool> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (config, codec) = (env.config.clone(), env.codec.clone());
    let deployments: Vec<String> = deployments.iter().map(|d| d.to_string()).collect();
    tokio::spawn(async move {
        let producer = kafka::producer(&config).unwrap();
        let mut i = 0u64;
        while !*stopped.borrow() {
            let mut records = Vec::new();
            for d in &deployments {
                for _ in 0..rate / 10 {
                    i += 1;
                    let r = Request {
                        request_id: format!("{d}-{i}"),
                        user_id: format!("{d}-user-{}", rand::random::<u64>() % users),
                        deployment: d.clone(),
                        sent_at: clock::now_millis(),
                        payload: format!("p{i}").into_bytes(),
                        attributes: HashMap::new(),
                    };
                    records.push(OutRecord::new(
                        config.topics.requests.clone(),
                        r.user_id.as_bytes(),
                        codec.encode(&r),
                    ));
                }
            }
            kafka::send_all(&producer, &records).await.expect("requests produced");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    stop
}

/// Waits until `done` holds for the deployment in force (or panics after `limit`).
async fn wait_for(env: &Env, name: &str, limit: Duration, done: impl Fn(&Deployment) -> bool) -> Deployment {
    let start = Instant::now();
    loop {
        let registry = watcher::snapshot(&env.config).await.unwrap();
        if let Some(d) = registry.get(name).filter(|d| done(d)) {
            return (*d).clone();
        }
        let now = registry.get(name).map(|d| d.spec.to_json());
        assert!(start.elapsed() < limit, "{name} not done after {limit:?}; in force: {now:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every record of a one-partition topic: (offset, key, value).
async fn read_all(env: &Env, topic: &str) -> Vec<(i64, String, Option<Vec<u8>>)> {
    let reader = kafka::reader(&env.config).unwrap();
    let (_, end) = reader.fetch_watermarks(topic, 0, Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    reader.assign(&tpl).unwrap();
    let targets = HashMap::from([(0, end)]);
    let mut out = Vec::new();
    while !kafka::batch::caught_up(&reader, topic, &targets) {
        let Ok(m) = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await else { continue };
        let m = m.unwrap();
        out.push((m.offset(), String::from_utf8_lossy(m.key().unwrap()).into_owned(), m.payload().map(<[u8]>::to_vec)));
    }
    out
}

async fn history(env: &Env, name: &str) -> Vec<Entry> {
    read_all(env, &env.config.topics.history)
        .await
        .into_iter()
        .filter(|(_, key, _)| key == name)
        .map(|(_, _, v)| serde_json::from_slice(&v.unwrap()).unwrap())
        .collect()
}

/// Waits until the history has an entry for every record of `name` on the deployments topic.
async fn settled_history(env: &Env, name: &str) -> Vec<Entry> {
    let start = Instant::now();
    loop {
        let records = read_all(env, &env.config.topics.deployments).await.into_iter().filter(|r| r.1 == name).count();
        let entries = history(env, name).await;
        if entries.len() >= records || start.elapsed() > Duration::from_secs(30) {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Plans of five deployments side by side under one service: a healthy candidate walks its plan and is
/// promoted (its answers agree with control's: its disagreement guard stays quiet); one failing 20% of
/// requests is rolled back by the error guard; a slow one by the latency guard; one answering otherwise
/// than control on 30% of requests by the disagreement guard (bound 10%), before any label; one without
/// traffic pauses at its step's maximum instead of advancing. `history` and `status` say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_promote_a_healthy_candidate_and_guards_roll_back_failing_and_slow_ones() {
    let Some(mut env) = Env::new("plans").await else { return };
    env.start_service();
    env.start_model("v1", 2, 0.0, 0.0);
    env.start_model("good", 2, 0.0, 0.0);
    env.start_model("failing", 2, 0.2, 0.0);
    env.start_model("slow", 600, 0.0, 0.0);
    env.start_model("contrary", 2, 0.0, 30.0);
    // Judged by the disagreement guard, the healthy candidate's answers are compared with control's on
    // every request (copies both ways); the contrary deployment gets a third of the others' traffic so
    // that v1, which serves every control arm, keeps up on two cores.
    let all_and_pairs = r#","guards":["error_rate","timeout_rate","latency","sample_ratio","disagreement"]"#;
    deploy_plan(&env, "healthy", ("v1", "good"), &[5.0, 20.0, 50.0], 3000, 90_000, all_and_pairs).await;
    deploy_plan(&env, "broken", ("v1", "failing"), &[5.0, 20.0, 50.0], 3000, 90_000, "").await;
    deploy_plan(&env, "sluggish", ("v1", "slow"), &[10.0, 50.0], 3000, 90_000, "").await;
    let pairs = r#","guards":["error_rate","disagreement"],"disagreement_guard":{"max_rate":0.1}"#;
    deploy_plan(&env, "contrary", ("v1", "contrary"), &[10.0, 50.0], 3000, 90_000, pairs).await;
    deploy_plan(&env, "idle", ("v1", "good"), &[5.0, 50.0], 1000, 8000, "").await;
    let stop = traffic(&env, &["healthy", "broken", "sluggish"], 150, 3000);
    let stop_contrary = traffic(&env, &["contrary"], 50, 1000);

    let limit = Duration::from_secs(120);
    let promoted = wait_for(&env, "healthy", limit, |d| d.strategy() == Strategy::Single).await;
    assert_eq!(promoted.spec.control, "good");
    let broken = wait_for(&env, "broken", limit, |d| d.spec.plan.is_none()).await;
    assert_eq!(
        (broken.spec.canary_percent, broken.spec.change.as_ref().unwrap().actor.as_str()),
        (0.0, "guard:error_rate")
    );
    let sluggish = wait_for(&env, "sluggish", limit, |d| d.spec.plan.is_none()).await;
    assert_eq!(sluggish.spec.change.as_ref().unwrap().actor, "guard:latency", "{:?}", sluggish.spec.change);
    let contrary = wait_for(&env, "contrary", limit, |d| d.spec.plan.is_none()).await;
    assert_eq!(contrary.spec.change.as_ref().unwrap().actor, "guard:disagreement", "{:?}", contrary.spec.change);
    let idle =
        wait_for(&env, "idle", limit, |d| d.spec.plan.as_ref().is_some_and(|p| p.state != PlanState::Running)).await;
    let plan = idle.spec.plan.as_ref().unwrap();
    assert_eq!(
        (plan.state, plan.step, idle.spec.canary_percent),
        (PlanState::Paused, 0, 5.0),
        "no data: paused, not advanced"
    );
    assert!(idle.spec.change.as_ref().unwrap().reason.contains("no evidence"));
    stop.send(true).unwrap();
    stop_contrary.send(true).unwrap();
    // Ended plans read step 0 ("none running"); a paused one keeps its step.
    for name in ["healthy", "broken", "sluggish", "contrary"] {
        assert_eq!(common::counter("switchyard_rollout_step", &[&format!("deployment=\"{name}\"")]), 0.0, "{name}");
    }
    assert_eq!(common::counter("switchyard_rollout_step", &["deployment=\"idle\""]), 1.0);

    // History: every change once, by whom and why, with the numbers.
    let entries = settled_history(&env, "healthy").await;
    let actors: Vec<&str> = entries.iter().map(|e| e.change.as_ref().unwrap().actor.as_str()).collect();
    assert_eq!(actors, ["operator:test", "plan", "plan", "plan"], "{entries:#?}");
    assert!(entries.iter().all(|e| e.verdict == Verdict::Accepted));
    assert!(entries[3].change.as_ref().unwrap().reason.contains("candidate promoted"));
    let versions: Vec<Option<u64>> = entries.iter().map(|e| e.version).collect();
    assert_eq!(versions, [Some(1), Some(2), Some(3), Some(4)]);
    let broken_history = settled_history(&env, "broken").await;
    let fired = broken_history.last().unwrap().change.as_ref().unwrap();
    let error = &fired.figures.as_ref().unwrap().guards[0];
    assert!(error.e_value >= error.threshold && error.candidate.bad > 0 && error.control.bad == 0, "{error:?}");

    let (ok, text, err) = env.cli(&["history", "broken"]);
    assert!(ok, "{err}");
    assert!(text.contains("by guard:error_rate") && text.contains("guard error_rate fired in step"), "{text}");
    assert!(text.contains("error_rate") && text.contains("candidate ") && text.contains("fires at"), "{text}");
    let (ok, text, err) = env.cli(&["status", "idle"]);
    assert!(ok, "{err}");
    assert!(text.contains("plan: paused at step 1/2") && text.contains("last change by plan"), "{text}");

    // Nested ramp: a user the candidate served in one step is served by it in the next.
    let decisions =
        env.read::<Decision>(&env.config.topics.decisions, 1, Duration::from_secs(30), Duration::from_secs(3)).await;
    let mut cohorts: BTreeMap<i64, HashMap<String, String>> = BTreeMap::new();
    for d in decisions.iter().map(|r| &r.value).filter(|d| d.deployment == "healthy") {
        cohorts.entry(d.config_version).or_default().insert(d.user_id.clone(), d.cohort.clone());
    }
    // The rollback in force: the last request routed to the failing candidate's version was sent this
    // long after the guard's record was written.
    let rollback = broken_history.last().unwrap();
    let last_old = decisions
        .iter()
        .map(|r| &r.value)
        .filter(|d| d.deployment == "broken" && d.config_version as u64 == rollback.version.unwrap() - 1)
        .map(|d| d.decided_at - d.latency_ms)
        .max()
        .unwrap();
    eprintln!(
        "guard's rollback written at {}; last request under the old version sent {} ms later",
        rollback.at,
        last_old - rollback.at
    );
    assert!(last_old - rollback.at < 5_000, "the rollback took {} ms to be in force", last_old - rollback.at);
    for step in 1..=2 {
        let (before, after) = (&cohorts[&step], &cohorts[&(step + 1)]);
        let moved: Vec<_> = before
            .iter()
            .filter(|(u, c)| *c == "candidate" && after.get(*u).is_some_and(|c| c != "candidate"))
            .collect();
        let kept = before.iter().filter(|(u, c)| *c == "candidate" && after.contains_key(*u)).count();
        assert!(kept > 0 && moved.is_empty(), "step {step}: {kept} candidate users kept, {moved:?} left the cohort");
    }
    env.stop().await;
}

/// A/B/n: three candidates against one control, 10% of users each, one of them failing 30% of its
/// requests. Its error guard cuts it alone — its users go back to control, the other two keep theirs
/// and their step starts again — and the two healthy ones walk the plan to its end, where the split
/// holds for the operator to choose (`promote --candidate`). Decisions name each candidate; a user
/// only changes arm when its arm is cut (to control) or when it was control's and an arm grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abn_canary_cuts_its_failing_candidate_and_the_others_go_on() {
    let Some(mut env) = Env::new("abn").await else { return };
    env.start_service();
    env.start_model("v1", 2, 0.0, 0.0);
    env.start_model("good-a", 2, 0.0, 0.0);
    env.start_model("good-b", 2, 0.0, 0.0);
    env.start_model("failing", 2, 0.3, 0.0);
    let step = |p: u32| format!(r#"{{"canary_percent":{p},"bake_ms":3000,"min_sample":150,"max_ms":120000}}"#);
    let json = format!(
        r#"{{"version":1,"strategy":"canary","control":"v1","timeout_ms":2000,
            "candidates":[{{"model":"good-a","percent":10}},{{"model":"failing","percent":10}},{{"model":"good-b","percent":10}}],
            "plan":{{"steps":[{},{}],"guards":["error_rate","timeout_rate","sample_ratio"],"step_started_at":{}}}}}"#,
        step(10),
        step(20),
        clock::now_millis()
    );
    switchyard::control::ops::deploy(&env.config, "abn", DeploymentSpec::from_json(json.as_bytes()).unwrap())
        .await
        .expect("deploy");
    let stop = traffic(&env, &["abn"], 200, 3000);

    let limit = Duration::from_secs(150);
    let cut = wait_for(&env, "abn", limit, |d| d.spec.candidates.len() == 2).await;
    let change = cut.spec.change.as_ref().unwrap();
    assert_eq!(change.actor, "guard:error_rate", "{change:?}");
    assert!(change.reason.starts_with("candidate failing: guard error_rate fired"), "{}", change.reason);
    let models: Vec<&str> = cut.spec.candidates.iter().map(|c| c.model.as_str()).collect();
    assert_eq!(models, ["good-a", "good-b"]);
    assert_eq!(cut.spec.plan.as_ref().unwrap().state, PlanState::Running, "the others go on");
    let failing = change.arms.iter().find(|f| f.candidate.as_deref() == Some("failing")).unwrap();
    let error = &failing.guards[0];
    assert!(error.e_value >= error.threshold && error.candidate.bad > 0 && error.control.bad == 0, "{error:?}");
    let done =
        wait_for(&env, "abn", limit, |d| d.spec.plan.as_ref().is_some_and(|p| p.state != PlanState::Running)).await;
    let plan = done.spec.plan.as_ref().unwrap();
    assert_eq!((plan.state, plan.step), (PlanState::Done, 1), "{:?}", done.spec.change);
    assert!(done.spec.candidates.iter().all(|c| c.percent == 20.0));
    assert!(done.spec.change.as_ref().unwrap().reason.contains("several candidates passed"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(true).unwrap();

    // Every arm's decisions carry its candidate; per version, users move only as the buckets say.
    let decisions =
        env.read::<Decision>(&env.config.topics.decisions, 1, Duration::from_secs(30), Duration::from_secs(3)).await;
    let mine: Vec<&Decision> = decisions.iter().map(|r| &r.value).filter(|d| d.deployment == "abn").collect();
    let mut by_version: BTreeMap<i64, HashMap<&str, &str>> = BTreeMap::new();
    for d in &mine {
        assert!(["control", "candidate:good-a", "candidate:good-b", "candidate:failing"].contains(&d.cohort.as_str()));
        let served = d.cohort.strip_prefix("candidate:").unwrap_or("v1");
        assert!(d.model == served || d.status != DecisionStatus::Ok, "{d:?}");
        by_version.entry(d.config_version).or_default().insert(&d.user_id, &d.cohort);
    }
    let versions: Vec<i64> = by_version.keys().copied().collect();
    assert!(versions.len() >= 3, "deploy, cut, advance: {versions:?}");
    for pair in versions.windows(2) {
        let (before, after) = (&by_version[&pair[0]], &by_version[&pair[1]]);
        for (user, was) in before {
            let Some(is) = after.get(user) else { continue };
            let cut_to_control = *was == "candidate:failing" && *is == "control";
            assert!(was == is || *was == "control" || cut_to_control, "{user}: {was} -> {is} (versions {pair:?})");
        }
    }
    let after_cut = by_version.range(cut.version() as i64..).flat_map(|(_, users)| users.values());
    assert!(after_cut.clone().all(|c| *c != "candidate:failing"), "nobody is served by the cut candidate");
    for arm in ["candidate:good-a", "candidate:good-b", "candidate:failing"] {
        assert!(common::counter("switchyard_decisions_total", &[&format!("cohort=\"{arm}\"")]) > 0.0, "{arm}");
    }
    let (ok, text, err) = env.cli(&["history", "abn"]);
    assert!(ok, "{err}");
    eprintln!("{text}");
    assert!(
        text.contains("candidate failing: guard error_rate fired") && text.contains("candidate good-b users"),
        "{text}"
    );
    // Offline, from what was logged: a split without the failing candidate would have failed nobody,
    // one giving it half the users about 15% of requests.
    let (ok, text, err) =
        env.cli(&["evaluate", "abn", "--share", "good-a=25", "--share", "good-b=25", "--minutes", "10"]);
    assert!(ok, "{err}");
    eprintln!("{text}");
    assert!(text.contains("target split: candidate:good-a 25.00%, candidate:good-b 25.00%, control 50.00%"), "{text}");
    assert!(text.contains("failure rate: DR 0.0000 [0.0000, 0.0000]"), "{text}");
    assert!(
        ["candidate:failing", "candidate:good-a", "candidate:good-b", "control"].iter().all(|a| text.contains(a)),
        "{text}"
    );
    let (ok, text, err) = env.cli(&["evaluate", "abn", "--share", "failing=50", "--minutes", "10"]);
    assert!(ok, "{err}");
    let line = text.lines().find(|l| l.contains("failure rate")).unwrap();
    let dr: f64 = line.split("DR ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!((0.05..0.3).contains(&dr), "half the users on a candidate failing 30%: {line}");
    let (ok, text, err) = env.cli(&["promote", "abn", "--candidate", "good-b"]);
    assert!(ok, "{err}");
    assert!(text.contains("100.00% -> good-b (control)"), "{text}");
    env.stop().await;
}

/// An A/B/n bandit: control and a steady candidate that never fail, and a shaky one failing 20% of its
/// requests, from 10% each. Every interval the shares move toward the arms likelier to be best: the shaky
/// one goes down to its floor (5%). Between any two versions a user changes arm only when its arm's
/// share shrank (control's included), and every decision carries its arm's share under its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abn_bandit_moves_traffic_off_the_worse_candidate_and_keeps_users_where_their_arm_grows() {
    let Some(mut env) = Env::new("abn-bandit").await else { return };
    env.start_service();
    env.start_model("v1", 2, 0.0, 0.0);
    env.start_model("steady", 2, 0.0, 0.0);
    env.start_model("shaky", 2, 0.2, 0.0);
    let json = format!(
        r#"{{"version":1,"strategy":"canary","control":"v1","timeout_ms":2000,
            "candidates":[{{"model":"steady","percent":10}},{{"model":"shaky","percent":10}}],
            "plan":{{"steps":[{{"canary_percent":10,"bake_ms":0,"min_sample":1,"max_ms":300000}}],
                     "guards":["timeout_rate"],"step_started_at":{},
                     "bandit":{{"interval_ms":2000,"floor_percent":5,"max_change_percent":30}}}}}}"#,
        clock::now_millis()
    );
    let spec = DeploymentSpec::from_json(json.as_bytes()).unwrap();
    switchyard::control::ops::deploy(&env.config, "abn-bandit", spec).await.expect("deploy");
    let stop = traffic(&env, &["abn-bandit"], 150, 3000);
    let shaky = |d: &Deployment| d.spec.candidates.iter().find(|c| c.model == "shaky").map_or(100.0, |c| c.percent);
    let done = wait_for(&env, "abn-bandit", Duration::from_secs(120), |d| shaky(d) <= 5.0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(true).unwrap();
    assert_eq!(done.spec.plan.as_ref().unwrap().state, PlanState::Running, "{:?}", done.spec.change);

    let records: Vec<DeploymentSpec> = read_all(&env, &env.config.topics.deployments)
        .await
        .into_iter()
        .filter(|(_, key, _)| key == "abn-bandit")
        .map(|(_, _, v)| DeploymentSpec::from_json(&v.unwrap()).unwrap())
        .collect();
    // Each version's share per arm, in percent: control, steady, shaky.
    let share = |spec: &DeploymentSpec, cohort: &str| -> f64 {
        let candidates: f64 = spec.candidates.iter().map(|c| c.percent).sum();
        match cohort.strip_prefix("candidate:") {
            Some(model) => spec.candidates.iter().find(|c| c.model == model).map_or(0.0, |c| c.percent),
            None => 100.0 - candidates,
        }
    };
    let trail: Vec<String> =
        records.iter().map(|r| format!("{}/{}", share(r, "candidate:steady"), share(r, "candidate:shaky"))).collect();
    eprintln!("abn-bandit: steady/shaky shares by version {trail:?}");
    assert!(records.len() >= 3, "the bandit moved: {trail:?}");
    assert!(records[1..].iter().all(|r| r.change.as_ref().unwrap().reason.starts_with("bandit (errors reward)")));
    let decisions =
        env.read::<Decision>(&env.config.topics.decisions, 1, Duration::from_secs(30), Duration::from_secs(3)).await;
    let mut by_version: BTreeMap<i64, HashMap<String, String>> = BTreeMap::new();
    for d in decisions.iter().map(|r| &r.value).filter(|d| d.deployment == "abn-bandit") {
        let spec = &records[d.config_version as usize - 1];
        let want = share(spec, &d.cohort) / 100.0;
        let off = (d.propensity.expect("randomised") - want).abs();
        assert!(
            off < 1e-9,
            "{}: propensity {:?} under v{}, its arm's share {want}",
            d.cohort,
            d.propensity,
            d.config_version
        );
        by_version.entry(d.config_version).or_default().insert(d.user_id.clone(), d.cohort.clone());
    }
    let mut moved = 0;
    for ((&v, before), (&w, after)) in by_version.iter().zip(by_version.iter().skip(1)) {
        let (old, new) = (&records[v as usize - 1], &records[w as usize - 1]);
        for (user, was) in before {
            let Some(is) = after.get(user).filter(|is| *is != was) else { continue };
            moved += 1;
            assert!(
                share(new, was) < share(old, was) && share(new, is) > share(old, is),
                "v{v} -> v{w}: {user} moved from {was} to {is}, but {was}'s share went {} -> {}",
                share(old, was),
                share(new, was)
            );
        }
    }
    assert!(moved > 0, "some users moved as the shares did");
    env.stop().await;
}

/// Safe canaries: a candidate failing 30% of its requests, and one that never answers in time, each
/// hedged by control. Their users get control's answer (HEDGED) instead of an error or a timeout: not one
/// MODEL_ERROR or TIMEOUT decision. The error-rate guard still sees the failures and rolls both back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_canary_gives_its_users_no_errors_and_is_still_rolled_back() {
    let Some(mut env) = Env::new("hedge").await else { return };
    env.start_service();
    env.start_model("v1", 2, 0.0, 0.0);
    env.start_model("flaky", 2, 0.3, 0.0);
    env.start_model("stalled", 2_500, 0.0, 0.0);
    for (name, candidate) in [("flaky", "flaky"), ("stalled", "stalled")] {
        let mut spec = plan_spec(name, ("v1", candidate), &[10.0, 50.0], 3000, 90_000, r#","guards":["error_rate"]"#);
        spec.hedge = true;
        switchyard::control::ops::deploy(&env.config, name, spec).await.expect("deploy");
    }
    let stop = traffic(&env, &["flaky", "stalled"], 100, 2000);
    for name in ["flaky", "stalled"] {
        let d = wait_for(&env, name, Duration::from_secs(120), |d| d.spec.plan.is_none()).await;
        let change = d.spec.change.as_ref().unwrap();
        assert_eq!((d.spec.canary_percent, change.actor.as_str()), (0.0, "guard:error_rate"), "{name}: {change:?}");
    }
    // Requests routed to the candidates just before the rollback are still decided.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.send(true).unwrap();

    let decisions =
        env.read::<Decision>(&env.config.topics.decisions, 1, Duration::from_secs(30), Duration::from_secs(3)).await;
    for name in ["flaky", "stalled"] {
        let mine: Vec<&Decision> = decisions.iter().map(|r| &r.value).filter(|d| d.deployment == name).collect();
        let count = |status: DecisionStatus| mine.iter().filter(|d| d.status == status).count();
        let candidate = mine.iter().filter(|d| d.cohort == "candidate").count();
        let hedged = count(DecisionStatus::Hedged);
        eprintln!("{name}: {} decisions, {candidate} served by the candidate's arm, {hedged} hedged", mine.len());
        assert_eq!(count(DecisionStatus::Ok) + hedged, mine.len(), "{name}: every user got an answer");
        assert!(
            mine.iter().all(|d| d.output.is_some() && (d.status == DecisionStatus::Ok || d.model == "v1")),
            "{name}: a hedged decision carries control's answer"
        );
        let share = hedged as f64 / candidate as f64;
        let want = if name == "flaky" { 0.15..0.45 } else { 0.95..1.0001 };
        assert!(candidate >= 20 && want.contains(&share), "{name}: {hedged} of {candidate} hedged");
    }
    assert!(common::counter("switchyard_decisions_total", &["status=\"HEDGED\""]) > 0.0);
    env.stop().await;
}

/// Adaptive allocation: a bandit between a control failing 20% of requests and a candidate that never
/// fails moves most traffic to the candidate, one interval at a time (on little evidence it may also step
/// back), and users only ever move onto the arm that grows; the other way round the candidate's share falls to the floor (or its error guard
/// rolls it back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandit_moves_traffic_to_the_better_arm_and_keeps_users_where_their_arm_grows() {
    let Some(mut env) = Env::new("bandit").await else { return };
    env.start_service();
    env.start_model("shaky", 2, 0.2, 0.0);
    env.start_model("steady", 2, 0.0, 0.0);
    let bandit = r#","guards":["error_rate","timeout_rate"],
        "bandit":{"interval_ms":2000,"floor_percent":5,"max_change_percent":30}"#;
    deploy_plan(&env, "up", ("shaky", "steady"), &[10.0], 0, 300_000, bandit).await;
    deploy_plan(&env, "down", ("steady", "shaky"), &[50.0], 0, 300_000, bandit).await;
    let stop = traffic(&env, &["up", "down"], 100, 2000);
    let up = wait_for(&env, "up", Duration::from_secs(90), |d| d.spec.canary_percent >= 80.0).await;
    let down = wait_for(&env, "down", Duration::from_secs(90), |d| d.spec.canary_percent <= 5.0).await;
    stop.send(true).unwrap();
    assert!(up.spec.plan.is_some(), "no guard fired on the better candidate: {:?}", up.spec.change);
    eprintln!("down ended at {}%: {:?}", down.spec.canary_percent, down.spec.change);

    let entries = settled_history(&env, "up").await;
    let shares: Vec<f64> = read_all(&env, &env.config.topics.deployments)
        .await
        .into_iter()
        .filter(|(_, key, _)| key == "up")
        .map(|(_, _, v)| DeploymentSpec::from_json(&v.unwrap()).unwrap().canary_percent)
        .collect();
    eprintln!("up: shares {shares:?}");
    assert!(shares.last().is_some_and(|s| *s >= 80.0), "most traffic on the better arm: {shares:?}");
    assert!(entries[1..].iter().all(|e| e.change.as_ref().unwrap().reason.contains("bandit (errors reward)")));
    // Stickiness: from one version to the next, users only move onto the arm whose share grew.
    let decisions =
        env.read::<Decision>(&env.config.topics.decisions, 1, Duration::from_secs(30), Duration::from_secs(3)).await;
    let mut by_version: BTreeMap<i64, HashMap<String, String>> = BTreeMap::new();
    for d in decisions.iter().map(|r| &r.value).filter(|d| d.deployment == "up") {
        by_version.entry(d.config_version).or_default().insert(d.user_id.clone(), d.cohort.clone());
        let want = shares[d.config_version as usize - 1] / 100.0;
        let got = if d.cohort == "candidate" { want } else { 1.0 - want };
        // The record's percent (73.68) over 100 may differ from the bucket share (7368 / 10000) in the
        // last bit of a double.
        let off = (d.propensity.expect("randomised") - got).abs();
        assert!(off < 1e-9, "each decision carries its side's share under its version: {:?} vs {got}", d.propensity);
    }
    for ((&v, before), (&w, after)) in by_version.iter().zip(by_version.iter().skip(1)) {
        let grew = shares[w as usize - 1] > shares[v as usize - 1];
        let shrinking = if grew { "control" } else { "candidate" };
        let moved_onto_shrinking =
            before.iter().filter(|(u, c)| *c != shrinking && after.get(*u).is_some_and(|c| c == shrinking));
        assert_eq!(
            moved_onto_shrinking.count(),
            0,
            "v{v} -> v{}: a user moved onto the shrinking {shrinking} arm",
            v + 1
        );
    }
    env.stop().await;
}

/// Two instances; the one leading the controller is killed with SIGKILL while the plan runs. The other
/// takes over, the plan completes, and each step's record is on the deployments topic once and in the
/// history once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_plan_hands_over_and_writes_each_step_once() {
    let Some(mut env) = Env::new("handover").await else { return };
    let dir = std::env::temp_dir().join(format!("switchyard-{}", env.config.service.group_id));
    std::fs::create_dir_all(&dir).unwrap();
    let mut instances: HashMap<&str, Child> = HashMap::new();
    for id in ["a", "b"] {
        instances.insert(id, env.spawn_instance(id, &dir.join(format!("{id}.log"))));
    }
    env.start_model("v1", 2, 0.0, 0.0);
    env.start_model("v2", 2, 0.0, 0.0);
    env.start_model("v3", 2, 0.0, 0.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    deploy_plan(&env, "fraud", ("v1", "v2"), &[5.0, 10.0, 20.0, 40.0], 4000, 120_000, "").await;
    // An A/B/n plan of two candidates as good as control beside it: the new leader rebuilds each
    // candidate's evidence, and no guard fires on equal models.
    let mut abn = plan_spec("abn", ("v1", "v2"), &[5.0, 10.0, 20.0], 4000, 120_000, "");
    abn.candidate = None;
    abn.canary_percent = 0.0;
    abn.candidates = ["v2", "v3"]
        .iter()
        .map(|m| switchyard::record::deployment::Candidate { model: m.to_string(), percent: 5.0, buckets: Vec::new() })
        .collect();
    switchyard::control::ops::deploy(&env.config, "abn", abn).await.expect("deploy");
    let stop = traffic(&env, &["fraud", "abn"], 150, 4000);

    // Once the plan is past its first step, kill the leader.
    wait_for(&env, "fraud", Duration::from_secs(90), |d| d.spec.plan.as_ref().is_none_or(|p| p.step >= 1)).await;
    let leads = |id: &str| {
        let log = std::fs::read_to_string(dir.join(format!("{id}.log"))).unwrap_or_default();
        log.rfind("this instance is the rollout controller") > log.rfind("handed over")
    };
    let leader = ["a", "b"].into_iter().find(|id| leads(id)).expect("one instance leads");
    let registry = watcher::snapshot(&env.config).await.unwrap();
    let abn_at_kill = registry.get("abn").and_then(|d| d.spec.plan.clone()).expect("abn has its plan");
    assert_eq!(abn_at_kill.state, PlanState::Running, "the A/B/n plan is mid-way when its leader dies");
    let mut killed = instances.remove(leader).unwrap();
    killed.kill().unwrap(); // SIGKILL
    killed.wait().unwrap();
    let killed_at = Instant::now();

    let promoted = wait_for(&env, "fraud", Duration::from_secs(150), |d| d.strategy() == Strategy::Single).await;
    eprintln!("killed controller {leader}; plan completed {:.1} s later", killed_at.elapsed().as_secs_f64());
    assert_eq!(promoted.spec.control, "v2");
    let abn_done = |d: &Deployment| d.spec.plan.as_ref().is_none_or(|p| p.state != PlanState::Running);
    let abn = wait_for(&env, "abn", Duration::from_secs(150), abn_done).await;
    eprintln!("abn at the kill: step {}; at the end: {:?}", abn_at_kill.step + 1, abn.spec.change);
    stop.send(true).unwrap();
    let abn_records: Vec<DeploymentSpec> = read_all(&env, &env.config.topics.deployments)
        .await
        .into_iter()
        .filter_map(|(_, key, value)| (key == "abn").then(|| DeploymentSpec::from_json(&value.unwrap()).unwrap()))
        .collect();
    let abn_steps: Vec<(usize, usize, PlanState)> = abn_records
        .iter()
        .map(|r| (r.candidates.len(), r.plan.as_ref().unwrap().step, r.plan.as_ref().unwrap().state))
        .collect();
    assert_eq!(
        abn_steps,
        [(2, 0, PlanState::Running), (2, 1, PlanState::Running), (2, 2, PlanState::Running), (2, 2, PlanState::Done)],
        "each step written once, no candidate cut: {abn_records:#?}"
    );
    assert!(abn_records[1..].iter().all(|r| r.change.as_ref().unwrap().actor == "plan"));

    let records: Vec<DeploymentSpec> = read_all(&env, &env.config.topics.deployments)
        .await
        .into_iter()
        .filter_map(|(_, key, value)| (key == "fraud").then(|| DeploymentSpec::from_json(&value.unwrap()).unwrap()))
        .collect();
    let steps: Vec<Option<usize>> = records.iter().map(|r| r.plan.as_ref().map(|p| p.step)).collect();
    assert_eq!(steps, [Some(0), Some(1), Some(2), Some(3), None], "each step written once: {records:#?}");
    let entries = settled_history(&env, "fraud").await;
    let versions: Vec<Option<u64>> = entries.iter().map(|e| e.version).collect();
    assert_eq!(versions, [Some(1), Some(2), Some(3), Some(4), Some(5)], "one history entry per record: {entries:#?}");
    let survivor = if leader == "a" { "b" } else { "a" };
    let log = std::fs::read_to_string(dir.join(format!("{survivor}.log"))).unwrap();
    assert!(log.contains("this instance is the rollout controller"), "{survivor} took over");
    for (_, mut child) in instances {
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        child.wait().unwrap();
    }
    env.stop().await;
}
