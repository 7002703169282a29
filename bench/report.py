"""What a benchmark run leaves behind: the table, the ratios, the targets
met or missed, JSON, markdown and PNG charts under ``bench-results/``."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.common import Figure

__all__ = ["Target", "table", "ratios", "targets", "targets_table", "charts"]


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cpu(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value * 1000:.3f}"


def table(figures: list[Figure]) -> str:
    lines = [
        "| scenario | system | metric | min | median | max | unit | runs "
        "| CPU ms/item: system | database | broker | notes |",
        "|---|---|---|--:|--:|--:|---|--:|--:|--:|--:|---|",
    ]
    for f in figures:
        cpu = f.cpu_s_per_item
        own = next((v for k, v in cpu.items() if k not in ("database", "broker")), None)
        lines.append(
            f"| {f.scenario} | {f.system} | {f.metric} | {_fmt(f.low)} | {_fmt(f.median)} "
            f"| {_fmt(f.high)} | {f.unit} | {len(f.runs)} | {_cpu(own)} "
            f"| {_cpu(cpu.get('database'))} | {_cpu(cpu.get('broker'))} | {f.notes} |"
        )
    return "\n".join(lines)


def _find(figures: list[Figure], scenario: str, system: str, metric: str) -> Figure | None:
    return next(
        (
            f
            for f in figures
            if f.scenario == scenario and f.system == system and f.metric == metric
        ),
        None,
    )


def ratios(figures: list[Figure]) -> dict[str, float]:
    """How many times better channels is than each reference, by median."""
    out: dict[str, float] = {}
    for ours in figures:
        if ours.system != "channels" and not ours.system.startswith("channels "):
            continue
        for other in figures:
            if (
                other.scenario != ours.scenario
                or other.metric != ours.metric
                or other.system.startswith("channels")
                or not other.runs
                or not ours.runs
            ):
                continue
            if ours.higher_is_better:
                value = ours.median / other.median if other.median else float("nan")
                key = f"{ours.scenario} {ours.metric}: {ours.system} / {other.system}"
            else:
                value = other.median / ours.median if ours.median else float("nan")
                key = f"{ours.scenario} {ours.metric}: {other.system} / {ours.system}"
            out[key] = value
    return out


@dataclass
class Target:
    scenario: str
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


def targets(figures: list[Figure], cpus: int) -> list[Target]:
    out: list[Target] = []

    def median(scenario: str, system: str, metric: str = "throughput") -> float | None:
        f = _find(figures, scenario, system, metric)
        return f.median if f is not None and f.runs else None

    def check(scenario: str, text: str, value: float | None, ok: bool, shown: str) -> None:
        out.append(
            Target(
                scenario,
                text,
                shown if value is not None else "not run",
                ok if value is not None else None,
            )
        )

    s1 = median("S1", "channels")
    s1n = median("S1", "naive Celery")
    s1b = median("S1", "bare client")
    check("S1", "≥ 5,000 deliveries/s", s1, bool(s1 and s1 >= 5000), f"{_fmt(s1 or 0)}/s")
    if s1 and s1n:
        check("S1", "≥ 15× naive", s1 / s1n, s1 / s1n >= 15, f"{s1 / s1n:.1f}×")
    if s1 and s1b:
        check("S1", "≥ 0.8× bare client", s1 / s1b, s1 / s1b >= 0.8, f"{s1 / s1b:.2f}×")
    s2 = median("S2", "channels")
    s2n = median("S2", "naive Celery")
    check("S2", "≥ 2,000 deliveries/s", s2, bool(s2 and s2 >= 2000), f"{_fmt(s2 or 0)}/s")
    if s2 and s2n:
        check("S2", "≥ 50× naive, same pool", s2 / s2n, s2 / s2n >= 50, f"{s2 / s2n:.1f}×")
    s3 = _find(figures, "S3", "channels", "throughput")
    if s3 is not None and s3.runs:
        done = "time limit" not in s3.notes
        check(
            "S3",
            "100k completes",
            1.0,
            done,
            f"yes, {_fmt(s3.median)}/s" if done else "no: " + s3.notes,
        )
        rss = next((f for f in figures if f.scenario == "S3" and f.unit == "ratio"), None)
        if rss is not None:
            check(
                "S3",
                "peak RSS 100k ≤ 1.2× 10k",
                rss.median,
                rss.high <= 1.2,
                f"{_fmt(rss.low)}–{_fmt(rss.high)}× (median {_fmt(rss.median)}×)",
            )
        trips = _find(figures, "S3", "channels", "deliveries per DB round trip")
        if trips is not None:
            check(
                "S3",
                "≤ 1 DB round trip per 50 deliveries",
                trips.median,
                trips.median >= 50,
                f"1 per {_fmt(trips.median)} deliveries",
            )
    p50 = median("S4", "channels", "p50 send→delivered")
    p99 = median("S4", "channels", "p99 send→delivered")
    n99 = median("S4", "naive Celery", "p99 send→delivered")
    if p50 is not None:
        check("S4", "p50 ≤ 20 ms", p50, p50 <= 20, f"{_fmt(p50)} ms")
    if p99 is not None:
        check("S4", "p99 ≤ 100 ms", p99, p99 <= 100, f"{_fmt(p99)} ms")
        if n99 is not None:
            check("S4", "p99 better than naive", p99, p99 < n99, f"{_fmt(p99)} vs {_fmt(n99)} ms")
    s5 = median("S5", "channels")
    s5n = median("S5", "naive smtplib loop")
    if s5 and s5n:
        check("S5", "≥ 5× naive smtplib", s5 / s5n, s5 / s5n >= 5, f"{s5 / s5n:.1f}×")
    s6 = median("S6", "channels Producer.send_many")
    s6c = median("S6", "Celery .delay() of a no-op")
    if s6 is not None:
        check("S6", "≥ 2,000 messages/s", s6, s6 >= 2000, f"{_fmt(s6)}/s")
        if s6c:
            check("S6", "≥ 1.5× Celery .delay()", s6 / s6c, s6 / s6c >= 1.5, f"{s6 / s6c:.2f}×")
    scaling = sorted(
        (int(f.system.split(",")[1].split()[0]), f.median)
        for f in figures
        if f.scenario == "S7" and f.runs
    )
    if len(scaling) >= 2:
        # Grows while there are free cores; past them, holds within 10 %.
        ok = all(
            b > a * 1.05 if n_b <= cpus else b >= a * 0.9
            for (_, a), (n_b, b) in zip(scaling, scaling[1:], strict=False)
        )
        shown = ", ".join(f"{n} proc {_fmt(v)}/s" for n, v in scaling)
        check("S7", f"grows with workers until the {cpus} CPUs are full", 1.0, ok, shown)
    return out


def targets_table(found: list[Target]) -> str:
    lines = ["| scenario | target | measured | met |", "|---|---|---|---|"]
    for t in found:
        met = "not run" if t.met is None else ("**yes**" if t.met else "**no**")
        lines.append(f"| {t.scenario} | {t.target} | {t.measured} | {met} |")
    return "\n".join(lines)


def charts(
    figures: list[Figure], samples: dict[str, list[float]], out: Path, stamp: str
) -> list[Path]:
    """Throughput per scenario against its references; S4 latency; S7 scaling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    rates = [f for f in figures if f.unit.endswith("/s") and f.scenario != "S7"]
    scenarios = list(dict.fromkeys(f.scenario for f in rates))
    if scenarios:
        fig, axes = plt.subplots(1, len(scenarios), figsize=(3.2 * len(scenarios), 4.2))
        axes_list = list(axes) if len(scenarios) > 1 else [axes]
        for ax, scenario in zip(axes_list, scenarios, strict=True):
            group = [f for f in rates if f.scenario == scenario]
            xs = list(range(len(group)))
            medians = [f.median for f in group]
            ax.bar(
                xs,
                medians,
                yerr=[
                    [m - f.low for m, f in zip(medians, group, strict=True)],
                    [f.high - m for m, f in zip(medians, group, strict=True)],
                ],
                capsize=4,
                color=["#2b7bba" if f.system.startswith("channels") else "#999999" for f in group],
            )
            ax.set_xticks(xs, [f.system.replace(" ", "\n", 1) for f in group], fontsize=7)
            ax.set_title(scenario, fontsize=10)
            ax.set_ylabel(group[0].unit, fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
        fig.suptitle("Throughput, median with min–max of the runs (blue: channels)", fontsize=10)
        fig.tight_layout()
        path = out / f"{stamp}-throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if any(samples.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for (system, values), color in zip(samples.items(), ("#2b7bba", "#999999"), strict=False):
            if not values:
                continue
            ordered = sorted(values)
            ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
            ax.plot(
                ordered,
                ys,
                label=f"{system} (p50 {statistics.median(ordered):.1f} ms)",
                color=color,
            )
        ax.set_xscale("log")
        ax.axvline(20, color="#2b7bba", linestyle=":", linewidth=1)
        ax.axvline(100, color="#cc4444", linestyle=":", linewidth=1)
        ax.set_xlabel("send → delivered, ms (log); dotted: 20 ms and 100 ms targets")
        ax.set_ylabel("fraction of deliveries")
        ax.set_title("S4 latency at 20 messages/s × 10 subscribers, all runs")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{stamp}-latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    scaling = [f for f in figures if f.scenario == "S7" and f.runs]
    if scaling:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        procs = [int(f.system.split(",")[1].split()[0]) for f in scaling]
        ax.errorbar(
            procs,
            [f.median for f in scaling],
            yerr=[[f.median - f.low for f in scaling], [f.high - f.median for f in scaling]],
            marker="o",
            capsize=4,
            color="#2b7bba",
        )
        ax.set_xticks(procs)
        ax.set_xlabel("worker processes (prefork pool)")
        ax.set_ylabel("deliveries/s")
        ax.set_ylim(bottom=0)
        ax.set_title("S7: 100 ms endpoints, scaling with worker processes")
        fig.tight_layout()
        path = out / f"{stamp}-scaling.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
