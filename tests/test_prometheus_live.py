"""A real Prometheus scrapes real workers while they train: every dashboard and alert query
must return data.

Set-up (one run for the module): ``init_deployment(topology="multihop", clients=2,
ops=True)`` gives a server, a relay and two clients, started as real processes. client-1
runs activation noise (``privacy.noise.sigma``/``clip``) and NoPeek; client-2 runs DP-SGD
with a ``target_epsilon``, so both privacy mechanisms and a budget exist. Prometheus
(the Debian package, installed when missing) runs with the repo's
``deploy/prometheus/prometheus.yml`` (intervals cut to 1 s, the static targets replaced by
the live ops ports) and the repo's ``alerts.yml``. While the clients train, an unadmitted
key knocks on the server (refused at the connection gate), and an admitted key's connection
sends a frame without a session, so that the handshake and rejection panels have events.
Then an evaluation time ``T`` is taken with every worker up and training; every query is
evaluated at ``T``.

What is asserted:

* Dashboard: every target's ``expr`` of every panel, with Grafana's variables substituted
  as Grafana would with every value ticked: ``$job``/``$instance`` become the regex
  alternation of the values that the dashboard's own ``label_values(...)`` variable queries
  return, and ``$__rate_interval`` becomes 4 x the scrape interval (Grafana's floor for it).
  The expression is evaluated as written (``> 0`` filters included) and must return a
  non-empty result with at least one finite sample (a NaN-only result, such as a gauge the
  workers never set, or a quantile over empty buckets, is no data on a panel).
* Alert rules: a rule's expression is a comparison that is legitimately empty while the
  alert is not firing. So each rule is evaluated with its comparisons stripped: in each
  operand of a top-level ``and``/``or``/``unless``, a top-level comparison (without
  ``bool``) is replaced by its left-hand side (``up{...} == 0`` -> ``up{...}``; ``A == 0 and
  on (job, instance) B > 0`` -> ``A and on (job, instance) B``). Comparisons nested in
  parentheses, e.g. ``(sl_privacy_epsilon_budget > 0)``, are filters and stay. The
  stripped expression must return a finite sample: the metrics, labels and joins the rule
  depends on exist on live workers. Prometheus must also report every rule healthy.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq

from sl_pipeline.gate import USERNAME, connect_token
from sl_pipeline.keys import generate_keypair, load_keypair, load_public_key
from tests.conftest_prometheus import api_get, query, query_until, start_prometheus, stop_prometheus
from tests.workerproc import WorkerProcess
from workers.tools.demo import stop_process
from workers.tools.localdeploy import init_deployment

pytestmark = [pytest.mark.prometheus, pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD_JSON = json.loads((ROOT / "deploy/grafana/dashboards/sl-pipeline.json").read_text())
SCRAPE_S = 1
RATE_INTERVAL = f"{4 * SCRAPE_S}s"
EPOCHS = 40  # about 30 s of multihop training on 2 cores; the test stops it once T is taken
CAPTURE_TIMEOUT_S = 120.0
CLIENT_PRIVACY = {
    "client-1": "\n[privacy.noise]\nsigma = 1.0\nclip = 1.0\n\n[privacy.nopeek]\nalpha = 0.1\n",
    "client-2": "\n[privacy.dpsgd]\ntarget_epsilon = 8.0\nmax_grad_norm = 1.0\n",
}


# ---- PromQL helpers ----------------------------------------------------------------------
def _mask(expr: str) -> str:
    """``expr`` with everything inside brackets or string literals replaced by ``#``."""
    out, depth, quote = [], 0, ""
    for i, ch in enumerate(expr):
        if quote:
            quote = "" if ch == quote and expr[i - 1] != "\\" else quote
            out.append("#")
        elif ch in "\"'`":
            quote = ch
            out.append("#")
        elif ch in "([{":
            out.append(ch if depth == 0 else "#")
            depth += 1
        elif ch in ")]}":
            depth -= 1
            out.append(ch if depth == 0 else "#")
        else:
            out.append(ch if depth == 0 else "#")
    return "".join(out)


_SET_OP = re.compile(r"\s(?:and|or|unless)\b(?:\s*(?:on|ignoring)\s*\(#*\))?\s")
_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def strip_comparisons(expr: str) -> str:
    """Each top-level set-operator operand of ``expr`` cut at its top-level comparison."""
    masked, parts, start = _mask(expr), [], 0
    for match in [*_SET_OP.finditer(masked), None]:
        end = match.start() if match else len(expr)
        operand, masked_operand = expr[start:end], masked[start:end]
        cmp = _COMPARISON.search(masked_operand)
        if cmp and not re.match(r"\s*bool\b", masked_operand[cmp.end() :]):
            operand = operand[: cmp.start()]
        parts.append(operand.strip())
        if match:
            parts.append(" ".join(expr[match.start() : match.end()].split()))
            start = match.end()
    return " ".join(parts)


def _walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk(panel.get("panels", []))


