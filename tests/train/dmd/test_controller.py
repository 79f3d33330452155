"""The asynchronous controller on a local Ray cluster: the 5:1 schedule with warm-up, bounded staleness,
exact resume including the rollout queue, and recovery from a killed role actor."""

import json
import threading
import time

import pytest
import ray
from safetensors.torch import load_file

from livetalk_ray.train.dmd.controller import Controller, request_plan
from livetalk_ray.train.dmd.schedule import generator_steps_through
from tests.train.dmd.conftest import dmd_cfg


def engine_weights(run, step, role):
    directory = sorted((run / "checkpoints" / f"step_{step:06d}" / role / "checkpoints").glob("step_*"))[-1]
    return load_file(str(directory / "model.safetensors"))


def test_schedule_staleness_and_plans_depend_on_the_index_only(dmd_checkpoints):
    cfg = dmd_cfg(*dmd_checkpoints, "train.dmd.staleness=1")
    assert [generator_steps_through(i, cfg) for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [request_plan(i, cfg)[0] for i in range(8)] == [0, 0, 0, 0, 1, 1, 2, 2]
    sync = dmd_cfg(*dmd_checkpoints, "train.dmd.staleness=0")
    assert [request_plan(i, sync)[0] for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert request_plan(5, cfg) == request_plan(5, cfg) and request_plan(5, cfg)[1] != request_plan(6, cfg)[1]


@pytest.mark.parametrize("staleness", [0, pytest.param(1, marks=pytest.mark.slow)])  # 1: slow run only
def test_stopped_and_resumed_dmd_equals_an_uninterrupted_run(
    ray_cluster, dmd_checkpoints, random_shards, tmp_path, staleness
):
    cfg = dmd_cfg(
        *dmd_checkpoints, f"train.dmd.staleness={staleness}", "train.checkpoint_every=4", "train.dmd.queue_size=3"
    )
    whole = Controller(cfg, random_shards, tmp_path / "whole", 8).run()
    Controller(cfg, random_shards, tmp_path / "split", 4).run()
    split = Controller(cfg, random_shards, tmp_path / "split", 8).run()
    assert whole["generator_steps"] == split["generator_steps"] == 3
    for role in ("generator", "critic"):
        a, b = engine_weights(tmp_path / "whole", 8, role), engine_weights(tmp_path / "split", 8, role)
        assert all(a[k].equal(b[k]) for k in a), role
    records = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["staleness"] for r in records) <= staleness
    assert sum("generator_loss" in r for r in records) == 3  # before critic steps 2, 4, 6 (0-based), after warm-up


@pytest.mark.parametrize("role", ["critic", pytest.param("generator", marks=pytest.mark.slow)])
def test_a_killed_role_costs_at_most_one_checkpoint_interval(
    ray_cluster, dmd_checkpoints, random_shards, tmp_path, role
):
    cfg = dmd_cfg(*dmd_checkpoints, "train.checkpoint_every=3")
    run = tmp_path / "run"
    controller = Controller(cfg, random_shards, run, 9)

    def kill_once() -> None:
        while not (run / "checkpoints" / "step_000003" / "controller.json").exists():
            time.sleep(0.05)
        ray.kill(ray.get_actor(f"{controller.name}:{role}:0"), no_restart=True)

    threading.Thread(target=kill_once, daemon=True).start()
    summary = controller.run()
    assert summary["step"] == 9
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert len(events) == 1 and events[0]["event"] == "role_failure" and role in events[0]["detail"].lower()
    assert 3 <= events[0]["step"] <= 6  # lost steps: at most one checkpoint interval (3)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))  # the resumed run's log continues from the checkpoint, no gaps


def test_export_writes_the_ema_student_in_livetalk_layout(ray_cluster, dmd_checkpoints, random_shards, tmp_path):
    from livetalk_ray.models.checkpoint import livetalk_key_hash, load_checkpoint
    from livetalk_ray.train.dmd.export import export_generator
    from livetalk_ray.train.dmd.roles import EMA_FILE

    cfg = dmd_cfg(*dmd_checkpoints, "train.checkpoint_every=4")
    Controller(cfg, random_shards, tmp_path / "run", 4).run()
    directory, used_ema = export_generator(tmp_path / "run", tmp_path / "export")
    assert used_ema
    model, _ = load_checkpoint(directory)
    ema = load_file(
        str(sorted((tmp_path / "run/checkpoints/step_000004/generator/checkpoints").glob("*"))[-1] / EMA_FILE)
    )
    assert all(model.state_dict()[k].equal(ema[k]) for k in ema)
    source, _ = load_checkpoint(dmd_checkpoints[1])
    assert livetalk_key_hash(model.state_dict()) == livetalk_key_hash(source.state_dict())


@pytest.mark.slow  # 63 s: two DeepSpeed ranks per role; the one-rank resume test stays in the default run
def test_trainer_roles_as_two_rank_deepspeed_groups_resume_exactly(
    ray_cluster, dmd_checkpoints, random_shards, tmp_path
):
    cfg = dmd_cfg(
        *dmd_checkpoints,
        "train.engine.backend=deepspeed",
        "train.engine.zero_stage=2",
        "train.dmd.placement.generator.count=2",
        "train.dmd.placement.critic.count=2",
        "train.dmd.placement.generator.cpus=0.2",
        "train.dmd.placement.critic.cpus=0.2",
        "train.checkpoint_every=3",
    )
    whole = Controller(cfg, random_shards, tmp_path / "whole", 6)
    assert whole.rollout_data.batch_size == whole.generator_data.batch_size == 4  # 2 ranks × micro-batch 2
    whole.run()
    Controller(cfg, random_shards, tmp_path / "split", 3).run()
    Controller(cfg, random_shards, tmp_path / "split", 6).run()
    for role in ("generator", "critic"):
        a, b = engine_weights(tmp_path / "whole", 6, role), engine_weights(tmp_path / "split", 6, role)
        assert all(a[k].equal(b[k]) for k in a), role
        state = sorted((tmp_path / "whole" / "checkpoints" / "step_000006" / role / "checkpoints").glob("step_*"))[-1]
        shards = sorted(p.name for p in (state / "train_state" / "state").glob("*optim_states.pt"))
        assert len(shards) == 2, shards  # ZeRO-2 partitions the optimizer over the group's two ranks
    records = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert sum("generator_loss" in r for r in records) == 2 and all("critic_loss" in r for r in records)


def test_a_multi_rank_trainer_role_needs_deepspeed(dmd_checkpoints):
    from livetalk_ray.config import ConfigError
    from livetalk_ray.train.dmd.placement import check_placement

    cfg = dmd_cfg(*dmd_checkpoints, "train.engine.backend=torch", "train.dmd.placement.critic.count=2")
    with pytest.raises(ConfigError, match="placement.critic.count=2 needs train.engine.backend=deepspeed"):
        check_placement(cfg)


def test_roles_that_do_not_fit_the_cluster_fail_fast_with_the_numbers(
    ray_cluster, dmd_checkpoints, random_shards, tmp_path
):
    from livetalk_ray.train.dmd.placement import PlacementError

    cfg = dmd_cfg(*dmd_checkpoints, "train.dmd.placement.critic.cpus=8", "train.dmd.role_timeout_s=3")
    with pytest.raises(PlacementError, match=r"more than the cluster has: CPU 8\.75 \(cluster: 2\)"):
        Controller(cfg, random_shards, tmp_path / "run", 4).run()


def test_roles_that_fail_to_start_leave_no_actor_or_bundle_behind(
    ray_cluster, dmd_checkpoints, random_shards, tmp_path
):
    """The critic's constructor fails (its checkpoint is corrupt) after the generator has started: the
    started roles are killed and their names released, so a retry or another run can start them again."""
    import shutil

    from ray.util import placement_group_table

    teacher, student = dmd_checkpoints
    broken = tmp_path / "broken_teacher"
    shutil.copytree(teacher, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    controller = Controller(dmd_cfg(str(broken), student), random_shards, tmp_path / "run", 4)
    with pytest.raises(Exception, match="(?i)safetensors|checkpoint"):
        controller.run()
    for role in ("generator", "critic", "teacher", "rollout"):
        with pytest.raises(ValueError):
            ray.get_actor(f"{controller.name}:{role}:0")
    assert not [g for g in placement_group_table().values() if g["state"] not in ("REMOVED",)]
