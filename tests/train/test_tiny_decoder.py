"""Tiny decoder distillation: it learns the full decoder's frames, exports a TAEHV-layout file that serving loads,
reports PSNR, and resumes bit-exactly; on Ray Train as well as in process."""

import json

import pytest
import torch

from livetalk_ray.config import load_config
from livetalk_ray.models.tiny_decoder import load_taehv
from livetalk_ray.toyworld.clips import make_demo_dataset
from livetalk_ray.train.tiny_decoder import TARGETS, WEIGHTS, train_tiny_decoder


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("clips")
    make_demo_dataset(out, 6, seed=4, corrupt_fraction=1 / 6, progress=False)  # one broken clip is skipped
    return out


def cfg(*overrides):
    return load_config(
        "toy",
        overrides=[
            "vae.tiny.widths=[16,8,8,8]",
            "train.tiny_decoder.clips_per_step=2",
            "train.tiny_decoder.psnr_clips=2",
            "train.tiny_decoder.lr=3e-3",
            "train.tiny_decoder.schedule=constant",
            "train.checkpoint_every=4",
            "train.max_steps=8",
            *overrides,
        ],
    )


def test_distillation_learns_the_full_decoders_frames_and_exports_a_taehv_file(clips, tmp_path):
    run = tmp_path / "run"
    prepared = []
    summary = train_tiny_decoder(cfg(), clips, run, 8, use_ray=False, on_prepare=lambda i, n: prepared.append((i, n)))
    assert prepared[-1] == (5, 5)  # five readable clips decoded once by the full decoder
    report = json.loads((run / "report.json").read_text())
    assert [r["step"] for r in report] == [4, 8]
    untrained = train_tiny_decoder(cfg(), clips, tmp_path / "zero", 0, use_ray=False)
    assert report[-1]["psnr_vs_full_db"] > untrained["psnr_vs_full_db"] + 3, (untrained, report)
    assert report[-1]["psnr_vs_truth_db"] > untrained["psnr_vs_truth_db"] + 3
    assert summary["checkpoint"].endswith("step_000008") and summary["psnr_vs_full_db"] == report[-1]["psnr_vs_full_db"]
    model, lines = load_taehv(run / "checkpoints" / "step_000008" / WEIGHTS)
    assert model.widths == (16, 8, 8, 8) and lines[-1] == "ignored: none"
    assert (run / "loss.png").is_file() and (run / "checkpoints" / "step_000008" / "samples.png").is_file()


def test_resume_is_bit_exact_and_reuses_the_distillation_set(clips, tmp_path):
    whole = train_tiny_decoder(cfg(), clips, tmp_path / "a", 8, use_ray=False)
    train_tiny_decoder(cfg(), clips, tmp_path / "b", 4, use_ray=False)
    made = (tmp_path / "b" / TARGETS).stat().st_mtime_ns
    resumed = train_tiny_decoder(cfg(), clips, tmp_path / "b", 8, resume=True, use_ray=False)
    assert (tmp_path / "b" / TARGETS).stat().st_mtime_ns == made
    assert resumed == {**whole, "checkpoint": resumed["checkpoint"]}
    a = load_taehv(tmp_path / "a" / "checkpoints" / "step_000008" / WEIGHTS)[0].state_dict()
    b = load_taehv(tmp_path / "b" / "checkpoints" / "step_000008" / WEIGHTS)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="--resume"):
        train_tiny_decoder(cfg(), clips, tmp_path / "b", 8, use_ray=False)


def test_on_ray_train_the_set_is_built_by_a_task_and_the_run_resumes(ray_cluster, clips, tmp_path):
    run = tmp_path / "ray"
    train_tiny_decoder(cfg("train.checkpoint_every=2"), clips, run, 2)
    assert (run / TARGETS).is_file() and (run / "checkpoints" / "step_000002" / WEIGHTS).is_file()
    summary = train_tiny_decoder(cfg("train.checkpoint_every=2"), clips, run, 4, resume=True)
    assert summary["step"] == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
