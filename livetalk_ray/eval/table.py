"""The toy "paper table": teacher (many-step, bidirectional), ODE-init student and DMD student side by side.

Per model, on held-out conditions from prepared shards (same noise for every model):

- `lipsync`: the toy world's lip-sync score of generated clips (mouth opening vs speech envelope);
- `frechet`: Fréchet distance of frame features (eval/frechet.py) between generated frames and the
  held-out ground truth decoded by the same VAE;
- `identity_drift_sinks` / `identity_drift_nosinks` (students): a `seconds`-long stream from one held-out
  reference and looped held-out speech, with the configured anchor sinks and with none; the identity
  descriptor of the last 3 s against that of the first 3 s. The teacher does not stream: null. When the
  last 3 s hold no recognisable face, the drift is null and `face_lost_sinks` / `face_lost_nosinks` true;
- `fps`, `ttff_s`: one stream's steady frames per second (denoise + decode) and the time to its first
  frames; for the teacher, one clip's frames over the time to sample and decode it, which is also when
  its first frame exists. `denoise_fps` / `denoise_ttff_s` count the DiT's work alone (the part the
  recipe changes; the VAE decode is the same for every model);
- `fps_x_teacher`, `ttff_x_teacher` (and the `denoise_` pair): a student's speed-ups over the teacher row;
- `collapse`: the reasons a model's frames count as collapsed (empty: healthy), from `frame_health`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.data.reader import first_batch
from livetalk_ray.diffusion.clips import EVAL_COLUMNS, SAMPLE_SEED, sample_clips, sample_stream
from livetalk_ray.eval.frechet import frame_features, frechet_distance
from livetalk_ray.eval.longform import stream_student
from livetalk_ray.models.checkpoint import load_checkpoint
from livetalk_ray.models.image import frame_grid, psnr_db
from livetalk_ray.models.vae import WanVAE
from livetalk_ray.toyworld.measure import identity_descriptor, identity_distance, lip_sync_scores


@dataclass(frozen=True)
class Candidate:
    name: str  # "teacher", "ode", "dmd"
    checkpoint: Path
    streaming: bool


# Collapse thresholds (0-255 frames): a frame this dark is black; consecutive frames this close are frozen;
# frames whose spatial spread falls below this share of the ground truth's have lost their variance.
BLACK_LEVEL, FROZEN_DIFF, MIN_STD_SHARE = 16.0, 0.5, 0.5
MAX_BLACK, MAX_FROZEN = 0.05, 0.25  # tolerated fractions of black frames / frozen frame pairs


def frame_health(frames: np.ndarray, truth_std: float) -> dict:
    """Collapse checks on frames [N, H, W, 3] uint8: black, frozen, vanishing spatial variance (any 1 s
    window, 16 frames, whose mean per-frame std is under MIN_STD_SHARE of the ground truth's)."""
    f = frames.astype(np.float32)
    black = float((f.mean(axis=(1, 2, 3)) < BLACK_LEVEL).mean())
    frozen = float((np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3)) < FROZEN_DIFF).mean()) if len(f) > 1 else 0.0
    stds = f.std(axis=(1, 2, 3))
    window = min(16, len(stds))
    lowest = float(np.convolve(stds, np.ones(window) / window, mode="valid").min())
    reasons = [
        name
        for name, bad in (
            ("black frames", black > MAX_BLACK),
            ("frozen frames", frozen > MAX_FROZEN),
            ("vanishing frame variance", lowest < MIN_STD_SHARE * truth_std),
        )
        if bad
    ]
    return {
        "black_fraction": black,
        "frozen_fraction": frozen,
        "min_std_share": lowest / truth_std,
        "collapse": reasons,
    }


def _sample(vae: WanVAE, cand: Candidate, cfg: LiveTalkConfig, batch: dict) -> tuple[np.ndarray, float, float]:
    """Frames of every clip in `batch`, seconds to denoise, seconds to denoise and decode."""
    model, _ = load_checkpoint(cand.checkpoint, causal=cand.streaming)
    sample = sample_stream if cand.streaming else sample_clips
    start = time.perf_counter()
    latents = sample(model.eval(), cfg, batch, SAMPLE_SEED)
    denoised = time.perf_counter()
    frames = vae.decode_frames(latents)
    return frames, denoised - start, time.perf_counter() - start


