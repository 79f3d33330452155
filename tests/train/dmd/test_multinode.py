"""DMD on a simulated multi-node cluster: a head node and two worker node types whose custom resources stand
in for GPU types (trainer GPUs for generator and critic, sampler GPUs for teacher and rollouts). A short run
places every role on the node of its `train.dmd.placement.<role>.node_group`; a node group that no node
provides fails fast with PlacementError.

The cluster lives in a child process (this module run with `python -m`). A driver joins one cluster only, and
the pytest process may already be the driver of the session `ray_cluster` fixture (or become it later). The
child also gets its own RAY_TMPDIR, because `Cluster` writes its address to `<ray temp dir>/ray_current_cluster`
and a plain `ray.init()` anywhere on the machine, such as another test running at the same time, would join
that cluster instead of starting its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.train.dmd.controller import Controller
from livetalk_ray.train.dmd.placement import bundle
from livetalk_ray.train.dmd.schedule import generator_steps_through
from tests.train.dmd.conftest import dmd_cfg

REPO = Path(__file__).resolve().parents[3]
ROLE_GROUPS = {"generator": "trainer_gpu", "critic": "trainer_gpu", "teacher": "sampler_gpu", "rollout": "sampler_gpu"}
MISSING_GROUP = "h100_nowhere"
STEPS = 5  # critic warm-up 2, then a generator step every 2 critic steps: generator steps at iterations 2 and 4
CHILD_TIMEOUT_S = 600  # cluster start-up and actor imports are slow on a loaded 2-core machine


def placed(*overrides: str, groups: dict[str, str] = ROLE_GROUPS) -> list[str]:
    return [f"train.dmd.placement.{role}.node_group={group}" for role, group in groups.items()] + list(overrides)


def test_roles_run_on_their_node_groups_and_an_absent_group_fails_fast(dmd_checkpoints, random_shards, tmp_path):
    # No retries: a role that fails on a remote node must fail the test, not restart from a checkpoint.
    cfg = dmd_cfg(*dmd_checkpoints, *placed("train.dmd.role_timeout_s=120", "train.max_failures=0"))
    unplaceable = dmd_cfg(
        *dmd_checkpoints,
        *placed("train.dmd.role_timeout_s=5", groups={**ROLE_GROUPS, "teacher": MISSING_GROUP}),
    )
    # Each worker node type advertises exactly the custom resources that placement.bundle asks of its roles.
    node_types: dict[str, dict[str, float]] = {}
    for role, group in ROLE_GROUPS.items():
        custom = {k: 1.0 for k in bundle(getattr(cfg.train.dmd.placement, role)) if k not in ("CPU", "GPU")}
        assert custom == {group: 1.0}, custom
        node_types[group] = custom
    run = tmp_path / "run"
    spec = {
        "cfg": cfg.model_dump(mode="json"),
        "unplaceable_cfg": unplaceable.model_dump(mode="json"),
        "data": str(random_shards),
        "run_dir": str(run),
        "steps": STEPS,
        "worker_nodes": list(node_types.values()),
        "result": str(tmp_path / "result.json"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = run_child(tmp_path / "spec.json")

    # (a) The run finished: every iteration, the scheduled generator steps, no role failure on the way.
    assert result["summary"]["step"] == STEPS
    assert result["summary"]["generator_steps"] == generator_steps_through(STEPS - 1, cfg) == 2
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert sum("generator_loss" in r for r in records) == 2
    assert all(seconds > 0 for seconds in records[-1]["busy_s"].values()), records[-1]["busy_s"]  # every role worked
    assert not (run / "events.jsonl").exists()

    # (b) Each role actor's process ran on a node advertising the role's node group (the head has none).
    nodes: dict[str, dict[str, float]] = result["nodes"]
    assert len(nodes) == 1 + len(node_types)
    role_nodes: dict[str, list[str]] = result["role_nodes"]
    assert set(role_nodes) == set(ROLE_GROUPS)
    for role, group in ROLE_GROUPS.items():
        assert len(role_nodes[role]) == getattr(cfg.train.dmd.placement, role).count
        for node in role_nodes[role]:
            assert group in nodes[node], (role, group, nodes[node])

    # (c) Roles of different node groups ran on different nodes; roles of one group share its single node.
    by_group: dict[str, set[str]] = {}
    for role, group in ROLE_GROUPS.items():
        by_group.setdefault(group, set()).update(role_nodes[role])
    assert all(len(group_nodes) == 1 for group_nodes in by_group.values()), by_group
    assert by_group["trainer_gpu"].isdisjoint(by_group["sampler_gpu"]), by_group

    # A node group nobody provides: the existing PlacementError, naming the missing resource, after about
    # role_timeout_s (5 s), and neither run leaves a placement group behind.
    assert f"{MISSING_GROUP} 0.001 (cluster: 0)" in (result["placement_error"] or ""), result["placement_error"]
    assert result["placement_error_s"] < 60, result["placement_error_s"]
    assert result["groups_left"] == [], result["groups_left"]


def run_child(spec_path: Path) -> dict:
    ray_tmp = tempfile.mkdtemp(prefix="ltmn-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.setdefault("RAY_AUTH_MODE", "disabled")  # the same in every process of the child's cluster
    env.pop("RAY_ADDRESS", None)  # the child must start its own cluster, never join one
    command = [sys.executable, "-m", "tests.train.dmd.test_multinode", str(spec_path)]
    # A session of its own: on a timeout the child and every Ray process it started go at once.
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"the multi-node run took over {CHILD_TIMEOUT_S} s:\n{output[-5000:]}") from None
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, output[-5000:]
    return json.loads(Path(json.loads(spec_path.read_text())["result"]).read_text())


# ---------------------------------------------------------------------------------------- the child process
def _node_id(actor: object) -> str:
    """Run inside a role actor (through `__ray_call__`): the node its process is on."""
    return ray.get_runtime_context().get_node_id()


class RecordingController(Controller):
    """The DMD controller, plus a record of where the role actors run, asked of the actors themselves."""

    role_nodes: dict[str, list[str]]

    def _start(self) -> None:
        super()._start()
        roles, timeout = self.roles, self.cfg.train.dmd.role_timeout_s
        named = {"generator": roles.generators, "critic": roles.critics, "teacher": roles.teachers}
        named["rollout"] = roles.rollouts
        self.role_nodes = {
            role: ray.get([a.__ray_call__.remote(_node_id) for a in actors], timeout=timeout)
            for role, actors in named.items()
        }


def main(spec_path: str) -> None:
    from ray.cluster_utils import Cluster

    from livetalk_ray.train.dmd.placement import PlacementError

    spec = json.loads(Path(spec_path).read_text())
    # Any one node can hold all four roles' CPUs (4 × 0.25): only the node groups split them. Without them
    # the PACK placement group puts every role on a single node (seen: all on one worker).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for resources in spec["worker_nodes"]:
            cluster.add_node(num_cpus=1, resources=resources)
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        result: dict = {"nodes": {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}
        cfg = LiveTalkConfig.model_validate(spec["cfg"])
        controller = RecordingController(cfg, spec["data"], spec["run_dir"], spec["steps"])
        result["summary"] = controller.run()
        result["role_nodes"] = controller.role_nodes

        unplaceable = LiveTalkConfig.model_validate(spec["unplaceable_cfg"])
        started, result["placement_error"] = time.monotonic(), None
        try:
            Controller(unplaceable, spec["data"], spec["run_dir"] + "-unplaceable", spec["steps"]).run()
        except PlacementError as exc:
            result["placement_error"] = str(exc)
        result["placement_error_s"] = time.monotonic() - started
        groups = ray.util.placement_group_table().values()
        result["groups_left"] = [g["state"] for g in groups if g["state"] != "REMOVED"]
        Path(spec["result"]).write_text(json.dumps(result))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
