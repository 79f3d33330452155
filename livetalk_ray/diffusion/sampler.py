"""Samplers: the teacher's many-step CFG sampler and the few-step block-autoregressive StreamingSampler.

Conditioning shared by both: `y` = the reference latent repeated over frames plus a mask channel that is
0 on latent frame 0 (known) and 1 elsewhere; latent frame 0 of the noisy input is overwritten with the
clean reference latent before every step of the first block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.diffusion.flow import FlowSchedule, student_steps
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.models.kv_cache import KVCache


def reference_condition(ref_latent: torch.Tensor, num_frames: int, frame_start: int = 0) -> torch.Tensor:
    """y for latent frames [frame_start, frame_start+num_frames): ref latent [B, C, 1, h, w] + mask."""
    lat = ref_latent.expand(-1, -1, num_frames, -1, -1)
    mask = torch.ones_like(lat[:, :1])
    if frame_start == 0:
        mask[:, :, 0] = 0
    return torch.cat([lat, mask], dim=1)


def guided_velocity(model: WanDiT, x, t, y, cond_text, uncond_text, audio, g_text: float, g_audio: float):
    """CFG with separate text and audio scales; unconditional = negative prompt and zero audio.

    Two passes when the scales are equal, otherwise three (text-only pass in between)."""
    v_cond = model(x, t, cond_text, y, audio)
    v_uncond = model(x, t, uncond_text, y, None)
    if g_text == g_audio:
        return v_uncond + g_text * (v_cond - v_uncond)
    v_text = model(x, t, cond_text, y, None)
    return v_uncond + g_text * (v_text - v_uncond) + g_audio * (v_cond - v_text)


@torch.no_grad()
def sample_teacher(
    model: WanDiT,
    cfg: LiveTalkConfig,
    noise: torch.Tensor,
    ref_latent: torch.Tensor,
    text: torch.Tensor,
    negative_text: torch.Tensor,
    audio: torch.Tensor | None,
    num_steps: int | None = None,
    keep_timesteps: list[float] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Euler flow sampler with CFG over the whole clip (bidirectional teacher).

    Returns the final latent and the states at `keep_timesteps` (those must lie on the step grid; the
    ODE-initialisation stage keeps the student's timesteps)."""
    schedule = FlowSchedule(cfg.sampler)
    steps = num_steps or cfg.sampler.teacher_steps
    sigmas = torch.cat([schedule.sigmas(steps), torch.zeros(1, dtype=torch.float64)])
    keep = {round(float(t), 3) for t in keep_timesteps or []}
    y = reference_condition(ref_latent, noise.shape[2])
    x, kept = noise.clone(), []
    for i in range(steps):
        x[:, :, :1] = ref_latent
        t = (sigmas[i] * schedule.num_train_timesteps).float()
        if round(float(t), 3) in keep:
            kept.append(x.clone())
        tt = t.expand(x.shape[0]).to(x.device)
        v = guided_velocity(
            model, x, tt, y, text, negative_text, audio, cfg.sampler.text_guidance, cfg.sampler.audio_guidance
        )
        x = x + (sigmas[i + 1] - sigmas[i]).item() * v
    x[:, :, :1] = ref_latent
    if len(kept) != len(keep):
        raise ValueError(f"keep_timesteps {sorted(keep)} are not all on the {steps}-step grid")
    return x, kept


