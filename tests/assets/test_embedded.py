"""The shipped toy weights: chosen only for the toy model without a checkpoint, and they really talk."""

import json
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
    # ... and the tiny decoder distilled from that VAE, which `--set vae.decoder=tiny` selects
    assert Path(cfg.vae.tiny.path) == TOY_DIR / "tiny_decoder.safetensors" and Path(cfg.vae.tiny.path).is_file()
    manifest = json.loads((TOY_DIR / "manifest.json").read_text())
    assert "tiny_decoder.safetensors" in manifest["sha256"] and manifest["tiny_decoder"]["psnr_vs_full_db"] > 20


def test_other_models_and_named_checkpoints_are_left_alone(tmp_path):
    cfg = load_config("toy", overrides=["model.num_layers=3"])
    assert with_embedded_weights(cfg, None) == (cfg, None)
    toy = load_config("toy")
    assert with_embedded_weights(toy, tmp_path) == (toy, tmp_path)
    assert with_embedded_weights(load_config("wan-1.3b"), None)[1] is None


@needs_weights
def test_the_shipped_weights_animate_held_out_faces_in_sync_with_speech(tmp_path):
    """Fresh toy identities and sentences (not the pipeline's seeds): every stream keeps a face that moves, and
    on average its mouth follows the speech (the toy world's lip-sync score; one clip alone is noisy, 0.25 to
    0.6, the ground truth scores 1.0, the shipped run's 8-clip held-out eval 0.55)."""
    from livetalk_ray.diffusion.pipeline import AvatarPipeline
    from livetalk_ray.eval.table import frame_health
    from livetalk_ray.models.image import load_reference_image
    from livetalk_ray.toyworld.clips import read_clip, write_clip
    from livetalk_ray.toyworld.measure import lip_sync_score

    cfg, checkpoint = with_embedded_weights(load_config("toy"), None)
    pipe = AvatarPipeline(cfg, checkpoint)
    scores = []
    for seed in (1234, 55555, 777):
        info = write_clip(tmp_path, f"c{seed}", seed=seed, seconds=6.0, fps=cfg.video.fps)
        truth, speech, _ = read_clip(info.video, cfg.audio.sample_rate)
        ref = load_reference_image(info.ref_image, cfg.video.height, cfg.video.width)
        stream = pipe.open_stream(ref, info.caption_text, seed=0)
        stream.push_audio(speech)
        stream.finish_audio()
        frames = []
        while sum(len(f) for f in frames) < len(truth):
            frames.append(stream.next_block().frames)
        video = np.concatenate(frames)[: len(truth)]
        truth_std = float(truth.astype(np.float32).std(axis=(1, 2, 3)).mean())
        assert frame_health(video, truth_std)["collapse"] == [], seed
        scores.append(lip_sync_score(video, speech, cfg.video.fps).score)
    assert np.mean(scores) > 0.3, scores


@needs_weights
@pytest.mark.xfail(strict=True, reason="issue 15: the shipped student loses the face; the retrained chain must pass")
def test_the_shipped_student_keeps_a_held_out_portraits_face_for_20_seconds():
    """A bundled portrait (held out of training) streamed for 20 s: every second looks like its reference
    (the toy world's identity distance; the truth scores 0.03 to 0.07, another person at least 0.18)."""
    from livetalk_ray.eval.longform import OTHER_PERSON, held_out_talk, score_stream, stream_student
    from livetalk_ray.toyworld.render import PORTRAIT_SEEDS

    cfg, checkpoint = with_embedded_weights(load_config("toy"), None)
    talk = held_out_talk(cfg, "cy", PORTRAIT_SEEDS["cy"], 20.0, seed=7)  # the README eval streams ada and bo
    frames, _ = stream_student(cfg, checkpoint, talk.reference, talk.speech, 20.0)
    scores = score_stream(frames, talk, cfg.video.fps, cfg.audio.sample_rate)
    assert len(scores.identity) == 20
    assert max(scores.identity) <= OTHER_PERSON, [round(d, 3) for d in scores.identity]
