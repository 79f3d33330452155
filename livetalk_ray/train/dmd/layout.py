"""Where a DMD run keeps its checkpoints, in one place (the controller writes and reads them, export reads).

RUN/checkpoints/step_NNNNNN/          one controller checkpoint, complete once controller.json exists
    controller.json                   iteration, weight version, cursors (written last)
    queue.pt                          finished rollouts waiting for the critic
    rollout_weights_vV.safetensors    generator weights the rollout workers may still be asked for
    generator/checkpoints/step_*/     the generator's engine checkpoint (+ EMA weights)
    critic/checkpoints/step_*/        the critic's
"""

from __future__ import annotations

from pathlib import Path

from livetalk_ray.train.engine import CHECKPOINT_DIR

MARKER = "controller.json"
QUEUE = "queue.pt"
ROLES = ("generator", "critic")


def step_directory(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:06d}"


def finished_steps(run_dir: str | Path) -> list[Path]:
    """Complete controller checkpoints of a run, oldest first."""
    return sorted(p.parent for p in (Path(run_dir) / CHECKPOINT_DIR).glob(f"step_*/{MARKER}"))


def role_directory(step_dir: Path, role: str) -> Path:
    """Where a role saves its engine checkpoints inside a controller checkpoint."""
    if role not in ROLES:
        raise ValueError(f"unknown DMD role {role!r}; one of {ROLES}")
    return step_dir / role


def role_engine_checkpoint(step_dir: Path, role: str) -> Path | None:
    """The role's newest engine checkpoint inside a controller checkpoint (None if it has none)."""
    inner = sorted((role_directory(step_dir, role) / CHECKPOINT_DIR).glob("step_*"))
    return inner[-1] if inner else None


def rollout_weights(step_dir: Path, version: int) -> Path:
    return step_dir / f"rollout_weights_v{version}.safetensors"
