"""The shipped toy weights: chosen only for the toy model without a checkpoint, and they really talk."""

from pathlib import Path

import numpy as np
import pytest

from livetalk_ray.assets import TOY_DIR, toy_weights_available, with_embedded_weights
from livetalk_ray.config import load_config

needs_weights = pytest.mark.skipif(not toy_weights_available(), reason="livetalk_ray/assets/toy is not installed")


@needs_weights
def test_the_toy_preset_without_a_checkpoint_gets_the_shipped_student_and_vae():
    cfg, checkpoint = with_embedded_weights(load_config("toy"), None)
    assert checkpoint == TOY_DIR and Path(cfg.vae.path) == TOY_DIR / "vae"
    named = with_embedded_weights(load_config("toy"), TOY_DIR)[0]  # --checkpoint pointing at the assets
    assert Path(named.vae.path) == TOY_DIR / "vae"


def test_other_models_and_named_checkpoints_are_left_alone(tmp_path):
    cfg = load_config("toy", overrides=["model.num_layers=3"])
    assert with_embedded_weights(cfg, None) == (cfg, None)
    toy = load_config("toy")
    assert with_embedded_weights(toy, tmp_path) == (toy, tmp_path)
    assert with_embedded_weights(load_config("wan-1.3b"), None)[1] is None


@needs_weights
def test_the_shipped_weights_animate_a_held_out_face_in_sync_with_speech(tmp_path):
    """A fresh toy identity and sentence (not in the pipeline's seeds): the stream keeps a face that moves,
    and its mouth follows the speech (the toy world's lip-sync score)."""
    from livetalk_ray.diffusion.pipeline import AvatarPipeline
    from livetalk_ray.eval.table import frame_health
    from livetalk_ray.models.image import load_reference_image
    from livetalk_ray.toyworld.clips import read_clip, write_clip
    from livetalk_ray.toyworld.measure import lip_sync_score

    cfg, checkpoint = with_embedded_weights(load_config("toy"), None)
    info = write_clip(tmp_path, "held_out", seed=987_654, seconds=4.0, fps=cfg.video.fps)
    truth, speech, _ = read_clip(tmp_path / "held_out.mp4", cfg.audio.sample_rate)
    ref = load_reference_image(tmp_path / "held_out.png", cfg.video.height, cfg.video.width)
    stream = AvatarPipeline(cfg, checkpoint).open_stream(ref, info.caption_text, seed=0)
    stream.push_audio(speech)
    stream.finish_audio()
    frames = []
    while sum(len(f) for f in frames) < len(truth):
        frames.append(stream.next_block().frames)
    video = np.concatenate(frames)[: len(truth)]
    truth_std = float(truth.astype(np.float32).std(axis=(1, 2, 3)).mean())
    assert frame_health(video, truth_std)["collapse"] == []
    score = lip_sync_score(video, speech, cfg.video.fps).score
    assert score > 0.3, score
