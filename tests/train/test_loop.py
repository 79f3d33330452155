"""The shared training loop (teacher stage, in this process): run directory contents, exact resume,
refusal to overwrite, plateau detection."""

import json

import pytest
from safetensors.torch import load_file

from livetalk_ray.config import ConfigError, PlateauConfig
from livetalk_ray.data.schema import SchemaError
from livetalk_ray.train.launch import run_stage
from livetalk_ray.train.loop import Plateau
from tests.train.conftest import train_cfg


def weights(run, step):
    return load_file(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key


@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
def test_stopped_and_resumed_teacher_equals_an_uninterrupted_run(random_shards, tmp_path, backend):
    cfg = train_cfg(f"train.engine.backend={backend}", "train.checkpoint_every=3", "train.optim.schedule=cosine")
    cfg.train.max_steps = 6  # the LR schedule spans 6 steps in both runs; --max-steps only says where to stop
    whole = run_stage("teacher", cfg, random_shards, tmp_path / "whole", 6, use_ray=False)
    run_stage("teacher", cfg, random_shards, tmp_path / "split", 3, use_ray=False)
    resumed = run_stage("teacher", cfg, random_shards, tmp_path / "split", 6, resume=True, use_ray=False)
    assert whole["step"] == resumed["step"] == 6
    assert_same_weights(weights(tmp_path / "whole", 6), weights(tmp_path / "split", 6))
    logs = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("whole", "split")]
    assert [json.loads(x)["loss"] for x in logs[0]] == [json.loads(x)["loss"] for x in logs[1]]
    cursor = json.loads((tmp_path / "split/checkpoints/step_000006/trainer.json").read_text())["cursor"]
    assert cursor == {"epoch": 1, "position": 2}  # 8 clips / batch 2 = 4 steps per epoch


def test_run_directory_has_curves_samples_and_report(random_shards, tmp_path):
    cfg = train_cfg("train.engine.backend=torch", "train.checkpoint_every=2")
    summary = run_stage("teacher", cfg, random_shards, tmp_path / "run", 4, use_ray=False)
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 1000
    for step in (2, 4):
        assert (run / "checkpoints" / f"step_{step:06d}" / "samples.png").is_file()
    report = json.loads((run / "report.json").read_text())
    assert [r["step"] for r in report] == [2, 4]
    assert len(report[-1]["lipsync"]) == cfg.train.report_clips  # toy preset: scored samples
    assert summary["lipsync_mean"] == report[-1]["lipsync_mean"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["samples_per_s"] > 0 for r in records)


def test_an_old_run_is_never_overwritten_without_resume(random_shards, tmp_path):
    cfg = train_cfg("train.engine.backend=torch", "train.checkpoint_every=1")
    run_stage("teacher", cfg, random_shards, tmp_path / "run", 1, use_ray=False)
    with pytest.raises(ConfigError, match="already holds step_000001: pass --resume"):
        run_stage("teacher", cfg, random_shards, tmp_path / "run", 2, use_ray=False)
    with pytest.raises(ConfigError, match="is a teacher run, not a ode run"):
        run_stage("ode", cfg, random_shards, tmp_path / "run", 2, resume=True, use_ray=False)


def test_bad_data_is_reported_before_anything_starts(tmp_path):
    cfg = train_cfg()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_stage("teacher", cfg, tmp_path / "nowhere", tmp_path / "run", 1, use_ray=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SchemaError, match="no parquet shards"):
        run_stage("teacher", cfg, tmp_path / "empty", tmp_path / "run", 1, use_ray=False)
    assert not (tmp_path / "run").exists()


def test_plateau_needs_patience_windows_of_small_improvement():
    plateau = Plateau(PlateauConfig(window=2, min_improvement=0.1, patience=2, stop=True))
    losses = [4, 4, 2, 2, 1.95, 1.95, 1.9, 1.9, 1.0, 1.0]  # window means 4, 2, 1.95, 1.9, then a drop
    steps = []
    for step, loss in enumerate(losses, 1):
        plateau.update(loss, step)
        steps.append(plateau.converged_at)
    assert steps[5] is None and steps[7] == 8 and plateau.stop  # flat twice in a row at step 8
    restored = Plateau(plateau.cfg, json.loads(json.dumps(plateau.state_dict())))
    assert restored.state_dict() == plateau.state_dict()
