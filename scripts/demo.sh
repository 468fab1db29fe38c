#!/usr/bin/env bash
# The router end to end on a local broker: a canary of fraud-v2 next to fraud-v1 (fraud-v3, a scikit-learn
# model served by the Python kit in python/, gets shadow copies via mirror), the model workers, load, the
# live split and sample decisions, then a
# blue/green switch to fraud-v2 and back. Then rollouts that drive themselves: a plan takes the healthy
# fraud-v2 from 1% to 100% unattended, and a second plan's guards roll back fraud-v4, which fails 30% of
# its requests; the history says who did what and why. Last, outcome labels: a labeller reports what
# really happened, answers are scored, and a candidate that is faster but less accurate (churn-v2, 75%
# against 90%) is rolled back by the quality guard, not by latency; then a blue/green switch to it on
# probation is switched back by the paired guard; then chargebacks that come late and honest payments that
# never get a label: decisions judged when they mature. Stops everything it started.
#
# DEMO_RATE (requests/s, default 200) and DEMO_SECONDS (per phase, default 8) tune it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

rate="${DEMO_RATE:-200}"
seconds="${DEMO_SECONDS:-8}"
count=$((rate * seconds))
logs=".demo"
mkdir -p "$logs"
bin="target/debug/switchyard"
pids=()
started_broker=0

