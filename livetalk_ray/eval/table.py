"""The toy "paper table": teacher (many-step, bidirectional), ODE-init student and DMD student side by side.

Per model, on held-out conditions from prepared shards (same noise for every model):

- `lipsync`: the toy world's lip-sync score of generated clips (mouth opening vs speech envelope);
- `frechet`: Fréchet distance of frame features (eval/frechet.py) between generated frames and the
  held-out ground truth decoded by the same VAE;
- `identity_drift_sinks` / `identity_drift_nosinks` (students): a `seconds`-long stream from one held-out
  reference and looped held-out speech, with the configured anchor sinks and with none; the identity
  descriptor of the last 3 s against that of the first 3 s. The teacher does not stream: null;
- `fps`, `ttff_s`: one stream's steady frames per second (denoise + decode) and the time to its first
  frames; for the teacher, one clip's frames over the time to sample and decode it, which is also when
  its first frame exists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.diffusion.pipeline import AvatarPipeline
from livetalk_ray.eval.frechet import frame_features, frechet_distance
from livetalk_ray.models.checkpoint import load_checkpoint
from livetalk_ray.toyworld.measure import identity_descriptor, identity_distance
from livetalk_ray.train.loop import load_stage
from livetalk_ray.train.report import REPORT_SEED, Reporter, frame_grid, toy_lipsync


@dataclass(frozen=True)
class Candidate:
    name: str  # "teacher", "ode", "dmd"
    checkpoint: Path
    streaming: bool


def _sample(reporter: Reporter, cand: Candidate, cfg: LiveTalkConfig, batch: dict) -> tuple[np.ndarray, float]:
    model, _ = load_checkpoint(cand.checkpoint, causal=cand.streaming)
    stage = load_stage("ode" if cand.streaming else "teacher")
    start = time.perf_counter()
    frames = reporter.decode(stage.sample(model.eval(), cfg, batch, REPORT_SEED))
    return frames, time.perf_counter() - start


def _stream(cfg: LiveTalkConfig, checkpoint: Path, image: np.ndarray, speech: np.ndarray, seconds: float):
    """Frames of one stream and its timings (first block's latency, steady FPS)."""
    pipe = AvatarPipeline(cfg, checkpoint)
    ref = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    stream = pipe.open_stream(ref, "A person talks to the camera.", seed=REPORT_SEED)
    need = int(seconds * cfg.audio.sample_rate)
    stream.push_audio(np.resize(speech, need).astype(np.float32))
    stream.finish_audio()
    frames, starts, first_latency = [], time.perf_counter(), None
    while sum(len(f) for f in frames) < seconds * cfg.video.fps:
        block = stream.next_block()
        frames.append(block.frames)
        if first_latency is None:
            first_latency, steady_start = time.perf_counter() - starts, time.perf_counter()
    steady = sum(len(f) for f in frames[1:]) / max(time.perf_counter() - steady_start, 1e-9)
    return np.concatenate(frames), first_latency, steady


def evaluate(
    cfg: LiveTalkConfig,
    candidates: list[Candidate],
    eval_data: str | Path,
    seconds: float = 60.0,
    clips: int = 8,
    out_dir: Path | None = None,
) -> list[dict]:
    cfg = cfg.model_copy(deep=True)
    cfg.train.eval_clips = clips
    reporter = Reporter(cfg, load_stage("teacher"), Path(out_dir or "."), data_dir=str(eval_data))
    batch = reporter.eval_batch()
    audio, fps = batch["audio"].numpy(), cfg.video.fps
    truth = reporter.decode(batch["latents"])
    truth_features = frame_features(truth.reshape(-1, *truth.shape[2:]))
    rows, grids = [], []
    for cand in candidates:
        frames, seconds_taken = _sample(reporter, cand, cfg, batch)
        row: dict = {
            "model": cand.name,
            "lipsync": float(np.mean(toy_lipsync(frames, audio, fps))),
            "frechet": frechet_distance(frame_features(frames.reshape(-1, *frames.shape[2:])), truth_features),
        }
        grids.append(frame_grid(frames[:2], batch["ref_image"].numpy()[:2]))
        if cand.streaming:
            drift = {}
            for label, sinks in (("sinks", cfg.cache.sink_size), ("nosinks", 0)):
                run_cfg = cfg.model_copy(deep=True)
                run_cfg.cache.sink_size = sinks
                stream, ttff, steady = _stream(
                    run_cfg, cand.checkpoint, batch["ref_image"][0].numpy(), np.concatenate(list(audio)), seconds
                )
                window = 3 * fps
                drift[label] = identity_distance(
                    identity_descriptor(stream[:window]), identity_descriptor(stream[-window:])
                )
                if label == "sinks":
                    row["fps"], row["ttff_s"] = steady, ttff
            row["identity_drift_sinks"], row["identity_drift_nosinks"] = drift["sinks"], drift["nosinks"]
        else:
            one = {k: v[:1] for k, v in batch.items()}
            frames_one, took = _sample(reporter, cand, cfg, one)
            row.update(
                fps=frames_one.shape[1] / took, ttff_s=took, identity_drift_sinks=None, identity_drift_nosinks=None
            )
        rows.append(row)
    truth_row = {"model": "ground truth (VAE)", "lipsync": float(np.mean(toy_lipsync(truth, audio, fps)))}
    if out_dir is not None:
        from PIL import Image

        Image.fromarray(np.concatenate(grids, axis=0)).save(Path(out_dir) / "eval_samples.png")
    return [*rows, truth_row]


def markdown(rows: list[dict]) -> str:
    cols = ["model", "lipsync", "frechet", "identity_drift_sinks", "identity_drift_nosinks", "fps", "ttff_s"]

    def fmt(v) -> str:
        return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
