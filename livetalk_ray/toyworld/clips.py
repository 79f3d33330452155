"""Toy-world clips on disk: mp4 (H.264 + AAC), reference png, caption json, ground-truth npz, manifest.

A clip is a pure function of its seed, so a dataset is reproducible from (clips, seed). A share of clips can
be deliberately broken, one kind at a time, so the data pipeline's quarantine can be tested per reason.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageFilter

from livetalk_ray.media import Mp4Writer
from livetalk_ray.toyworld.render import (
    HeadMotion,
    Identity,
    face_centre_px,
    render_frames,
    render_reference,
    sample_identity,
    sample_motion,
)
from livetalk_ray.toyworld.speech import (
    SpeechEngine,
    espeak_available,
    openness_from_envelope,
    speech_envelope,
    synthesize_speech,
)

CORRUPTION_KINDS = (
    "truncated",  # mp4 cut to half its bytes
    "zero_bytes",  # empty mp4
    "not_a_video",  # text in the .mp4
    "black_frames",  # every frame black
    "heavy_blur",  # strong Gaussian blur on every frame
    "silence",  # audio track all zeros
    "wrong_fps",  # a valid clip at WRONG_FPS, too low for the pipeline
    "missing_caption",  # no .json
)
WRONG_FPS = 7
BLUR_SIGMA = 0.08  # of the frame height: ~5 px at 64x64, features vanish


@dataclass(frozen=True)
class ClipInfo:
    clip_id: str
    video: Path
    ref_image: Path
    caption: Path
    truth: Path
    seed: int
    identity_seed: int
    seconds: float
    fps: int
    num_frames: int
    caption_text: str
    speech_engine: SpeechEngine
    corruption: str | None = None

    def manifest_row(self, root: Path) -> dict:
        def rel(p: Path) -> str:
            return p.relative_to(root).as_posix()

        return {
            "id": self.clip_id,
            "video": rel(self.video),
            "ref_image": rel(self.ref_image),
            "caption_file": rel(self.caption),  # the key `livetalk data prepare` reads in manifests
            "truth": rel(self.truth),
            "corruption": self.corruption,
        }


def caption_for(energy: float) -> str:
    """The clip's motion prompt: how the person talks and moves, never what they look like.

    Serving prompts are motion prompts ("A person talks to the camera."), so the appearance has to come from
    the reference portrait alone; a caption naming hair, skin and shirt colours let a model trained on a few
    hundred people draw them from the text and ignore the reference (issue 15)."""
    if energy < 0.45:
        motion = "talks calmly to the camera with the head almost still"
    elif energy < 0.75:
        motion = "talks to the camera with gentle head movements"
    else:
        motion = "talks animatedly to the camera with lively head movements"
    return f"A person {motion}."


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def load_truth(path: str | Path) -> dict:
    """The ground-truth sidecar: arrays plus `identity` (an Identity) and the scalar fields as Python values."""
    with np.load(path, allow_pickle=False) as data:
        out: dict = {k: data[k] for k in data.files}
    for key in ("fps", "sample_rate", "seed", "identity_seed", "lag_frames"):
        out[key] = int(out[key])
    out["corruption"] = str(out["corruption"]) or None
    out["speech_engine"] = str(out["speech_engine"])
    out["identity"] = Identity.from_dict(json.loads(str(out.pop("identity_json"))))
    return out


def _blur(frames: np.ndarray) -> np.ndarray:
    radius = BLUR_SIGMA * frames.shape[1]
    return np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(radius))) for f in frames])


def write_clip(
    out_dir: str | Path,
    clip_id: str,
    seed: int,
    *,
    seconds: float,
    fps: int = 16,
    height: int = 64,
    width: int = 64,
    sample_rate: int = 16000,
    identity_seed: int | None = None,
    text: str | None = None,
    speech_engine: SpeechEngine = "auto",
    lag_frames: int = 0,
    ref_scale: int = 2,
    corruption: str | None = None,
) -> ClipInfo:
    """Render, voice and write one clip: `<id>.mp4`, `<id>.png`, `<id>.json`, `<id>.truth.npz` in out_dir.

    `identity_seed` (default: `seed`) fixes who is talking; `seed` fixes speech and motion. The reference
    png is a still, neutral portrait at `ref_scale` x the video resolution. `corruption` is one of
    CORRUPTION_KINDS (or None) and breaks the clip in that way; the truth sidecar is written regardless.
    """
    if corruption is not None and corruption not in CORRUPTION_KINDS:
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {', '.join(CORRUPTION_KINDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity_seed = seed if identity_seed is None else identity_seed
    ident = sample_identity(identity_seed)
    video_fps = WRONG_FPS if corruption == "wrong_fps" else fps
    num_frames = max(1, int(round(seconds * video_fps)))
    seconds = num_frames / video_fps  # whole frames; audio covers exactly the same span
    use_espeak = speech_engine == "espeak" or (speech_engine == "auto" and espeak_available())
    engine: SpeechEngine = "espeak" if use_espeak else "synthetic"
    wave = synthesize_speech(text, seed, seconds, sample_rate, engine=engine)
    envelope = speech_envelope(wave, video_fps, sample_rate)[:num_frames]
    openness = openness_from_envelope(envelope, lag_frames)
    motion = sample_motion(seed, num_frames, video_fps)
    frames = render_frames(ident, openness, motion, height=height, width=width)

    paths = {k: out / f"{clip_id}{ext}" for k, ext in [("video", ".mp4"), ("ref", ".png"), ("caption", ".json")]}
    _write_video(paths["video"], frames, wave, video_fps, sample_rate, corruption)
    Image.fromarray(render_reference(ident, height * ref_scale, width * ref_scale)).save(paths["ref"])
    caption = caption_for(motion.energy)
    _write_caption(paths["caption"], caption, ident, corruption)
    info = ClipInfo(
        clip_id=clip_id,
        video=paths["video"],
        ref_image=paths["ref"],
        caption=paths["caption"],
        truth=out / f"{clip_id}.truth.npz",
        seed=seed,
        identity_seed=identity_seed,
        seconds=seconds,
        fps=video_fps,
        num_frames=num_frames,
        caption_text=caption,
        speech_engine=engine,
        corruption=corruption,
    )
    _save_npz(
        info.truth, _truth_arrays(info, ident, motion, openness, envelope, (height, width), sample_rate, lag_frames)
    )
    return info


def _write_video(
    path: Path, frames: np.ndarray, wave: np.ndarray, fps: int, sample_rate: int, corruption: str | None
) -> None:
    """Write the mp4, broken in the way `corruption` names if it is one that concerns the video or its audio."""
    if corruption == "black_frames":
        frames = np.zeros_like(frames)
    elif corruption == "heavy_blur":
        frames = _blur(frames)
    audio = np.zeros_like(wave) if corruption == "silence" else wave
    height, width = frames.shape[1:3]
    writer = Mp4Writer(path, fps, width, height, sample_rate, reproducible=True)
    writer.write(frames, audio)
    writer.close()
    if corruption == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif corruption == "zero_bytes":
        path.write_bytes(b"")
    elif corruption == "not_a_video":
        path.write_text("This is not a video. It is a text file with an .mp4 name.\n")


def _write_caption(path: Path, caption: str, ident: Identity, corruption: str | None) -> None:
    if corruption == "missing_caption":
        path.unlink(missing_ok=True)
    else:
        doc = {"caption": caption, "identity": ident.to_dict()}
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _truth_arrays(
    info: ClipInfo,
    ident: Identity,
    motion: HeadMotion,
    openness: np.ndarray,
    envelope: np.ndarray,
    size: tuple[int, int],
    sample_rate: int,
    lag_frames: int,
) -> dict[str, np.ndarray]:
    """The ground-truth sidecar's arrays (what `load_truth` reads back), in the order they are written."""
    return {
        "mouth_openness": openness.astype(np.float32),
        "envelope": envelope.astype(np.float32),
        "eyes_open": motion.eyes_open,
        "blink": ~motion.eyes_open,
        "head_centre_px": face_centre_px(motion, *size),
        "head_scale": motion.scale,
        "head_tilt_deg": motion.tilt,
        "motion_energy": np.float32(motion.energy),
        "fps": np.int64(info.fps),
        "sample_rate": np.int64(sample_rate),
        "seed": np.int64(info.seed),
        "identity_seed": np.int64(info.identity_seed),
        "lag_frames": np.int64(lag_frames),
        "identity_json": np.str_(json.dumps(ident.to_dict(), sort_keys=True)),
        "caption": np.str_(info.caption_text),
        "corruption": np.str_(info.corruption or ""),
        "speech_engine": np.str_(info.speech_engine),
    }


