"""Plots a results.json of scripts/bench: throughput (requests or records per second) and end-to-end
latency (p50 and p99 per load level) for switchyard, Kafka Streams and the null pipe; or a soak.json of
`scripts/bench --soak`: RSS, open requests, latency and lag per minute, restarts marked; or a scale.json
of `scripts/bench --scale`: throughput, start-up, memory, rebalance pause and the CPU a light load costs
against the deployments.

    .bench/venv/bin/python scripts/bench_plot.py .bench/<run>/results.json docs/benchmarks.png
    .bench/venv/bin/python scripts/bench_plot.py .bench/<run>/soak.json docs/soak.png
    .bench/venv/bin/python scripts/bench_plot.py .bench/<run>/scale.json docs/scale.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402



def plot_soak(results, out):
    rows = results["soak"]
    minutes = [r["minute"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(13, 7), sharex=True)
    panels = [
        (axes[0][0], "switchyard RSS (MiB)", [("rss_mib", "RSS", "-")]),
        (axes[0][1], "open requests (merge) and consumer lag", [
            ("open_requests", "open requests", "-"), ("lag_route", "route lag", "--"), ("lag_merge", "merge lag", ":")]),
        (axes[1][0], "end to end (ms)", [("p50_ms", "p50", "-"), ("p99_ms", "p99", "--")]),
        (axes[1][1], "decisions per minute", [("decided", "decided", "-"), ("timeouts", "TIMEOUT", "--")]),
    ]
    for ax, title, series in panels:
        for key, label, style in series:
            ax.plot(minutes, [r[key] if r[key] is not None else float("nan") for r in rows], style, label=label)
        for r in rows:
            if r["restarted"]:
                ax.axvline(r["minute"], color="#bbbbbb", linewidth=0.8)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("minute (grey lines: switchyard restarted)")
    fig.suptitle(f"soak: {results['rate']:,} requests/s for {results['minutes']} minutes, run {results['run']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def plot_scale(results, out):
    rows = results["scale"]
    n = [r["deployments"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    panels = [
        (axes[0], "throughput (per second)", [("route_rate", "route only"), ("full_rate", "full loop")]),
        (axes[1], "seconds", [("full_first_s", "start-up to first decision"),
                              ("rebalance_gap_s", "pause while a 2nd instance joins"),
                              ("rebalance_assigned_s", "2nd instance assigned partitions"),
                              ("topics_s", "creating the topics")]),
        (axes[2], "switchyard peak RSS (MiB)", [("route_peak_rss_mib", "route only"),
                                                 ("full_peak_rss_mib", "full loop")]),
        (axes[3], "CPU-s per minute at 200 requests/s", [("cpu_s_per_minute", "switchyard"),
                                                         ("broker_cpu_s_per_minute", "broker")]),
    ]
    for ax, title, series in panels:
        for key, label in series:
            ax.plot(n, [r.get(key) if r.get(key) is not None else float("nan") for r in rows], "o-", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("deployments (each with its own two models)")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"cost as deployments grow, {results['partitions']} partitions per topic, run {results['run']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


results = json.load(open(sys.argv[1]))
if "soak" in results:
    plot_soak(results, sys.argv[2])
    sys.exit(0)
if "scale" in results:
    plot_scale(results, sys.argv[2])
    sys.exit(0)
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))

rows = results["throughput"]
names = [r["name"] for r in rows]
colors = ["#888888" if "pipe" in n else "#1f77b4" if "switchyard" in n else "#ff7f0e" for n in names]
left.barh(names, [r["rate"] for r in rows], color=colors)
left.set_xlabel("per second (preloaded backlog)")
left.set_title("Throughput")
left.invert_yaxis()
for y, r in enumerate(rows):
    left.text(r["rate"], y, f" {r['rate']:,.0f}", va="center", fontsize=8)

for system, color in [("Switchyard", "#1f77b4"), ("Streams", "#ff7f0e")]:
    points = sorted((p for p in results["latency"] if p["system"] == system), key=lambda p: p["rate"])
    if not points:
        continue
    rates = [p["rate"] for p in points]
    right.plot(rates, [p["end_to_end"][0] for p in points], "o-", color=color, label=f"{system} p50")
    right.plot(rates, [p["end_to_end"][1] for p in points], "s--", color=color, label=f"{system} p99")
hop = results.get("plain_hop")
if hop:
    right.axhline(hop[0], color="#888888", linestyle=":", label="one plain Kafka hop, p50")
right.set_xlabel("requests per second (open loop, instant models)")
right.set_ylabel("send -> decision visible (ms)")
right.set_yscale("log")
right.set_title("End-to-end latency")
right.legend(fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
print(f"wrote {sys.argv[2]}")
