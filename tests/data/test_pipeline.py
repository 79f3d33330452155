"""The Ray Data pipeline on a real local Ray: toy clips with every corruption, a real-world clip, faults."""

import json

import pyarrow.parquet as pq
import pytest

from livetalk_ray.config import load_config
from livetalk_ray.data.pipeline import prepare
from livetalk_ray.data.reader import ShardReader
from livetalk_ray.data.schema import SchemaError
from livetalk_ray.toyworld.clips import make_demo_dataset

from .conftest import write_portrait_clip

EXPECTED_REASON = {
    "truncated": "unreadable_video",
    "zero_bytes": "unreadable_video",
    "not_a_video": "unreadable_video",
    "black_frames": "black_frames",
    "heavy_blur": "blurry",
    "silence": "silence",
    "wrong_fps": "fps_out_of_range",
    "missing_caption": "missing_caption",
}


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory, portrait, speech):
    root = tmp_path_factory.mktemp("data")
    clips = root / "in"
    infos = make_demo_dataset(clips, 11, seed=3, corrupt_fraction=8 / 11)
    write_portrait_clip(portrait, speech, clips)
    # two clean clips whose captions make the caption rewriter fail: once with an exception, once by
    # killing its worker process outright
    for marker, name in (("EXPLODE", "explode"), ("CRASH", "crash")):
        write_portrait_clip(portrait, speech, clips, name=name)
        (clips / f"{name}.json").write_text(json.dumps({"caption": f"A person talks. {marker}"}))
    (clips / "stray.dat").write_text("not a clip")
    cfg = load_config(
        "toy", overrides=["data.caption_rewriter=tests.data.faults:fail_on_marker", "data.clips_per_shard=4"]
    )
    stats = prepare(cfg, clips, root / "out", progress=False)
    return cfg, root, infos, stats


def test_every_input_is_counted_with_its_reason(prepared):
    cfg, root, infos, stats = prepared
    assert stats["clips_in"] == len(infos) + 3 + 1 == stats["accepted"] + stats["quarantined"]
    quarantine = {r["clip_id"]: r for r in pq.read_table(root / "out" / "quarantine.parquet").to_pylist()}
    for info in infos:
        if info.corruption:
            assert quarantine[info.clip_id]["reason"] == EXPECTED_REASON[info.corruption], info
        else:
            assert info.clip_id not in quarantine, quarantine.get(info.clip_id)
    assert quarantine["explode"]["reason"] == "decode_error" and "exploded" in quarantine["explode"]["detail"]
    assert quarantine["crash"]["reason"] == "worker_lost"
    assert quarantine["stray.dat"]["reason"] == "unsupported_file"
    assert "portrait_talk" not in quarantine
    assert sum(stats["reasons"].values()) == stats["quarantined"]
    assert json.loads((root / "out" / "stats.json").read_text()) == stats


def test_shards_have_the_schema_and_shapes(prepared):
    cfg, root, _, stats = prepared
    reader = ShardReader(root / "out", cfg)
    assert len(reader) == stats["accepted"]
    batch = next(reader.iter_batches(batch_size=2))
    assert batch["latents"].shape == (2, cfg.vae.z_dim, 9, cfg.latent_height, cfg.latent_width)
    assert batch["audio_features"].shape == (2, 33, cfg.audio.feature_dim)
    assert batch["text_embedding"].shape == (2, cfg.text.max_length, cfg.text.d_model)
    assert batch["ref_image"].shape == (2, 64, 64, 3)
    assert all("talk" in c for c in batch["caption"])
    other = load_config("toy", overrides=["text.max_length=16"])
    with pytest.raises(SchemaError, match="text_embedding"):
        ShardReader(root / "out", other)


def test_rerun_is_a_no_op(prepared):
    cfg, root, _, stats = prepared
    shards = sorted((root / "out" / "shards").glob("*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    again = prepare(cfg, root / "in", root / "out", progress=False)
    assert {k: v for k, v in again.items() if k != "wall_seconds_last_run"} == {
        k: v for k, v in stats.items() if k != "wall_seconds_last_run"
    }
    assert again["wall_seconds_last_run"] == 0  # no clip was processed again
    assert {p: p.stat().st_mtime_ns for p in shards} == before


def test_resume_after_an_interrupted_run(prepared, tmp_path):
    """Drop one shard's done-marker and file, as if the job died while writing it: only it is redone."""
    cfg, root, _, stats = prepared
    import shutil

    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    (out / "_done" / "shard-00001.json").unlink()
    (out / "shards" / "shard-00001.parquet").unlink(missing_ok=True)
    kept = (out / "shards" / "shard-00000.parquet").stat().st_mtime_ns
    again = prepare(cfg, root / "in", out, progress=False)
    assert again["accepted"] == stats["accepted"] and again["reasons"] == stats["reasons"]
    assert (out / "shards" / "shard-00000.parquet").stat().st_mtime_ns == kept


def test_an_encoder_failure_quarantines_only_its_clip(prepared):
    """A corrupt payload in a batch: the batch is retried clip by clip and only that clip is quarantined."""
    import pickle

    import numpy as np

    from livetalk_ray.data.curation import prepare_clip
    from livetalk_ray.data.pipeline import RESULT_COLUMNS, EncodeStage, _result
    from livetalk_ray.data.sources import discover

    cfg, root, _, _ = prepared
    _, sources = discover(root / "in")
    good = next(s for s in sources if s.clip_id == "portrait_talk")
    rows = [
        _result("good", 0, "curated", payload=pickle.dumps(prepare_clip(good, cfg))),
        _result("bad", 0, "curated", payload=b"not a pickle"),
    ]
    out = EncodeStage(cfg.model_dump(mode="json"))(
        {c: np.array([r[c] for r in rows], dtype=object) for c in RESULT_COLUMNS}
    )
    status = dict(zip(out["clip_id"], zip(out["status"], out["reason"], strict=True), strict=True))
    assert status == {"good": ("accepted", ""), "bad": ("quarantined", "encode_error")}


def test_encoders_that_cannot_start_end_the_run_with_their_error(tmp_path):
    """A user error in the encoder actor's constructor reaches the driver as itself (not as a dead actor, nor
    as clips lost to worker_lost); here in process, the same stage functions as the actor pool runs."""
    from livetalk_ray.models.vae import VAEError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.mp4").write_bytes(b"not a video")  # quarantined by decode, then passes the encoder
    cfg = load_config("toy", overrides=[f"vae.path={tmp_path / 'no-vae'}"])
    with pytest.raises(VAEError, match="VAE path not found"):
        prepare(cfg, tmp_path / "in", tmp_path / "out", local_threads=1, progress=False)
