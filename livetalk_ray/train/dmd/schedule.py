"""Which DMD iterations take a generator step. Iteration i is one critic step; after `critic_warmup`
critic-only steps the generator steps once every `critic_per_generator` iterations."""

from __future__ import annotations

from livetalk_ray.config import LiveTalkConfig


def generator_steps_through(i: int, cfg: LiveTalkConfig) -> int:
    """G(i): generator steps taken before critic step i runs (the step at iteration i included)."""
    d = cfg.train.dmd
    return 0 if i < d.critic_warmup else (i - d.critic_warmup) // d.critic_per_generator + 1


def takes_generator_step(i: int, cfg: LiveTalkConfig) -> bool:
    d = cfg.train.dmd
    return i >= d.critic_warmup and (i - d.critic_warmup) % d.critic_per_generator == 0


def generator_schedule_steps(cfg: LiveTalkConfig) -> int:
    """Generator steps of a whole run of `train.max_steps` critic steps: the span of the generator's LR schedule."""
    return max(1, generator_steps_through(cfg.train.max_steps - 1, cfg))
