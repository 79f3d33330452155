"""One training engine per model: DeepSpeed (ZeRO stage from config) or plain torch (DDP when distributed).

The engine owns the optimizer (a torch AdamW in both cases, so DeepSpeed never JIT-compiles fused or CPU
Adam), the LR schedule, gradient accumulation and clipping, and full-state checkpoints:

    checkpoints/step_000100/
      model.safetensors   the weights in LiveTalk's Wan layout (loadable by `livetalk generate`)
      config.yaml         the resolved config
      train_state/        optimizer, scheduler, step (DeepSpeed's own files, or torch's)
      rng_rank{R}.pt      every RNG of every rank
      trainer.json        step, data cursor and whatever the caller adds

Resuming from it continues bit-exactly on CPU with fixed seeds (tested).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from livetalk_ray.config import LiveTalkConfig, OptimConfig, resume_changes

CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (its trainer.json is written last)."""
    done = sorted(p.parent for p in (Path(run_dir) / CHECKPOINT_DIR).glob("step_*/trainer.json"))
    return done[-1] if done else None


def lr_lambda(optim: OptimConfig, max_steps: int):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def init_distributed_for_deepspeed() -> None:
    """DeepSpeed needs a process group; reuse Ray Train's or torchrun's, else start a world of one.

    On the CPU accelerator DeepSpeed JIT-compiles a shared-memory comm op (30-50 s, every cold cache);
    gloo does the job without it, so the build is skipped."""
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        if os.environ["WORLD_SIZE"] == "1":
            # A world of one rendezvouses in memory: no TCP port to pick, race for or expose.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainEngine:
    def __init__(
        self,
        model: nn.Module,
        cfg: LiveTalkConfig,
        optim: OptimConfig | None = None,
        schedule_steps: int | None = None,
    ) -> None:
        """`optim` and `schedule_steps` (the LR schedule's span) default to `train.optim` and `train.max_steps`;
        a DMD generator passes its own step count, as it steps once per several iterations."""
        self.cfg, self.model = cfg, model
        train, optim = cfg.train, optim or cfg.train.optim
        params = [p for p in model.parameters() if p.requires_grad]
        # foreach=False: the same kernels on every backend, so resumed runs match bit for bit
        optimizer = torch.optim.AdamW(
            params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, foreach=False
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, schedule_steps or train.max_steps))
        self.backend = train.engine.backend
        self.micro_steps = 0
        if self.backend == "deepspeed":
            import deepspeed

            init_distributed_for_deepspeed()
            param = next(model.parameters())
            ds_config = {
                "train_micro_batch_size_per_gpu": train.engine.micro_batch_per_worker,
                "gradient_accumulation_steps": train.engine.grad_accum_steps,
                "gradient_clipping": train.engine.grad_clip,
                "zero_optimization": {"stage": train.engine.zero_stage},
                "bf16": {"enabled": param.dtype == torch.bfloat16},
                "steps_per_print": 10**9,
                "zero_allow_untested_optimizer": True,
            }
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
            )
            self.module = self.engine
        else:
            self.optimizer, self.scheduler = optimizer, scheduler
            self.module = nn.parallel.DistributedDataParallel(model) if _world() > 1 else model

    # ---- training ----
    @property
    def step(self) -> int:
        """Optimizer steps taken (micro-steps / gradient accumulation)."""
        return self.micro_steps // self.cfg.train.engine.grad_accum_steps

    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward one micro-batch; on an accumulation boundary clip, step and advance the LR schedule.
        Returns whether an optimizer step happened."""
        accum = self.cfg.train.engine.grad_accum_steps
        if self.backend == "deepspeed":
            self.engine.backward(loss)
            self.engine.step()
        else:
            (loss / accum).backward()
            if (self.micro_steps + 1) % accum == 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.engine.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1
        return self.micro_steps % accum == 0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- checkpoints ----
    def save(
        self, run_dir: str | Path, extra: dict[str, Any] | None = None, export: Callable[[Path], None] | None = None
    ) -> Path:
        """Full state at the current step; every rank calls it (DeepSpeed gathers), rank 0 writes the rest.

        `export(directory)` writes the deployable weights; by default the DiT in LiveTalk's Wan layout."""
        from livetalk_ray.models.checkpoint import save_checkpoint

        directory = checkpoint_path(run_dir, self.step)
        directory.mkdir(parents=True, exist_ok=True)
        rank = _rank()
        if self.backend == "deepspeed":
            self.engine.save_checkpoint(str(directory / "train_state"), tag="state")
        elif rank == 0:
            (directory / "train_state").mkdir(exist_ok=True)
            torch.save(
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                directory / "train_state" / "torch.pt",
            )
        torch.save(rng_state(), directory / f"rng_rank{rank}.pt")
        _barrier()
        if rank == 0:
            if export is None:
                save_checkpoint(self.model, self.cfg, directory)
            else:
                export(directory)
            state = {"step": self.step, "micro_steps": self.micro_steps, **(extra or {})}
            (directory / "trainer.json").write_text(json.dumps(state, indent=2))  # last: marks it complete
        _barrier()
        return directory

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer, schedule and RNGs; returns trainer.json (step, data cursor, ...)."""
        directory = Path(directory)
        state = json.loads((directory / "trainer.json").read_text())
        if (directory / "config.yaml").is_file():  # refuses another model or schedule, reports the rest
            state["config_changes"] = resume_changes(directory / "config.yaml", self.cfg)
            if state["config_changes"] and _rank() == 0:
                print(f"resuming {directory} with changed settings: " + "; ".join(state["config_changes"]))
        if self.backend == "deepspeed":
            self.engine.load_checkpoint(str(directory / "train_state"), tag="state")
        else:
            saved = torch.load(directory / "train_state" / "torch.pt", weights_only=False)
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(torch.load(directory / f"rng_rank{_rank()}.pt", weights_only=False))
        self.micro_steps = state["micro_steps"]
        return state


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
