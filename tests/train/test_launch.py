"""The training commands end to end on a real local Ray cluster: teacher on 2 Ray Train workers (DeepSpeed
ZeRO-2 over gloo), trajectories from a 2-actor Ray Data pool, the ODE student on 2 workers."""

import json

import pytest
from typer.testing import CliRunner

from livetalk_ray.cli import app
from tests.cli.test_app import assert_user_error

TINY = [
    "model.dim=32",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.ffn_dim=64",
    "train.engine.micro_batch_per_worker=2",
    "train.checkpoint_every=2",
    "sampler.teacher_steps=8",
]


def run(*args: str):
    sets = [x for item in TINY for x in ("--set", item)]
    result = CliRunner().invoke(app, [*args, *sets])
    return result


def test_teacher_trajectories_and_student_on_ray(ray_cluster, random_shards, tmp_path):
    teacher_run = tmp_path / "teacher"
    result = run(
        "train",
        "teacher",
        "--data",
        str(random_shards),
        "--out",
        str(teacher_run),
        "--max-steps",
        "2",
        "--workers",
        "2",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((teacher_run / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["step"] == 2
    checkpoint = teacher_run / "checkpoints" / "step_000002"
    assert {"rng_rank0.pt", "rng_rank1.pt", "model.safetensors", "config.yaml", "samples.png"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert "teacher: step 2 →" in result.output and "sample lip-sync" in result.output

    traj = tmp_path / "traj"
    result = run(
        "ode",
        "generate",
        "--data",
        str(random_shards),
        "--out",
        str(traj),
        "--teacher",
        str(checkpoint),
        "--actors",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "8 trajectories in 2 shards (8 made now" in result.output

    student_run = tmp_path / "student"
    result = run(
        "train",
        "ode",
        "--data",
        str(traj),
        "--out",
        str(student_run),
        "--teacher",
        str(checkpoint),
        "--max-steps",
        "2",
        "--workers",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((student_run / "summary.json").read_text())["stage"] == "ode"

    # User errors: one line, exit code 2, nothing started.
    assert_user_error(
        run("train", "teacher", "--data", str(random_shards), "--out", str(teacher_run), "--max-steps", "4"),
        "already holds step_000002: pass --resume",
    )
    assert_user_error(run("ode", "generate", "--data", str(random_shards), "--out", str(traj)), "pass --teacher DIR")
    assert_user_error(
        run("train", "ode", "--data", str(random_shards), "--out", str(tmp_path / "x"), "--teacher", str(checkpoint)),
        "no 'ode_states' column",
    )


@pytest.mark.slow
def test_ctrl_c_stops_a_ray_train_run_with_a_resume_hint(random_shards, tmp_path):
    """A real `livetalk train teacher` process: SIGINT → graceful abort, exit 130, the checkpoint to resume."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "livetalk_ray.cli",
        "train",
        "teacher",
        "--data",
        str(random_shards),
        "--out",
        str(run),
        "--max-steps",
        "100000",
        *[x for item in TINY for x in ("--set", item)],
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_000002" / "trainer.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "rerun with --resume to continue" in output
