"""The deployment files: Grafana dashboard, Prometheus config and alerts, Compose, k8s, systemd."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests.conftest_prometheus import (
    api_get,
    query,
    query_until,
    run_promtool,
    start_prometheus,
    stop_prometheus,
)
from workers.ops.http import OpsServer
from workers.ops.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sl-pipeline.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
METRIC_RE = re.compile(r"\b(?:sl|process)_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# The subset of Grafana's dashboard JSON model (grafana.com/docs/grafana/latest/dashboards/
# build-dashboards/view-dashboard-json-model/) that provisioning and our panels rely on.
GRID_POS = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
TARGET = {
    "type": "object",
    "required": ["refId", "expr"],
    "properties": {"refId": {"type": "string"}, "expr": {"type": "string", "minLength": 1}},
}
PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos"],
    "properties": {
        "id": {"type": "integer"},
        "type": {"enum": ["row", "timeseries", "stat", "gauge", "bargauge", "table", "text"]},
        "title": {"type": "string", "minLength": 1},
        "gridPos": GRID_POS,
        "targets": {"type": "array", "minItems": 1, "items": TARGET},
        "fieldConfig": {
            "type": "object",
            "required": ["defaults"],
            "properties": {"defaults": {"type": "object"}},
        },
    },
    "allOf": [
        {
            "if": {"properties": {"type": {"const": "row"}}},
            "then": {"required": ["collapsed"]},
            "else": {"required": ["targets", "datasource", "fieldConfig"]},
        },
        {
            "if": {"properties": {"type": {"const": "timeseries"}}},
            "then": {
                "properties": {
                    "fieldConfig": {
                        "properties": {
                            "defaults": {
                                "required": ["unit"],
                                "properties": {"unit": {"type": "string", "minLength": 1}},
                            }
                        }
                    }
                }
            },
        },
    ],
}
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "time", "refresh", "templating"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "refresh": {"type": "string"},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "items": {"type": "object", "required": ["name", "type"]},
                }
            },
        },
        "panels": {"type": "array", "minItems": 1, "items": PANEL},
    },
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported_names() -> set[str]:
    """Every sample name a worker exports, histogram series and process metrics included."""
    metrics = WorkerMetrics("server", CollectorRegistry())
    metrics.set_privacy("dpsgd", 1.0, budget=8.0)  # labelled gauges appear once set
    metrics.record_run("run-1", 1, True)
    assert metrics.clients is not None
    metrics.clients.joined("client-1")
    metrics.clients.stepped("client-1", 1, 0)
    metrics.clients.done("client-1", 0.5)
    return {s.name for family in metrics.registry.collect() for s in family.samples}


# --- Grafana ---------------------------------------------------------------------------


def test_dashboard_matches_the_schema(dashboard: dict[str, Any]) -> None:
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)
    for panel in dashboard["panels"]:
        for child in panel.get("panels", []):
            jsonschema.validate(child, PANEL)


def test_dashboard_defaults(dashboard: dict[str, Any]) -> None:
    assert dashboard["refresh"] == "10s"
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    names = {var["name"] for var in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= names
    for expr in _dashboard_exprs(dashboard):
        if expr.startswith(("sl_", "histogram_quantile", "sum", "rate", "time")):
            assert 'job=~"$job"' in expr, expr


def test_dashboard_counts_and_times_what_it_says(dashboard: dict[str, Any]) -> None:
    """The defects an operator found (issue 19), each pinned: a by-kind panel counts each
    message once, at its sender; "All" workers never include Prometheus' own job; a time
    since the last step is measured at the sample (not the scrape's age); a finished client
    shows as finished."""
    panels = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in _panels(dashboard)}
    by_kind = [e for title, exprs in panels.items() if "by kind" in title for e in exprs]
    assert by_kind and all('direction="sent"' in e for e in by_kind), by_kind
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["job"]["definition"].startswith("label_values(sl_build_info")
    since = [e for title, exprs in panels.items() if title.startswith("Time since") for e in exprs]
    assert len(since) == 2 and all("timestamp(" in e and "time()" not in e for e in since)
    assert "sl_finished" in panels["Workers up, down or finished"][0]


def test_dashboard_rows_by_concern(dashboard: dict[str, Any]) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    for wanted in (
        "Training progress",
        "Throughput & latency",
        "Bytes on the wire",
        "Security events",
        "Privacy budget",
    ):
        assert wanted in rows


def test_dashboard_ids_unique_and_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


@pytest.mark.parametrize(
    ("title", "unit"),
    [
        ("Step round-trip time (client)", "s"),
        ("Server compute time", "s"),
        ("Bytes per second by direction", "Bps"),
        ("Test accuracy", "percentunit"),
        ("Budget spent", "percentunit"),
    ],
)
def test_dashboard_units(dashboard: dict[str, Any], title: str, unit: str) -> None:
    panel = next(p for p in _panels(dashboard) if p["title"] == title)
    assert panel["fieldConfig"]["defaults"]["unit"] == unit


def test_rtt_panel_shows_p50_p95_p99(dashboard: dict[str, Any]) -> None:
    panel = next(p for p in _panels(dashboard) if p["title"].startswith("Step round-trip"))
    exprs = " ".join(t["expr"] for t in panel["targets"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in exprs
    assert "sl_step_rtt_seconds_bucket" in exprs


def _check_names(names: set[str], exported: set[str], where: str) -> None:
    assert names, f"no metric names found in {where}"
    for name in names:
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] + "_bucket" in exported:
                base = name[: -len(suffix)] + "_bucket"
        assert base in exported, f"{where} uses {name}, which WorkerMetrics does not export"


def test_dashboard_metrics_exist(dashboard: dict[str, Any], exported_names: set[str]) -> None:
    names = {m for e in _dashboard_exprs(dashboard) for m in METRIC_RE.findall(e)}
    _check_names(names, exported_names, "the dashboard")


def test_alert_metrics_exist(exported_names: set[str]) -> None:
    names = {m for rule in _alert_rules() for m in METRIC_RE.findall(rule["expr"])}
    _check_names(names, exported_names, "alerts.yml")


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    datasource = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert datasource["datasources"][0]["uid"] == "prometheus"
    provider = yaml.safe_load((prov / "dashboards" / "sl-pipeline.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts


# --- Prometheus ------------------------------------------------------------------------


def test_alerts_cover_the_required_conditions() -> None:
    rules = {rule["alert"]: rule for rule in _alert_rules()}
    assert "up" in rules["SLWorkerDown"]["expr"]
    assert "sl_steps_applied_total" in rules["SLTrainingStalled"]["expr"]
    assert "sl_rejected_messages_total" in rules["SLRejectedMessagesSpike"]["expr"]
    assert "sl_privacy_epsilon_budget > 0" in rules["SLPrivacyBudgetNearlySpent"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    tested = {case["alertname"] for case in cases if case["exp_alerts"]}
    assert tested == {rule["alert"] for rule in _alert_rules()}


@pytest.mark.prometheus
@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "deploy/prometheus/alerts.yml"),
        ("test", "rules", "deploy/prometheus/alerts_test.yml"),
    ],
    ids=["check-rules", "test-rules"],
)
def test_promtool(args: tuple[str, ...]) -> None:
    done = run_promtool(*args, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.prometheus
def test_promtool_checks_the_config_with_the_metrics_token_in_place(tmp_path: Path) -> None:
    # Prepare: the shipped config, and the token file it names where Compose mounts it
    shutil.copytree(DEPLOY / "prometheus", tmp_path / "prometheus")
    (tmp_path / "prometheus" / "secrets" / "metrics.token").write_text("t" * 43 + "\n")
    # Execute
    done = run_promtool("check", "config", "prometheus/prometheus.yml", cwd=tmp_path)
    # Assert
    assert done.returncode == 0, done.stdout + done.stderr
    assert "secrets/metrics.token" in (DEPLOY / "prometheus" / "prometheus.yml").read_text()


def _substitute(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*")


@pytest.mark.prometheus
def test_dashboard_queries_are_valid_promql(tmp_path: Path, dashboard: dict[str, Any]) -> None:
    process, url = start_prometheus("global: {scrape_interval: 15s}\n", tmp_path)
    try:
        for expr in _dashboard_exprs(dashboard):
            if not expr.startswith("label_values("):  # a Grafana function, not PromQL
                query(url, _substitute(expr))
        with pytest.raises(AssertionError, match="parse error"):
            query(url, "rate(sl_messages_total[")
    finally:
        stop_prometheus(process)


@pytest.mark.prometheus
@pytest.mark.timeout(90)
async def test_real_prometheus_scrapes_a_worker_and_loads_the_rules(tmp_path: Path) -> None:
    # Prepare: a worker's ops endpoint in this loop, Prometheus scraping it every second
    metrics = WorkerMetrics("client", CollectorRegistry(), version="9.9.9")
    metrics.record_message("sent", "forward", 4096)
    ops = OpsServer(metrics, dict, lambda: True, "127.0.0.1", 0)
    await asyncio.wait_for(ops.start(), 5)
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    config = (
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [alerts.yml]\n"
        "scrape_configs:\n"
        "  - job_name: sl-pipeline\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{ops.port}'], labels: {{role: client}}}}]\n"
    )
    process, url = await asyncio.to_thread(start_prometheus, config, tmp_path)
    try:
        # Execute: wait for a successful scrape (blocking calls run in a thread)
        expr = 'sl_message_bytes_total{job="sl-pipeline", direction="sent", kind="forward"}'
        result = await asyncio.to_thread(query_until, url, expr, 30.0)
        up = await asyncio.to_thread(query, url, 'up{job="sl-pipeline"}')
        info = await asyncio.to_thread(query, url, "sl_build_info")
        rules = await asyncio.to_thread(api_get, url, "/api/v1/rules")
    finally:
        await asyncio.to_thread(stop_prometheus, process)
        await ops.stop()
    # Assert
    assert float(result[0]["value"][1]) == 4096
    assert up[0]["value"][1] == "1"
    assert info[0]["metric"]["version"] == "9.9.9"
    loaded = [r for g in rules["groups"] for r in g["rules"]]
    assert len(loaded) == len(_alert_rules())
    assert all(r["health"] in ("ok", "unknown") for r in loaded), loaded


# --- Compose, Docker, k8s, systemd -----------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_files_parse(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs


def test_compose_services() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"server", "prometheus", "grafana"} <= set(services)
    clients = [s for s in services.values() if s.get("command", [None])[0] == "client"]
    assert len(clients) == 2
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


TOMLS = sorted((DEPLOY / "compose").glob("*.toml"))


@pytest.mark.parametrize("path", TOMLS, ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    data = tomllib.loads(path.read_text())
    assert data["ops"]["listen"] == "0.0.0.0:9100"
    config = pytest.importorskip("sl_pipeline.config")
    cls = config.ServerConfig if "server" in data else config.ClientConfig
    config.from_mapping(cls, data)  # the worker's own loader: catches schema drift


def test_every_compose_worker_asks_for_the_token_keys_init_gives_it() -> None:
    """Every worker's /metrics asks for [ops] metrics_token, and keys-init writes that file
    into the volume the worker mounts at /keys (one token: one Prometheus scrapes them)."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    init = compose["services"]["keys-init"]
    written = "".join(init["command"])
    loop = re.search(
        r'for name in ([^;]+); do\s+\(umask 077; cp (\S+) "/out/\$\$name/metrics', written
    )
    assert loop is not None and loop.group(2) == "/out/server/metrics.token", written
    copied = {f"/out/{name}" for name in loop.group(1).split()}
    out_of = {v.split(":")[0]: v.split(":")[1] for v in init["volumes"]}  # volume -> /out/...
    workers = {n: s for n, s in compose["services"].items() if "--config" in s.get("command", [])}
    assert len(workers) == 3
    for name, service in workers.items():
        config = next(v.split(":")[0] for v in service["volumes"] if ":/etc/sl-pipeline/" in v)
        ops = tomllib.loads((DEPLOY / config).read_text())["ops"]
        assert ops["metrics_token"] == "/keys/metrics.token", name
        keys = next(v.split(":")[0] for v in service["volumes"] if ":/keys" in v)
        folder = out_of[keys]
        assert folder in copied or f"> {folder}/metrics.token" in written, (name, folder)


def test_every_k8s_worker_asks_for_the_token_its_secret_holds() -> None:
    docs = _k8s_docs()
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    for name, text in config["data"].items():
        assert tomllib.loads(text)["ops"]["metrics_token"] == "/keys/metrics.token", name
    secrets = {d["metadata"]["name"]: d["stringData"] for d in docs if d["kind"] == "Secret"}
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        pod = workload["spec"]["template"]["spec"]
        (secret,) = [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v]
        assert "metrics.token" in secrets[secret], secret
        script = "".join(arg for c in pod["initContainers"] for arg in c["args"])
        assert "install -m 0600 /secret/metrics.token /keys/metrics.token" in script


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert f"torch=={pin.group(1)}" in text
    user = re.search(r"^USER (\S+)", text, re.MULTILINE)
    assert user is not None and not user.group(1).startswith(("root", "0"))
    assert re.search(r"^HEALTHCHECK .*\n?.*sl-pipeline\", \"health\", \"--config\"", text, re.M)
    assert 'ENTRYPOINT ["sl-pipeline"]' in text


def _k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_k8s_workloads_are_hardened_and_probed() -> None:
    docs = _k8s_docs()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs if "metadata" in d}
    assert ("Service", "sl-pipeline-server") in kinds
    assert ("ConfigMap", "sl-pipeline-config") in kinds
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 2
    for doc in docs:
        assert "namespace" not in doc.get("metadata", {}), "manifests must be namespace-agnostic"
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert "memory" in container["resources"]["limits"]
        for container in pod["containers"]:
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_k8s_config_templates_are_valid_toml() -> None:
    config = next(d for d in _k8s_docs() if d["kind"] == "ConfigMap")
    for name, text in config["data"].items():
        assert tomllib.loads(text)["ops"]["listen"], name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders() -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


SERVICES = sorted((DEPLOY / "systemd").glob("*.service"))


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_systemd_units_are_sandboxed(path: Path) -> None:
    text = path.read_text()
    for line in text.splitlines():
        assert not re.match(r"^\w+=.*\s#", line), f"systemd has no trailing comments: {line}"
    for setting in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=",
        "Restart=on-failure",
        "ReadWritePaths=",
    ):
        assert setting in text, setting
    assert not re.search(r"^MemoryDenyWriteExecute=yes", text, re.MULTILINE)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_systemd_units_verify(path: Path, tmp_path: Path) -> None:
    # systemd-analyze wants an instance name for templates and an existing ExecStart binary.
    unit = tmp_path / path.name.replace("@.", "@1.")
    unit.write_text(re.sub(r"/opt/sl-pipeline/bin/sl-pipeline", "/bin/true", path.read_text()))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
