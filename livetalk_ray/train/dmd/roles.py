"""The four roles of on-policy DMD. Each is a plain class (usable in one process, as the tests and the
synchronous baseline do); the controller turns them into Ray actors with the resources from
`train.dmd.placement`.

- `TeacherScorer`: the frozen bidirectional teacher; x0 with text + audio CFG (the "real" score).
- `CriticTrainer`: the bidirectional fake score, initialised from the teacher, trained with flow matching
  on detached generator rollouts; also serves its conditional x0 to the generator step.
- `GeneratorTrainer`: the causal student (from the ODE initialisation), its engine and EMA; one step =
  its own Self-Forcing rollout with gradient at one exit step shared by all blocks, then the DMD loss.
- `RolloutWorker`: a no-grad copy of the generator producing rollouts tagged with the weight version.

A trainer role with `placement.<role>.count = N` is a DeepSpeed group of N rank actors: each takes its
share of every batch (the controller draws N micro-batches), DeepSpeed averages the gradients, and rank 0
publishes weights, keeps the EMA and writes the exported model.

Tensors cross role boundaries on the CPU (Ray's object store), whatever device a role computes on.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from livetalk_ray import metrics
from livetalk_ray.config import LiveTalkConfig, resolve_device, resolve_dtype
from livetalk_ray.diffusion.clips import conditions, rollout
from livetalk_ray.diffusion.flow import FlowSchedule
from livetalk_ray.diffusion.sampler import guided_velocity, reference_condition
from livetalk_ray.models.checkpoint import load_checkpoint
from livetalk_ray.models.conditioning import negative_text
from livetalk_ray.seeds import seed_of
from livetalk_ray.train.dmd.losses import critic_loss, generator_loss
from livetalk_ray.train.dmd.schedule import generator_schedule_steps
from livetalk_ray.train.engine import TrainEngine

Batch = dict[str, Any]  # ref_latent, audio_features, text_embedding (CPU tensors)
EMA_FILE = "ema.safetensors"  # the generator's EMA weights in the Wan layout, beside its engine checkpoint


def _cfg(cfg: LiveTalkConfig | dict) -> LiveTalkConfig:
    return cfg if isinstance(cfg, LiveTalkConfig) else LiveTalkConfig.model_validate(cfg)


def _call(role, method: str, *args):
    """Call a role's method whether it is an object in this process or a Ray actor handle."""
    fn = getattr(role, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args))
    return fn(*args)


