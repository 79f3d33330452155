"""ODE stage: trajectories at the student's timesteps (resumable, seeded per clip), the regression loss's
semantics, and exact resume of the student's training."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from livetalk_ray.data.schema import SchemaError
from livetalk_ray.diffusion.clips import conditions
from livetalk_ray.diffusion.sampler import sample_teacher
from livetalk_ray.models.checkpoint import save_checkpoint
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.train.launch import run_stage
from livetalk_ray.train.ode import (
    STATES,
    TrajectoryMaker,
    generate_trajectories,
    noise_seed,
    ode_loss,
    student_timesteps,
    trajectory_shards,
)
from tests.train.conftest import train_cfg
from tests.train.test_loop import assert_same_weights, weights


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    cfg = train_cfg()
    torch.manual_seed(3)
    model = WanDiT(cfg.model, causal=False)
    nn.init.normal_(model.head.head.weight, std=0.02)  # Wan zero-inits the head: give it a non-trivial field
    return save_checkpoint(model, cfg, tmp_path_factory.mktemp("teacher") / "step_000001")


@pytest.fixture(scope="module")
def trajectories(random_shards, teacher_dir, tmp_path_factory):
    cfg = train_cfg(f"train.ode.teacher_checkpoint={teacher_dir}", "train.ode.clips_per_call=3")
    out = tmp_path_factory.mktemp("traj")
    generate_trajectories(cfg, random_shards, out, use_ray=False, progress=False)
    return cfg, out


def test_states_are_the_teacher_samplers_own_states_for_the_clips_seed(trajectories, teacher_dir):
    cfg, out = trajectories
    assert student_timesteps(cfg) == [1000.0, 937.5, 833.3333333333334, 625.0]
    files = trajectory_shards(out, cfg)
    table = pq.read_table(files[0])
    assert table.num_rows == 4 and "latents" in table.column_names  # inputs are carried along
    states = np.array(table.column(STATES).combine_chunks().to_numpy_ndarray())
    assert states.shape == (4, 5, cfg.vae.z_dim, 9, cfg.latent_height, cfg.latent_width)
    # Row 2 alone (another batch split than generation used) reproduces its trajectory from the clip's seed.
    from livetalk_ray.data.reader import table_to_batch

    maker = TrajectoryMaker(cfg)
    batch = table_to_batch(table.slice(2, 1))
    ref, text, audio = conditions(batch, cfg, "cpu", torch.float32)
    seed = noise_seed(cfg.runtime.seed, batch["clip_id"][0], 0)
    noise = torch.randn(
        (cfg.vae.z_dim, 9, cfg.latent_height, cfg.latent_width), generator=torch.Generator().manual_seed(seed)
    )[None]
    final, kept = sample_teacher(
        maker.teacher, cfg, noise, ref, text, torch.zeros_like(text), audio, keep_timesteps=student_timesteps(cfg)
    )
    expected = torch.stack([*kept, final], dim=1)[0].numpy()
    np.testing.assert_allclose(states[2], expected.astype(np.float16), rtol=2e-3, atol=2e-3)
    noise16 = noise[0].numpy().astype(np.float16)
    assert np.array_equal(states[2, 0, :, 1:], noise16[:, 1:])  # t = 1000 is the pure noise (frame 0: ref)


def test_generation_resumes_by_shard_and_stats_count_the_work(trajectories, random_shards):
    cfg, out = trajectories
    stats = json.loads((out / "ode_stats.json").read_text())
    assert stats["trajectories"] == 8 and stats["made_this_run"] == 8
    first = (out / "shards" / "shard-00001.parquet").read_bytes()
    (out / "shards" / "shard-00001.parquet").unlink()
    again = generate_trajectories(cfg, random_shards, out, use_ray=False, progress=False)
    assert again["made_this_run"] == 4 and again["trajectories"] == 8
    assert pq.read_table(out / "shards" / "shard-00001.parquet").equals(pq.read_table(pa.BufferReader(first)))


def test_plain_shards_are_not_trajectories(random_shards):
    with pytest.raises(SchemaError, match="no 'ode_states' column: make trajectories with `livetalk ode generate`"):
        trajectory_shards(random_shards, train_cfg())


class Oracle(nn.Module):
    """Predicts exactly the velocity that maps x_t to the trajectory end; records the timesteps it saw."""

    def __init__(self, target):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.target, self.seen = target, []

    def forward(self, x, t, context, y, audio):
        self.seen.append(t)
        return (x - self.target) / (t / 1000).view(t.shape[0], 1, t.shape[1], 1, 1) + self.w


def test_loss_draws_one_student_timestep_per_block_and_regresses_x0_onto_the_end():
    cfg = train_cfg()
    g = torch.Generator().manual_seed(0)
    z, h = cfg.vae.z_dim, cfg.latent_height
    states = torch.randn(3, 5, z, 9, h, h, generator=g)
    batch = {
        STATES: states,
        "ref_latent": torch.randn(3, z, 1, h, h, generator=g),
        "audio_features": torch.randn(3, 33, cfg.audio.feature_dim, generator=g),
        "text_embedding": torch.randn(3, cfg.text.max_length, cfg.text.d_model, generator=g),
    }
    oracle = Oracle(states[:, -1])
    assert ode_loss(oracle, batch, cfg).item() < 1e-10
    t = oracle.seen[0]
    assert t.shape == (3, 9)
    blocks = t.view(3, 3, 3)
    assert torch.equal(blocks, blocks[:, :, :1].expand_as(blocks))  # one timestep per block
    assert set(t.unique().tolist()) <= set(student_timesteps(cfg))
    off = Oracle(states[:, -1] + 1.0)
    assert abs(ode_loss(off, batch, cfg).item() - 1.0) < 1e-5  # plain MSE on x0


def test_stopped_and_resumed_student_equals_an_uninterrupted_run(trajectories, tmp_path):
    cfg, out = trajectories
    cfg = cfg.model_copy(deep=True)
    cfg.train.checkpoint_every = 2
    run_stage("ode", cfg, out, tmp_path / "whole", 4, use_ray=False)
    run_stage("ode", cfg, out, tmp_path / "split", 2, use_ray=False)
    summary = run_stage("ode", cfg, out, tmp_path / "split", 4, resume=True, use_ray=False)
    assert summary["stage"] == "ode" and summary["step"] == 4
    assert_same_weights(weights(tmp_path / "whole", 4), weights(tmp_path / "split", 4))
