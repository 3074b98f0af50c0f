"""The `mlcls` command: the main job through Prefect, bundle creation, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import polars as pl
import pytest
import torch
import torchvision

from mlcls.cli.main import main
from tests.helpers.images import write_images

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The installed command's code in a subprocess, in Prefect's local mode with its own PREFECT_HOME."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "mlcls.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_tag_runs_the_prefect_flow_in_local_mode_and_resumes(tmp_path, tiny_bundle):
    write_images(tmp_path / "src", 9)
    (tmp_path / "src" / "broken.jpg").write_bytes(b"nope")
    first = run_cli("tag", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--model", tiny_bundle,
                    "--shard-size", "4", "--batch-size", "3", home=tmp_path / "prefect")
    assert first.returncode == 0, first.stderr
    assert "tagged 9 of 10 new images" in first.stdout and "1 errors" in first.stdout
    assert "decode 1" in first.stdout
    wall = r"wall \d+\.\d s: \d+\.\d s start-up \(imports, checks, Prefect\), \d+\.\d s planning and tagging"
    assert re.search(wall, first.stdout)
    df = pl.read_delta(str(tmp_path / "out"))
    assert df.height == 10 and df["model"].str.starts_with("tiny@").all()
    second = run_cli("tag", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--model", tiny_bundle,
                     home=tmp_path / "prefect")
    assert second.returncode == 0, second.stderr
    assert "0 new images: all 10 listed images are already tagged" in second.stdout


def test_tag_without_prefect_and_with_the_demo_bundle(tmp_path, capsys):
    write_images(tmp_path / "src", 5)
    assert main(["tag", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-prefect", "-q"]) == 0
    assert "tagged 5 of 5 new images" in capsys.readouterr().out
    df = pl.read_delta(str(tmp_path / "out"))
    assert df.height == 5 and df["model"][0].startswith("shapes-demo@")


@pytest.mark.parametrize("args, message", [
    (["tag", "{tmp}/missing", "--out", "{tmp}/out"], "source not found: {tmp}/missing"),
    (["tag", "{tmp}/src", "--out", "{tmp}/out", "--model", "{tmp}/src"], "no bundle.json in {tmp}/src"),
    (["tag", "{tmp}/src", "--out", "{tmp}/src/img0000.jpg"], "is a file; give a folder"),
    (["tag", "{tmp}/src", "--out", "{tmp}/out", "--device", "tpu"], "--device 'tpu': use auto, cpu"),
    (["tag", "{tmp}/src", "--out", "{tmp}/out", "--batch-size", "0"], "--batch-size must be a positive"),
    (["tag", "{tmp}/src", "--out", "{tmp}/out", "--probs", "top-k:x"], "--probs 'top-k:x'"),
    (["bundle", "create", "--arch", "resnet5O", "--classes", "a,b", "--random-init", "--out", "{tmp}/b"],
     "unknown architecture 'resnet5O' (did you mean resnet50"),
    (["bundle", "show", "{tmp}/nowhere"], "no bundle.json in {tmp}/nowhere"),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, args, message):
    write_images(tmp_path / "src", 1)
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("mlcls: error:") and message.format(tmp=tmp_path) in err
    assert len(err.splitlines()) == 1 or len(err) > 100  # one line (rich may wrap a very long one)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


def test_unreadable_bundle_is_refused_before_any_work(tmp_path, capsys, tiny_bundle):
    write_images(tmp_path / "src", 2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bundle.json").write_text(json.dumps({"format": "mlcls-bundle", "name": "x"}))
    assert main(["tag", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--model", str(bad)]) == 2
    assert "lacks the field 'arch'" in capsys.readouterr().err


def test_bundle_create_from_a_state_dict_then_tag_with_it(tmp_path, capsys):
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", num_classes=3)
    torch.save(model.state_dict(), tmp_path / "mine.pth")
    (tmp_path / "classes.txt").write_text("cat\ndog\nboat\n")
    code = main(["bundle", "create", "--arch", "resnet18", "--weights", str(tmp_path / "mine.pth"),
                 "--classes", str(tmp_path / "classes.txt"), "--out", str(tmp_path / "mine"), "--size", "96",
                 "--threshold", "0.4"])
    assert code == 0, capsys.readouterr().err
    assert "wrote bundle" in capsys.readouterr().out
    assert main(["bundle", "show", str(tmp_path / "mine")]) == 0
    shown = capsys.readouterr().out
    assert "resnet18" in shown and "96x96" in shown and "0.400" in shown
    write_images(tmp_path / "src", 3)
    assert main(["tag", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "mine"),
                 "--no-prefect", "-q"]) == 0
    df = pl.read_delta(str(tmp_path / "out"))
    assert df.height == 3 and df["probs"].struct.fields == ["cat", "dog", "boat"]
    # a checkpoint for another class count is refused, naming the mismatch
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    assert main(["bundle", "create", "--arch", "resnet18", "--weights", str(tmp_path / "mine.pth"),
                 "--classes", str(tmp_path / "four.txt"), "--out", str(tmp_path / "bad")]) == 2
    assert "fc.weight is (3, 512) in the weights but (4, 512) in the model" in capsys.readouterr().err


def test_tag_asks_prefect_for_the_library_loggers_and_keeps_the_users_own(monkeypatch):
    from mlcls.cli.tag import _add_extra_logger

    monkeypatch.delenv("PREFECT_LOGGING_EXTRA_LOGGERS", raising=False)
    _add_extra_logger("mlcls")
    assert os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] == "mlcls"
    monkeypatch.setenv("PREFECT_LOGGING_EXTRA_LOGGERS", "dask, scipy")
    _add_extra_logger("mlcls")
    _add_extra_logger("mlcls")
    assert os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] == "dask,scipy,mlcls"


def test_local_server_is_not_started_when_an_api_url_is_set(monkeypatch, tmp_path):
    from mlcls.cli.local_server import LocalServer, profile_api_url

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    server = LocalServer().start()
    assert server.process is None
    server.wait()  # nothing to wait for
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "profiles.toml"))
    (tmp_path / "profiles.toml").write_text('active = "team"\n[profiles.team]\n'
                                            'PREFECT_API_URL = "http://prefect:4200/api"\n')
    assert profile_api_url() == "http://prefect:4200/api"
    assert LocalServer().start().process is None and "PREFECT_API_URL" not in os.environ


def test_local_server_boots_answers_and_stops(monkeypatch, tmp_path):
    from mlcls.cli.local_server import LocalServer

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "none.toml"))
    server = LocalServer().start()
    try:
        assert os.environ["PREFECT_API_URL"] == server.url
        server.wait()
        assert server.seconds >= server.waited > 0
        with urllib.request.urlopen(f"{server.url}/health", timeout=5) as answer:
            assert answer.status == 200
        process = server.process
    finally:
        server.stop()
    assert process.poll() is not None  # terminated, not left behind


def test_local_server_that_cannot_start_is_one_line(monkeypatch, tmp_path):
    from mlcls.cli import local_server
    from mlcls.errors import MlclsError

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "none.toml"))
    monkeypatch.setattr(local_server.sys, "executable", "/bin/false")  # exits at once, code 1
    server = local_server.LocalServer().start()
    with pytest.raises(MlclsError, match=r"^could not start Prefect's local server \(it exited with code 1\); set"):
        server.wait()