class _Role:
    def __init__(self, cfg: LiveTalkConfig | dict, checkpoint: str, causal: bool) -> None:
        self.cfg = _cfg(cfg)
        self.device = resolve_device(self.cfg.runtime)
        self.dtype = resolve_dtype(self.cfg.runtime, self.device)
        self.flow = FlowSchedule(self.cfg.sampler)
        self.model, _ = load_checkpoint(checkpoint, device=self.device, dtype=self.dtype, causal=causal)
        self.busy_seconds = 0.0

    def conditions(self, batch: Batch):
        return conditions(batch, self.cfg, self.device, self.dtype)

    def _x0(self, v: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.flow.x0_from_v(xt.float(), v.float(), self.flow.sigma_of(t))

    def stats(self) -> dict[str, float]:
        return {"busy_seconds": self.busy_seconds}

    def _busy(self, start: float, role: str, step: bool = False, waited: float = 0.0) -> None:
        """Account one call's compute (minus time spent waiting on other roles) and export it."""
        seconds = time.perf_counter() - start - waited
        self.busy_seconds += seconds
        metrics.record(metrics.TRAIN_STEP_SECONDS, seconds, role=role)
        if step:
            metrics.record(metrics.TRAIN_STEPS, role=role)


class TeacherScorer(_Role):
    def __init__(self, cfg: LiveTalkConfig | dict, checkpoint: str) -> None:
        super().__init__(cfg, checkpoint, causal=False)
        self.model.eval().requires_grad_(False)
        self.negative = negative_text(self.cfg, self.device, self.dtype)

    @torch.no_grad()
    def x0(self, xt: torch.Tensor, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        start = time.perf_counter()
        ref, text, audio = self.conditions(batch)
        x = xt.to(self.device, self.dtype)
        y = reference_condition(ref, x.shape[2]).to(self.dtype)
        s = self.cfg.sampler
        tt = t.to(self.device)
        v = guided_velocity(
            self.model, x, tt, y, text, self.negative.expand_as(text), audio, s.text_guidance, s.audio_guidance
        )
        out = self._x0(v, xt.to(self.device), tt).cpu()
        self._busy(start, "teacher_score")
        return out


def _pick(roles, rank: int):
    """Rank r of a trainer group asks scorer r mod n (a pool spreads the load); a single role is its own pool."""
    return roles[rank % len(roles)] if isinstance(roles, list | tuple) else roles


class _Trainer(_Role):
    """A trainer role's rank. With `world=1` it is ready at once; rank actors of a larger group are ready
    after every rank has called `join` (the process group rendezvous)."""

    def __init__(
        self, cfg: LiveTalkConfig | dict, checkpoint: str, causal: bool, lr: float, schedule_steps: int, world: int = 1
    ) -> None:
        super().__init__(cfg, checkpoint, causal)
        self.model.train().requires_grad_(True)
        self.optim = self.cfg.train.optim.model_copy(update={"lr": lr, "betas": self.cfg.train.dmd.betas})
        self.schedule_steps = schedule_steps  # this role's own steps in a run of train.max_steps iterations
        self.rank, self.world = 0, world
        if world == 1:
            self.engine = self._engine()

    def _engine(self) -> TrainEngine:
        return TrainEngine(self.model, self.cfg, optim=self.optim, schedule_steps=self.schedule_steps)

    @staticmethod
    def rendezvous_address() -> tuple[str, int]:
        """Called on rank 0: this node's address and a free port for the group's process group."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, rank: int, world: int, address: str, port: int) -> int:
        """Enter the role's process group (gloo on CPU, NCCL on CUDA, via DeepSpeed) and build the engine."""
        self.rank, self.world = rank, world
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=address, MASTER_PORT=str(port)
        )
        self.engine = self._engine()
        return rank

    def share(self, batch: Batch) -> Batch:
        """This rank's contiguous share of a group batch (every rank holds micro_batch_per_worker samples)."""
        return {k: _share(v, self.rank, self.world) for k, v in batch.items()}

    def rank_seed(self, seed: int) -> int:
        """This rank's seed for a step: rank 0 (and a group of one) keeps the controller's."""
        return seed if self.rank == 0 else seed_of(seed, "rank", self.rank)

    def save(self, run_dir: str, extra: dict | None = None) -> str:
        return str(self.engine.save(run_dir, extra=extra))

    def load(self, directory: str) -> dict:
        return self.engine.load(directory)

    @property
    def step(self) -> int:
        return self.engine.step


def _share(value, rank: int, world: int):
    if world == 1:
        return value
    size = len(value) // world
    return value[rank * size : (rank + 1) * size]


class CriticTrainer(_Trainer):
    def __init__(self, cfg: LiveTalkConfig | dict, checkpoint: str, world: int = 1) -> None:
        cfg = _cfg(cfg)
        d = cfg.train.dmd
        super().__init__(cfg, checkpoint, causal=False, lr=d.critic_lr, schedule_steps=cfg.train.max_steps, world=world)

    def _v(self, module, xt: torch.Tensor, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        ref, text, audio = self.conditions(batch)
        y = reference_condition(ref, xt.shape[2]).to(self.dtype)
        return module(xt.to(self.device, self.dtype), t.to(self.device), text, y, audio).float()

    @torch.no_grad()
    def x0(self, xt: torch.Tensor, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The fake score for one generator rank: the bare model, so no collective runs on this rank alone."""
        start = time.perf_counter()
        out = self._x0(self._v(self.model, xt, t, batch), xt.to(self.device), t.to(self.device)).cpu()
        self._busy(start, "critic_score")
        return out

    def train_step(self, x: torch.Tensor, batch: Batch, seed: int) -> dict[str, float]:
        start = time.perf_counter()
        x, batch = _share(x, self.rank, self.world), self.share(batch)
        ref = self.conditions(batch)[0]
        gen = torch.Generator(device=self.device).manual_seed(self.rank_seed(seed))
        v = lambda xt, t: self._v(self.engine.module, xt, t, batch)  # noqa: E731
        loss = critic_loss(x.to(self.device), v, self.flow, gen, ref=ref)
        self.engine.backward_step(loss)
        self._busy(start, "critic", step=True)
        return {"critic_loss": float(loss.detach()), "critic_step": self.engine.step}


class GeneratorTrainer(_Trainer):
    def __init__(self, cfg: LiveTalkConfig | dict, checkpoint: str, world: int = 1) -> None:
        cfg = _cfg(cfg)
        lr, steps = cfg.train.dmd.generator_lr, generator_schedule_steps(cfg)
        super().__init__(cfg, checkpoint, causal=True, lr=lr, schedule_steps=steps, world=world)
        self.ema: dict[str, torch.Tensor] | None = None  # fp32 shadow on rank 0, created at train.dmd.ema_start

    def train_step(self, batch: Batch, seed: int, exit_step: int, teacher, critic) -> dict[str, float]:
        """Own rollout with gradient at `exit_step`, scored by the teacher and the critic (objects or actors,
        or pools of them: rank r asks member r mod n)."""
        start = time.perf_counter()
        batch, seed = self.share(batch), self.rank_seed(seed)
        teacher, critic = _pick(teacher, self.rank), _pick(critic, self.rank)
        ref, text, audio = self.conditions(batch)
        x = rollout(self.model, self.cfg, ref, text, audio, seed, exit_step, grad=True)
        gen = torch.Generator(device=self.device).manual_seed(seed_of(seed, "dmd.generator.scores"))
        waited = 0.0

        def remote_x0(role):
            def score(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                nonlocal waited
                t0 = time.perf_counter()
                out = _call(role, "x0", xt.cpu(), t.cpu(), batch).to(self.device)
                waited += time.perf_counter() - t0
                return out

            return score

        loss, stats = generator_loss(x.float(), remote_x0(teacher), remote_x0(critic), self.flow, gen, ref=ref)
        self.engine.backward_step(loss)
        self.model.train()  # the rollout's sampler switched to eval mode (no behavioural difference in WanDiT)
        self._busy(start, "generator", step=True, waited=waited)
        return {"generator_loss": float(loss.detach()), "generator_step": self.engine.step, **stats}

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        if self.rank != 0:
            return
        params = {k: v.detach().float() for k, v in self.model.state_dict().items()}
        if self.ema is None:
            self.ema = {k: v.clone().cpu() for k, v in params.items()}
            return
        for k, v in params.items():
            self.ema[k].mul_(decay).add_(v.cpu(), alpha=1 - decay)

    def save_with_ema(self, run_dir: str, extra: dict | None = None) -> str:
        from safetensors.torch import save_file

        directory = self.engine.save(run_dir, extra=extra)
        if self.ema is not None and self.rank == 0:
            save_file(self.ema, str(directory / EMA_FILE))
        return str(directory)

    def load_with_ema(self, directory: str) -> dict:
        from safetensors.torch import load_file

        state = self.engine.load(directory)
        path = Path(directory) / EMA_FILE
        self.ema = load_file(str(path)) if path.exists() else None
        return state

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


class RolloutWorker(_Role):
    def __init__(self, cfg: LiveTalkConfig | dict, checkpoint: str) -> None:
        super().__init__(cfg, checkpoint, causal=True)
        self.model.eval().requires_grad_(False)
        self.version = 0

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        self.model.load_state_dict(state)
        self.version = version
        return version

    @torch.no_grad()
    def rollout(self, batch: Batch, seed: int, exit_step: int) -> tuple[torch.Tensor, int]:
        start = time.perf_counter()
        ref, text, audio = self.conditions(batch)
        x = rollout(self.model, self.cfg, ref, text, audio, seed, exit_step, grad=False).float().cpu()
        self._busy(start, "rollout")
        return x, self.version
