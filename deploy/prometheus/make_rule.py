"""Writes deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/alerts.yml.

The rule file stays the one place alerts are edited (promtool checks and tests it); the
PrometheusRule is the same text nested under `spec:`. Text, not a YAML round trip, so comments
and block scalars survive unchanged. `--check` exits 1 when the generated file is stale.

    python3 deploy/prometheus/make_rule.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alerts.yml"
TARGET = HERE.parent / "k8s" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/prometheus/make_rule.py: edit that file
# and run `python3 deploy/prometheus/make_rule.py`, never this one.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: jobstream
spec:
"""


def render(source: str) -> str:
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main(argv: list[str]) -> int:
    wanted = render(SOURCE.read_text(encoding="utf-8"))
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != wanted:
            print(f"{TARGET} is stale: run python3 {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
