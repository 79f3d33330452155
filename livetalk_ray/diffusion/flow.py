"""Flow-matching schedule (rectified flow with timestep shift), as Wan / LiveTalk use it.

x_t = (1 - σ)·x0 + σ·ε, the model predicts v = ε - x0, σ(s) = shift·s / (1 + (shift - 1)·s), t = 1000·σ.
"""

from __future__ import annotations

import torch

from livetalk_ray.config import SamplerConfig


class FlowSchedule:
    def __init__(self, cfg: SamplerConfig) -> None:
        self.shift = cfg.shift
        self.num_train_timesteps = cfg.num_train_timesteps

    def shift_sigma(self, s: torch.Tensor | float) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=torch.float64)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """Shifted σ for an N-step sampler, from 1 down (σ = 0 excluded), float64."""
        return self.shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1])

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """t = 1000·σ; for 4 steps and shift 5 this is [1000, 937.5, 833.33, 625]."""
        return self.sigmas(num_steps) * self.num_train_timesteps

    def sigma_of(self, t: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps

    def sample_train_timesteps(
        self, shape, generator: torch.Generator | None = None, min_t: float = 0.0, max_t: float = 1000.0
    ) -> torch.Tensor:
        """Training timesteps: uniform u, shifted, clamped to [min_t, max_t] (DMD uses [20, 980])."""
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        return (self.shift_sigma(u) * self.num_train_timesteps).clamp(min_t, max_t)

    @staticmethod
    def _bcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ of shape [], [B] or per frame [B, F] → broadcastable to latents [B, C, F, H, W]."""
        sigma = torch.as_tensor(sigma, device=like.device).to(like.dtype)
        if sigma.dim() == 1:
            return sigma.view(-1, 1, 1, 1, 1)
        if sigma.dim() == 2:
            return sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)
        return sigma

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        s = self._bcast(sigma, x0)
        return (1 - s) * x0 + s * noise

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
        return x_t - self._bcast(sigma, x_t) * v

    def v_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
        return (x_t - x0) / self._bcast(sigma, x_t)

    @staticmethod
    def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0
