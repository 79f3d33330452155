"""Input discovery: a directory of clips with sidecars, or a manifest (JSONL or parquet) of paths.

Every input is accounted for: a video becomes a `ClipSource`; a file that is neither a video nor a
sidecar of one, and a manifest row whose path escapes the input root, become `ClipSource`s that carry
their rejection, so that `clips_in = accepted + quarantined` always holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from livetalk_ray.config import ConfigError

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CAPTION_EXTENSIONS = {".json", ".txt"}
# Files that belong to the dataset but are not clips: truth sidecars of the toy world, manifests, notes.
SIDECAR_EXTENSIONS = IMAGE_EXTENSIONS | CAPTION_EXTENSIONS | {".npz", ".jsonl", ".parquet", ".md"}


@dataclass(frozen=True)
class ClipSource:
    clip_id: str
    path: str  # as given, relative to the input root where possible
    video: str | None = None  # absolute path, None when rejected at discovery
    ref_image: str | None = None
    caption: str | None = None  # caption text (manifest) ...
    caption_file: str | None = None  # ... or a sidecar file holding it
    reject_reason: str | None = None
    reject_detail: str = ""


def _inside(root: Path, candidate: Path) -> bool:
    try:
        candidate.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _sidecar(video: Path, extensions: set[str]) -> str | None:
    for ext in sorted(extensions):
        for cand in (video.with_suffix(ext), video.with_suffix(ext.upper())):
            if cand.is_file():
                return str(cand)
    return None


def _clip_id(root: Path, video: Path) -> str:
    return video.relative_to(root).with_suffix("").as_posix().replace("/", "__")


def discover_directory(root: Path) -> list[ClipSource]:
    root = root.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
    stems = {v.with_suffix("") for v in videos}
    sources = [
        ClipSource(
            clip_id=_clip_id(root, v),
            path=v.relative_to(root).as_posix(),
            video=str(v),
            ref_image=_sidecar(v, IMAGE_EXTENSIONS),
            caption_file=_sidecar(v, CAPTION_EXTENSIONS),
        )
        for v in videos
    ]
    for p in files:  # neither a video nor anything we know: counted and quarantined, never dropped
        known_sidecar = p.suffix.lower() in SIDECAR_EXTENSIONS and (
            p.with_suffix("") in stems
            or Path(str(p.with_suffix("")).removesuffix(".truth")) in stems
            or p.suffix.lower() in {".jsonl", ".parquet", ".md"}
        )
        if p.suffix.lower() not in VIDEO_EXTENSIONS and not known_sidecar:
            rel = p.relative_to(root).as_posix()
            sources.append(
                ClipSource(
                    rel.replace("/", "__"),
                    rel,
                    reject_reason="unsupported_file",
                    reject_detail=f"not a video ({p.suffix or 'no extension'})",
                )
            )
    return sources


def _manifest_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n} is not valid JSON ({exc}): fix that line of the manifest") from None
    return rows


def read_manifest(path: Path, root: Path | None = None) -> list[ClipSource]:
    """Rows hold `video` (or `path`), optional `ref_image`, `caption` and `caption_file`, `id`.

    Relative paths are resolved against `root` (default: the manifest's folder); any path that resolves
    outside it (`..`, absolute paths elsewhere, symlinks out) is rejected with `path_outside_root`."""
    root = (root or path.parent).resolve()
    sources = []
    for n, row in enumerate(_manifest_rows(path)):
        given = row.get("video") or row.get("path")
        clip_id = str(row.get("id") or (Path(given).with_suffix("").as_posix().replace("/", "__") if given else n))
        if not given:
            sources.append(
                ClipSource(
                    clip_id,
                    f"<row {n}>",
                    reject_reason="bad_manifest_row",
                    reject_detail="row has no 'video' or 'path'",
                )
            )
            continue
        paths = {k: row.get(k) for k in ("ref_image", "caption_file")}
        resolved = {k: (root / v) for k, v in {"video": given, **paths}.items() if v}
        escaped = [k for k, v in resolved.items() if not _inside(root, v)]
        if escaped:
            sources.append(
                ClipSource(
                    clip_id,
                    str(given),
                    reject_reason="path_outside_root",
                    reject_detail=f"{escaped[0]} path {row.get(escaped[0], given)!r} leaves {root}",
                )
            )
            continue
        sources.append(
            ClipSource(
                clip_id,
                str(given),
                video=str(resolved["video"].resolve()),
                ref_image=str(resolved["ref_image"].resolve()) if "ref_image" in resolved else None,
                caption=row.get("caption"),
                caption_file=str(resolved["caption_file"].resolve()) if "caption_file" in resolved else None,
            )
        )
    return sources


def discover(input_path: str | Path) -> tuple[Path, list[ClipSource]]:
    """(input root, sources) for a directory or a manifest file; duplicate ids are made unique."""
    path = Path(input_path)
    if path.is_dir():
        root, sources = path.resolve(), discover_directory(path)
    elif path.is_file() and path.suffix in {".jsonl", ".parquet"}:
        root, sources = path.parent.resolve(), read_manifest(path)
    else:
        raise FileNotFoundError(f"--input {path} is neither a directory nor a .jsonl/.parquet manifest")
    seen: dict[str, int] = {}
    unique = []
    for s in sources:
        n = seen.get(s.clip_id, 0)
        seen[s.clip_id] = n + 1
        unique.append(s if n == 0 else ClipSource(**{**s.__dict__, "clip_id": f"{s.clip_id}~{n}"}))
    return root, sorted(unique, key=lambda s: s.clip_id)