def evaluate(
    cfg: LiveTalkConfig,
    candidates: list[Candidate],
    eval_data: str | Path,
    seconds: float = 60.0,
    clips: int = 8,
    out_dir: Path | None = None,
    drift: bool = True,
) -> list[dict]:
    """The table's rows. With `drift=False` each student streams `seconds` once, for its speed only (the
    long-stream evaluation, eval/longform.py, measures identity second by second instead)."""
    batch = first_batch(eval_data, cfg, EVAL_COLUMNS, clips)
    vae = WanVAE(cfg.vae)
    audio, fps = batch["audio"].numpy(), cfg.video.fps
    truth = vae.decode_frames(batch["latents"])
    truth_features = frame_features(truth.reshape(-1, *truth.shape[2:]))
    truth_std = float(truth.reshape(-1, *truth.shape[2:]).astype(np.float32).std(axis=(1, 2, 3)).mean())
    rows, grids = [], []
    for cand in candidates:
        frames = _sample(vae, cand, cfg, batch)[0]
        row: dict = {
            "model": cand.name,
            "lipsync": float(np.mean(lip_sync_scores(frames, audio, fps))),
            "frechet": frechet_distance(frame_features(frames.reshape(-1, *frames.shape[2:])), truth_features),
        }
        grids.append(frame_grid(frames[:2], batch["ref_image"].numpy()[:2]))
        if cand.streaming:
            drifts = {}
            for label, sinks in (("sinks", cfg.cache.sink_size), ("nosinks", 0))[: 2 if drift else 1]:
                run_cfg = cfg.model_copy(deep=True)
                run_cfg.cache.sink_size = sinks
                stream, timing = stream_student(
                    run_cfg,
                    cand.checkpoint,
                    batch["ref_image"][0].numpy(),
                    np.concatenate(list(audio)),
                    seconds,
                    seed=SAMPLE_SEED,
                )
                window = 3 * fps
                drifts[label] = identity_distance(
                    identity_descriptor(stream[:window]), identity_descriptor(stream[-window:])
                )
                if label == "sinks":
                    row.update(timing, **frame_health(stream, truth_std))
            for label, value in drifts.items() if drift else ():  # no face: null drift and a flag (JSON has no inf)
                row[f"identity_drift_{label}"] = value if np.isfinite(value) else None
                row[f"face_lost_{label}"] = not np.isfinite(value)
        else:
            one = {k: v[:1] for k, v in batch.items()}
            frames_one, denoise_s, total_s = _sample(vae, cand, cfg, one)
            n = frames_one.shape[1]
            row.update(fps=n / total_s, ttff_s=total_s, denoise_fps=n / denoise_s, denoise_ttff_s=denoise_s)
            row.update(
                identity_drift_sinks=None,
                identity_drift_nosinks=None,
                **frame_health(frames.reshape(-1, *frames.shape[2:]), truth_std),
            )
        rows.append(row)
    _speedups(rows)
    if out_dir is not None:
        from PIL import Image

        Image.fromarray(np.concatenate(grids, axis=0)).save(Path(out_dir) / "eval_samples.png")
    return [*rows, *decoder_rows(cfg, batch, vae, truth)]


def decoder_rows(cfg: LiveTalkConfig, batch: dict, vae: WanVAE, full_frames: np.ndarray) -> list[dict]:
    """A row per decoder of the held-out ground-truth latents: lip-sync of its frames, PSNR against the full
    decoder's (`vae`, whose frames are `full_frames`), and its streaming decode time per steady block (one stream,
    this process's threads)."""
    from livetalk_ray.models.vae import frame_decoder

    audio, fps = batch["audio"].numpy(), cfg.video.fps
    decoders = {"full": vae}
    if cfg.vae.tiny.path:
        decoders["tiny"] = frame_decoder(cfg.vae.model_copy(update={"decoder": "tiny"}))
    rows = []
    for name, decoder in decoders.items():
        frames = decoder.decode_frames(batch["latents"]) if name == "tiny" else full_frames
        rows.append(
            {
                "model": f"ground truth ({name} decoder)",
                "lipsync": float(np.mean(lip_sync_scores(frames, audio, fps))),
                "psnr_vs_full_db": None if name == "full" else psnr_db(frames, full_frames),
                "decode_ms_per_block": 1000 * steady_block_seconds(decoder, batch["latents"][:1], cfg),
            }
        )
    return rows


def steady_block_seconds(decoder, latents, cfg: LiveTalkConfig, repeats: int = 3) -> float:
    """Median seconds to decode one steady block (after the stream's first) of one stream of `latents`."""
    import torch

    fpb = cfg.cache.frames_per_block
    times = []
    for _ in range(repeats):
        stream = decoder.stream()
        stream.decode_block(latents[:, :, :fpb])
        start = time.perf_counter()
        with torch.no_grad():
            stream.decode_block(latents[:, :, fpb : 2 * fpb])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _speedups(rows: list[dict]) -> None:
    """Each student's FPS and first-frame latency as multiples of the teacher's (bigger is better)."""
    teacher = next((r for r in rows if r["model"] == "teacher"), None)
    if teacher is None:
        return
    for row in rows:
        if row is not teacher:
            for prefix in ("", "denoise_"):
                row[f"{prefix}fps_x_teacher"] = row[f"{prefix}fps"] / teacher[f"{prefix}fps"]
                row[f"{prefix}ttff_x_teacher"] = teacher[f"{prefix}ttff_s"] / row[f"{prefix}ttff_s"]


def markdown(rows: list[dict]) -> str:
    cols = [
        "model",
        "lipsync",
        "frechet",
        "identity_drift_sinks",
        "identity_drift_nosinks",
        "fps",
        "ttff_s",
        "fps_x_teacher",
        "ttff_x_teacher",
        "denoise_fps_x_teacher",
        "denoise_ttff_x_teacher",
        "collapse",
        "psnr_vs_full_db",
        "decode_ms_per_block",
    ]

    def fmt(v) -> str:
        if v == "face lost":
            return v
        if isinstance(v, list):
            return ", ".join(v) or "none"
        return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def cell(row: dict, col: str):
        label = col.removeprefix("identity_drift_")
        return "face lost" if col != label and row.get(f"face_lost_{label}") else row.get(col)

    lines += ["| " + " | ".join(fmt(cell(r, c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(long: dict, rows: list[dict] | None, out_dir: Path | None) -> tuple[dict, str]:
    """The long-stream table (and the clip table, when there is one) as one JSON object and one markdown
    text, written to `out_dir`/eval.json and eval.md when a directory is given."""
    import json

    from livetalk_ray.eval.longform import markdown_long

    result: dict = {"long": long} if rows is None else {"long": long, "rows": rows}
    text = "\n\n".join([markdown_long(long), *([] if rows is None else [markdown(rows)])]) + "\n"
    if out_dir is not None:
        (out_dir / "eval.md").write_text(text)
        (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result, text
