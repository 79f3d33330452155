"""The DMD roles in one process: a generator step scored by a teacher and a critic, critic steps, EMA, and
rollout workers that reproduce the generator's own rollouts from published weights."""

import torch

from livetalk_ray.data.reader import ShardReader
from livetalk_ray.diffusion.clips import CONDITION_COLUMNS, rollout
from livetalk_ray.train.dmd.roles import CriticTrainer, GeneratorTrainer, RolloutWorker, TeacherScorer
from tests.train.dmd.conftest import dmd_cfg


def conditions(shards, cfg):
    return next(ShardReader(shards, cfg, columns=CONDITION_COLUMNS).iter_batches(2))


def test_generator_and_critic_steps_move_their_weights(dmd_checkpoints, random_shards):
    cfg = dmd_cfg(*dmd_checkpoints, "train.engine.backend=torch")
    batch = conditions(random_shards, cfg)
    teacher, critic = TeacherScorer(cfg, dmd_checkpoints[0]), CriticTrainer(cfg, dmd_checkpoints[0])
    generator = GeneratorTrainer(cfg, dmd_checkpoints[1])
    before = generator.weights()
    stats = generator.train_step(batch, seed=1, exit_step=2, teacher=teacher, critic=critic)
    assert stats["generator_step"] == 1 and torch.isfinite(torch.tensor(stats["generator_loss"]))
    after = generator.weights()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    worker = RolloutWorker(cfg, dmd_checkpoints[1])
    x, version = worker.rollout(batch, seed=4, exit_step=1)
    c = critic.train_step(x, batch, seed=9)
    assert c["critic_step"] == 1 and c["critic_loss"] > 0
    generator.update_ema(0.5)
    generator.update_ema(0.5)
    assert torch.equal(generator.ema["head.head.weight"], after["head.head.weight"].float())


def test_rollout_worker_reproduces_the_generators_rollout_for_a_version(dmd_checkpoints, random_shards):
    cfg = dmd_cfg(*dmd_checkpoints, "train.engine.backend=torch")
    batch = conditions(random_shards, cfg)
    generator = GeneratorTrainer(cfg, dmd_checkpoints[1])
    worker = RolloutWorker(cfg, dmd_checkpoints[1])
    assert worker.set_weights(generator.weights(), 7) == 7
    x, version = worker.rollout(batch, seed=3, exit_step=2)
    ref, text, audio = generator.conditions(batch)
    with torch.no_grad():
        own = rollout(generator.model, cfg, ref, text, audio, 3, 2, grad=False)
    assert version == 7 and torch.equal(x, own.float())
    assert torch.equal(x[:, :, :1], ref)  # the reference frame is given
