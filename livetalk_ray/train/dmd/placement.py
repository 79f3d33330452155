"""Placement is data: `train.dmd.placement` gives each role a count, CPUs, GPUs and optionally a node group
(a custom resource that nodes of one type advertise, e.g. `{"h100": 1}`); this turns it into one placement
group with a bundle per actor and starts the role actors in their bundles."""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from livetalk_ray.config import LiveTalkConfig, RolePlacement
from livetalk_ray.train.dmd import roles

NODE_GROUP_SHARE = 0.001  # a sliver of the node-group resource pins a bundle to that node type


@dataclass
class RoleActors:
    generator: ray.actor.ActorHandle
    critic: ray.actor.ActorHandle
    teachers: list[ray.actor.ActorHandle]
    rollouts: list[ray.actor.ActorHandle]
    group: object = None
    all: list[ray.actor.ActorHandle] = field(default_factory=list)

    def busy_seconds(self, timeout: float) -> dict[str, float]:
        """Seconds each role has spent computing (idle time = wall time − busy time)."""
        named = {
            "generator": [self.generator],
            "critic": [self.critic],
            "teacher": self.teachers,
            "rollout": self.rollouts,
        }
        stats = {role: ray.get([a.stats.remote() for a in actors], timeout=timeout) for role, actors in named.items()}
        return {role: sum(s["busy_seconds"] for s in values) for role, values in stats.items()}

    def kill(self) -> None:
        for actor in self.all:
            ray.kill(actor, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)


def bundle(spec: RolePlacement) -> dict[str, float]:
    out = {"CPU": spec.cpus}
    if spec.gpus:
        out["GPU"] = spec.gpus
    if spec.node_group:
        out[spec.node_group] = NODE_GROUP_SHARE
    return out


def start_roles(cfg: LiveTalkConfig, name: str, ready_timeout_s: float = 600.0) -> RoleActors:
    """Start every role actor, named `{name}:{role}:{index}` (operators and tests can find them)."""
    d = cfg.train.dmd
    if not d.generator_checkpoint or not d.teacher_checkpoint:
        from livetalk_ray.config import ConfigError

        raise ConfigError("DMD needs train.dmd.generator_checkpoint (ODE student) and train.dmd.teacher_checkpoint")
    layout = [
        ("generator", roles.GeneratorTrainer, d.placement.generator, d.generator_checkpoint, 1),
        ("critic", roles.CriticTrainer, d.placement.critic, d.teacher_checkpoint, 1),
        ("teacher", roles.TeacherScorer, d.placement.teacher, d.teacher_checkpoint, d.placement.teacher.count),
        ("rollout", roles.RolloutWorker, d.placement.rollout, d.generator_checkpoint, d.placement.rollout.count),
    ]
    bundles = [bundle(spec) for _, _, spec, _, count in layout for _ in range(count)]
    group = placement_group(bundles, strategy="PACK")
    ray.get(group.ready(), timeout=ready_timeout_s)
    cfg_json = cfg.model_dump(mode="json")
    actors: dict[str, list] = {}
    index = 0
    for role, cls, spec, checkpoint, count in layout:
        for k in range(count):
            strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)
            options = {"num_cpus": spec.cpus, "num_gpus": spec.gpus, "scheduling_strategy": strategy}
            actor = ray.remote(cls).options(name=f"{name}:{role}:{k}", max_restarts=0, **options)
            actors.setdefault(role, []).append(actor.remote(cfg_json, checkpoint))
            index += 1
    everyone = [a for group_actors in actors.values() for a in group_actors]
    ray.get([a.stats.remote() for a in everyone], timeout=ready_timeout_s)  # constructors finished
    return RoleActors(
        actors["generator"][0], actors["critic"][0], actors["teacher"], actors["rollout"], group, everyone
    )
