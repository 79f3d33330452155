"""DMD fixtures: a tiny teacher and student checkpoint (random weights, non-zero heads) and its config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from livetalk_ray.models.checkpoint import save_checkpoint
from livetalk_ray.models.dit import WanDiT
from tests.train.conftest import train_cfg


def dmd_cfg(teacher, student, *overrides: str):
    return train_cfg(
        f"train.dmd.teacher_checkpoint={teacher}",
        f"train.dmd.generator_checkpoint={student}",
        "train.dmd.generator_lr=1e-3",
        "train.dmd.critic_lr=1e-3",
        "train.dmd.critic_warmup=2",
        "train.dmd.critic_per_generator=2",
        "train.dmd.ema_start=1",
        "train.dmd.placement.generator.cpus=0.25",
        "train.dmd.placement.critic.cpus=0.25",
        "train.dmd.placement.teacher.cpus=0.25",
        "train.dmd.placement.rollout.cpus=0.25",
        *overrides,
    )


@pytest.fixture(scope="session")
def dmd_checkpoints(tmp_path_factory):
    cfg = train_cfg()
    root = tmp_path_factory.mktemp("dmd_ckpt")
    out = []
    for name, seed in (("teacher", 5), ("student", 6)):
        torch.manual_seed(seed)
        model = WanDiT(cfg.model)
        nn.init.normal_(model.head.head.weight, std=0.02)
        out.append(str(save_checkpoint(model, cfg, root / name)))
    return tuple(out)