def _derive(seed: int, *keys: int) -> int:
    """An independent 31-bit seed for (seed, keys...): clip seeds do not collide across datasets."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] & 0x7FFFFFFF)


def make_demo_dataset(
    out_dir: str | Path,
    clips: int,
    seed: int,
    corrupt_fraction: float = 0.0,
    seconds_range: tuple[float, float] = (2.5, 4.0),
    *,
    fps: int = 16,
    height: int = 64,
    width: int = 64,
    sample_rate: int = 16000,
    num_identities: int | None = None,
    speech_engine: SpeechEngine = "auto",
    progress: bool = True,
) -> list[ClipInfo]:
    """Write `clips` clips and `manifest.jsonl` into out_dir; the same arguments give the same dataset.

    `num_identities` (default: one per clip) makes several clips share a person, as real data would.
    round(clips x corrupt_fraction) clips, chosen by the seed, are broken, cycling through CORRUPTION_KINDS.
    """
    from rich.progress import track

    if clips < 0:
        raise ValueError(f"clips must be >= 0, got {clips}")
    if not 0.0 <= corrupt_fraction <= 1.0:
        raise ValueError(f"corrupt_fraction must be in [0, 1], got {corrupt_fraction}")
    lo, hi = seconds_range
    if not 0 < lo <= hi:
        raise ValueError(f"seconds_range must satisfy 0 < low <= high, got {seconds_range}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    durations = rng.uniform(lo, hi, size=clips)
    n_bad = int(round(clips * corrupt_fraction))
    bad = sorted(rng.choice(clips, size=n_bad, replace=False).tolist()) if n_bad else []
    kinds = {idx: CORRUPTION_KINDS[j % len(CORRUPTION_KINDS)] for j, idx in enumerate(bad)}

    infos: list[ClipInfo] = []
    for i in track(range(clips), description="toy clips", total=clips, disable=not progress):
        clip_seed = _derive(seed, i)
        who = _derive(seed, 1_000_000 + i % num_identities) if num_identities else clip_seed
        infos.append(
            write_clip(
                out,
                f"clip_{i:05d}",
                clip_seed,
                seconds=float(durations[i]),
                fps=fps,
                height=height,
                width=width,
                sample_rate=sample_rate,
                identity_seed=who,
                speech_engine=speech_engine,
                corruption=kinds.get(i),
            )
        )
    manifest = out / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(info.manifest_row(out)) + "\n" for info in infos))
    tmp.replace(manifest)  # readers never see a half-written manifest
    return infos


def read_manifest(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_clip(path: str | Path, sample_rate: int = 16000) -> tuple[np.ndarray, np.ndarray, float]:
    """Decode an mp4: (frames [T, H, W, 3] uint8, mono float32 audio at `sample_rate`, fps)."""
    from livetalk_ray.media import load_audio

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.base_rate or 0)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return frames, load_audio(path, sample_rate), fps


def corruption_counts(infos: Sequence[ClipInfo]) -> dict[str, int]:
    """Clips per corruption kind ("ok" for clean ones): a one-line summary for the CLI."""
    counts: dict[str, int] = {}
    for info in infos:
        key = info.corruption or "ok"
        counts[key] = counts.get(key, 0) + 1
    return counts
