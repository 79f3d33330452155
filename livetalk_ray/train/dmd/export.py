"""`livetalk export`: the DMD generator's EMA weights (its raw weights before EMA starts) as a deployable
checkpoint directory in LiveTalk's layout: model.safetensors (Wan keys) + config.yaml."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from livetalk_ray.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from livetalk_ray.train.dmd import layout
from livetalk_ray.train.dmd.roles import EMA_FILE


def generator_directory(path: str | Path) -> Path:
    """The generator engine checkpoint inside a DMD run directory or one of its step directories."""
    path = Path(path)
    steps = [path] if (path / layout.MARKER).exists() else layout.finished_steps(path)
    if not steps:
        raise CheckpointError(
            f"{path} holds no finished DMD checkpoint (no controller.json): pass the --out of `livetalk train dmd`, "
            "or one of its checkpoints/step_NNNNNN directories"
        )
    inner = layout.role_engine_checkpoint(steps[-1], "generator")
    if inner is None:
        raise CheckpointError(f"{steps[-1]} has no generator checkpoint")
    return inner


def export_generator(path: str | Path, out: str | Path, use_ema: bool = True) -> tuple[Path, bool]:
    """Write the deployable student to `out`; returns (directory, whether EMA weights were used)."""
    source = generator_directory(path)
    model, cfg = load_checkpoint(source, causal=True)
    ema = source / EMA_FILE
    used_ema = use_ema and ema.exists()
    if used_ema:
        state = load_file(str(ema))
        dtype = next(model.parameters()).dtype
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return save_checkpoint(model, cfg, out), used_ema