cleanup() {
  echo; echo "== stopping demo processes"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$started_broker" = 1 ]; then scripts/kafka.sh stop || true; fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "building switchyard"
cargo build --locked --quiet
# fraud-v3 is a scikit-learn model served by the Python model-worker kit (python/); its venv is
# .python-kit/venv (pinned requirements, installed on the first run). Without it, a demo model stands in.
py=""
if scripts/test_python.sh --setup >"$logs/python-kit-setup.log" 2>&1; then
  py=".python-kit/venv/bin/python"
else
  echo "(the Python kit could not be installed, see $logs/python-kit-setup.log: fraud-v3 is a demo model)"
fi

step "starting a local Kafka broker (KRaft, single node)"
if ! scripts/kafka.sh status 2>/dev/null; then
  KAFKA_FRESH=1 scripts/kafka.sh start
  started_broker=1
fi

export SWITCHYARD_BOOTSTRAP_SERVERS="127.0.0.1:${KAFKA_PORT:-9092}"
export RUST_LOG="${RUST_LOG:-info,rdkafka=warn,librdkafka=error}"
# The score stage's store of open decisions, with the demo's logs.
export SWITCHYARD__QUALITY__STATE_DIR="$logs/state"

step "creating topics and a canary deployment: 10% of users on fraud-v2, fraud-v3 mirrored"
$bin create-topics
$bin deploy fraud --strategy canary --control fraud-v1 --candidate fraud-v2 --canary-percent 10 \
  --mirror fraud-v3 --timeout-ms 1000 --override user-42=candidate

step "starting switchyard (route + merge, metrics on 127.0.0.1:9898), two demo models and fraud-v3, a scikit-learn model on the Python kit"
$bin run >"$logs/switchyard.log" 2>&1 & pids+=($!)
for model in fraud-v1 fraud-v2; do
  $bin demo-model --model "$model" --latency-ms 15 --error-rate 0.01 >"$logs/$model.log" 2>&1 & pids+=($!)
done
if [ -n "$py" ]; then
  OMP_NUM_THREADS=1 "$py" python/examples/sklearn_worker.py --model fraud-v3 --metrics-port 9101 >"$logs/fraud-v3.log" 2>&1 & pids+=($!)
else
  $bin demo-model --model fraud-v3 --latency-ms 15 --error-rate 0.01 >"$logs/fraud-v3.log" 2>&1 & pids+=($!)
fi
$bin demo-model --model fraud-v4 --latency-ms 15 --error-rate 0.3 >"$logs/fraud-v4.log" 2>&1 & pids+=($!)
$bin demo-model --model churn-v1 --latency-ms 30 --accuracy 0.9 >"$logs/churn-v1.log" 2>&1 & pids+=($!)
$bin demo-model --model churn-v2 --latency-ms 2 --accuracy 0.75 >"$logs/churn-v2.log" 2>&1 & pids+=($!)
$bin labeller --delay-ms 2000 --positives-only chargeback >"$logs/labeller.log" 2>&1 & pids+=($!)
for _ in $(seq 1 60); do curl -fs 127.0.0.1:9898/readyz >/dev/null 2>&1 && break; sleep 0.5; done
curl -fs 127.0.0.1:9898/readyz

$bin status fraud

phase() { # name: load at $rate for $seconds and show the live split with sample decisions
  step "$1: $count requests at $rate/s from 1000 users"
  $bin loadgen --deployment fraud --rate "$rate" --count "$count" --users 1000 >"$logs/loadgen.log" 2>&1 &
  local load=$!
  $bin watch --deployment fraud --seconds "$((seconds + 3))" --sample "$((rate * 2))"
  wait "$load"
  cat "$logs/loadgen.log" | grep -v INFO || true
}

phase "canary at 10%"

step "blue/green: fraud-v1 active, then switch everyone to fraud-v2"
$bin deploy fraud --strategy blue_green --control fraud-v1 --candidate fraud-v2 --active control --mirror fraud-v3 --timeout-ms 1000
$bin promote fraud
phase "after the switch (fraud-v2 serves everyone)"

step "rollback: switch back to fraud-v1"
$bin rollback fraud
phase "after the switch back (fraud-v1 serves everyone)"

# A plan runs unattended while load flows: waits until `until` (a grep pattern) shows in `status`.
run_plan() { # title, until, deployment (default fraud)
  step "$1"
  local name="${3:-fraud}"
  $bin loadgen --deployment "$name" --rate "$rate" --count "$((rate * 120))" --users 20000 >"$logs/loadgen-plan.log" 2>&1 &
  local load=$! start=$SECONDS
  until $bin status "$name" 2>/dev/null | grep -q "$2"; do
    sleep 2; local waited=$((SECONDS - start))
    echo "-- after ${waited} s:"; $bin status "$name" | grep -E 'plan:|probation:|last change|labels mature|observed split|^    (error_rate|timeout_rate|latency|sample_ratio|coverage|quality|paired_quality|disagreement|new − old)' || true
    if [ "$waited" -ge 120 ]; then
      echo "the plan did not finish in 120 s (waited for \"$2\"); its history:"; $bin history "$name" || true
      kill "$load"; exit 1
    fi
  done
  kill "$load" 2>/dev/null || true; wait "$load" 2>/dev/null || true
  $bin status "$name" | grep -vE '^  record:'
}

plan='{"steps":[{"canary_percent":1,"bake_ms":5000,"min_sample":20,"max_ms":90000},
                {"canary_percent":10,"bake_ms":5000,"min_sample":20,"max_ms":90000},
                {"canary_percent":50,"bake_ms":5000,"min_sample":20,"max_ms":90000}],
        "on_alarm":"rollback","on_end":"promote"}'

step "a rollout plan: fraud-v2 from 1% through 10% and 50% to 100%, judged by anytime-valid guards"
$bin deploy fraud --strategy canary --control fraud-v1 --candidate fraud-v2 --mirror fraud-v3 --timeout-ms 1000 \
  --plan "$plan" --reason "ship fraud-v2"
run_plan "the plan runs unattended (no command typed until it is done)" "strategy single"

step "a broken candidate: fraud-v4 answers 30% of its requests with an error"
$bin deploy fraud --strategy canary --control fraud-v2 --candidate fraud-v4 --mirror fraud-v3 --timeout-ms 1000 \
  --plan "$plan" --reason "try fraud-v4"
run_plan "the guards judge fraud-v4" "last change by guard:"

step "the history: every change, by whom and why, with the evidence"
$bin history fraud

