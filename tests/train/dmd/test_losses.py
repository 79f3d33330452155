"""DMD losses on a problem with a known answer: a 2-D Gaussian mixture whose denoiser is exact.

A one-step generator (noise → point) trained only through `generator_loss` (teacher = the exact mixture
denoiser, critic = a small network fitted to the generator's own samples with `critic_loss`, 5 critic
steps per generator step) must move its samples onto the mixture."""

import math

import torch
from torch import nn

from livetalk_ray.config import SamplerConfig
from livetalk_ray.diffusion.flow import FlowSchedule
from livetalk_ray.train.dmd.losses import critic_loss, generator_loss

MEANS = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]])
STD = 0.3


def mixture_samples(n: int, generator: torch.Generator) -> torch.Tensor:
    k = torch.randint(len(MEANS), (n,), generator=generator)
    return MEANS[k] + STD * torch.randn(n, 2, generator=generator)


def exact_x0(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for x_t = (1 − σ)·x0 + σ·ε and x0 from the mixture."""
    sigma = (t / 1000).view(-1, 1, 1)
    a = 1 - sigma
    var = a**2 * STD**2 + sigma**2
    diff = xt[:, None, :] - a * MEANS[None]  # [B, K, 2]
    resp = torch.softmax(-(diff**2).sum(-1, keepdim=True) / (2 * var), dim=1)
    post = MEANS[None] + (a * STD**2 / var) * diff
    return (resp * post).sum(1)


class TimeMLP(nn.Module):
    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 + 8, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(4, dtype=torch.float32)
        angle = (t / 1000)[:, None] * math.pi * 2**freqs
        return self.net(torch.cat([x, angle.sin(), angle.cos()], dim=1))


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def test_dmd_moves_a_one_step_generator_onto_the_mixture():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    flow = FlowSchedule(SamplerConfig())
    gen = nn.Sequential(nn.Linear(2, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))
    critic = TimeMLP()
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.0, 0.999))
    opt_c = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.0, 0.999))

    def fake_x0(xt, t):
        return xt - (t / 1000)[:, None] * critic(xt, t)

    reference = mixture_samples(2000, g)
    probe = torch.randn(2000, 2, generator=g)
    with torch.no_grad():
        before = energy_distance(gen(probe), reference)
    for step in range(1500):
        if step >= 100 and step % 5 == 0:  # critic warm-up, then one generator step per 5 critic steps
            loss, stats = generator_loss(gen(torch.randn(256, 2, generator=g)), exact_x0, fake_x0, flow, g)
            opt_g.zero_grad()
            loss.backward()
            opt_g.step()
            assert math.isfinite(stats["dmd_grad_norm"])
        with torch.no_grad():
            samples = gen(torch.randn(256, 2, generator=g))
        loss_c = critic_loss(samples, critic, flow, g)
        opt_c.zero_grad()
        loss_c.backward()
        opt_c.step()
    with torch.no_grad():
        out = gen(probe)
    after = energy_distance(out, reference)
    assert after < before / 10, (before, after)
    nearest = torch.cdist(out, MEANS).argmin(1)
    share = torch.bincount(nearest, minlength=4).float() / len(out)
    assert share.min() > 0.1, share  # every mode kept: no collapse onto one


def test_reference_frame_is_outside_both_losses():
    flow = FlowSchedule(SamplerConfig())
    x = torch.randn(2, 4, 3, 2, 2, requires_grad=True)
    ref = torch.randn(2, 4, 1, 2, 2)

    def real(xt, t):
        return torch.zeros_like(xt)

    def fake(xt, t):
        return xt

    loss, _ = generator_loss(x, real, fake, flow, torch.Generator().manual_seed(0), ref=ref)
    loss.backward()
    assert x.grad[:, :, 0].abs().max() == 0 and x.grad[:, :, 1:].abs().max() > 0
    seen = []

    def fake_v(xt, t):
        seen.append(xt[:, :, 0].clone())
        out = torch.zeros_like(xt)
        out[:, :, 0] = 1e6  # a wild reference-frame prediction must not count
        return out

    c = critic_loss(x, fake_v, flow, torch.Generator().manual_seed(0), ref=ref)
    assert torch.equal(seen[0], ref[:, :, 0]) and c.item() < 100


def test_generator_gradient_is_the_normalised_score_difference():
    flow = FlowSchedule(SamplerConfig())
    x = torch.randn(3, 5, requires_grad=True)
    real_x0 = torch.randn(3, 5)
    fake_x0 = torch.randn(3, 5)
    loss, _ = generator_loss(x, lambda xt, t: real_x0, lambda xt, t: fake_x0, flow)
    loss.backward()
    scale = (x.detach() - real_x0).abs().mean(1, keepdim=True)
    expected = (fake_x0 - real_x0) / scale / x.numel()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-7)
