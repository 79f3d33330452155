"""`livetalk eval` end to end on tiny random models: every row has the documented keys, and the JSON is one
object with `rows`."""

import json

import pytest
from typer.testing import CliRunner

from livetalk_ray.cli import app
from tests.test_cli import assert_user_error
from tests.train.conftest import train_cfg


@pytest.fixture(scope="module")
def random_shards(tmp_path_factory):
    from livetalk_ray.data.synthetic import write_random_shards

    return write_random_shards(train_cfg(), tmp_path_factory.mktemp("eval_shards"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch

    from livetalk_ray.models.checkpoint import save_checkpoint
    from livetalk_ray.models.dit import WanDiT

    cfg = train_cfg()
    root = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    return str(save_checkpoint(WanDiT(cfg.model, causal=False), cfg, root / "teacher")), str(
        save_checkpoint(WanDiT(cfg.model), cfg, root / "student")
    )


def test_eval_json_has_a_row_per_model_with_every_column(models, random_shards, tmp_path):
    teacher, student = models
    sets = ["--set", "sampler.teacher_steps=4"]
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--eval-data",
            str(random_shards),
            "--teacher",
            teacher,
            "--checkpoint",
            student,
            "--seconds",
            "1.5",
            "--clips",
            "2",
            "--out",
            str(tmp_path / "eval"),
            "--json",
            *sets,
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output.strip().splitlines()[-1])["rows"]
    assert [r["model"] for r in rows] == ["teacher", "dmd", "ground truth (VAE)"]
    keys = {"model", "lipsync", "identity_drift_sinks", "identity_drift_nosinks", "frechet", "fps", "ttff_s"}
    assert keys <= set(rows[0]) and keys <= set(rows[1])
    assert rows[0]["identity_drift_sinks"] is None and rows[1]["fps"] > 0 and rows[1]["ttff_s"] > 0
    assert (tmp_path / "eval" / "eval.md").read_text().startswith("| model |")
    assert (tmp_path / "eval" / "eval_samples.png").is_file()


def test_eval_needs_a_model(random_shards):
    assert_user_error(CliRunner().invoke(app, ["eval", "--eval-data", str(random_shards)]), "name at least one model")
