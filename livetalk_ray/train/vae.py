"""Toy VAE fit: a small diffusers `AutoencoderKLWan` trained on toy-world clips until reconstructions stay
faithful for minutes. Real presets never train a VAE: they load the pretrained Wan 2.1 VAE.

The Wan VAE is causal with a feature cache, and serving runs it as one endless stream. A toy VAE fitted on
short windows falls apart once a stream runs past them (its decoder's temporal receptive field is ~80 frames),
so it is trained the way it is used: each step advances `clips_per_step` of `streams` live streams, picked at
random, by one chunk of `chunk_latents` latent frames, encoder and decoder caches carried from chunk to chunk
and detached between steps (truncated backpropagation through the stream). A stream plays a clip forwards and
backwards (no cuts) for about `episode_chunks` chunks, then a new stream on another clip takes its place; all
streams restart at every checkpoint, so a resumed run continues bit-exactly from weights and generator state.
Loss per chunk: L1 + MSE of the posterior sample's reconstruction plus a small KL term. The report is held-out
PSNR over the first 33 frames and over a long stream. The result is a diffusers directory (`vae/` inside each
checkpoint) for `--set vae.path=...`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from livetalk_ray.config import TOY_INIT_SEED, LiveTalkConfig, resolve_device, video_frames_of
from livetalk_ray.data.sources import discover
from livetalk_ray.models.vae import WanVAE, decode_chunk, detach_cache, encode_chunk, new_cache, temporal_factor
from livetalk_ray.train.engine import TrainEngine, latest_checkpoint

# Held-out PSNR over the first 33 frames of each clip (as whole-clip encode/decode sees them) and over a long
# stream (`train.vae.eval_stream_seconds`), which is where a VAE that only learnt short windows shows it.
EVAL_FRAMES = 33


def load_clips(clips_dir: str | Path, cfg: LiveTalkConfig) -> list[np.ndarray]:
    """Frames [T, H, W, 3] of every readable clip at the preset resolution, at least `EVAL_FRAMES` long."""
    from livetalk_ray.data.curation import Rejected, decode_frames, probe

    clip_cfg = cfg.model_copy(deep=True)
    clip_cfg.data.num_frames = EVAL_FRAMES
    clips = []
    for source in discover(clips_dir)[1]:
        if source.video is None:
            continue
        try:
            clips.append(decode_frames(source.video, probe(source.video, clip_cfg), clip_cfg))
        except Rejected:
            continue  # broken or short clips teach nothing; `data prepare` reports them
    if len(clips) <= cfg.train.vae.psnr_clips:
        raise FileNotFoundError(
            f"{clips_dir}: need more than {cfg.train.vae.psnr_clips} readable clips, "
            f"found {len(clips)} (make some with `livetalk demo-data`)"
        )
    return clips


def to_video(frames: np.ndarray) -> torch.Tensor:
    """[B, T, H, W, 3] uint8 → [B, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def ping_pong(clip: np.ndarray, start: int, count: int) -> np.ndarray:
    """Frames `start .. start+count` of the clip played forwards, backwards, forwards, ... (no cuts)."""
    period = 2 * (len(clip) - 1)
    q = (start + np.arange(count)) % period
    return clip[np.where(q < len(clip), q, period - q)]


class Stream:
    """One training stream: a clip played forwards and backwards from a random frame for `length` chunks,
    with the encoder and decoder caches it has built so far (None until its first chunk)."""

    def __init__(self, clips: list[np.ndarray], episode_chunks: int, generator: torch.Generator) -> None:
        self.clip = clips[int(torch.randint(len(clips), (1,), generator=generator))]
        self.start = int(torch.randint(2 * len(self.clip), (1,), generator=generator))
        # lengths spread around the mean so that the pool's streams do not all restart together
        self.length = int(
            torch.randint(max(1, episode_chunks // 2), episode_chunks * 3 // 2 + 1, (1,), generator=generator)
        )
        self.frames_in = self.chunks = 0  # chunks done; a stream with none yet starts at its first frame
        self.encoder_cache: list | None = None
        self.decoder_cache: list | None = None

    def next_frames(self, latents: int, temporal: int) -> np.ndarray:
        frames = video_frames_of(latents, temporal, at_start=self.frames_in == 0)
        out = ping_pong(self.clip, self.start + self.frames_in, frames)
        self.frames_in += frames
        return out

    def key(self) -> tuple:
        """Streams with equal keys have caches of equal shapes and can share one batched forward."""
        if self.encoder_cache is None:
            return ("new",)
        return tuple(tuple(c.shape) if torch.is_tensor(c) else c for c in self.encoder_cache + self.decoder_cache)


class StreamPool:
    """`size` live training streams. Each step advances a random few of them by one chunk; a stream that has
    run its length is replaced by a new one on another clip. Picking from many streams keeps consecutive
    steps from training on the same few clips (with 4 streams advanced together, the held-out PSNR fell while
    the training loss dropped: the model fitted the clips of the moment)."""

    def __init__(self, clips: list[np.ndarray], size: int, episode_chunks: int, generator: torch.Generator) -> None:
        self.clips, self.episode_chunks, self.generator = clips, episode_chunks, generator
        self.streams = [Stream(clips, episode_chunks, generator) for _ in range(size)]

    def pick(self, count: int) -> list[Stream]:
        order = torch.randperm(len(self.streams), generator=self.generator)[:count].tolist()
        return [self.streams[i] for i in order]

    def after_step(self, picked: list[Stream]) -> None:
        """Cut the picked streams' caches from the graph and replace the streams that have ended."""
        for stream in picked:
            stream.encoder_cache = detach_cache(stream.encoder_cache)
            stream.decoder_cache = detach_cache(stream.decoder_cache)
            stream.chunks += 1
            if stream.chunks >= stream.length:
                self.streams[self.streams.index(stream)] = Stream(self.clips, self.episode_chunks, self.generator)


def _stack_caches(model, part: str, caches: list[list | None]) -> list:
    if caches[0] is None:
        return new_cache(model, part)
    return [torch.cat(entries) if torch.is_tensor(entries[0]) else entries[0] for entries in zip(*caches, strict=True)]


def _split_cache(cache: list, count: int) -> list[list]:
    parts = [c.chunk(count) if torch.is_tensor(c) else [c] * count for c in cache]
    return [list(entries) for entries in zip(*parts, strict=True)]


def stream_loss(model, picked: list[Stream], latents: int, kl_weight: float, generator: torch.Generator):
    """Reconstruction loss of the picked streams' next chunk, frame-weighted over groups of streams that can
    be batched together (gradients reach back to the chunk's first frame; older frames act through the
    caches only)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    device = next(model.parameters()).device
    temporal = temporal_factor(model)
    groups: dict[tuple, list[Stream]] = {}
    for stream in picked:
        groups.setdefault(stream.key(), []).append(stream)
    total, frames = 0.0, 0
    for group in groups.values():
        latents_in = group[0].chunks * latents
        video = to_video(np.stack([s.next_frames(latents, temporal) for s in group])).to(device)
        encoder_cache = _stack_caches(model, "encoder", [s.encoder_cache for s in group])
        decoder_cache = _stack_caches(model, "decoder", [s.decoder_cache for s in group])
        moments = encode_chunk(model, video, encoder_cache, 0 if latents_in == 0 else 1)
        posterior = DiagonalGaussianDistribution(moments)
        recon = decode_chunk(model, posterior.sample(generator), decoder_cache, latents_in)
        loss = (recon - video).abs().mean() + ((recon - video) ** 2).mean() + kl_weight * posterior.kl().mean()
        count = video.shape[0] * video.shape[2]
        total, frames = total + loss * count, frames + count
        for stream, enc, dec in zip(
            group, _split_cache(encoder_cache, len(group)), _split_cache(decoder_cache, len(group)), strict=True
        ):
            stream.encoder_cache, stream.decoder_cache = enc, dec
    return total / frames


@torch.no_grad()
def reconstruct_stream(model, video: torch.Tensor, latents: int = 4) -> torch.Tensor:
    """Deterministic (posterior mode) reconstruction of a whole video [B, 3, T, H, W] run as one stream in
    chunks, as serving decodes it; T = 1 + 4k frames."""
    temporal = temporal_factor(model)
    encoder, decoder = new_cache(model, "encoder"), new_cache(model, "decoder")
    out, frames_in, latents_in = [], 0, 0
    while frames_in < video.shape[2]:
        frames = video_frames_of(latents, temporal, at_start=frames_in == 0)
        chunk = video[:, :, frames_in : frames_in + frames]
        moments = encode_chunk(model, chunk, encoder, frames_in)
        z = moments[:, : moments.shape[1] // 2]
        out.append(decode_chunk(model, z, decoder, latents_in).clamp(-1, 1))
        frames_in += chunk.shape[2]
        latents_in += z.shape[2]
    return torch.cat(out, dim=2)


@torch.no_grad()
def psnr(model, clips: list[np.ndarray], frames: int = EVAL_FRAMES) -> float:
    """PSNR (dB, pixels in [0, 1]) of deterministic streamed reconstructions of the first `frames` frames of
    each clip played forwards and backwards (4k+1 frames)."""
    model.eval()
    video = to_video(np.stack([ping_pong(clip, 0, frames) for clip in clips]))
    video = video.to(next(model.parameters()).device)
    recon = reconstruct_stream(model, video).to(video.dtype)
    model.train()
    mse = (((recon - video) / 2) ** 2).mean(dim=(1, 2, 3, 4)).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def latent_statistics(model, clips: list[np.ndarray], max_clips: int = 32) -> tuple[list, list]:
    """Per-channel mean and std of the posterior means, which the DiT's latents are normalised with (the
    real Wan VAE ships its own; a freshly fitted one has to measure them)."""
    model.eval()
    device = next(model.parameters()).device
    videos = [to_video(c[None, :EVAL_FRAMES]).to(device) for c in clips[:max_clips]]
    z = torch.cat([model.encode(v).latent_dist.mode() for v in videos])
    model.train()
    dims = (0, 2, 3, 4)
    return z.mean(dims).tolist(), z.std(dims).clamp_min(1e-3).tolist()


def train_vae(
    cfg: LiveTalkConfig,
    clips_dir: str | Path,
    run_dir: str | Path,
    max_steps: int,
    resume: bool,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Fit the toy VAE (from `vae.path` when set, else from scratch) until step `max_steps` (its LR schedule
    spans `train.max_steps`); checkpoints every `train.checkpoint_every` steps and at the end, resumable
    bit-exactly."""
    tcfg = cfg.train.vae
    run_dir = Path(run_dir)
    clips = load_clips(clips_dir, cfg)
    held_out, train_clips = clips[: tcfg.psnr_clips], clips[tcfg.psnr_clips :]
    torch.manual_seed(cfg.runtime.seed)
    model = WanVAE(cfg.vae, seed=TOY_INIT_SEED).model.train().requires_grad_(True)
    model.to(resolve_device(cfg.runtime))
    if not tcfg.train_encoder:
        model.encoder.requires_grad_(False)
        model.quant_conv.requires_grad_(False)
    engine_cfg = cfg.model_copy(deep=True)
    engine_cfg.train.engine.backend = "torch"  # a few MB on one process: no distribution to gain
    optim = engine_cfg.train.optim.model_copy(update={"lr": tcfg.lr, "schedule": tcfg.schedule})
    engine = TrainEngine(model, engine_cfg, optim=optim)
    generator = torch.Generator().manual_seed(cfg.runtime.seed)
    history: list[dict] = []
    if resume and (last := latest_checkpoint(run_dir)) is not None:
        state = engine.load(last)
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        history = state["history"]

    def export(directory: Path) -> None:
        mean, std = latent_statistics(model, train_clips)
        model.register_to_config(latents_mean=mean, latents_std=std)
        model.save_pretrained(directory / "vae")
        engine_cfg.save(directory / "config.yaml")

    def checkpoint() -> Path:
        history.append(
            {
                "step": engine.step,
                "psnr_db": psnr(model, held_out),
                "stream_psnr_db": psnr(model, held_out, stream_frames),
            }
        )
        extra = {"generator": generator.get_state().tolist(), "history": history}
        return engine.save(run_dir, extra=extra, export=export)

    temporal = cfg.vae.temporal_factor
    stream_frames = 1 + temporal * round(tcfg.eval_stream_seconds * cfg.video.fps / temporal)
    pool: StreamPool | None = None
    while engine.step < max_steps:
        if pool is None:
            pool = StreamPool(train_clips, tcfg.streams, tcfg.episode_chunks, generator)
        picked = pool.pick(tcfg.clips_per_step)
        loss = stream_loss(engine.module, picked, tcfg.chunk_latents, tcfg.kl_weight, generator)
        engine.backward_step(loss)
        pool.after_step(picked)
        if on_step:
            on_step(engine.step, loss.item())
        if engine.step % cfg.train.checkpoint_every == 0 and engine.step < max_steps:
            checkpoint()
            pool = None  # streams restart at checkpoints, so a resumed run continues exactly
    directory = checkpoint()
    result = {"checkpoint": str(directory), "vae_path": str(directory / "vae"), "history": history}
    (run_dir / "vae_report.json").write_text(json.dumps(result, indent=2))
    return result
