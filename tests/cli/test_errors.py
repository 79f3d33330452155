"""Every user error ends a `livetalk` process with one `error:` line on stderr and exit code 2, also when a Ray
Train worker or a Ray actor raised it; `--debug` / LIVETALK_DEBUG=1 add the traceback. Each case is a real
process, so what Ray prints to the terminal counts too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from livetalk_ray.cli.errors import one_line
from livetalk_ray.config import load_config

# A 2-layer toy model (as tests/train/conftest.py): the commands below get as far as their error quickly.
TINY = ["model.dim=32", "model.num_heads=2", "model.num_layers=2", "model.ffn_dim=64"]
SET_TINY = [arg for item in TINY for arg in ("--set", item)]


def livetalk(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "livetalk_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "LIVETALK_DEBUG": "", **(env or {})},
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2 and stderr is exactly one `error:` line holding every fragment; returns that line."""
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stdout, proc.stdout
    return lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """6 clips of schema-valid random tensors: fewer than the toy preset's batch of 8."""
    from livetalk_ray.data.synthetic import write_random_shards

    return write_random_shards(load_config("toy", overrides=TINY), tmp_path_factory.mktemp("shards"), clips=3)


def test_too_few_clips_for_one_batch_names_the_setting(shards, tmp_path):
    proc = livetalk("train", "teacher", "--data", str(shards), "--out", str(tmp_path / "run"), *SET_TINY)
    assert_user_error(
        proc, "6 clips in the shards, fewer than one global batch of 8", "--set train.engine.micro_batch_per_worker=6"
    )


def test_missing_data_directory(tmp_path):
    proc = livetalk("train", "teacher", "--data", "/nonexistent", "--out", str(tmp_path / "run"))
    assert_user_error(proc, "--data /nonexistent does not exist", "livetalk data prepare")


def test_tiny_decoder_training_without_data_or_over_an_old_run(tmp_path):
    proc = livetalk("train", "tiny-decoder", "--data", "/nonexistent", "--out", str(tmp_path / "run"))
    assert_user_error(proc, "--data /nonexistent does not exist", "shards or a directory of clips")
    (tmp_path / "run" / "checkpoints" / "step_000004").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_000004" / "trainer.json").write_text("{}")
    proc = livetalk("train", "tiny-decoder", "--data", str(tmp_path), "--out", str(tmp_path / "run"))
    assert_user_error(proc, "already holds step_000004", "--resume")


def test_missing_input_of_data_prepare(tmp_path):
    proc = livetalk("data", "prepare", "--input", "/nonexistent", "--out", str(tmp_path / "out"))
    assert_user_error(proc, "--input /nonexistent does not exist", "livetalk demo-data")


def test_bad_override_lists_the_section_keys(shards, tmp_path):
    proc = livetalk("train", "teacher", "--data", str(shards), "--out", str(tmp_path), "--set", "train.batch_size=4")
    assert_user_error(proc, "unknown train.batch_size (train has ", "max_steps", "workers")


def test_unknown_checkpoint_layout(tmp_path):
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2), "decoder.conv_out.bias": torch.zeros(2)}, str(weights))
    proc = livetalk("model", "import", str(weights), "--out", str(tmp_path / "ckpt"), *SET_TINY)
    assert_user_error(proc, "unknown checkpoint layout", "decoder.conv_out.bias", "livetalk model info --keys")


def test_unreachable_ray_address(shards, tmp_path):
    proc = livetalk(
        "train", "teacher", "--data", str(shards), "--out", str(tmp_path / "run"), "--address", "127.0.0.1:1",
        *SET_TINY, "--set", "train.engine.micro_batch_per_worker=2",
    )  # fmt: skip
    assert_user_error(proc, "cannot reach the Ray cluster at 127.0.0.1:1", "ray start --head")


def test_unreachable_job_server():
    proc = livetalk("job", "status", "raysubmit_x", "--address", "http://127.0.0.1:1")
    assert_user_error(proc, "cannot reach the Ray job server at http://127.0.0.1:1", "--address")


def test_user_error_in_a_ray_train_worker(shards, tmp_path):
    """Initial weights that do not fit fail in the worker's build_teacher; Ray Train ends the run at once
    (tests/test_errors.py checks the callback that stops its retries) and fit() raises a ControllerError."""
    import torch

    from livetalk_ray.models.checkpoint import save_checkpoint
    from livetalk_ray.models.dit import WanDiT

    other = load_config("toy", overrides=[*TINY, "model.num_layers=3"])
    torch.manual_seed(0)
    save_checkpoint(WanDiT(other.model, causal=False), other, tmp_path / "init")
    proc = livetalk(
        "train", "teacher", "--data", str(shards), "--out", str(tmp_path / "run"), "--init", str(tmp_path / "init"),
        "--max-steps", "1", *SET_TINY, "--set", "train.engine.micro_batch_per_worker=2",
    )  # fmt: skip
    assert_user_error(proc, "does not fit the model", "blocks.2.", "--preset")


def test_user_error_in_a_ray_actor_constructor(shards, tmp_path):
    """DMD role actors load their checkpoints in their constructors: a directory with weights but no config.yaml
    passes the driver's check and fails in the actors (ActorDiedError, which keeps only the error's text)."""
    fake = tmp_path / "ckpt"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"not weights")
    proc = livetalk(
        "train", "dmd", "--data", str(shards), "--out", str(tmp_path / "run"), "--generator", str(fake),
        "--teacher", str(fake), "--max-steps", "1", *SET_TINY, "--set", "train.engine.micro_batch_per_worker=2",
    )  # fmt: skip
    assert_user_error(proc, f"{fake}: no config.yaml", "livetalk model import")
    assert not (tmp_path / "run" / "events.jsonl").exists()  # the controller did not restart the roles


@pytest.mark.parametrize("how", ["--debug", "LIVETALK_DEBUG=1"])
def test_debug_adds_the_traceback_and_keeps_exit_code_2(tmp_path, how):
    args = ["train", "teacher", "--data", "/nonexistent", "--out", str(tmp_path / "run")]
    if how == "--debug":
        proc = livetalk("--debug", *args)
    else:
        proc = livetalk(*args, env={"LIVETALK_DEBUG": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("Traceback") and "FileNotFoundError: --data /nonexistent" in proc.stderr
    assert lines[-1].startswith("error: --data /nonexistent does not exist")


def test_one_line_joins_multi_line_messages():
    assert one_line(ValueError("first\n  second\n\n")) == "first second"
    assert one_line(ValueError()) == "ValueError"
