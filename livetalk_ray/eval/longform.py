"""Does the avatar keep its face? Identity and lip-sync second by second over long streams of held-out people.

A held-out person is a toy-world identity no training set contains (the page's six bundled portraits by
default), speaking eSpeak NG sentences for `seconds`; the renderer draws the ground truth. Every model makes
the same span from the same reference portrait and speech:

- `truth`: the rendered video after H.264, as training clips are stored;
- `truth (VAE)`: the truth encoded and decoded by the VAE: the ceiling of every generated row;
- a bidirectional teacher: consecutive training-length clips, each anchored on the reference (it does not
  stream; this is how it makes a long video);
- a streaming student: one `AvatarStream` with the configured identity sinks, or with none.

Scores: the identity distance (`toyworld.measure`) between the reference portrait and every second of video
(inf where no face is found), and lip-sync of every `LIPSYNC_WINDOW_S` window against the speech.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.toyworld.measure import identity_descriptor, identity_distance, lip_sync_score

PROMPT = "A person talks to the camera."  # the page's default motion prompt
LIPSYNC_WINDOW_S = 5
OTHER_PERSON = 0.18  # identity distance from which two people differ, calibrated in tests/toyworld/test_measure.py


@dataclass
class HeldOutTalk:
    """One held-out person speaking: reference portrait at the preset resolution, speech, rendered truth."""

    name: str
    reference: np.ndarray  # [H, W, 3] uint8
    speech: np.ndarray  # float32 mono at the audio sample rate
    truth: np.ndarray  # [T, H, W, 3] uint8


def held_out_talk(cfg: LiveTalkConfig, name: str, identity_seed: int, seconds: float, seed: int = 0) -> HeldOutTalk:
    """Render `identity_seed` speaking for `seconds` (speech and motion from `seed`) through an mp4 round trip."""
    from PIL import Image

    from livetalk_ray.toyworld.clips import read_clip, write_clip

    v = cfg.video
    with tempfile.TemporaryDirectory() as tmp:
        info = write_clip(
            tmp, "talk", seed, seconds=seconds, fps=v.fps, height=v.height, width=v.width, identity_seed=identity_seed
        )
        frames, speech, _ = read_clip(info.video, cfg.audio.sample_rate)
        portrait = Image.open(info.ref_image).convert("RGB").resize((v.width, v.height), Image.BICUBIC)
    speech = speech[: round(len(frames) * cfg.audio.sample_rate / v.fps)]  # AAC pads the last frame
    return HeldOutTalk(name, np.asarray(portrait), speech.astype(np.float32), frames)


def portrait_talks(cfg: LiveTalkConfig, seconds: float, people: int) -> list[HeldOutTalk]:
    """The first `people` bundled portraits (never in a training set), each with its own speech."""
    from livetalk_ray.toyworld.render import PORTRAIT_SEEDS

    chosen = list(PORTRAIT_SEEDS.items())[:people]
    return [held_out_talk(cfg, name, seed, seconds, seed=1000 + i) for i, (name, seed) in enumerate(chosen)]


@dataclass
class StreamScores:
    """Per-second identity distances and per-window lip-sync of one model on one held-out talk."""

    identity: list[float]  # second s → distance of frames [s·fps, (s+1)·fps) to the reference (inf: no face)
    lipsync: list[float]  # window w → lip-sync of seconds [w·W, (w+1)·W)
    extra: dict = field(default_factory=dict)

    def identity_at(self, second: float) -> float:
        """Distance of the second that ends at `second` (1 → the first second)."""
        return self.identity[min(len(self.identity), max(1, round(second))) - 1]

    def lipsync_at(self, second: float) -> float:
        """Lip-sync of the window holding the second that ends at `second`."""
        return self.lipsync[min(len(self.lipsync) - 1, (max(1, round(second)) - 1) // LIPSYNC_WINDOW_S)]

    def summary(self) -> dict:
        ident = np.asarray(self.identity)
        found = ident[np.isfinite(ident)]
        return {
            "identity_median": float(np.median(found)) if len(found) else None,
            "identity_max": float(found.max()) if len(found) else None,
            "seconds_other_person": int((ident > OTHER_PERSON).sum()),  # a lost face counts too
            "seconds_face_lost": int((~np.isfinite(ident)).sum()),
            "lipsync_mean": float(np.mean(self.lipsync)),
        }


def score_stream(frames: np.ndarray, talk: HeldOutTalk, fps: int, sample_rate: int) -> StreamScores:
    reference = identity_descriptor(talk.reference)
    seconds = len(frames) // fps
    identity = [
        identity_distance(identity_descriptor(frames[s * fps : (s + 1) * fps]), reference) for s in range(seconds)
    ]
    per = LIPSYNC_WINDOW_S * fps
    lipsync = []
    for start in range(0, max(1, len(frames) - per // 2), per):
        clip = frames[start : start + per]
        wave = talk.speech[int(start * sample_rate / fps) : int((start + len(clip)) * sample_rate / fps)]
        lipsync.append(float(lip_sync_score(clip, wave, fps, sample_rate).score))
    return StreamScores(identity, lipsync)


# -- the models


def through_vae(cfg: LiveTalkConfig, frames: np.ndarray) -> np.ndarray:
    """Frames encoded and decoded by the config's VAE (the first 4k+1 frames)."""
    from livetalk_ray.models.image import tensor_to_uint8
    from livetalk_ray.models.vae import WanVAE

    n = cfg.video_frames(cfg.latent_frames(len(frames)), at_start=True)
    vae = WanVAE(cfg.vae)
    video = torch.from_numpy(frames[:n]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        return tensor_to_uint8(vae.decode(vae.encode(video))[0])


def stream_student(
    cfg: LiveTalkConfig, checkpoint: Path, image: np.ndarray, speech: np.ndarray, seconds: float, seed: int = 0
) -> tuple[np.ndarray, dict]:
    """One stream of a causal student for `seconds` (speech looped to length), with its timings: the first
    block's latency and the steady FPS, each also for the DiT's work alone (denoise + cache refill)."""
    import time

    from livetalk_ray.diffusion.pipeline import AvatarPipeline

    pipe = AvatarPipeline(cfg, checkpoint)
    ref = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    stream = pipe.open_stream(ref, PROMPT, seed=seed)
    stream.push_audio(np.resize(speech, int(seconds * cfg.audio.sample_rate)).astype(np.float32))
    stream.finish_audio()
    frames, dit_seconds, start = [], [], time.perf_counter()
    first_latency = steady_start = None
    while sum(len(f) for f in frames) < seconds * cfg.video.fps:
        block = stream.next_block()
        frames.append(block.frames)
        dit_seconds.append(block.timings["denoise"] + block.timings["refill"])
        if first_latency is None:
            first_latency, steady_start = time.perf_counter() - start, time.perf_counter()
    steady_frames = sum(len(f) for f in frames[1:])
    timing = {
        "fps": steady_frames / max(time.perf_counter() - steady_start, 1e-9),
        "ttff_s": first_latency,
        "denoise_fps": steady_frames / max(sum(dit_seconds[1:]), 1e-9),
        "denoise_ttff_s": dit_seconds[0],
    }
    return np.concatenate(frames)[: int(seconds * cfg.video.fps)], timing


@torch.no_grad()
def teacher_video(
    cfg: LiveTalkConfig, checkpoint: Path, image: np.ndarray, speech: np.ndarray, seconds: float, seed: int = 0
) -> np.ndarray:
    """A long video from the bidirectional teacher: clips of `data.num_frames` frames over consecutive spans
    of the speech, each with the reference as its first latent frame (dropped from the output but once)."""
    from livetalk_ray.diffusion.clips import sample_clips
    from livetalk_ray.models.checkpoint import load_checkpoint
    from livetalk_ray.models.conditioning import build_conditioners
    from livetalk_ray.models.image import tensor_to_uint8

    enc = build_conditioners(cfg)
    model, _ = load_checkpoint(checkpoint, causal=False, device=enc.device, dtype=enc.dtype)
    model.eval()
    fps, per = cfg.video.fps, cfg.data.num_frames - 1
    chunks = math.ceil((int(seconds * fps) - 1) / per)
    wave = np.resize(speech, int(seconds * cfg.audio.sample_rate)).astype(np.float32)
    audio = enc.audio.encode_timed(wave, fps, chunks * per + 1)  # silence past the end
    ref = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    ref_latent = enc.vae.encode(ref.to(enc.device, enc.dtype))
    text = enc.text.encode([PROMPT])
    frames = [tensor_to_uint8(enc.vae.decode(ref_latent)[0])]
    batch_size = 4
    for first in range(0, chunks, batch_size):
        ks = range(first, min(chunks, first + batch_size))
        batch = {
            "ref_latent": ref_latent.expand(len(ks), -1, -1, -1, -1),
            "text_embedding": text.expand(len(ks), -1, -1),
            "audio_features": torch.stack([audio[k * per : k * per + per + 1] for k in ks]),
        }
        latents = sample_clips(model, cfg, batch, seed + first)
        frames += [tensor_to_uint8(clip)[1:] for clip in enc.vae.decode(latents.float())]
    return np.concatenate(frames)[: int(seconds * fps)]


# -- the evaluation


@dataclass(frozen=True)
class Model:
    """One row of the long-stream evaluation: a checkpoint and how it makes a long video."""

    name: str
    checkpoint: Path | None  # None for the truth rows
    kind: str  # "truth", "vae", "teacher", "student"
    sinks: bool = True  # students: the configured identity sinks, or none


def rows_for(teacher: Path | None, ode: Path | None, dmd: Path | None) -> list[Model]:
    """The truth, the truth through the VAE, and every given model; students with and without sinks."""
    models = [Model("truth", None, "truth"), Model("truth (VAE)", None, "vae")]
    if teacher is not None:
        models.append(Model("teacher", teacher, "teacher"))
    for name, path in (("ode", ode), ("dmd", dmd)):
        if path is not None:
            models += [Model(name, path, "student"), Model(f"{name} (no sinks)", path, "student", sinks=False)]
    return models


def make_video(cfg: LiveTalkConfig, model: Model, talk: HeldOutTalk, seconds: float) -> tuple[np.ndarray, dict]:
    if model.kind == "truth":
        return talk.truth[: int(seconds * cfg.video.fps)], {}
    if model.kind == "vae":
        return through_vae(cfg, talk.truth[: int(seconds * cfg.video.fps) + cfg.vae.temporal_factor]), {}
    if model.kind == "teacher":
        return teacher_video(cfg, model.checkpoint, talk.reference, talk.speech, seconds), {}
    run_cfg = cfg.model_copy(deep=True)
    if not model.sinks:
        run_cfg.cache.sink_size = 0
    return stream_student(run_cfg, model.checkpoint, talk.reference, talk.speech, seconds)


MARKS_S = (1, 10, 60)  # the seconds the table reports


def evaluate_long(
    cfg: LiveTalkConfig,
    models: list[Model],
    talks: list[HeldOutTalk],
    seconds: float,
    out_dir: Path | None = None,
    progress=None,
) -> dict:
    """Every model on every talk: a table row per model (medians over talks), per-second curves, strips."""
    fps, sr = cfg.video.fps, cfg.audio.sample_rate
    scores: dict[str, list[StreamScores]] = {m.name: [] for m in models}
    strips: dict[str, np.ndarray] = {}
    timings: dict[str, dict] = {}
    for talk in talks:
        for model in models:
            frames, timing = make_video(cfg, model, talk, seconds)
            scores[model.name].append(score_stream(frames, talk, fps, sr))
            if talk is talks[0]:
                strips[model.name] = frames
                timings[model.name] = timing
            if progress is not None:
                progress(talk.name, model.name)
    vae_lipsync = np.mean([s.summary()["lipsync_mean"] for s in scores.get("truth (VAE)", [])] or [0.0])
    rows = []
    for model in models:
        per_talk = [s.summary() for s in scores[model.name]]
        row: dict = {"model": model.name}
        for mark in (m for m in MARKS_S if m <= seconds):
            row[f"identity_{mark}s"] = _finite(np.median([s.identity_at(mark) for s in scores[model.name]]))
        row["identity_median"] = _median([p["identity_median"] for p in per_talk])
        row["identity_max"] = _max([p["identity_max"] for p in per_talk])
        row["seconds_other_person"] = int(sum(p["seconds_other_person"] for p in per_talk))
        row["seconds_face_lost"] = int(sum(p["seconds_face_lost"] for p in per_talk))
        for mark in (m for m in MARKS_S if m <= seconds):
            row[f"lipsync_{mark}s"] = float(np.mean([s.lipsync_at(mark) for s in scores[model.name]]))
        row["lipsync_mean"] = float(np.mean([p["lipsync_mean"] for p in per_talk]))
        row["lipsync_x_vae"] = row["lipsync_mean"] / vae_lipsync if vae_lipsync > 0 else None
        row.update(timings.get(model.name, {}))
        rows.append(row)
    result = {
        "seconds": seconds,
        "people": [t.name for t in talks],
        "rows": rows,
        # JSON has no infinity: a second without a face is null
        "curves": {
            name: [{"identity": [_finite(d) for d in s.identity], "lipsync": s.lipsync} for s in ss]
            for name, ss in scores.items()
        },
    }
    if out_dir is not None:
        from livetalk_ray.eval.plots import plot_curves, save_strips

        out_dir.mkdir(parents=True, exist_ok=True)
        plot_curves(result, out_dir / "identity_lipsync.png")
        save_strips(strips, talks[0].reference, fps, out_dir / "strips.png")
    return result


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _median(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None


def _max(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(max(kept)) if kept else None


def markdown_long(result: dict) -> str:
    rows = result["rows"]
    cols = [c for c in rows[0] if c != "model" and not c.endswith("_s") and "fps" not in c]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def fmt(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return "inf" if not np.isfinite(v) else f"{v:.3f}"
        return str(v)

    lines += ["| " + " | ".join([r["model"], *(fmt(r.get(c)) for c in cols)]) + " |" for r in rows]
    return "\n".join(lines)