def dashboard_params() -> list[Any]:
    params = []
    for panel in _walk(DASHBOARD_JSON["panels"]):
        for target in panel.get("targets", []):
            params.append(
                pytest.param(target["expr"], id=f"{panel['id']}{target['refId']}-{panel['title']}")
            )
    return params


def alert_params() -> list[Any]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [
        pytest.param(rule["expr"], id=rule["alert"])
        for group in groups
        for rule in group["rules"]
        if "alert" in rule
    ]


def variables() -> list[tuple[str, str]]:
    """(name, label_values query) of the dashboard's query variables, in order."""
    return [
        (v["name"], v["definition"])
        for v in DASHBOARD_JSON["templating"]["list"]
        if v["type"] == "query"
    ]


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


# ---- the live run ------------------------------------------------------------------------
class Live:
    def __init__(self, url: str, at_s: float, targets: dict[str, str]) -> None:
        self.url, self.at_s, self.targets = url, at_s, targets
        self.values: dict[str, str] = {}  # Grafana variable -> regex with every value
        self.found: dict[str, list[str]] = {}  # Grafana variable -> its values

    def query(self, expr: str) -> list[dict[str, Any]]:
        return query(self.url, expr, at_s=self.at_s)

    def substitute(self, expr: str) -> str:
        expr = expr.replace("$__rate_interval", RATE_INTERVAL)
        for name, alternation in self.values.items():
            expr = expr.replace(f"${name}", alternation)
        return expr


def _prometheus_config(targets: dict[str, str]) -> str:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(
        scrape_interval=f"{SCRAPE_S}s",
        scrape_timeout=f"{SCRAPE_S}s",
        evaluation_interval=f"{SCRAPE_S}s",
    )
    job = next(j for j in config["scrape_configs"] if j["job_name"].startswith("sl-pipeline"))
    job["static_configs"] = [
        {"targets": [address], "labels": {"role": name.split("-")[0]}}
        for name, address in targets.items()
    ]
    config["scrape_configs"] = [job]
    return yaml.safe_dump(config)


def token_beside(tmp: Path, server: Path) -> None:
    """The deployment's metrics token (``init --ops`` gives every worker the server's) where
    the shipped config's ``credentials_file`` looks for it (``secrets/``, beside the config),
    as docs/deploy.md tells an operator to put it: it scrapes the relay and clients too."""
    (tmp / "secrets").mkdir(exist_ok=True)
    shutil.copy(server.parent / "keys" / "metrics.token", tmp / "secrets" / "metrics.token")


def knock(endpoint: str, keys: Path, admitted: str = "relay-1.key") -> None:
    """An unadmitted key, refused at the connection gate; then an admitted key's connection
    that sends a frame without a session, refused with ``unauthenticated``."""
    server_pub = load_public_key(keys / "server.pub")
    ctx = zmq.Context()
    try:
        for static, expect_reply in (
            (generate_keypair(), False),
            (load_keypair(keys / admitted), True),
        ):
            sock = ctx.socket(zmq.DEALER)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            sock.plain_username = USERNAME
            sock.plain_password = connect_token(static, server_pub, time.time())
            sock.connect(endpoint)
            sock.send_multipart([b"no session"])
            answered = (sock if expect_reply else monitor).poll(10_000)
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            assert answered, "the server neither answered nor refused the connection"
    finally:
        ctx.destroy(linger=0)  # closes the sockets too, even after a failed assert


def _wait_count(url: str, expr: str, count: int) -> None:
    query_until(
        url,
        f"count({expr})",
        CAPTURE_TIMEOUT_S,
        lambda r: bool(r) and float(r[0]["value"][1]) >= count,
    )


# What must hold at the evaluation time: every worker's last scrape answered, and the knock's
# rise inside the 4-scrape rate window of both counters
AT_T = (
    "count(up{job='sl-pipeline'} == 1) == bool count(up{job='sl-pipeline'})",
    f"rate(sl_handshakes_total{{result='not_admitted'}}[{RATE_INTERVAL}]) > bool 0",
    f"rate(sl_rejected_messages_total{{reason='unauthenticated'}}[{RATE_INTERVAL}]) > bool 0",
)
KNOCKS = 5


def _holds_at(url: str, at_s: float) -> bool:
    return all(any(float(r["value"][1]) == 1 for r in query(url, expr, at_s=at_s)) for expr in AT_T)


