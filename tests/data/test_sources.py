import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from livetalk_ray.data.sources import discover


def touch(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_directory_discovery_attaches_sidecars_and_counts_everything(tmp_path):
    touch(tmp_path / "a.mp4")
    touch(tmp_path / "a.png")
    touch(tmp_path / "a.json", '{"caption": "hi"}')
    touch(tmp_path / "a.truth.npz")
    touch(tmp_path / "sub" / "b.mov")
    touch(tmp_path / "sub" / "b.txt", "a caption")
    touch(tmp_path / "manifest.jsonl", "")
    touch(tmp_path / "stray.bin")
    root, sources = discover(tmp_path)
    by_id = {s.clip_id: s for s in sources}
    assert set(by_id) == {"a", "sub__b", "stray.bin"}
    assert by_id["a"].ref_image.endswith("a.png") and by_id["a"].caption_file.endswith("a.json")
    assert by_id["sub__b"].caption_file.endswith("b.txt") and by_id["sub__b"].ref_image is None
    assert by_id["stray.bin"].reject_reason == "unsupported_file"


def test_manifest_paths_cannot_escape_the_root(tmp_path):
    root = tmp_path / "data"
    touch(root / "ok.mp4")
    touch(tmp_path / "secret.mp4")
    rows = [
        {"video": "ok.mp4", "caption": "fine"},
        {"video": "../secret.mp4"},
        {"video": str(tmp_path / "secret.mp4")},
        {"video": "ok.mp4", "ref_image": "../../etc/passwd", "id": "sneaky_ref"},
        {"caption": "no path"},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    _, sources = discover(manifest)
    reasons = sorted((s.reject_reason or "ok") for s in sources)
    assert reasons == ["bad_manifest_row", "ok", "path_outside_root", "path_outside_root", "path_outside_root"]
    ok = next(s for s in sources if s.reject_reason is None)
    assert ok.caption == "fine" and ok.video == str((root / "ok.mp4").resolve())


def test_parquet_manifest_and_duplicate_ids(tmp_path):
    touch(tmp_path / "x.mp4")
    pq.write_table(pa.table({"video": ["x.mp4", "x.mp4"], "caption": ["one", "two"]}), tmp_path / "m.parquet")
    _, sources = discover(tmp_path / "m.parquet")
    assert [s.clip_id for s in sources] == ["x", "x~1"]


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        discover(tmp_path / "nothing.csv")
    (tmp_path / "bad.jsonl").write_text("{not json")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        discover(tmp_path / "bad.jsonl")


def test_toy_world_manifest_is_a_valid_input(tmp_path):
    from livetalk_ray.toyworld.clips import make_demo_dataset

    infos = make_demo_dataset(tmp_path, 2, seed=0, progress=False)
    root, sources = discover(tmp_path / "manifest.jsonl")
    assert root == tmp_path.resolve()
    assert [s.clip_id for s in sources] == [i.clip_id for i in infos]
    assert all(s.caption_file and s.ref_image and s.reject_reason is None for s in sources)
