"""Every label the dashboard and the alert rules use is one the workers (or the scrape) put
on that metric: static and fast, beside ``tests/test_deploy.py``'s check of the names.

A label renamed in the code (``client`` to ``peer``, ``worker`` to ``role``) leaves a panel
that returns nothing, a legend that shows blanks, or an alert whose ``on (...)`` join never
matches: PromQL accepts any label name, so only a real Prometheus run would notice
(``tests/test_prometheus_live.py``, which needs the binary). What is checked:

* each selector's matchers (``sl_messages_total{direction="sent"}``) name labels of that
  metric;
* each ``by``/``on``/``ignoring``/``without`` list names labels of a metric in the same
  expression;
* each panel legend's ``{{label}}`` and each alert annotation's ``$labels.label`` is a label
  the expression's result keeps: one of its outermost ``by (...)`` lists where it aggregates.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.test_deploy import DASHBOARD, METRIC_RE, _alert_rules, _panels
from workers.ops.metrics import WorkerMetrics

# Prometheus adds job and instance; deploy/prometheus/prometheus.yml adds role per target.
TARGET_LABELS = frozenset({"job", "instance", "role"})
SELECTOR_RE = re.compile(r"\b((?:sl|process)_[a-z0-9_]+|up)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING_RE = re.compile(r"\b(by|on|ignoring|without|group_left|group_right)\s*\(([^)]*)\)")
LEGEND_RE = re.compile(r"\{\{\s*(\w+)\s*\}\}")
ANNOTATION_RE = re.compile(r"\$labels\.(\w+)")


def exported_labels() -> dict[str, frozenset[str]]:
    """Each sample name a server exports (every labelled series set once), with its labels
    and the scrape's."""
    metrics = WorkerMetrics("server", CollectorRegistry())
    metrics.set_privacy("dpsgd", 1.0, budget=8.0)
    metrics.record_message("sent", "forward", 10)
    metrics.record_rejected("replay")
    metrics.record_handshake("ok")
    metrics.record_run("run-1", 1, True)
    assert metrics.clients is not None
    metrics.clients.joined("client-1")
    metrics.clients.stepped("client-1", 1, 0)
    metrics.clients.done("client-1", 0.5)
    found: dict[str, set[str]] = {"up": set()}
    for family in metrics.registry.collect():
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels | TARGET_LABELS) for name, labels in found.items()}


LABELS = exported_labels()


def label_problems(expr: str, shown: set[str]) -> list[str]:
    """What in ``expr`` (and the labels ``shown`` of its result) no exported metric has."""
    problems = []
    for metric, matchers in SELECTOR_RE.findall(expr):
        have = LABELS.get(metric, frozenset())
        missing = [m for m in MATCHER_RE.findall(matchers) if m not in have]
        problems += [f"{metric} has no label {m!r}" for m in missing]
    metrics = {*METRIC_RE.findall(expr), *(["up"] if re.search(r"\bup\b", expr) else [])}
    problems += [f"no worker exports {m}" for m in sorted(metrics - LABELS.keys())]
    known = frozenset().union(*(LABELS.get(m, frozenset()) for m in metrics))
    kept = set()
    for kind, names in GROUPING_RE.findall(expr):
        listed = {n.strip() for n in names.split(",") if n.strip()}
        problems += [f"{kind} ({n}): no metric of the expression has it" for n in listed - known]
        kept |= listed if kind == "by" else set()
    result = kept or known  # an aggregation keeps its by-labels only
    problems += [f"{{{{{n}}}}} is not a label of the result" for n in sorted(shown - result)]
    return problems


def panel_params() -> list[Any]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        pytest.param(t["expr"], t.get("legendFormat", ""), id=f"{p['id']}{t['refId']}")
        for p in _panels(dashboard)
        for t in p.get("targets", [])
    ]


@pytest.mark.parametrize(("expr", "legend"), panel_params())
def test_dashboard_labels_exist(expr: str, legend: str) -> None:
    problems = label_problems(expr, set(LEGEND_RE.findall(legend)))
    assert not problems, f"{expr!r}: {problems}"


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda r: r["alert"])
def test_alert_labels_exist(rule: dict[str, Any]) -> None:
    text = " ".join(rule["annotations"].values())
    problems = label_problems(rule["expr"], set(ANNOTATION_RE.findall(text)))
    assert not problems, f"{rule['alert']}: {problems}"


@pytest.mark.parametrize(
    ("expr", "shown", "problem"),
    [
        ('sl_messages_total{direction="sent", peer="a"}', set(), "has no label 'peer'"),
        ("sum by (peer) (rate(sl_client_steps[1m]))", set(), "by (peer)"),
        ("sl_client_connected == 0 and on (job, client) sl_finished", set(), None),
        ("sum by (kind) (rate(sl_messages_total[1m]))", {"instance"}, "{{instance}}"),
        ("sl_client_steps", {"client"}, None),
        ("rate(sl_step_rtt_seconds[1m])", set(), "no worker exports sl_step_rtt_seconds"),
    ],
)
def test_label_problems_finds_what_it_should(expr: str, shown: set[str], problem: str) -> None:
    found = label_problems(expr, shown)
    assert (problem is None and not found) or any(problem in p for p in found), found
