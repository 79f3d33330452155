"""The `livetalk` command: output formats, one-line user errors, and an end-to-end toy generate."""

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from livetalk_ray.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_model_info_lists_sorted_keys_with_shapes():
    result = run("model", "info", "--preset", "wan-1.3b", "--keys")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "preset wan-1.3b: 1,421,187,232 parameters in 857 tensors"
    keys = lines[1:]
    assert len(keys) == 857 and keys == sorted(keys)
    assert "head.modulation 1x2x1536" in keys
    assert "patch_embedding.weight 1536x33x1x2x2" in keys


def test_model_info_takes_overrides_and_config_files(tmp_path):
    result = run("model", "info", "--preset", "toy", "--set", "model.num_layers=8")
    assert result.exit_code == 0 and "preset toy" in result.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: wan-14b\n")
    assert "14,2" in run("model", "info", "--config", str(cfg)).output


def test_bad_preset_is_one_line():
    assert_user_error(run("model", "info", "--preset", "wan-7b"), "unknown preset 'wan-7b'")


@pytest.fixture
def wav(tmp_path) -> Path:
    path = tmp_path / "speech.wav"
    sf.write(path, (0.1 * np.sin(np.arange(16000) / 10)).astype(np.float32), 16000)
    return path


@pytest.fixture
def png(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "face.png"
    Image.new("RGB", (120, 90), (200, 150, 120)).save(path)
    return path


def generate(image: Path, audio: Path, *extra: str):
    return run("generate", "--image", str(image), "--audio", str(audio), "--out", str(audio.parent / "o.mp4"), *extra)


def test_unreadable_image(tmp_path, wav):
    bad = tmp_path / "face.jpg"
    bad.write_text("not an image")
    assert_user_error(generate(bad, wav), "cannot read", "face.jpg")
    assert_user_error(generate(tmp_path / "none.png", wav), "not found")


def test_empty_and_unreadable_audio(tmp_path, png):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    assert_user_error(generate(png, empty), "empty.wav")
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"\x00" * 100)
    assert_user_error(generate(png, junk), "junk.mp3")


def test_wrong_checkpoint(tmp_path, png, wav):
    assert_user_error(generate(png, wav, "--checkpoint", str(tmp_path)), "config.yaml")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text("preset: toy\n")
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    assert_user_error(generate(png, wav, "--checkpoint", str(ckpt)), "model.safetensors")


def test_generate_end_to_end_with_the_real_fixtures(tmp_path, portrait, speech):
    """The console script, as a user runs it: per-block report, mp4 with H.264 video and AAC audio."""
    out = tmp_path / "demo.mp4"
    exe = Path(sys.executable).with_name("livetalk")
    proc = subprocess.run(
        [
            str(exe),
            "generate",
            "--preset",
            "toy",
            "--image",
            str(portrait),
            "--audio",
            str(speech),
            "--out",
            str(out),
            "--seconds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "first block after" in proc.stdout and "FPS" in proc.stdout
    with av.open(str(out)) as container:
        kinds = sorted(s.type for s in container.streams)
        frames = sum(1 for _ in container.decode(video=0))
    assert kinds == ["audio", "video"]
    assert frames == 32  # 2 s at 16 fps


def test_generate_from_a_saved_checkpoint(tmp_path, png, wav):
    from livetalk_ray.config import load_config
    from livetalk_ray.models.checkpoint import save_checkpoint
    from livetalk_ray.models.dit import WanDiT

    cfg = load_config("toy")
    save_checkpoint(WanDiT(cfg.model), cfg, tmp_path / "ckpt")
    result = generate(png, wav, "--checkpoint", str(tmp_path / "ckpt"), "--seconds", "0.5")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o.mp4").stat().st_size > 0


def test_model_import_round_trips_through_generate_layout(tmp_path):
    """A Wan-layout safetensors (as LiveTalk ships) becomes a checkpoint directory with identical tensors."""
    import torch
    from safetensors.torch import load_file, save_file

    from livetalk_ray.config import load_config
    from livetalk_ray.models.dit import WanDiT

    cfg = load_config("toy")
    source = {k: v.contiguous() for k, v in WanDiT(cfg.model).state_dict().items()}
    save_file(source, tmp_path / "released.safetensors")
    result = run(
        "model",
        "import",
        str(tmp_path / "released.safetensors"),
        "--preset",
        "toy",
        "--dtype",
        "float32",
        "--out",
        str(tmp_path / "ckpt"),
    )
    assert result.exit_code == 0, result.output
    assert f"imported {len(source)} tensors (wan layout)" in result.output
    written = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert written.keys() == source.keys() and all(torch.equal(written[k], source[k]) for k in source)
    assert (tmp_path / "ckpt" / "config.yaml").is_file()
    bad = run(
        "model",
        "import",
        str(tmp_path / "released.safetensors"),
        "--preset",
        "toy",
        "--set",
        "model.dim=64",
        "--out",
        str(tmp_path / "x"),
    )
    assert_user_error(bad, "patch_embedding.weight: checkpoint has 128x33x1x2x2, model expects 64x33x1x2x2")


def test_demo_data_then_prepare(tmp_path):
    """The data commands as a user runs them: toy clips (one broken), then Ray Data into shards."""
    import json
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    result = run(
        "demo-data", "--out", str(tmp_path / "clips"), "--clips", "4", "--seed", "2", "--corrupt-fraction", "0.25"
    )
    assert result.exit_code == 0, result.output
    assert "wrote 4 clips (1 corrupted)" in result.output
    result = run("data", "prepare", "--input", str(tmp_path / "clips"), "--out", str(tmp_path / "shards"))
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "shards" / "stats.json").read_text())
    assert (stats["clips_in"], stats["accepted"], stats["quarantined"]) == (4, 3, 1)
    assert "4 clips in: 3 accepted" in result.output
    assert_user_error(
        run("data", "prepare", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "x")), "does not exist"
    )
