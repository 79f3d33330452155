"""`livetalk eval` end to end on tiny random models: every row has the documented keys, and the JSON is one
object with `rows`."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from livetalk_ray.cli import app
from tests.cli.test_app import assert_user_error
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
    import torch

    from livetalk_ray.models.tiny_decoder import TinyDecoder, save_taehv

    teacher, student = models
    torch.manual_seed(0)
    save_taehv(TinyDecoder(16, (8, 8, 8, 8)), tmp_path / "tiny.safetensors")
    sets = ["--set", "sampler.teacher_steps=4", "--set", f"vae.tiny.path={tmp_path / 'tiny.safetensors'}"]
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
            "2",
            "--people",
            "1",
            "--clips",
            "2",
            "--out",
            str(tmp_path / "eval"),
            "--json",
            *sets,
        ],
    )
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("{"), result.output[-800:]
    output = json.loads(last)
    long = output["long"]
    assert [r["model"] for r in long["rows"]] == ["truth", "truth (VAE)", "teacher", "dmd", "dmd (no sinks)"]
    assert long["people"] == ["ada"] and len(long["curves"]["dmd"][0]["identity"]) == 2  # one value per second
    for row in long["rows"]:
        assert {"identity_1s", "identity_median", "seconds_other_person", "lipsync_mean"} <= set(row), row
    assert long["rows"][0]["identity_median"] < 0.06  # the truth is the portrait's person
    rows = output["rows"]
    decoders = ["ground truth (full decoder)", "ground truth (tiny decoder)"]
    assert [r["model"] for r in rows] == ["teacher", "dmd", *decoders]
    full, tiny = rows[2:]
    assert full["psnr_vs_full_db"] is None and 0 < tiny["psnr_vs_full_db"] < 60  # an untrained tiny decoder
    assert full["decode_ms_per_block"] > 0 and tiny["decode_ms_per_block"] > 0
    keys = {"model", "lipsync", "identity_drift_sinks", "identity_drift_nosinks", "frechet", "fps", "ttff_s"}
    assert keys <= set(rows[0]) and keys <= set(rows[1])
    assert rows[0]["identity_drift_sinks"] is None and rows[1]["fps"] > 0 and rows[1]["ttff_s"] > 0
    for key in ("fps_x_teacher", "ttff_x_teacher", "denoise_fps_x_teacher", "denoise_ttff_x_teacher"):
        assert rows[1][key] > 0, key
    assert rows[1]["denoise_fps"] > rows[1]["fps"]  # the DiT alone is faster than DiT + decode
    assert isinstance(rows[0]["collapse"], list) and isinstance(rows[1]["collapse"], list)
    assert (tmp_path / "eval" / "eval.md").read_text().startswith("| model |")
    for picture in ("eval_samples.png", "identity_lipsync.png", "strips.png"):
        assert (tmp_path / "eval" / picture).is_file(), picture


def test_eval_of_a_real_preset_is_a_user_error():
    assert_user_error(CliRunner().invoke(app, ["eval", "--preset", "wan-1.3b"]), "toy-preset models only")


def test_eval_of_a_missing_checkpoint_is_a_user_error(tmp_path):
    assert_user_error(CliRunner().invoke(app, ["eval", "--teacher", str(tmp_path)]), "not a checkpoint directory")


def test_frame_health_names_each_kind_of_collapse():
    from livetalk_ray.eval.table import frame_health

    rng = np.random.default_rng(0)
    moving = rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
    truth_std = float(moving.astype(np.float32).std(axis=(1, 2, 3)).mean())
    assert frame_health(moving, truth_std)["collapse"] == []
    black = moving.copy()
    black[:10] = 3
    assert "black frames" in frame_health(black, truth_std)["collapse"]
    frozen = np.repeat(moving[:4], 12, axis=0)
    assert frame_health(frozen, truth_std)["collapse"] == ["frozen frames"]
    flat = moving.copy()
    flat[20:40] = (128 + (flat[20:40].astype(np.int16) - 128) // 8).astype(np.uint8)  # a 1.25 s grey-out
    health = frame_health(flat, truth_std)
    assert health["collapse"] == ["vanishing frame variance"] and health["min_std_share"] < 0.5


def test_eval_without_models_needs_a_shipped_teacher_and_ode(tmp_path, monkeypatch):
    import livetalk_ray.assets

    monkeypatch.setattr(livetalk_ray.assets, "TOY_DIR", tmp_path)  # weights without teacher/ and ode/
    assert_user_error(CliRunner().invoke(app, ["eval"]), "hold no teacher and ODE student", "--checkpoint")
