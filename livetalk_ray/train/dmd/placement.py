"""Placement is data: `train.dmd.placement` gives each role a count, CPUs, GPUs and optionally a node group
(a custom resource that nodes of one type advertise, e.g. `{"h100": 1}`); this turns it into one placement
group with a bundle per actor and starts the role actors in their bundles. Generator and critic with a
count above one are DeepSpeed groups: their ranks meet in a process group before the run starts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from livetalk_ray.config import LiveTalkConfig, RolePlacement
from livetalk_ray.train.dmd import roles

NODE_GROUP_SHARE = 0.001  # a sliver of the node-group resource pins a bundle to that node type


@dataclass
class RoleActors:
    generators: list[ray.actor.ActorHandle]  # the generator's ranks; rank 0 publishes weights and the EMA
    critics: list[ray.actor.ActorHandle]
    teachers: list[ray.actor.ActorHandle]
    rollouts: list[ray.actor.ActorHandle]
    group: object = None
    all: list[ray.actor.ActorHandle] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def generator(self) -> ray.actor.ActorHandle:
        return self.generators[0]

    def busy_seconds(self, timeout: float) -> dict[str, float]:
        """Seconds each role has spent computing (idle time = wall time − busy time)."""
        named = {
            "generator": self.generators,
            "critic": self.critics,
            "teacher": self.teachers,
            "rollout": self.rollouts,
        }
        stats = {role: ray.get([a.stats.remote() for a in actors], timeout=timeout) for role, actors in named.items()}
        return {role: sum(s["busy_seconds"] for s in values) for role, values in stats.items()}

    def kill(self) -> None:
        kill_roles(self.all, self.names, self.group)


def kill_roles(actors: list, names: list[str], group, release_timeout_s: float = 30.0) -> None:
    """Kill the actors and free their bundles, then wait until their names are released: a restarted run
    names its new actors the same, and `ray.kill` only asks the GCS to end them."""
    for actor in actors:
        ray.kill(actor, no_restart=True)
    if group is not None:
        remove_placement_group(group)
    deadline = time.monotonic() + release_timeout_s
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name)
            except ValueError:
                break
            time.sleep(0.05)


def bundle(spec: RolePlacement) -> dict[str, float]:
    out = {"CPU": spec.cpus}
    if spec.gpus:
        out["GPU"] = spec.gpus
    if spec.node_group:
        out[spec.node_group] = NODE_GROUP_SHARE
    return out


def start_roles(cfg: LiveTalkConfig, name: str) -> RoleActors:
    """Start every role actor, named `{name}:{role}:{index}` (operators and tests can find them)."""
    check_placement(cfg)
    d, ready_timeout_s = cfg.train.dmd, cfg.train.dmd.role_timeout_s
    layout = [
        (
            "generator",
            roles.GeneratorTrainer,
            d.placement.generator,
            d.generator_checkpoint,
            d.placement.generator.count,
        ),
        ("critic", roles.CriticTrainer, d.placement.critic, d.teacher_checkpoint, d.placement.critic.count),
        ("teacher", roles.TeacherScorer, d.placement.teacher, d.teacher_checkpoint, d.placement.teacher.count),
        ("rollout", roles.RolloutWorker, d.placement.rollout, d.generator_checkpoint, d.placement.rollout.count),
    ]
    bundles = [bundle(spec) for _, _, spec, _, count in layout for _ in range(count)]
    group = placement_group(bundles, strategy="PACK")
    if not group.wait(timeout_seconds=ready_timeout_s):
        remove_placement_group(group)
        raise PlacementError(_placement_report(bundles))
    cfg_json = cfg.model_dump(mode="json")
    actors: dict[str, list] = {}
    everyone, names = [], []
    try:
        for role, cls, spec, checkpoint, count in layout:
            for k in range(count):
                index = len(everyone)
                strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)
                options = {"num_cpus": spec.cpus, "num_gpus": spec.gpus, "scheduling_strategy": strategy}
                names.append(f"{name}:{role}:{k}")
                actor = ray.remote(cls).options(name=names[-1], max_restarts=0, **options)
                args = (cfg_json, checkpoint, count) if role in TRAINER_ROLES else (cfg_json, checkpoint)
                everyone.append(actor.remote(*args))
                actors.setdefault(role, []).append(everyone[-1])
        ray.get([a.stats.remote() for a in everyone], timeout=ready_timeout_s)  # constructors finished
        joins = []  # both groups rendezvous at once (each rank's join blocks until its whole group has joined)
        for role in TRAINER_ROLES:
            ranks = actors[role]
            if len(ranks) > 1:
                address, port = ray.get(ranks[0].rendezvous_address.remote(), timeout=ready_timeout_s)
                joins += [a.join.remote(r, len(ranks), address, port) for r, a in enumerate(ranks)]
        ray.get(joins, timeout=ready_timeout_s)
    except BaseException:
        kill_roles(everyone, names, group)  # a role that failed to start must not leave its siblings running
        raise
    generators, critics, teachers, rollouts = (actors[r] for r in ("generator", "critic", "teacher", "rollout"))
    return RoleActors(generators, critics, teachers, rollouts, group, everyone, names)


TRAINER_ROLES = ("generator", "critic")


class PlacementError(RuntimeError):
    """The roles' resources never became available: not retried (a restart would wait again)."""


def _placement_report(bundles: list[dict[str, float]]) -> str:
    demand: dict[str, float] = {}
    for b in bundles:
        for key, value in b.items():
            demand[key] = demand.get(key, 0.0) + value
    have = ray.cluster_resources()
    short = ", ".join(f"{k} {v:g} (cluster: {have.get(k, 0):g})" for k, v in demand.items() if v > have.get(k, 0))
    return (
        f"the DMD roles' placement group was not ready in time; they need {demand}"
        + (f"; more than the cluster has: {short}" if short else "; the cluster is busy")
        + ". Lower train.dmd.placement.<role>.cpus/gpus/count, or add nodes."
    )


def check_placement(cfg: LiveTalkConfig) -> None:
    """Errors a user can fix before any actor starts."""
    from livetalk_ray.config import ConfigError

    d = cfg.train.dmd
    if not d.generator_checkpoint or not d.teacher_checkpoint:
        raise ConfigError("DMD needs train.dmd.generator_checkpoint (ODE student) and train.dmd.teacher_checkpoint")
    for role in TRAINER_ROLES:
        count = getattr(d.placement, role).count
        if count > 1 and cfg.train.engine.backend != "deepspeed":
            raise ConfigError(
                f"train.dmd.placement.{role}.count={count} needs train.engine.backend=deepspeed: a trainer role of "
                "several ranks is a DeepSpeed group (its rollout calls the model outside any DDP wrapper)"
            )
