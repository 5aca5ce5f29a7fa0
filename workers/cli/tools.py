"""Commands that make or try a deployment without one running: ``init``, ``provision``,
``keygen``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from sl_pipeline.errors import ConfigError
from workers.ops.logs import configure_logging


def cmd_init(args: argparse.Namespace) -> int:
    from workers.tools.localdeploy import deployment_options, init_deployment, start_commands

    result = init_deployment(args.dir, **deployment_options(args))
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    print("start each worker in its own terminal, the server first:")
    for _, command in start_commands(result["files"]):
        print(f"  {command}")
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from workers.tools.provision import provision, write_example

    if args.example:
        print(f"wrote {write_example(args.project)}: edit it, then provision --out DIR")
        return 0
    if args.out is None:
        raise ConfigError("provision needs --out DIR (a new folder for the kits)")
    result = provision(args.project, args.out)
    print(f"wrote one folder per site under {result['dir']}; copy each to its machine.")
    print("on each machine, start its site (the server first):")
    for site, script in result["sites"].items():
        print(f"  {site}: sh {script}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.tools.demo import run_demo

    configure_logging("text", "WARNING", "demo")
    summary = run_demo(args)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``python -m bench`` from the source tree this package was installed from."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "__main__.py").exists():
        raise ConfigError(
            "the benchmark suite lives in the source tree (bench/); run it from a checkout"
        )
    chosen = (("--quick", args.quick), ("--json", args.json), ("--pin", args.pin))
    flags = [flag for flag, on in chosen if on]
    if args.only:
        flags += ["--only", *args.only]
    flags += ["--device", args.device]
    return subprocess.run([sys.executable, "-m", "bench", *flags], cwd=root, check=False).returncode


def cmd_keygen(args: argparse.Namespace) -> int:
    from sl_pipeline.keys import fingerprint, load_public_key, write_keypair

    private, public = write_keypair(args.name, args.out)
    print(f"private key: {private} (mode 0600; keep it secret)")
    print(f"public key:  {public} (fingerprint {fingerprint(load_public_key(public))})")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "init": cmd_init,
    "provision": cmd_provision,
    "demo": cmd_demo,
    "keygen": cmd_keygen,
    "bench": cmd_bench,
}

__all__ = ["COMMANDS"]
