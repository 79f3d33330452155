"""Flow-matching schedule (rectified flow with timestep shift), as Wan / LiveTalk use it.

x_t = (1 - σ)·x0 + σ·ε, the model predicts v = ε - x0, σ(s) = shift·s / (1 + (shift - 1)·s), t = 1000·σ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livetalk_ray.config import SamplerConfig


class FlowSchedule:
    def __init__(self, cfg: SamplerConfig) -> None:
        self.shift = cfg.shift
        self.num_train_timesteps = cfg.num_train_timesteps

    def shift_sigma(self, s: torch.Tensor | float) -> torch.Tensor:
        s = s.to(torch.float64) if torch.is_tensor(s) else torch.tensor(s, dtype=torch.float64)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """Shifted σ for an N-step sampler, from 1 down (σ = 0 excluded), float64."""
        return self.shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1])

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """t = 1000·σ; for 4 steps and shift 5 this is [1000, 937.5, 833.33, 625]."""
        return self.sigmas(num_steps) * self.num_train_timesteps

    def sigma_of(self, t: torch.Tensor | float) -> torch.Tensor | float:
        """σ of timestep t (t = 1000·σ); a tensor keeps its dtype and device."""
        return t / self.num_train_timesteps

    def sample_train_timesteps(
        self, shape, generator: torch.Generator | None = None, min_t: float = 0.0, max_t: float = 1000.0
    ) -> torch.Tensor:
        """Training timesteps: uniform u, shifted, clamped to [min_t, max_t] (DMD uses [20, 980]). Drawn on the
        generator's device (a CUDA generator cannot fill a CPU tensor), float64."""
        device = generator.device if generator is not None else None
        u = torch.rand(shape, generator=generator, dtype=torch.float64, device=device)
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


@dataclass(frozen=True)
class StudentSteps:
    """The few-step student's schedule: the noise level σ of each step and the timestep the model is told
    there (1000·σ rounded to `timestep_dtype`, the dtype of the timestep tensor the model receives, which
    also sets the precision of its sinusoidal time embedding, as in Wan)."""

    sigmas: tuple[float, ...]
    timesteps: tuple[float, ...]
    timestep_dtype: torch.dtype


def student_steps(cfg: SamplerConfig) -> StudentSteps:
    """The student's steps: `sampler.student_timesteps` if set, else the shifted `student_steps`-step grid."""
    schedule = FlowSchedule(cfg)
    grid = cfg.student_timesteps or schedule.timesteps(cfg.student_steps).tolist()
    sigmas = tuple(schedule.sigma_of(float(t)) for t in grid)
    dtype = getattr(torch, cfg.student_timestep_dtype)
    timesteps = tuple(float(torch.tensor(float(t)).to(dtype)) for t in grid)
    return StudentSteps(sigmas, timesteps, dtype)
