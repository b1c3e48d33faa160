"""Helpers for deploy/prometheus and deploy/grafana: promtool, the metric names a PromQL
expression reads, and the names a /metrics text exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.formats import DEPLOY

RULES = sorted((DEPLOY / "prometheus").glob("*.yml"))
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))

# Words of PromQL that are not metric names (functions are followed by "(" and skipped).
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan", "atan2",
}  # fmt: skip
# Label lists: `by (a, b)`, `on(a)`, `group_left(a)` ...; matchers `{...}`; ranges `[5m]`;
# strings; Grafana variables.
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_STRIPPED = re.compile(
    r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\{[^}]*\}|\[[^\]]*\]|\$\w+|\boffset\s+-?\w+'
)
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*(?=\s*(\(?))")
# Sample names each metric type exposes, from the name its `# TYPE` line gives.
_SAMPLE_SUFFIXES = {
    "counter": ("", "_created"),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs promtool (Debian's `prometheus` package; scripts/bootstrap installs it)."""
    path = shutil.which("promtool")
    assert path, "promtool is missing: apt-get install prometheus (scripts/bootstrap does)"
    return subprocess.run(
        [path, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects: identifiers that are not functions, keywords, label
    names (in matchers, `by (...)` and the like) or numbers."""
    label_values = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,.*\)\s*", expr)
    if label_values:
        return {label_values.group(1)}
    text = _STRIPPED.sub(" ", _LABEL_LISTS.sub(" ", expr))
    text = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", text)
    return {
        match.group(0)
        for match in _IDENTIFIER.finditer(text)
        if not match.group(1) and match.group(0).lower() not in _KEYWORDS
    }


def exported_names(text: str) -> set[str]:
    """Every sample name a /metrics text (Prometheus text format) may carry: each `# TYPE`
    family with its type's suffixes (so a labelled family with no child yet counts), and
    every sample line's name."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.update(name + suffix for suffix in _SAMPLE_SUFFIXES[kind.strip()])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def rule_exprs() -> Iterator[tuple[str, str]]:
    """(where, expr) of every rule in deploy/prometheus/*.yml."""
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                yield f"{path.name}: {name}", str(rule["expr"])


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    """(where, expr) of every panel target and query variable of the dashboards."""
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in _panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                yield f"{path.name}: {panel.get('title')}", str(target["expr"])
        for variable in board.get("templating", {}).get("list", []):
            if variable.get("type") == "query":
                query = variable["query"]
                text = query["query"] if isinstance(query, dict) else query
                yield f"{path.name}: ${variable['name']}", str(text)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
