"""Named random streams: distinct seeds per stream and index, stable across processes."""

from livetalk_ray.config import load_config
from livetalk_ray.seeds import seed_of
from livetalk_ray.train.dmd.controller import request_plan

STREAMS = ("dmd.rollout", "dmd.exit_step", "dmd.critic", "dmd.generator", "dmd.generator.scores", "rank")


def test_streams_and_indices_never_share_a_seed():
    seeds = [seed_of(base, name, i) for base in (0, 1, 2) for name in STREAMS for i in range(2000)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    assert seed_of(0, "dmd.rollout", 12) != seed_of(0, "dmd.rollout", 1, 2)  # indices are not concatenated


def test_seeds_are_stable_across_processes_and_versions():
    # a resumed run on another machine must draw the same numbers: the hash is fixed, not Python's hash()
    assert seed_of(0, "dmd.rollout", 0) == 1619686039241552388
    assert seed_of(7, "rank", 1) == 5903668133070241991


def test_dmd_plan_seeds_do_not_collide():
    """Before: the critic's seed of step i was the generator's of step i, and the generator's scoring seed
    the rollout seed of the next step (`2i + 1` arithmetic)."""
    cfg = load_config("toy")
    base = cfg.runtime.seed
    used = []
    for i in range(300):
        used += [request_plan(i, cfg)[1], seed_of(base, "dmd.critic", i)]
        used += [g := seed_of(base, "dmd.generator", i), seed_of(g, "dmd.generator.scores")]
    assert len(set(used)) == len(used)
