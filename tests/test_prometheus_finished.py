"""Monitoring that tells the truth about a run whose clients finish: a real Prometheus
scrapes a server and two short-lived clients, with the repo's dashboard and alert rules.

* A finished client keeps serving ``/metrics`` until one scrape after its finish
  (``[ops] linger_s`` bounds the wait), so its final ``sl_test_accuracy_ratio`` and
  ``sl_finished = 1`` always reach Prometheus, however short the run: the set-up waits for
  those events, never for a fixed time.
* Every dashboard query has a finite value somewhere between the start of the run and a
  moment after both clients finished and exited (a range query at 1 s resolution, as a
  Grafana panel over that range plots it). The server's per-client and per-run series answer
  at that last moment on their own: short-lived clients stay visible through the server.
* No alert is pending or firing on the healthy finished run (the rules' ``for`` cut to 0 s,
  so a rule whose expression holds fires at once): a finished client is not a down client.
* ``SLWorkerDown`` fires for the server once it is killed.

Each panel's values at a moment when both clients trained are written to
``panel_values.txt`` beside the run and printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import wait_listening
from tests.conftest_prometheus import api_get, query, query_until, start_prometheus, stop_prometheus
from tests.test_prometheus_live import (
    CAPTURE_TIMEOUT_S,
    CLIENT_PRIVACY,
    PROMETHEUS_DIR,
    RATE_INTERVAL,
    _prometheus_config,
    _wait_count,
    dashboard_params,
    knock,
    token_beside,
)
from tests.workerproc import WorkerProcess
from workers.tools.demo import stop_process
from workers.tools.localdeploy import init_deployment, to_toml

pytestmark = [pytest.mark.prometheus, pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parent.parent
# digits; client-1 (activation noise only) is fast, so it trains more epochs: both clients
# train together for several scrapes (~6 s of 1 s scrapes at load 8), and each run ends in
# seconds
EPOCHS = {"client-1": 6, "client-2": 4}
LINGER_S = 60.0  # an upper bound only: each client leaves at the first scrape after its finish
WAIT_S = 150.0
TRAINING = 'count(sl_finished{role="client"} == 0)'  # clients up and training


class Finished:
    def __init__(self, url: str, times: tuple[float, float], tmp: Path) -> None:
        self.url, self.tmp = url, tmp
        self.t0, self.t2 = times  # server up before the run, clients finished and gone
        self.t1 = self.mid_run()  # as many clients up and training as ever
        self.server: WorkerProcess | None = None
        self.clients: dict[str, str] = {}  # client name -> its ops address (instance)

    def at(self, expr: str, when: float) -> list[dict[str, Any]]:
        return query(self.url, _grafana(expr), at_s=when)

    def over_the_run(self, expr: str) -> list[list[Any]]:
        """Every ``[time, value]`` of ``expr`` from the start of the run to after its end, as
        a Grafana panel over that time range would plot them (1 s resolution). The steps end
        exactly at ``t2``: the scrape that showed the run finished (and its accuracy) may lie
        in the last second, which steps counted from ``t0`` could end before."""
        start = self.t2 - math.floor(self.t2 - self.t0)
        params = {"query": _grafana(expr), "start": start, "end": self.t2, "step": 1}
        target = f"{self.url}/api/v1/query_range?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(target, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return [v for series in body["data"]["result"] for v in series["values"]]

    def mid_run(self) -> float:
        """The middle moment of those at which Prometheus saw the most clients up and
        training (both, unless one finished before the other got going: start-up times
        vary); the middle, as the edges catch a client starting or finishing."""
        seen = [(int(v), float(t)) for t, v in self.over_the_run(TRAINING)]
        assert seen, "Prometheus never saw a client training"
        most = max(n for n, _ in seen)
        moments = sorted(t for n, t in seen if n == most)
        return moments[len(moments) // 2]


def _grafana(expr: str) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    return expr.replace("$job", "sl-pipeline").replace("$instance", ".*")


def _alerts_without_for(tmp: Path) -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    (tmp / "alerts.yml").write_text(yaml.safe_dump(rules))


def _configure(files: dict[str, Path]) -> None:
    for name, text in CLIENT_PRIVACY.items():
        cfg = tomllib.loads(files[name].read_text())
        cfg["train"]["epochs"] = EPOCHS[name]
        cfg["ops"]["linger_s"] = LINGER_S
        files[name].write_text(to_toml(cfg) + text)


def _start(name: str, path: Path, tmp: Path) -> WorkerProcess:
    """A worker forked from a process that imported torch once (seconds of CPU saved each)."""
    role = name.split("-")[0]
    extra = ["--no-progress"] if role == "client" else []
    argv = [role, "--config", str(path), *extra]
    return WorkerProcess(argv, tmp / f"{name}.out", tmp / f"{name}.log")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    tmp = tmp_path_factory.mktemp("finished")
    out = init_deployment(tmp / "d", dataset="digits", clients=2, epochs=1, ops=True)
    files = {k: Path(v) for k, v in out["files"].items()}
    _configure(files)
    targets = {n: tomllib.loads(p.read_text())["ops"]["listen"] for n, p in files.items()}
    _alerts_without_for(tmp)
    token_beside(tmp, files["server"])
    prometheus, url = start_prometheus(_prometheus_config(targets), tmp)
    procs: dict[str, WorkerProcess] = {}
    try:
        t0 = time.time()
        for name, path in files.items():  # together: clients retry until the server listens
            procs[name] = _start(name, path, tmp)
        wait_listening(files["server"], procs["server"])
        _wait_count(url, "up{role='server'} == 1", 1)  # scraped before the knock: a rate
        bind = tomllib.loads(files["server"].read_text())["server"]["bind"]
        knock(bind, files["server"].parent / "keys", "client-1.key")
        for name in ("client-1", "client-2"):
            assert procs[name].wait(WAIT_S) == 0, (tmp / f"{name}.log").read_text()[-2000:]
        # each left only after a scrape carried its finish (else linger_s ran out: a failure)
        _wait_count(url, "max_over_time(sl_finished{role='client'}[10m]) == 1", 2)
        _wait_count(url, "up{role='client'} == 0", 2)  # both scraped as gone
        _wait_count(url, "sl_client_finished == 1", 2)
        _wait_count(url, "sl_rejected_messages_total{reason='unauthenticated'} > 0", 1)
        result = Finished(url, (t0, time.time()), tmp)
        result.server = procs["server"]
        result.clients = {n: a for n, a in targets.items() if n != "server"}
        yield result
    finally:
        for proc in procs.values():
            stop_process(proc, timeout_s=10)  # type: ignore[arg-type]
        stop_prometheus(prometheus)
        shutil.rmtree(tmp / "prometheus-data", ignore_errors=True)


def test_each_client_final_accuracy_reached_prometheus(finished: Finished) -> None:
    """The client's own last sl_test_accuracy_ratio is the accuracy it finished with (the
    one it told the server), though the run is far shorter than a production scrape."""
    own = finished.at("last_over_time(sl_test_accuracy_ratio{role='client'}[10m])", finished.t2)
    by_instance = {s["metric"]["instance"]: float(s["value"][1]) for s in own}
    told = finished.at("sl_client_test_accuracy_ratio", finished.t2)
    by_client = {s["metric"]["client"]: float(s["value"][1]) for s in told}
    for client, address in finished.clients.items():
        assert by_instance[address] == pytest.approx(by_client[client]), (client, own, told)


@pytest.mark.parametrize("expr", dashboard_params())
def test_every_dashboard_query_has_data_during_or_after_the_run(
    finished: Finished, expr: str
) -> None:
    values = [float(v) for _, v in finished.over_the_run(expr)]
    assert any(math.isfinite(v) for v in values), f"{expr!r}: no data over the run: {values}"


def test_panel_values_during_the_run_are_written_down(finished: Finished) -> None:
    """Each panel's values at T1 (while training), one line per series, in
    ``panel_values.txt`` beside the run: what an operator sees mid-run."""
    lines = []
    for param in dashboard_params():
        (expr,) = param.values
        for series in finished.at(expr, finished.t1):
            labels = ",".join(f"{k}={v}" for k, v in sorted(series["metric"].items()))
            lines.append(f"{param.id}\t{labels}\t{float(series['value'][1]):.4g}")
    (finished.tmp / "panel_values.txt").write_text("\n".join(lines) + "\n")
    training = finished.at(TRAINING, finished.t1)[0]["value"][1]
    print(f"\npanel values at T1 = {finished.t1:.0f} ({training} clients training):")
    print("\n".join(lines))
    assert len({line.split("\t")[0] for line in lines}) >= len(dashboard_params()) // 2


@pytest.mark.parametrize(
    "expr",
    [
        "sl_client_steps",
        "sl_client_finished == 1",
        "sl_client_test_accuracy_ratio",
        "sl_run_steps > 0",
        "timestamp(sl_client_last_step_timestamp_seconds) - sl_client_last_step_timestamp_seconds",
    ],
)
def test_short_lived_clients_stay_visible_through_the_server(finished: Finished, expr: str) -> None:
    result = finished.at(expr, finished.t2)
    assert {s["metric"].get("client", "-") for s in result} >= (
        {"client-1", "client-2"} if "client" in expr else {"-"}
    ), result


def test_the_workers_panel_shows_finished_clients_as_finished(finished: Finished) -> None:
    (param,) = [p for p in dashboard_params() if p.id.startswith("2A-")]
    states = {
        s["metric"]["instance"]: float(s["value"][1])
        for s in finished.at(param.values[0], finished.t2)
    }
    assert {states[a] for a in finished.clients.values()} == {2.0}, states  # finished
    assert sorted(states.values()) == [1.0, 2.0, 2.0], states  # and the server up


def _rules_evaluated_after(url: str, when: float) -> bool:
    groups = api_get(url, "/api/v1/rules")["groups"]
    return all(_unix(g["lastEvaluation"]) > when for g in groups)


def _unix(rfc3339: str) -> float:
    """Prometheus' RFC 3339 time (nanoseconds, ``Z``) as Unix seconds."""
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{frac or 0}")


def test_no_alert_on_a_healthy_finished_run_then_worker_down_for_a_killed_server(
    finished: Finished,
) -> None:
    # every rule evaluated after both clients were scraped as gone (an event, not a sleep)
    deadline = time.monotonic() + CAPTURE_TIMEOUT_S
    while not _rules_evaluated_after(finished.url, finished.t2):
        assert time.monotonic() < deadline, "Prometheus evaluated no rule after the run"
        time.sleep(0.2)
    alerts = api_get(finished.url, "/api/v1/alerts")["alerts"]
    assert alerts == [], f"alerts on a healthy finished run: {alerts}"
    assert finished.server is not None
    finished.server.kill()
    finished.server.wait(10)
    query_until(
        finished.url,
        'ALERTS{alertname="SLWorkerDown", alertstate="firing", role="server"}',
        30,
    )