@dataclass
class StreamState:
    """Everything one stream carries between blocks."""

    cache: KVCache
    ref_latent: torch.Tensor  # [B, C, 1, h, w], clean
    text: torch.Tensor  # raw text-encoder output [B, L, text_dim]
    generator: torch.Generator
    block_index: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class StreamingSampler:
    """Few-step block-autoregressive generation with the KV cache (LiveTalk's inference loop).

    Per block: fresh noise → `student_steps` denoising steps with fresh-noise re-noising between them →
    one more pass at t = context_noise on the clean block to rewrite its KV entries (refill)."""

    def __init__(self, model: WanDiT, cfg: LiveTalkConfig) -> None:
        self.model, self.cfg = model.eval(), cfg
        self.schedule = FlowSchedule(cfg.sampler)
        self.steps = student_steps(cfg.sampler)
        self.fpb = cfg.cache.frames_per_block

    def start(self, ref_latent: torch.Tensor, text: torch.Tensor, seed: int = 0) -> StreamState:
        p = next(self.model.parameters())
        cache = self.model.new_cache(
            ref_latent.shape[0],
            self.cfg.tokens_per_frame,
            self.cfg.cache.local_attn_size,
            self.cfg.cache.sink_size,
            self.cfg.cache.rope_positions,
        )
        gen = torch.Generator(device=p.device).manual_seed(seed)
        return StreamState(cache, ref_latent.to(p.device, p.dtype), text.to(p.device, p.dtype), gen)

    @staticmethod
    def set_prompt(state: StreamState, text: torch.Tensor) -> None:
        """Switch the text condition (e.g. a new motion prompt per turn) from the next block on."""
        state.text = text.to(state.text.device, state.text.dtype)
        state.cache.reset_text()

    def _sync(self) -> float:
        if next(self.model.parameters()).is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def next_block(
        self,
        state: StreamState,
        audio: torch.Tensor | None,
        exit_step: int | None = None,
        grad: bool = False,
        noise: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Generate the next block of latents [B, C, fpb, h, w]; `audio` is grouped [B, fpb, 4, D].

        `exit_step` ends the block after that denoising step and returns its x0 (Self-Forcing's training
        rollout); with `grad` that one forward keeps its graph, every other pass runs without. Per-phase
        seconds of this block go to `state.timings` (denoise, refill). `noise` replaces the generator's draws
        in the order they are made: the block's initial noise, then the fresh noise of each re-noising."""
        audios = None if audio is None else [audio]
        return self.next_blocks([state], audios, exit_step, grad, None if noise is None else [noise])[0]

    def next_blocks(
        self,
        states: list[StreamState],
        audios: list[torch.Tensor] | None,
        exit_step: int | None = None,
        grad: bool = False,
        noises: list[list[torch.Tensor]] | None = None,
    ) -> list[torch.Tensor]:
        """`next_block` for several streams in one batch (cross-session batching). Each stream draws its
        noise from its own generator and may be at any block, so a stream's blocks do not depend on which
        others share its batches (up to float reassociation in the batched kernels)."""
        refs = [s.ref_latent for s in states]
        starts = [s.block_index * self.fpb for s in states]
        fpb, sizes = self.fpb, [r.shape[0] for r in refs]
        device, dtype = refs[0].device, refs[0].dtype
        ref = torch.cat(refs)
        first_block = torch.tensor(
            [st == 0 for st, b in zip(starts, sizes, strict=True) for _ in range(b)], device=device
        )
        y = torch.cat([reference_condition(r, fpb, st) for r, st in zip(refs, starts, strict=True)])
        audio = None if audios is None else torch.cat(audios)
        texts, caches = [s.text for s in states], [s.cache for s in states]
        B, C, _, h, w = ref.shape
        draws = 0

        def noise() -> torch.Tensor:
            nonlocal draws
            parts = []
            for i, (b, s) in enumerate(zip(sizes, states, strict=True)):
                if noises is not None:
                    parts.append(noises[i][draws].to(device, dtype))
                else:
                    parts.append(torch.randn((b, C, fpb, h, w), generator=s.generator, device=device, dtype=dtype))
            draws += 1
            return torch.cat(parts)

        timesteps, sigmas = self.steps.timesteps, self.steps.sigmas
        last = len(timesteps) - 1 if exit_step is None else exit_step
        x = noise()
        t0 = self._sync()
        for i, t in enumerate(timesteps[: last + 1]):
            if first_block.any():
                x[first_block, :, :1] = ref[first_block]
            tt = torch.full((B, fpb), t, device=device, dtype=self.steps.timestep_dtype)
            with torch.set_grad_enabled(grad and i == last):
                v = self.model.forward_cached_many(x, tt, texts, y, caches, starts, audio)
                x0 = self.schedule.x0_from_v(x, v, sigmas[i])
            if i < last:
                x = self.schedule.add_noise(x0, noise(), sigmas[i + 1])
        if first_block.any():  # the known reference frame, kept out of the graph
            keep = (
                first_block[:, None, None, None, None]
                & (torch.arange(fpb, device=device) == 0)[None, None, :, None, None]
            )
            x0 = torch.where(keep, ref.to(x0.dtype).expand_as(x0), x0)
        t1 = self._sync()
        with torch.no_grad():
            context_t = self.cfg.cache.context_noise
            clean = x0.detach()
            if context_t > 0:
                clean = self.schedule.add_noise(clean, noise(), self.schedule.sigma_of(context_t))
            refill_t = torch.full((B, fpb), context_t, device=device, dtype=self.steps.timestep_dtype)
            self.model.forward_cached_many(clean, refill_t, texts, y, caches, starts, audio)
        t2 = self._sync()
        for state in states:
            state.timings = {"denoise": t1 - t0, "refill": t2 - t1}
            state.block_index += 1
        return list(x0.split(sizes))
