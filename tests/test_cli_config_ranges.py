"""A number a worker cannot use, through ``workers.cli.main``: refused when the config is
loaded, one line naming the key and its range, exit status 2; never taken silently as 1 or
as "off", never a traceback from torch minutes later."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workers.cli import main

# Each file names a key file that does not exist: a value the load accepts goes on to fail
# on the key instead, so a test of a value taken without a word fails on the message.
FILES = {
    "server": '[server]\nbind = "tcp://127.0.0.1:1"\nkey = "none.key"\nadmitted = "none"\n',
    "client": '[client]\nserver = "tcp://127.0.0.1:1"\nkey = "none.key"\n'
    'server_key = "none.pub"\n[data]\ndataset = "digits"\n'
    '[model]\nbuiltin = "cnn"\nin_shape = [1, 8, 8]\nclasses = 10\n',
    "relay": '[relay]\nkey = "none.key"\nadmitted = "none"\nupstream_key = "none.pub"\n',
}


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str, setting: str) -> str:
    cfg = tmp_path / f"{role}.toml"
    cfg.write_text(FILES[role])
    assert main([role, "--config", str(cfg), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert setting.split("=")[0] in err, err  # the key, not the missing key file
    return err


@pytest.mark.parametrize(
    ("role", "setting", "named"),
    [
        # each was taken as 1 without a word
        ("server", "checkpoint.keep=0", "at least 1"),
        ("server", "checkpoint.every_steps=0", "at least 1"),
        ("server", "server.max_runs=0", "at least 1"),
        ("server", "server.max_names=0", "at least 1"),
        ("server", "server.reply_cache_mib=0", "at least 1"),
        ("server", "server.hello_burst=0", "at least 1"),
        ("relay", "relay.rejoin_burst=0", "at least 1"),
        ("relay", "relay.max_names=0", "at least 1"),
        # a server that refuses every hello after the first 100, for good
        ("server", "server.hellos_per_s=0", "above 0"),
        ("relay", "relay.rejoins_per_s=0", "above 0"),
        # every peer dropped at once; no reply ever waited for; nothing ever learnt
        ("server", "server.client_timeout_s=0", "above 0"),
        ("relay", "relay.timeout_s=0", "above 0"),
        ("client", "client.connect_timeout_s=0", "above 0"),
        ("client", "train.lr=0", "above 0"),
        # an MLP layer of no units (the second is half as wide)
        ("server", "model.hidden=0", "at least 2"),
        ("server", "model.hidden=1", "at least 2"),
        # torch's "Overflow when unpacking long long", a traceback
        ("server", "model.seed=18446744073709551616", "at most"),
        ("client", "train.seed=100000000000000000", "at most 4294967295"),
        ("server", "limits.max_frames=99999999999999999999", "64-bit"),
        ("client", "client.timeout_s=99999999999999999999999999999999999", "too large"),
        # refused only after the data were read, or not at all
        ("client", "data.shards=0", "at least 1"),
        ("client", "client.max_average_ratio=0.5", "at least 1.0"),
    ],
)
def test_a_number_a_worker_cannot_use_is_named_at_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str, setting: str, named: str
) -> None:
    err = _refused(tmp_path, capsys, role, setting)
    assert named in err, err


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("model.in_shape=[8, 8]", "not enough values"),  # a CNN needs channels, height, width
    ],
)
def test_a_network_too_big_to_build_names_the_model_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, named: str
) -> None:
    assert main(["init", str(tmp_path / "site")]) == 0
    capsys.readouterr()
    argv = ["server", "--config", str(tmp_path / "site" / "server.toml"), "--set", setting]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "model.builtin = 'cnn'" in err and "check those keys" in err and named in err, err


def _with(role: str, dotted: str, value: str) -> str:
    """The role's file with ``dotted = value`` written in it (in its section's table)."""
    section, key = dotted.rsplit(".", 1)
    header = f"[{section}]\n"
    text = re.sub(rf"^{key} = .*\n", "", FILES[role], flags=re.M)
    if header in text:
        return text.replace(header, f"{header}{key} = {value}\n", 1)
    return f"{text}{header}{key} = {value}\n"


@pytest.mark.parametrize(
    ("role", "dotted", "value", "most"),
    [
        # each was taken: the client waited for a server that was not there until killed
        ("client", "client.timeout_s", "1e300", "at most 31536000"),
        ("client", "client.connect_timeout_s", "1e12", "at most 31536000"),
        ("client", "client.retry_for_s", "1e300", "at most 31536000"),
        ("client", "client.wait_for_parties_s", "1e300", "at most 31536000"),
        ("client", "ops.linger_s", "1e300", "at most 31536000"),
        ("server", "server.client_timeout_s", "1e300", "at most 31536000"),
        ("server", "server.stalled_run_s", "1e300", "at most 31536000"),
        ("relay", "relay.timeout_s", "1e300", "at most 31536000"),
        ("relay", "relay.request_log_mib", "1e300", "at most 4194304"),
        ("server", "server.reply_cache_mib", "9223372036854775807", "at most 4194304"),
        ("client", "data.max_memory_mb", "9223372036854775807", "at most 4194304"),
        ("server", "limits.max_message_bytes", "9223372036854775807", "at most 1099511627776"),
        ("server", "limits.max_abs_value", "1e300", "at most 1e+38"),
        ("client", "train.lr", "1e300", "at most 100.0"),
        ("client", "train.epochs", "99999999999", "at most 1000000"),
        ("server", "server.max_clients", "9223372036854775807", "at most 1000000"),
        ("server", "server.hellos_per_s", "1e300", "at most 1000000"),
        ("client", "train.batch_size", "9223372036854775807", "at most 16777216"),
        ("client", "model.in_shape", "[1, 8, 100000000]", "at most 16777216"),
        ("client", "train.pipeline_depth", "1000", "at most 16"),
        # was torch's "can't allocate memory", told as a model too big to build
        ("server", "model.classes", "100000000000000", "at most 16777216"),
    ],
)
def test_a_config_file_holding_a_huge_number_is_refused_naming_key_value_and_range(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    role: str,
    dotted: str,
    value: str,
    most: str,
) -> None:
    cfg = tmp_path / f"{role}.toml"
    cfg.write_text(_with(role, dotted, value))
    assert main([role, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{dotted}" in err and "out of range" in err and most in err, err
    shown = str(float(value)) if "e" in value else value.split(",")[-1].strip(" ]")
    assert shown in err, err  # the value given


def test_a_privacy_setting_of_1e300_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "client.toml"
    cfg.write_text(FILES["client"] + "[privacy.noise]\nsigma = 1.0\nclip = 1e300\n")
    assert main(["client", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "privacy.noise.clip = 1e+300 is out of range" in err, err


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("server", "port", "99999"),  # was a server.toml of tcp://0.0.0.0:99999
        ("server", "ops_port", "70000"),
        ("project", "epochs", "1000000000"),
    ],
)
def test_a_project_of_impossible_numbers_is_refused_by_provision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, key: str, value: str
) -> None:
    project = tmp_path / "project.toml"
    assert main(["provision", "--example", str(project)]) == 0
    text = project.read_text().replace(f"[{table}]\n", f"[{table}]\n{key} = {value}\n", 1)
    project.write_text(
        "\n".join(
            ln
            for ln in text.splitlines()
            if not ln.startswith(f"{key} =") or ln == f"{key} = {value}"
        )
    )
    capsys.readouterr()
    assert main(["provision", str(project), "--out", str(tmp_path / "kits")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{table}.{key} = " in err and "out of range" in err, err
    assert not (tmp_path / "kits").exists()
