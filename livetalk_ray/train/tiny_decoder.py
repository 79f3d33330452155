"""Tiny decoder distillation: a `TinyDecoder` (models/tiny_decoder.py) learns to draw, from the same latents, the
frames the full Wan decoder draws, and (when the data are clips) the ground truth's.

The driver first builds the distillation set once into the run directory (`targets.pt`, reused on resume):
latents of every clip (shards: their `latents` column; clips: the VAE's encoding of their first 33 frames), the
full decoder's frames of them and, for clips, the frames themselves. The first `psnr_clips` are held out. Then
`tiny_decoder_loop` runs on a Ray Train TorchTrainer (DDP over gloo on CPU, NCCL on GPU) or in this process:
each step decodes `clips_per_step` whole clips from their start (a stream from its first block sees exactly
this) and takes L1 + MSE against the full decoder's frames, plus `truth_weight` × the same against the truth.
Checkpoints (every `train.checkpoint_every` steps and at the end) hold the decoder in TAEHV's layout
(`tiny_decoder.safetensors`, for `--set vae.tiny.path=...`), the config, and the state to resume bit-exactly;
each adds a line to report.json (held-out PSNR against the full decoder and against the truth), redraws
loss.png and saves samples.png (rows: truth, full decoder, tiny decoder).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from livetalk_ray.config import TOY_INIT_SEED, ConfigError, LiveTalkConfig, resolve_device
from livetalk_ray.models.image import psnr_db
from livetalk_ray.models.tiny_decoder import build_tiny_decoder, save_taehv
from livetalk_ray.seeds import seed_of
from livetalk_ray.train.engine import TrainEngine, latest_checkpoint
from livetalk_ray.train.loop import MetricsLog

TARGETS = "targets.pt"
WEIGHTS = "tiny_decoder.safetensors"


# ---------------------------------------------------------------------------------------------- the data
def _shard_latents(data: Path, cfg: LiveTalkConfig) -> torch.Tensor:
    from livetalk_ray.data.reader import ShardReader

    reader = ShardReader(data, cfg, columns=["latents"])
    return torch.cat([batch["latents"] for batch in reader.iter_batches(64)])


def build_targets(cfg: LiveTalkConfig, data: Path, run_dir: Path, progress: Callable[[int, int], None] | None = None):
    """The distillation set in `run_dir/targets.pt` (made once): latents [N, z, F, h, w], the full decoder's
    frames and (clips only) the truth, both [N, T, H, W, 3] uint8."""
    from livetalk_ray.models.vae import WanVAE

    path = run_dir / TARGETS
    if path.is_file():
        return torch.load(path, weights_only=False)
    vae = WanVAE(cfg.vae, device=resolve_device(cfg.runtime), seed=TOY_INIT_SEED)
    if any(data.glob("*.parquet")) or any(data.glob("**/*.parquet")):
        latents, truth = _shard_latents(data, cfg), None
    else:
        from livetalk_ray.train.vae import load_clips, to_video

        clips = load_clips(data, cfg)  # first 33 frames of every readable clip; FileNotFoundError if too few
        truth = np.stack(clips)
        latents = torch.cat([vae.encode(to_video(truth[i : i + 8])).cpu() for i in range(0, len(truth), 8)])
    latents = latents[: cfg.train.tiny_decoder.max_clips]
    truth = truth[: len(latents)] if truth is not None else None
    if len(latents) <= cfg.train.tiny_decoder.psnr_clips:
        raise ConfigError(
            f"{data}: {len(latents)} clips, but train.tiny_decoder.psnr_clips={cfg.train.tiny_decoder.psnr_clips} "
            "are held out: give more clips (`livetalk demo-data`) or hold out fewer"
        )
    frames = []
    for i in range(len(latents)):
        frames.append(vae.decode_frames(latents[i : i + 1])[0])
        if progress:
            progress(i + 1, len(latents))
    targets = {"latents": latents.float(), "full": np.stack(frames), "truth": truth}
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(targets, path)
    return targets


def _video(frames: np.ndarray) -> torch.Tensor:
    """[B, T, H, W, 3] uint8 → [B, T, 3, H, W] in [0, 1] (the tiny decoder's own frame layout)."""
    return torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 255


# ---------------------------------------------------------------------------------------------- the worker
def _decode(model, raw: torch.Tensor, trim: int) -> torch.Tensor:
    """Whole clips from their start: raw latents [B, F, z, h, w] → frames [B, T, 3, H, W] in [0, 1]."""
    frames, _ = model(raw)
    return frames[:, trim:]


def _loss(frames: torch.Tensor, full: torch.Tensor, truth: torch.Tensor | None, truth_weight: float) -> torch.Tensor:
    def distance(target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(frames, target) + F.mse_loss(frames, target)

    loss = distance(full)
    return loss + truth_weight * distance(truth) if truth is not None and truth_weight > 0 else loss


class _Worker:
    """One rank: the decoder, its engine, the training clips and the batch generator."""

    def __init__(self, cfg: LiveTalkConfig, run_dir: Path) -> None:
        import torch.distributed as dist

        from livetalk_ray.models.vae import latent_statistics

        self.cfg, self.run_dir, tcfg = cfg, run_dir, cfg.train.tiny_decoder
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = resolve_device(cfg.runtime)
        targets = torch.load(run_dir / TARGETS, weights_only=False)
        mean, std = latent_statistics(cfg.vae)
        self.raw = (targets["latents"] * std + mean).transpose(1, 2)  # what TAEHV decodes: [N, F, z, h, w]
        self.full, self.truth = targets["full"], targets["truth"]
        self.held_out, self.train_ids = range(tcfg.psnr_clips), range(tcfg.psnr_clips, len(self.raw))
        torch.manual_seed(cfg.runtime.seed)  # the same initial weights on every rank
        self.model = build_tiny_decoder(cfg.vae, seed=TOY_INIT_SEED).to(self.device).train().requires_grad_(True)
        self.trim = self.model.temporal_factor - 1
        engine_cfg = cfg.model_copy(deep=True)
        engine_cfg.train.engine.backend = "torch"  # a few MB: DDP when Ray Train gives several workers
        optim = engine_cfg.train.optim.model_copy(update={"lr": tcfg.lr, "schedule": tcfg.schedule})
        self.engine = TrainEngine(self.model, engine_cfg, optim=optim)
        self.generator = torch.Generator().manual_seed(seed_of(cfg.runtime.seed, "tiny_decoder.batches", self.rank))
        self.history: list[dict] = []

    def step_loss(self) -> torch.Tensor:
        tcfg = self.cfg.train.tiny_decoder
        picks = torch.randint(len(self.train_ids), (tcfg.clips_per_step,), generator=self.generator)
        ids = [self.train_ids[int(i)] for i in picks]
        frames = _decode(self.engine.module, self.raw[ids].to(self.device), self.trim)
        full = _video(self.full[ids]).to(self.device)
        truth = _video(self.truth[ids]).to(self.device) if self.truth is not None else None
        return _loss(frames, full, truth, tcfg.truth_weight)

    @torch.no_grad()
    def evaluate(self) -> tuple[dict, np.ndarray]:
        """Held-out PSNR against the full decoder (and the truth), and the frames for the sample grid."""
        self.model.eval()
        ids = list(self.held_out)
        frames = _decode(self.model, self.raw[ids].to(self.device), self.trim)
        self.model.train()
        tiny = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
        row = {"step": self.engine.step, "psnr_vs_full_db": psnr_db(tiny, self.full[ids])}
        if self.truth is not None:
            row["psnr_vs_truth_db"] = psnr_db(tiny, self.truth[ids])
            row["full_psnr_vs_truth_db"] = psnr_db(self.full[ids], self.truth[ids])
        return row, tiny

    def checkpoint(self, log: MetricsLog) -> Path:
        row, tiny = self.evaluate() if self.rank == 0 else ({"step": self.engine.step}, None)

        def export(directory: Path) -> None:
            save_taehv(self.model, directory / WEIGHTS)
            self.cfg.save(directory / "config.yaml")
            self._report(directory, tiny, log.read())

        self.history.append(row)
        extra = {"generator": self.generator.get_state().tolist(), "history": self.history}
        return self.engine.save(self.run_dir, extra=extra, export=export)

    def _report(self, directory: Path, tiny: np.ndarray, records: list[dict]) -> None:
        from PIL import Image

        from livetalk_ray.models.image import frame_grid
        from livetalk_ray.train.report import plot_loss

        (self.run_dir / "report.json").write_text(json.dumps(self.history, indent=2))
        if records:
            plot_loss(records, self.run_dir / "loss.png", "tiny decoder distillation loss")
        ids = list(self.held_out)[:2]
        rows = [self.full[ids], tiny[: len(ids)]]
        rows = rows if self.truth is None else [self.truth[ids], *rows]
        clips = np.stack(rows, axis=1).reshape(-1, *tiny.shape[1:])  # per held-out clip: (truth,) full, tiny
        Image.fromarray(frame_grid(clips[:, 1:], clips[:, 0], every=4)).save(directory / "samples.png")

    def resume(self) -> None:
        if (last := latest_checkpoint(self.run_dir)) is not None:
            state = self.engine.load(last)
            self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
            self.history = state["history"]


def tiny_decoder_loop(config: dict) -> None:
    """Worker entry point. `config`: cfg (JSON), run_dir, max_steps (the distillation set already built)."""
    import time

    cfg = LiveTalkConfig.model_validate(config["cfg"])
    run_dir, max_steps = Path(config["run_dir"]), int(config["max_steps"])
    worker = _Worker(cfg, run_dir)
    log = MetricsLog(run_dir, enabled=worker.rank == 0)
    worker.resume()
    log.truncate(worker.engine.step)
    tick = time.perf_counter()
    while worker.engine.step < max_steps:
        loss = worker.step_loss()
        worker.engine.backward_step(loss)
        now = time.perf_counter()
        step = worker.engine.step
        clips = cfg.train.tiny_decoder.clips_per_step
        log.write(
            {"step": step, "loss": float(loss.detach()), "lr": worker.engine.lr, "samples_per_s": clips / (now - tick)}
        )
        if step % cfg.train.checkpoint_every == 0 or step == max_steps:
            worker.checkpoint(log)
        tick = time.perf_counter()
    if not worker.history or worker.history[-1]["step"] != worker.engine.step:  # e.g. max_steps=0: the untrained
        worker.checkpoint(log)
    if worker.rank == 0:
        summary = {"step": worker.engine.step, "checkpoint": str(latest_checkpoint(run_dir)), **worker.history[-1]}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


# ---------------------------------------------------------------------------------------------- the driver
def preflight(data: Path, run_dir: Path, resume: bool) -> None:
    """The user errors that need no Ray and no model: before any progress output."""
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist: pass prepared shards or a directory of clips")
    from livetalk_ray.train.launch import newest_to_resume

    newest_to_resume(run_dir, resume)


def train_tiny_decoder(
    cfg: LiveTalkConfig,
    data: str | Path,
    run_dir: str | Path,
    max_steps: int,
    *,
    resume: bool = False,
    use_ray: bool = True,
    on_prepare: Callable[[int, int], None] | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Checks, the distillation set, then `tiny_decoder_loop` on Ray Train (or here); returns summary.json."""
    from livetalk_ray.train.launch import StageInterrupted, absolute_paths, fit_on_ray
    from livetalk_ray.train.loop import following

    data, run_dir = Path(data).resolve(), Path(run_dir).resolve()
    preflight(data, run_dir, resume)
    cfg = absolute_paths(cfg)
    if use_ray and not (run_dir / TARGETS).is_file():
        _build_targets_on_ray(cfg, data, run_dir)
    build_targets(cfg, data, run_dir, on_prepare)  # here: in this process, or reusing the file just made
    (run_dir / "summary.json").unlink(missing_ok=True)
    config = {"cfg": cfg.model_dump(mode="json"), "run_dir": str(run_dir), "max_steps": max_steps}
    with following(MetricsLog(run_dir, enabled=True), on_progress):
        if use_ray:
            fit_on_ray(config, cfg, "tiny-decoder", run_dir, loop=tiny_decoder_loop)
        else:
            tiny_decoder_loop(config)
    if not (run_dir / "summary.json").is_file():
        raise StageInterrupted(f"the tiny-decoder run stopped before step {max_steps}: rerun with --resume")
    return json.loads((run_dir / "summary.json").read_text())


def _build_targets_on_ray(cfg: LiveTalkConfig, data: Path, run_dir: Path) -> None:
    """The full decodes in a task with one training worker's resources (a GPU on a cluster), not in the driver."""
    import ray

    def build(cfg: LiveTalkConfig, data: Path, run_dir: Path) -> int:
        return len(build_targets(cfg, data, run_dir)["latents"])  # the set stays on disk, not in the object store

    task = ray.remote(num_cpus=cfg.train.cpus_per_worker, num_gpus=cfg.train.gpus_per_worker)(build)
    ray.get(task.remote(cfg, data, run_dir))