def _capture(url: str, files: dict[str, Path], procs: dict[str, WorkerProcess]) -> float:
    _wait_count(url, "up{job='sl-pipeline'} == 1", len(files))
    _wait_count(url, "sl_test_accuracy_ratio >= 0", 2)  # NaN compares false
    _wait_count(url, "sl_privacy_epsilon", 2)
    bind = tomllib.loads(files["server"].read_text())["server"]["bind"]
    for _ in range(KNOCKS):
        knock(bind, files["server"].parent / "keys")
        # Both counters rose during the knock. A rate over 4 scrapes shows the rise only while
        # its window holds a scrape from before the knock and one after: so evaluate 1.2
        # scrapes after the knock, not "now", which under load can be seconds later
        at_s = time.time() + 1.2 * SCRAPE_S
        _wait_count(url, "sl_handshakes_total{result='not_admitted'} > 0", 1)
        _wait_count(url, "sl_rejected_messages_total{reason='unauthenticated'} > 0", 1)
        while time.time() < at_s + SCRAPE_S:  # bounded: at most 2.2 scrapes
            time.sleep(0.1)
        ended = [name for name, proc in procs.items() if proc.poll() is not None]
        assert not ended, f"{ended} stopped before the evaluation time; raise EPOCHS"
        # Under load a scrape can miss its 1 s timeout (up 0 at T, or no sample after the
        # knock in the window): then knock again and take the next T
        if _holds_at(url, at_s):
            return at_s
    raise AssertionError(f"no evaluation time in {KNOCKS} knocks had {AT_T} all true")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("live")
    files = {
        k: Path(v)
        for k, v in init_deployment(
            tmp / "deploy", topology="multihop", clients=2, epochs=EPOCHS, ops=True
        )["files"].items()
    }
    for name, text in CLIENT_PRIVACY.items():
        files[name].write_text(files[name].read_text() + text)
    targets = {
        name: tomllib.loads(path.read_text())["ops"]["listen"] for name, path in files.items()
    }
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp / "alerts.yml")
    token_beside(tmp, files["server"])
    prometheus, url = start_prometheus(_prometheus_config(targets), tmp)
    procs: dict[str, WorkerProcess] = {}
    try:
        for name, path in files.items():  # forked from a process that imported torch once
            role = name.split("-")[0]
            extra = ["--no-progress"] if role == "client" else []
            argv = [role, "--config", str(path), *extra]
            procs[name] = WorkerProcess(argv, tmp / f"{name}.out", tmp / f"{name}.log")
        at_s = _capture(url, files, procs)
        # Newest first: each stops at once while its upstream still answers (a relay whose
        # server went first waits out its rejoin of the server before it stops)
        for proc in reversed(procs.values()):
            stop_process(proc, timeout_s=10)  # type: ignore[arg-type]
        result = Live(url, at_s, targets)
        for name, definition in variables():
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", definition)
            assert match, f"unexpected variable query {definition!r}"
            selector, label = match.groups()
            found = sorted({s["metric"][label] for s in result.query(result.substitute(selector))})
            escaped = "|".join(re.escape(v) for v in found).replace("\\", "\\\\")
            result.values[name], result.found[name] = f"({escaped})", found
        yield result
    finally:
        for proc in reversed(procs.values()):
            stop_process(proc, timeout_s=10)  # type: ignore[arg-type]
        stop_prometheus(prometheus)


# ---- tests -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "stripped"),
    [
        ('up{job=~"a.*"} == 0', 'up{job=~"a.*"}'),
        (
            "increase(x[15m]) == 0\nand on (job, instance)\ny > 0",
            "increase(x[15m]) and on (job, instance) y",
        ),
        ("sum by (a) (rate(x[5m])) > 1", "sum by (a) (rate(x[5m]))"),
        ("e / (b > 0) > 0.9", "e / (b > 0)"),
        ('x{l="a>b"} > bool 1', 'x{l="a>b"} > bool 1'),
    ],
)
def test_strip_comparisons(expr: str, stripped: str) -> None:
    assert strip_comparisons(expr) == stripped


def test_dashboard_variables_list_every_worker(live: Live) -> None:
    assert live.found["job"] == ["sl-pipeline"]
    assert live.found["instance"] == sorted(live.targets.values())
    up = live.query("up{job='sl-pipeline'} == 1")
    assert len(up) == len(live.targets)


# Figures that exist only once a client finished (NaN while the run trains, as "no value yet"
# is everywhere): tests/test_prometheus_finished.py checks them after a run.
AFTER_A_RUN = ("sl_run_test_accuracy_ratio",)


@pytest.mark.parametrize("expr", dashboard_params())
def test_dashboard_query_returns_data(live: Live, expr: str) -> None:
    promql = live.substitute(expr)
    result = live.query(promql)
    if expr.startswith(AFTER_A_RUN):
        assert result, f"{promql!r}: no series at all while training"
        return
    assert _finite(result), f"{promql!r} returned no finite sample: {result}"


@pytest.mark.parametrize("expr", alert_params())
def test_alert_expression_returns_data(live: Live, expr: str) -> None:
    promql = strip_comparisons(expr)
    result = live.query(promql)
    assert _finite(result), f"{promql!r} (stripped from {expr!r}) returned no data: {result}"


def test_alert_rules_are_healthy(live: Live) -> None:
    rules = [r for g in api_get(live.url, "/api/v1/rules")["groups"] for r in g["rules"]]
    assert len(rules) == len(alert_params())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_server_counts_its_connected_peers(live: Live) -> None:
    result = live.query("sl_peers_connected{role='server'} >= 1")
    assert result, "the dashboard's Peers panel shows 0 connected peers on a busy server"


def test_training_stalled_alert_can_fire_for_every_worker(live: Live) -> None:
    result = live.query("sl_peers_authenticated{job='sl-pipeline'} > 0")
    assert len(result) == len(live.targets), f"only {result} report an authenticated peer"
