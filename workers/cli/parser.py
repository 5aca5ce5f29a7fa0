"""The command line's grammar: every verb and its flags (``sl-pipeline --help``)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, NoReturn

from sl_pipeline.config import MAX_PIPELINE_DEPTH, TOPOLOGIES
from workers.cli import privacy as privacy_cli


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="the worker's TOML file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, no authentication (warns on every start)",
    )
    p.add_argument("--log-format", choices=["text", "json"], default=None)
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")


class _Parser(argparse.ArgumentParser):
    """A usage error is one line naming the problem and where the flags are listed, exit 2
    (README: every failure is one line), not argparse's usage block above it. Every verb's
    parser is one too: ``add_subparsers`` builds them with the parent's class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sl-pipeline", description="Split learning over encrypted ZeroMQ")
    sub = parser.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("server", help="run the server worker"))
    _client_parser(sub)
    _deployment_parsers(sub)
    relay = sub.add_parser("relay", help="run a relay (a middle segment of a multi-hop chain)")
    _config_args(relay)
    _predict_parser(sub)
    keygen = sub.add_parser("keygen", help="write an X25519 key pair NAME.key / NAME.pub")
    keygen.add_argument("name")
    keygen.add_argument("--out", type=Path, default=Path("."))
    privacy_cli.add_parsers(sub)
    bench = sub.add_parser("bench", help="the benchmark suite (from a source checkout)")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--only", nargs="+", metavar="SECTION", help="run only these sections")
    bench.add_argument(
        "--pin", action="store_true", help="overhead: also each party on its own core"
    )
    bench.add_argument(
        "--device", default="cpu", help="overhead: where both sides train (cpu, cuda, cuda:N)"
    )
    _ops_parsers(sub)
    return parser


def _client_parser(sub: Any) -> None:
    client = sub.add_parser("client", help="run a client worker (trains, then exits)")
    _config_args(client)
    client.add_argument("--epochs", type=int, default=None)
    client.add_argument("--no-progress", action="store_true")
    client.add_argument("--run", default=None, help="the training run to join (client.run)")
    client.add_argument(
        "--takeover",
        action="store_true",
        help="replace a live session under this client's name (client.takeover)",
    )


def _deployment_parsers(sub: Any) -> None:
    init = sub.add_parser("init", help="write a ready-to-run local deployment")
    init.add_argument("dir", type=Path)
    _deployment_args(init)
    provision = sub.add_parser(
        "provision", help="write one start kit per site (own key, peers' public keys, config)"
    )
    provision.add_argument("project", type=Path, help="the project's TOML file")
    provision.add_argument("--out", type=Path, default=None, help="a new folder for the kits")
    provision.add_argument(
        "--example", action="store_true", help="write an example project file and stop"
    )
    demo = sub.add_parser("demo", help="train across real processes on built-in data")
    _deployment_args(demo)
    demo.add_argument("--json", action="store_true")
    demo.add_argument(
        "--baseline",
        action="store_true",
        help="also train the same architecture centrally and report its accuracy",
    )
    demo.add_argument("--dir", type=Path, default=None, help="keep the deployment here")


def _predict_parser(sub: Any) -> None:
    predict = sub.add_parser(
        "predict", help="predictions for an input file; only activations leave"
    )
    predict.add_argument("--config", required=True, type=Path, help="the client's TOML file")
    predict.add_argument(
        "--input",
        required=True,
        type=Path,
        help=".csv, .parquet or .npz features, or a folder of images",
    )
    predict.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    predict.add_argument("--insecure", action="store_true")
    predict.add_argument("--json", action="store_true")


def _ops_parsers(sub: Any) -> None:
    runs = sub.add_parser("runs", help="the server's training runs (needs its admin token)")
    runs.add_argument("action", choices=["list", "status", "stop", "download"])
    runs.add_argument("run", nargs="?", default=None, help="the run id (all but list)")
    runs.add_argument(
        "--config", required=True, type=Path, help="the server's TOML (its [ops] section)"
    )
    runs.add_argument("--out", type=Path, default=None, help="download: where to write it")
    runs.add_argument("--json", action="store_true")
    health = sub.add_parser("health", help="exit 0 if the worker's /readyz answers 200")
    health.add_argument("--config", required=True, type=Path)
    health.add_argument("--timeout", type=_seconds, default=3.0, help="seconds to wait")


def _seconds(text: str) -> float:
    """A wait in seconds: a positive finite number (a socket refuses -1 and NaN)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _pipeline_depth(text: str) -> int:
    """``--pipeline-depth``: a number of steps, or ``auto`` (stored as 0)."""
    if text == "auto":
        return 0
    try:
        depth = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of steps or 'auto'") from None
    if not 1 <= depth <= MAX_PIPELINE_DEPTH:
        raise argparse.ArgumentTypeError(
            f"{depth} must be between 1 and {MAX_PIPELINE_DEPTH} (or 'auto')"
        )
    return depth


def _deployment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", default="vanilla", choices=list(TOPOLOGIES))
    p.add_argument("--dataset", default="digits", choices=["digits", "breast_cancer"])
    p.add_argument(
        "--clients",
        type=int,
        default=None,
        help="number of clients (default: what the topology needs, 1 or 2)",
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--ops", action="store_true", help="give every worker an ops HTTP port")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--label-client",
        action="store_true",
        help="vertical: client-1 holds the labels and the loss instead of the server",
    )
    p.add_argument(
        "--pipeline-depth",
        type=_pipeline_depth,
        default=1,
        metavar="N|auto",
        help="steps in flight per client (>1 overlaps client and server compute; auto: "
        "chosen from the measured round trip and step time)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        metavar="cpu|cuda[:N]|auto",
        help="where every party trains (train.device; auto: a CUDA GPU where one is visible)",
    )
    p.add_argument(
        "--wire-dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16", "int8", "int4", "int2", "int2-ef"],
        help="compress activations and gradients on the wire",
    )