accuracy() { # per model, from the quality counters on /metrics: labelled answers and share right
  curl -fs 127.0.0.1:9898/metrics | awk '
    /^switchyard_quality_labelled_total\{/ && /deployment="churn"/ { match($0, /model="[^"]*"/); m = substr($0, RSTART + 7, RLENGTH - 8); n[m] += $NF }
    /^switchyard_quality_loss_micros_total\{/ && /deployment="churn"/ && /loss="zero_one"/ { match($0, /model="[^"]*"/); m = substr($0, RSTART + 7, RLENGTH - 8); w[m] += $NF / 1e6 }
    END { for (m in n) printf "  %-10s %6d labelled answers, accuracy %.3f\n", m, n[m], 1 - w[m] / n[m] }' | sort
}

step "outcome labels: churn-v1 (90% accurate) serves, churn-v2 (75%, but 15x faster) gets shadow copies; labels arrive 2 s after each request"
$bin deploy churn --strategy shadow --control churn-v1 --candidate churn-v2 --timeout-ms 1000 --quality '{}' --reason "score both"
$bin loadgen --deployment churn --rate "$rate" --count "$((rate * 9))" --users 20000 >"$logs/loadgen-churn.log" 2>&1 &
load=$!
for t in 3 6 9; do sleep 3; echo "-- after ${t} s:"; accuracy; done
wait "$load" 2>/dev/null || true
$bin status churn | grep -A3 "quality (" || true

churn_plan='{"steps":[{"canary_percent":20,"bake_ms":5000,"min_sample":100,"max_ms":90000},
                      {"canary_percent":50,"bake_ms":5000,"min_sample":100,"max_ms":90000}],
             "guards":["error_rate","latency","quality"],
             "quality_guard":{"loss":"zero_one","margin":0.02}}'
step "a plan for churn-v2 with a quality guard (at most 2 points less accurate): faster is not better if it is wrong"
$bin deploy churn --strategy canary --control churn-v1 --candidate churn-v2 --timeout-ms 1000 --quality '{}' \
  --plan "$churn_plan" --reason "try the fast model"
run_plan "the guards judge churn-v2" "last change by guard:" churn
$bin history churn | tail -12

step "blue/green with probation: everyone to churn-v2 at once; churn-v1 stays warm on copies and both are judged on the same labelled requests"
$bin deploy churn --strategy blue_green --control churn-v1 --candidate churn-v2 --active control --timeout-ms 1000 \
  --quality '{}' --reason "blue/green for the fast model"
$bin promote churn --probation-ms 120000 --reason "switch to churn-v2 on probation"
run_plan "the paired guard judges the switch" "last change by guard:" churn
$bin history churn | tail -6

step "labels weeks later, in compressed time: a chargeback comes 2 s after a payment, an honest payment never gets a label; each decision matures 6 s after it is made, judged on its chargeback or, without one, as honest (default_label 0)"
late_plan='{"steps":[{"canary_percent":50,"bake_ms":8000,"min_sample":100,"max_ms":90000}],
            "guards":["error_rate","quality"],
            "quality_guard":{"loss":"zero_one","margin":0.02}}'
$bin deploy chargeback --strategy canary --control churn-v1 --candidate churn-v2 --timeout-ms 1000 \
  --quality '{"maturity_ms":6000,"default_label":0}' --plan "$late_plan" --reason "the fast model on chargebacks"
run_plan "the quality guard judges matured users only: none before 6 s into the step" "last change by guard:" chargeback
echo "-- answers scored on a label by absence (implicit) and in all, per model:"
curl -fs 127.0.0.1:9898/metrics | awk '
  /^switchyard_quality_(implicit|labelled)_total\{/ && /deployment="chargeback"/ && /role="serving"/ {
    match($0, /model="[^"]*"/); m = substr($0, RSTART + 7, RLENGTH - 8); k = ($0 ~ /implicit/) ? "implicit" : "labelled"; n[m " " k] += $NF }
  END { for (x in n) printf "  %s %d\n", x, n[x] }' | sort

step "what Prometheus sees (excerpt of 127.0.0.1:9898/metrics)"
curl -fs 127.0.0.1:9898/metrics | grep -E '^switchyard_(decisions_total|shadow_comparisons_total|config_version|pending_requests|dead_letters_total|rollout_changes_total|quality_labelled_total)' | sort
if [ -n "$py" ]; then
  echo "-- fraud-v3's worker (Python kit, 127.0.0.1:9101/metrics):"
  curl -fs 127.0.0.1:9101/metrics | grep -E '^switchyard_worker_(requests|errors|undecodable)_total' || true
fi

step "demo done (logs in $logs/)"
