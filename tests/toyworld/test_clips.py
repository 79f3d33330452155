from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from livetalk_ray.toyworld import (
    CORRUPTION_KINDS,
    ClipInfo,
    corruption_counts,
    load_truth,
    make_demo_dataset,
    read_clip,
    read_manifest,
    write_clip,
)
from livetalk_ray.toyworld.clips import WRONG_FPS
from livetalk_ray.toyworld.speech import synthesize_speech


def _laplacian_var(frames: np.ndarray) -> float:
    g = frames.astype(np.float32).mean(-1)
    lap = g[:, 1:-1, 1:-1] * 4 - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    return float(lap.var())


def test_clip_files_decode_as_specified(clean_set: list[ClipInfo]) -> None:
    info = clean_set[0]
    with av.open(str(info.video)) as container:
        v, a = container.streams.video[0], container.streams.audio[0]
        assert v.codec_context.name == "h264" and v.codec_context.pix_fmt == "yuv420p"
        assert (v.width, v.height) == (64, 64) and v.average_rate == 16
        assert a.codec_context.name == "aac" and a.rate == 16000 and a.layout.name == "mono"
    frames, audio, fps = read_clip(info.video)
    assert frames.shape == (info.num_frames, 64, 64, 3) and fps == 16.0
    assert info.num_frames == round(info.seconds * 16)
    # The AAC track decodes in sync with the synthesised speech (priming is signalled, not left in).
    wave = synthesize_speech(None, info.seed, info.seconds, engine=info.speech_engine)
    assert len(wave) <= len(audio) < len(wave) + 1024
    assert np.corrcoef(audio[: len(wave)], wave)[0, 1] > 0.99

    ref = Image.open(info.ref_image)
    assert ref.size == (128, 128) and ref.mode == "RGB"
    doc = json.loads(info.caption.read_text())
    assert set(doc) == {"caption", "identity"} and doc["caption"] == info.caption_text
    assert doc["identity"]["seed"] == info.identity_seed

    truth = load_truth(info.truth)
    t = info.num_frames
    assert truth["mouth_openness"].shape == (t,) and truth["eyes_open"].shape == (t,)
    assert truth["head_centre_px"].shape == (t, 2) and truth["blink"].dtype == bool
    assert truth["fps"] == 16 and truth["sample_rate"] == 16000 and truth["corruption"] is None
    assert truth["identity"].seed == info.identity_seed
    assert 0 <= truth["mouth_openness"].min() and truth["mouth_openness"].max() <= 1


def test_caption_is_a_motion_prompt(clean_set: list[ClipInfo]) -> None:
    from livetalk_ray.toyworld.render import BACKGROUNDS, HAIR_COLOURS, SHIRT_COLOURS, SKIN_TONES

    colours = {*HAIR_COLOURS, *SKIN_TONES, *SHIRT_COLOURS, *BACKGROUNDS}
    for info in clean_set:
        text = info.caption_text
        assert text.startswith("A person talks") and text.endswith(".")
        assert not {w.strip(".,") for w in text.split()} & colours, text  # the face comes from the reference


def test_manifest(clean_set: list[ClipInfo]) -> None:
    root = clean_set[0].video.parent
    rows = read_manifest(root / "manifest.jsonl")
    assert [r["id"] for r in rows] == [i.clip_id for i in clean_set]
    for row in rows:
        assert set(row) == {"id", "video", "ref_image", "caption_file", "truth", "corruption"}
        assert row["corruption"] is None
        for key in ("video", "ref_image", "caption_file", "truth"):
            assert not Path(row[key]).is_absolute() and (root / row[key]).is_file()
    assert len({i.identity_seed for i in clean_set}) == 6  # num_identities=6
    assert len({i.seed for i in clean_set}) == 12


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    kwargs = {"seconds_range": (1.0, 1.5), "corrupt_fraction": 0.34, "progress": False}
    make_demo_dataset(tmp_path / "a", 3, 21, **kwargs)
    make_demo_dataset(tmp_path / "b", 3, 21, **kwargs)
    make_demo_dataset(tmp_path / "c", 3, 22, **kwargs)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:  # byte-identical: mp4 (H.264 + AAC), png, json, npz, manifest
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "clip_00000.mp4").read_bytes() != (tmp_path / "c" / "clip_00000.mp4").read_bytes()


def test_every_corruption_kind_once(broken_set: tuple[Path, list[ClipInfo]]) -> None:
    root, infos = broken_set
    assert corruption_counts(infos) == {"ok": 2, **{k: 1 for k in CORRUPTION_KINDS}}
    rows = {r["id"]: r["corruption"] for r in read_manifest(root / "manifest.jsonl")}
    assert rows == {i.clip_id: i.corruption for i in infos}
    for info in infos:
        assert info.truth.is_file() and load_truth(info.truth)["corruption"] == info.corruption
        assert info.ref_image.is_file()


def test_corruptions_break_clips_as_specified(broken_set: tuple[Path, list[ClipInfo]]) -> None:
    _, infos = broken_set
    by_kind = {i.corruption: i for i in infos}
    clean = by_kind[None]
    clean_frames, _, _ = read_clip(clean.video)

    for kind in ("truncated", "not_a_video"):
        with pytest.raises(av.FFmpegError):
            with av.open(str(by_kind[kind].video)) as container:
                list(container.decode(video=0))
    assert by_kind["zero_bytes"].video.stat().st_size == 0
    assert by_kind["not_a_video"].video.read_bytes().startswith(b"This is not a video")

    black, _, _ = read_clip(by_kind["black_frames"].video)
    assert len(black) == by_kind["black_frames"].num_frames and black.max() < 20

    blurred, _, _ = read_clip(by_kind["heavy_blur"].video)
    assert _laplacian_var(blurred) < 0.05 * _laplacian_var(clean_frames)

    frames, audio, _ = read_clip(by_kind["silence"].video)
    assert len(audio) > 0 and np.abs(audio).max() < 1e-4 and frames.std() > 10

    wrong = by_kind["wrong_fps"]
    frames, _, fps = read_clip(wrong.video)
    assert fps == WRONG_FPS and wrong.fps == WRONG_FPS and len(frames) == round(wrong.seconds * WRONG_FPS)

    missing = by_kind["missing_caption"]
    assert not missing.caption.exists() and missing.video.stat().st_size > 1000
    for info in infos:
        if info.corruption != "missing_caption":
            assert info.caption.is_file()


def test_write_clip_rejects_unknown_corruption(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        write_clip(tmp_path, "x", 1, seconds=1.0, corruption="sideways")


def test_dataset_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, 2, 0, corrupt_fraction=1.5, progress=False)
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, 2, 0, seconds_range=(3.0, 2.0), progress=False)
    assert make_demo_dataset(tmp_path, 0, 0, progress=False) == []
    assert (tmp_path / "manifest.jsonl").read_text() == ""
