"""DMD losses as pure functions of tensors and score callables (reference-models.md §3.3-3.4).

Both losses noise a generated sample x at one timestep per sample: t = 1000·shift(u), u uniform, clamped
to [20, 980]; x_t = (1 - σ)·x + σ·ε with σ = t/1000; latent frame 0 (the given reference) is overwritten
with the reference latent when one is passed. Scores are x0 predictions:

- `real_x0(x_t, t)`: the frozen teacher with CFG (the caller builds it: cond + s·(cond − uncond) with
  separate text and audio scales);
- `fake_x0(x_t, t)`: the critic, conditional only. The critic's own loss takes its velocity `fake_v`
  directly: going through x0 and back would divide rounding errors by σ (0.02 at t = 20), ruinous in bf16.

Generator: g = (x0_fake − x0_real) / mean|x − x0_real| (per sample, over every non-batch axis), NaNs to 0;
loss = 0.5·MSE(x, stopgrad(x − g)) in float64, so ∂loss/∂x = g / numel: the gradient moves x from where
the critic says the generator's samples are toward where the teacher says real samples are.

Critic: flow matching on detached generator samples, v_fake against ε − x. Unlike the
released code, whose frame mask lands on channel 0 of every frame, the reference frame really is left
out of both losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from livetalk_ray.diffusion.flow import FlowSchedule

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MIN_T, MAX_T = 20.0, 980.0


def _noised(x: torch.Tensor, flow: FlowSchedule, generator: torch.Generator | None, ref: torch.Tensor | None):
    b = x.shape[0]
    t = flow.sample_train_timesteps((b,), generator=generator, min_t=MIN_T, max_t=MAX_T).to(x.device, torch.float32)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    sigma = flow.sigma_of(t).view(b, *[1] * (x.dim() - 1)).to(x.dtype)
    xt = (1 - sigma) * x + sigma * noise
    if ref is not None:
        xt[:, :, :1] = ref.to(xt.dtype)
    return xt, t, sigma, noise


def _generated(x: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """The part of a sample the generator is responsible for (frames 1.. when frame 0 is the reference)."""
    return x[:, :, 1:] if ref is not None else x


def generator_loss(
    x: torch.Tensor,
    real_x0: Score,
    fake_x0: Score,
    flow: FlowSchedule,
    generator: torch.Generator | None = None,
    ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DMD loss of generated samples `x` (with gradient); returns the loss and diagnostics."""
    with torch.no_grad():
        xt, t, _, _ = _noised(x.detach(), flow, generator, ref)
        x0_real = real_x0(xt, t).to(x.dtype)
        x0_fake = fake_x0(xt, t).to(x.dtype)
        gen, real, fake = _generated(x.detach(), ref), _generated(x0_real, ref), _generated(x0_fake, ref)
        scale = (gen - real).abs().mean(dim=tuple(range(1, gen.dim())), keepdim=True)
        grad = torch.nan_to_num((fake - real) / scale)
    target = (_generated(x, ref) - grad).detach()
    loss = 0.5 * torch.mean((_generated(x, ref).double() - target.double()) ** 2)
    return loss, {"dmd_grad_norm": float(grad.norm()), "dmd_t_mean": float(t.mean())}


def critic_loss(
    x: torch.Tensor,
    fake_v: Score,
    flow: FlowSchedule,
    generator: torch.Generator | None = None,
    ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flow-matching loss of the critic on detached generator samples `x`."""
    x = x.detach()
    xt, t, _, noise = _noised(x, flow, generator, ref)
    v_pred = fake_v(xt, t)
    return torch.mean((_generated(v_pred, ref).float() - _generated(noise - x, ref).float()) ** 2)
