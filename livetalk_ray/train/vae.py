"""Toy VAE fit: a small diffusers `AutoencoderKLWan` trained on toy-world clips until reconstructions are
faithful. Real presets never train a VAE: they load the pretrained Wan 2.1 VAE.

Training windows are random 4k+1-frame slices of the clips (L1 + MSE reconstruction of the posterior
sample, plus a small KL term); the report is PSNR on held-out clips. The result is a diffusers directory
(`vae/` inside each checkpoint) that `--set vae.path=...` points the rest of the system at.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from livetalk_ray.config import TOY_INIT_SEED, LiveTalkConfig
from livetalk_ray.data.sources import discover
from livetalk_ray.models.vae import WanVAE
from livetalk_ray.train.engine import TrainEngine, latest_checkpoint

# Held-out PSNR over the first 33 frames of each clip, whatever the training windows: a causal VAE fitted on
# short windows can fall apart on the frames after them, and a window-length PSNR would not show it.
EVAL_FRAMES = 33


def load_clips(clips_dir: str | Path, cfg: LiveTalkConfig) -> list[np.ndarray]:
    """Frames [T, H, W, 3] of every readable clip at the preset resolution, long enough for one window."""
    from livetalk_ray.data.curation import Rejected, decode_frames, probe

    window = max(cfg.train.vae.window_frames, EVAL_FRAMES)
    clip_cfg = cfg.model_copy(deep=True)
    clip_cfg.data.num_frames = window
    clips = []
    for source in discover(clips_dir)[1]:
        if source.video is None:
            continue
        try:
            clips.append(decode_frames(source.video, probe(source.video, clip_cfg), clip_cfg))
        except Rejected:
            continue  # broken or short clips teach nothing; `data prepare` reports them
    if len(clips) <= cfg.train.vae.eval_clips:
        raise FileNotFoundError(
            f"{clips_dir}: need more than {cfg.train.vae.eval_clips} readable clips, "
            f"found {len(clips)} (make some with `livetalk demo-data`)"
        )
    return clips


def to_video(frames: np.ndarray) -> torch.Tensor:
    """[B, T, H, W, 3] uint8 → [B, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def sample_windows(clips: list[np.ndarray], count: int, window: int, generator: torch.Generator) -> np.ndarray:
    picks = torch.randint(len(clips), (count,), generator=generator).tolist()
    out = []
    for i in picks:
        start = int(torch.randint(len(clips[i]) - window + 1, (1,), generator=generator))
        out.append(clips[i][start : start + window])
    return np.stack(out)


def vae_loss(model, video: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None):
    posterior = model.encode(video).latent_dist
    recon = model.decode(posterior.sample(generator)).sample
    loss = (recon - video).abs().mean() + ((recon - video) ** 2).mean() + kl_weight * posterior.kl().mean()
    return loss, recon


@torch.no_grad()
def latent_statistics(model, clips: list[np.ndarray], window: int, max_clips: int = 32) -> tuple[list, list]:
    """Per-channel mean and std of the posterior means, which the DiT's latents are normalised with (the
    real Wan VAE ships its own; a freshly fitted one has to measure them)."""
    model.eval()
    z = torch.cat([model.encode(to_video(c[None, :window])).latent_dist.mode() for c in clips[:max_clips]])
    model.train()
    dims = (0, 2, 3, 4)
    return z.mean(dims).tolist(), z.std(dims).clamp_min(1e-3).tolist()


def set_latent_statistics(model, clips: list[np.ndarray], window: int) -> None:
    mean, std = latent_statistics(model, clips, window)
    model.register_to_config(latents_mean=mean, latents_std=std)


@torch.no_grad()
def psnr(model, clips: list[np.ndarray], window: int) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of deterministic (posterior mode) reconstructions."""
    model.eval()
    values = []
    for frames in clips:
        video = to_video(frames[None, :window])
        recon = model.decode(model.encode(video).latent_dist.mode()).sample
        mse = float((((recon.clamp(-1, 1) - video) / 2) ** 2).mean())
        values.append(10 * math.log10(1 / max(mse, 1e-10)))
    model.train()
    return float(np.mean(values))


def train_vae(
    cfg: LiveTalkConfig,
    clips_dir: str | Path,
    run_dir: str | Path,
    max_steps: int,
    resume: bool,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Fit the toy VAE; checkpoints every `train.checkpoint_every` steps and at the end, resumable."""
    tcfg = cfg.train.vae
    run_dir = Path(run_dir)
    clips = load_clips(clips_dir, cfg)
    held_out, train_clips = clips[: tcfg.eval_clips], clips[tcfg.eval_clips :]
    torch.manual_seed(cfg.runtime.seed)
    model = WanVAE(cfg.vae, seed=TOY_INIT_SEED).model.train().requires_grad_(True)
    if not tcfg.train_encoder:
        model.encoder.requires_grad_(False)
        model.quant_conv.requires_grad_(False)
    engine_cfg = cfg.model_copy(deep=True)
    engine_cfg.train.engine.backend = "torch"  # a few MB on one process: no distribution to gain
    engine_cfg.train.max_steps = max_steps
    optim = engine_cfg.train.optim.model_copy(update={"lr": tcfg.lr})
    engine = TrainEngine(model, engine_cfg, optim=optim)
    generator = torch.Generator().manual_seed(cfg.runtime.seed)
    history: list[dict] = []
    if resume and (last := latest_checkpoint(run_dir)) is not None:
        state = engine.load(last)
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        history = state["history"]

    def export(directory: Path) -> None:
        set_latent_statistics(model, train_clips, tcfg.window_frames)
        model.save_pretrained(directory / "vae")
        engine_cfg.save(directory / "config.yaml")

    def checkpoint() -> Path:
        history.append({"step": engine.step, "psnr_db": psnr(model, held_out, EVAL_FRAMES)})
        extra = {"generator": generator.get_state().tolist(), "history": history}
        return engine.save(run_dir, extra=extra, export=export)

    while engine.step < max_steps:
        video = to_video(sample_windows(train_clips, tcfg.clips_per_step, tcfg.window_frames, generator))
        loss, _ = vae_loss(engine.module, video, tcfg.kl_weight, generator)
        engine.backward_step(loss)
        if on_step:
            on_step(engine.step, loss.item())
        if engine.step % cfg.train.checkpoint_every == 0 and engine.step < max_steps:
            checkpoint()
    directory = checkpoint()
    result = {"checkpoint": str(directory), "vae_path": str(directory / "vae"), "history": history}
    (run_dir / "vae_report.json").write_text(json.dumps(result, indent=2))
    return result
