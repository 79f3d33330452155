"""`livetalk pipeline` end to end at tiny sizes on a real local Ray: every stage runs, leaves its marker
and outputs, and a rerun skips everything that is done."""

import hashlib
import json

import pytest
import yaml
from typer.testing import CliRunner

from livetalk_ray.assets import install_from_pipeline
from livetalk_ray.cli import app
from livetalk_ray.toy_pipeline import STAGES

TINY = [
    "pipeline.train_clips=6",
    "pipeline.heldout_clips=3",
    "pipeline.vae_train_steps=2",
    "pipeline.tiny_decoder_train_steps=2",
    "vae.tiny.widths=[8,8,8,8]",
    "train.tiny_decoder.psnr_clips=2",
    "pipeline.teacher_train_steps=2",
    "pipeline.ode_train_steps=2",
    "pipeline.dmd_train_steps=3",
    "pipeline.eval_seconds=2",
    "pipeline.eval_people=1",
    "train.vae.psnr_clips=2",
    "train.vae.clips_per_step=1",
    "model.dim=32",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.ffn_dim=64",
    "train.engine.micro_batch_per_worker=1",
    "train.checkpoint_every=2",
    "train.report_clips=2",
    "sampler.teacher_steps=4",
    "train.dmd.critic_warmup=1",
    "train.dmd.critic_per_generator=1",
    "train.dmd.placement.generator.cpus=0.25",
    "train.dmd.placement.critic.cpus=0.25",
    "train.dmd.placement.teacher.cpus=0.25",
    "train.dmd.placement.rollout.cpus=0.25",
]


@pytest.mark.slow  # 127 s: every stage of the chain; each stage has its own tests in the default run
def test_whole_toy_chain_runs_and_resumes(ray_cluster, tmp_path):
    args = ["pipeline", "--out", str(tmp_path / "p"), *[x for s in TINY for x in ("--set", s)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for stage in STAGES:
        assert (tmp_path / "p" / "stages" / f"{stage}.json").is_file(), stage
    rows = json.loads((tmp_path / "p" / "eval" / "eval.json").read_text())["rows"]
    assert [r["model"] for r in rows][:3] == ["teacher", "ode", "dmd"]
    assert (tmp_path / "p" / "student" / "model.safetensors").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("done earlier") == len(STAGES)

    # The run installs as shipped weights: student + VAE + a manifest whose hashes match the files.
    dest = tmp_path / "assets" / "toy"
    manifest = install_from_pipeline(tmp_path / "p", dest)
    shipped = {"model.safetensors", "config.yaml", "vae/config.json", "teacher/model.safetensors", "ode/config.yaml"}
    shipped.add("tiny_decoder.safetensors")  # distilled from that VAE: `vae.decoder=tiny` with the shipped weights
    assert shipped <= set(manifest["sha256"])
    assert [r["model"] for r in manifest["eval_long"]["rows"]][2:] == [
        "teacher",
        "ode",
        "ode (no sinks)",
        "dmd",
        "dmd (no sinks)",
    ]
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest, name
    assert [r["model"] for r in manifest["eval"]][:3] == ["teacher", "ode", "dmd"]
    assert yaml.safe_load((dest / "config.yaml").read_text())["vae"]["path"] is None


def test_installing_an_unfinished_run_is_refused(tmp_path):
    (tmp_path / "stages").mkdir()
    with pytest.raises(FileNotFoundError, match="stages not done: vae, teacher, ode, export, eval"):
        install_from_pipeline(tmp_path, tmp_path / "dest")
