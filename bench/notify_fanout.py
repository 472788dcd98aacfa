"""notify_fanout: NotificationService.StreamNotifications with 200 subscribers of one user against 1,
the same publisher making the same real events for both.

The events are real: each ContainerService.CreateContainer call (a container created in the
runtime's Quilt, not started) stores and publishes one container_status event. The publisher
(bench/_aria_client.py publish, a process of its own) makes them in two phases:
* paced: PACED_EVENTS at PACED_RATE a second: delivery latency under a steady load;
* burst: BURST_EVENTS back to back: how many deliveries a second the runtime keeps up with.
The subscribers (bench/_aria_client.py subscribe) are PROCESSES processes of STREAMS_EACH streams
(one grpcio.aio channel each), or one process with one stream for the reference. A subscriber
checks it gets every event once, in order. Latency: receive time - Notification.timestamp (set by
the runtime when it stores the event), same host clock. Deliveries a second in the burst: events x
streams / (last receive - first publish). Each configuration gets a fresh `aria serve` (with its
own Quilt child); the runtime's CPU time over the burst is read from /proc. The configurations take
turns, ROUNDS times; of each, the round with the most deliveries a second is kept (all are in the JSON).

No target is set: the ratios (200 subscribers / 1) show what fan-out costs.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from .harness import Client, ServerProcess, percentile, progress, run_script, start_aria

PROCESSES = 4
STREAMS_EACH = 50
PACED_EVENTS = 50
PACED_RATE = 10.0
BURST_EVENTS = 200
ROUNDS = 2
RESULT_TIMEOUT_S = 180.0
CLIENT = Path(__file__).resolve().parent / "_aria_client.py"
CONFIGS = {"1 subscriber": (1, 1), f"{PROCESSES * STREAMS_EACH} subscribers": (PROCESSES, STREAMS_EACH)}


def _publish(aria: ServerProcess, workdir: Path, events: int, rate: float) -> dict[str, Any]:
    argv = [sys.executable, str(CLIENT), "publish", str(aria.socket_path), str(events), str(rate)]
    answer: dict[str, Any] = json.loads(run_script(argv, "the publisher", workdir / "publish.err"))
    return answer


def _measure(tmp: Path, label: str, round_no: int, processes: int, streams_each: int) -> dict[str, Any]:
    workdir = tmp / f"{label.replace(' ', '-')}-{round_no}"
    workdir.mkdir()
    phases = f"{PACED_EVENTS},{BURST_EVENTS}"
    # (all subscribers are one user: the per-user cap on open streams, 64 by default, is raised to fit)
    streams = str(processes * streams_each + 8)
    with (
        start_aria(workdir / "aria.sock", workdir / "data", workdir, "--max-streams", streams) as aria,
        contextlib.ExitStack() as clients,
    ):
        _publish(aria, workdir, 1, 0)  # event 1, the subscribers' warm-up (this waits for the runtime's Quilt)
        subscribers = [
            clients.enter_context(
                Client(
                    [sys.executable, str(CLIENT), "subscribe", str(aria.socket_path), str(streams_each), phases],
                    f"subscriber process {k}",
                    workdir / f"subscriber-{k}.err",
                )
            )
            for k in range(processes)
        ]
        for subscriber in subscribers:
            subscriber.wait_ready()
        progress(
            f"round {round_no}, {label}: {PACED_EVENTS} events at {PACED_RATE:g}/s, then {BURST_EVENTS} back to back"
        )
        paced = _publish(aria, workdir, PACED_EVENTS, PACED_RATE)
        cpu_before = aria.cpu_seconds()
        burst = _publish(aria, workdir, BURST_EVENTS, 0)
        results = [subscriber.result(RESULT_TIMEOUT_S) for subscriber in subscribers]
        burst_cpu_s = aria.cpu_seconds() - cpu_before
        aria.stop()
    return {
        "config": label,
        "round": round_no,
        **_summary(processes * streams_each, paced, burst, results, burst_cpu_s),
    }


def _latency(results: list[dict[str, Any]], phase: int) -> dict[str, float]:
    ms = [v for r in results for v in r["phases"][phase]["latency_ms"]]
    return {
        "p50": round(statistics.median(ms), 2),
        "p99": round(percentile(ms, 0.99), 2),
        "max": round(max(ms), 2),
    }


def _summary(
    streams: int,
    paced: dict[str, Any],
    burst: dict[str, Any],
    results: list[dict[str, Any]],
    burst_cpu_s: float,
) -> dict[str, Any]:
    deliveries = BURST_EVENTS * streams
    burst_s = max(r["phases"][1]["last_receive"] for r in results) - burst["start"]
    summary = {
        "subscribers": streams,
        "paced_latency_ms": _latency(results, 0),
        "paced_publish_call_ms_p50": round(statistics.median(paced["call_ms"]), 2),
        "burst_deliveries": deliveries,
        "burst_s": round(burst_s, 3),
        "burst_deliveries_per_s": round(deliveries / burst_s, 1),
        "burst_publisher_events_per_s": round(BURST_EVENTS / (burst["end"] - burst["start"]), 1),
        "burst_latency_ms": _latency(results, 1),
        "burst_server_cpu_s": round(burst_cpu_s, 3),
        "burst_server_cpu_ms_per_event": round(burst_cpu_s / BURST_EVENTS * 1e3, 2),
        "burst_server_cpu_us_per_delivery": round(burst_cpu_s / deliveries * 1e6, 1),
    }
    progress(
        f"paced p99 {summary['paced_latency_ms']['p99']} ms; burst {summary['burst_deliveries_per_s']:.0f} "
        f"deliveries/s, p99 {summary['burst_latency_ms']['p99']} ms"
    )
    return summary


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aria-bench-", dir=os.environ.get("BENCH_TMP")) as name:
        runs = [
            _measure(Path(name), label, round_no, *shape)
            for round_no in range(1, ROUNDS + 1)
            for label, shape in CONFIGS.items()
        ]
    selected = {
        label: max((r for r in runs if r["config"] == label), key=lambda r: r["burst_deliveries_per_s"])
        for label in CONFIGS
    }
    reference, fanout = selected.values()
    extra_subscribers = fanout["subscribers"] - reference["subscribers"]
    ratios = {
        "burst_deliveries_per_s": round(fanout["burst_deliveries_per_s"] / reference["burst_deliveries_per_s"], 2),
        "burst_publisher_events_per_s": round(
            fanout["burst_publisher_events_per_s"] / reference["burst_publisher_events_per_s"], 3
        ),
        "paced_p50_ms": round(fanout["paced_latency_ms"]["p50"] / reference["paced_latency_ms"]["p50"], 2),
        "paced_p99_ms": round(fanout["paced_latency_ms"]["p99"] / reference["paced_latency_ms"]["p99"], 2),
    }
    extra_cpu_ms = fanout["burst_server_cpu_ms_per_event"] - reference["burst_server_cpu_ms_per_event"]
    return {
        "parameters": {
            "event": "container_status, one per ContainerService.CreateContainer",
            "subscriber_processes": PROCESSES,
            "streams_per_process": STREAMS_EACH,
            "paced_events": PACED_EVENTS,
            "paced_rate_per_s": PACED_RATE,
            "burst_events": BURST_EVENTS,
            "rounds": ROUNDS,
            "selection": "per configuration, the round with the most deliveries a second in the burst",
        },
        "runs": runs,
        "selected": selected,
        "ratios": ratios,
        "server_cpu_us_per_extra_subscriber_and_event": round(extra_cpu_ms * 1e3 / extra_subscribers, 1),
        "targets": [],
        "note": "no target set: the ratios (fan-out / 1 subscriber) show what fan-out costs",
    }


def table(r: dict[str, Any]) -> str:
    p = r["parameters"]
    lines = [
        f"notify_fanout: container_status events to N subscribers of one user; paced: {p['paced_events']} events "
        f"at {p['paced_rate_per_s']:g}/s, burst: {p['burst_events']} back to back",
        f"{'subscribers':<12} {'paced p50 ms':>12} {'paced p99 ms':>12} {'burst deliv/s':>13} {'burst p99 ms':>12} "
        f"{'publisher ev/s':>14} {'cpu ms/event':>12}",
    ]
    for run in r["selected"].values():
        lines.append(
            f"{run['subscribers']:<12} {run['paced_latency_ms']['p50']:>12.2f} {run['paced_latency_ms']['p99']:>12.2f} "
            f"{run['burst_deliveries_per_s']:>13.0f} {run['burst_latency_ms']['p99']:>12.1f} "
            f"{run['burst_publisher_events_per_s']:>14.1f} {run['burst_server_cpu_ms_per_event']:>12.2f}"
        )
    lines.append("ratios (fan-out / 1): " + ", ".join(f"{k} {v}" for k, v in r["ratios"].items()))
    lines.append(f"runtime CPU per event and extra subscriber: {r['server_cpu_us_per_extra_subscriber_and_event']} us")
    lines.append(r["note"])
    return "\n".join(lines)
