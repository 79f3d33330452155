"""cluster/: the ray-up config passes Ray's own schema; the RayService serves exactly serve_apps/gpu_cluster.yaml;
one RayJob per jobs/ stage, with arguments the CLI accepts, wired output to input; every KubeRay group is a copy of
raycluster.yaml's; and the node types advertise exactly the custom resources DMD's placement asks for, enough of
them to place its roles. Nothing is started. The checking is done by the CLI's own option parser and by Ray's
own code: ray-schema.json, the config preparation of `ray up`, and the KubeRay autoscaler's reading of a RayCluster
(the last two are private functions; Ray is pinned, so they change only with it)."""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import click
import jsonschema
import pytest
import ray
import typer
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema

from livetalk_ray.cli import app
from livetalk_ray.config import LiveTalkConfig, load_config
from livetalk_ray.train.dmd.placement import bundle
from livetalk_ray.train.engine import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
STAGES = sorted(p.stem for p in (ROOT / "jobs").glob("*.py"))
JOB_FILES = sorted((KUBERAY / "rayjobs").glob("*.yaml"))
RAY_STANDARD_RESOURCES = {"CPU", "GPU", "TPU", "memory", "object_store_memory"}
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def image_is_gpu(image: str) -> bool:
    """Our image (cluster/Dockerfile), pinned to this package's and the installed Ray's versions; True for GPU."""
    tag = f"{PROJECT_VERSION}-ray{ray.__version__}-py311"
    match = re.fullmatch(rf"[\w.\-/]+/livetalk-ray:{re.escape(tag)}(-gpu)?", image)
    assert match, f"{image} is not livetalk-ray:{tag}[-gpu]"
    return match.group(1) is not None


# ---------------------------------------------------------------- ray up


def test_ray_up_config_passes_rays_schema_and_bootstrap():
    config = load(CLUSTER / "ray-up.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does: provider defaults filled in
    validate_config(prepared)
    commands = [c for key, value in prepared.items() if key.endswith("_commands") for c in value]
    assert not [c for c in commands if re.search(r"pip install.*\bray\b", c)], "Ray comes from the image"


def test_ray_up_head_is_cpu_only_and_gpu_workers_use_the_gpu_image():
    config = load(CLUSTER / "ray-up.yaml")
    types, docker = config["available_node_types"], config["docker"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not image_is_gpu(docker["head_image"])
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    assert any(spec["resources"].get("GPU", 0) > 0 for spec in workers.values())
    for name, spec in workers.items():
        image = spec.get("docker", {}).get("worker_image", docker["worker_image"])
        assert image_is_gpu(image) == (spec["resources"].get("GPU", 0) > 0), name
    assert any("--metrics-export-port=8080" in c for c in config["head_start_ray_commands"])
    assert any("--metrics-export-port=8080" in c for c in config["worker_start_ray_commands"])


# ---------------------------------------------------------------- RayService


def test_rayservice_serves_exactly_the_gpu_cluster_serve_config():
    service = load(KUBERAY / "rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    assert served == load(ROOT / "serve_apps" / "gpu_cluster.yaml")


# ---------------------------------------------------------------- RayJobs


def job_subcommand(stage: str) -> list[str]:
    """The `livetalk` subcommand jobs/<stage>.py runs: the literal list it passes to `app`."""
    for node in ast.walk(ast.parse((ROOT / "jobs" / f"{stage}.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "app":
            return [e.value for e in node.args[0].elts if isinstance(e, ast.Constant)]
    raise AssertionError(f"jobs/{stage}.py does not call the livetalk app")


def parse_entrypoint(entrypoint: str) -> tuple[str, dict]:
    """(stage, options) as the stage's CLI command parses the entrypoint's arguments; unknown options fail."""
    argv = shlex.split(entrypoint)
    match = re.fullmatch(r"jobs/(\w+)\.py", argv[1])
    assert argv[0] == "python" and match, f"entrypoint should be `python jobs/<stage>.py ...`: {entrypoint}"
    stage = match.group(1)
    command = typer.main.get_command(app)
    names = job_subcommand(stage)
    for name in names:
        command = command.get_command(click.Context(command), name)
        assert command is not None, f"no livetalk command {' '.join(names)}"
    return stage, command.make_context(names[-1], argv[2:]).params


def job_config(options: dict) -> LiveTalkConfig:
    """The config the job runs with; the job's working_dir is the repository root (in the image)."""
    config = options.get("config")
    return load_config(options.get("preset"), ROOT / config if config else None, options.get("set_"))


def stage_job(path: Path) -> tuple[str, dict, LiveTalkConfig]:
    """(stage, parsed options, resolved config) of one RayJob manifest."""
    stage, options = parse_entrypoint(load(path)["spec"]["entrypoint"])
    return stage, options, job_config(options)


def test_every_job_stage_has_exactly_one_rayjob():
    assert sorted(parse_entrypoint(load(p)["spec"]["entrypoint"])[0] for p in JOB_FILES) == STAGES
    assert [p.stem for p in JOB_FILES] == STAGES  # rayjobs/<stage>.yaml, one file per stage


def dockerfile_workdir() -> str:
    return re.search(r"^WORKDIR (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.stem)
def test_rayjob_spec(path):
    job = load(path)
    spec = job["spec"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert set(env) <= set(RuntimeEnv.known_fields)
    assert env["working_dir"] == f"local://{dockerfile_workdir()}", "jobs run the checkout baked into the image"
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.stem)
def test_rayjob_entrypoint_is_accepted_by_the_cli(path):
    spec = load(path)["spec"]
    stage, options, _ = stage_job(path)  # the config file exists and every --set is valid
    assert path.stem == stage
    if "resume" in options and spec.get("backoffLimit", 0) > 0:
        assert options["resume"], "a retried training job must continue from its newest checkpoint"


def test_the_stages_read_what_the_previous_stages_wrote():
    by_stage = {path.stem: stage_job(path) for path in JOB_FILES}
    opts = {stage: options for stage, (_, options, _) in by_stage.items()}

    def final_checkpoint(stage: str) -> Path:
        options, cfg = opts[stage], by_stage[stage][2]
        assert not cfg.train.plateau.stop, f"{stage} could stop before its last step"
        return checkpoint_path(options["out"], options["max_steps"] or cfg.train.max_steps)

    shards, teacher = opts["data_prepare"]["out"], final_checkpoint("teacher")
    assert opts["teacher"]["data"] == shards
    assert (opts["ode_generate"]["data"], opts["ode_generate"]["teacher"]) == (shards, teacher)
    assert (opts["ode"]["data"], opts["ode"]["teacher"]) == (opts["ode_generate"]["out"], teacher)
    assert (opts["dmd"]["data"], opts["dmd"]["teacher"]) == (shards, teacher)
    assert opts["dmd"]["generator"] == final_checkpoint("ode")


def test_training_and_serving_use_the_same_encoders():
    (application,) = load(ROOT / "serve_apps" / "gpu_cluster.yaml")["applications"]
    served = load_config(application["args"]["preset"], None, application["args"]["set"])
    trained = load_config(config_file=CLUSTER / "configs" / "wan-1.3b.yaml")
    for section in ("vae", "audio", "text"):
        assert getattr(trained, section).path == getattr(served, section).path, section


def test_the_image_holds_what_the_jobs_run():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray.__version__)}$", dockerfile, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311\$\{FLAVOR\}$", dockerfile, re.M)
    copied = set(re.findall(r"^COPY \S+ (\S+) ", dockerfile, re.M))
    assert {"livetalk_ray", "jobs", "serve_apps", "cluster/configs"} <= copied


# ---------------------------------------------------------------- KubeRay cluster specs


def cluster_specs() -> dict[str, dict]:
    specs = {
        "raycluster": load(KUBERAY / "raycluster.yaml")["spec"],
        "rayservice": load(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"],
    }
    specs.update({f"rayjobs/{p.stem}": load(p)["spec"]["rayClusterSpec"] for p in JOB_FILES})
    return specs


def groups(spec: dict) -> dict[str, dict]:
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def node_types(spec: dict) -> dict[str, dict]:
    """What Ray's autoscaler makes of a RayCluster spec inside KubeRay (it also checks it against ray-schema)."""
    custom_resource = {"metadata": {"name": "livetalk", "namespace": "default"}, "spec": spec}
    return _derive_autoscaling_config_from_ray_cr(custom_resource)["available_node_types"]


@pytest.mark.parametrize("name", cluster_specs())
def test_cluster_spec_structure(name):
    spec = cluster_specs()[name]
    assert spec["rayVersion"] == ray.__version__
    derived = node_types(spec)
    assert derived["headgroup"]["resources"].get("GPU", 0) == 0
    for group_name, group in groups(spec).items():
        params, pod = group["rayStartParams"], group["template"]["spec"]
        assert all(isinstance(v, str) for v in params.values()), f"{group_name}: rayStartParams are strings"
        container = pod["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert {"cpu", "memory"} <= set(limits) and requests == limits, group_name  # guaranteed QoS
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert image_is_gpu(container["image"]) == (gpus > 0), group_name
        assert int(params.get("num-gpus", 0)) == gpus, f"{group_name}: num-gpus must match nvidia.com/gpu"
        assert params["metrics-export-port"] == "8080", group_name  # Prometheus scrapes this port
        assert 8080 in {p["containerPort"] for p in container["ports"]}, group_name
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
        assert claims[mounts["/mnt/shared"]], f"{group_name}: checkpoints go to a shared volume claim"
        if group_name != "head":
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group_name
    assert groups(spec)["head"]["rayStartParams"].get("num-gpus", "0") == "0"


@pytest.mark.parametrize("name", [n for n in cluster_specs() if n != "raycluster"])
def test_groups_are_copies_of_the_rayclusters(name):
    reference = groups(cluster_specs()["raycluster"])
    for group_name, group in groups(cluster_specs()[name]).items():
        assert group_name in reference, f"{group_name} is not a group of raycluster.yaml"
        for key in ("rayStartParams", "template"):
            assert group[key] == reference[group_name][key], f"{name} {group_name}.{key} differs from raycluster.yaml"


@pytest.mark.parametrize("name", ["raycluster", "rayservice"])
def test_long_lived_clusters_autoscale_gpu_workers(name):
    spec = cluster_specs()[name]
    assert spec["enableInTreeAutoscaling"] is True and "autoscalerOptions" in spec
    gpu_types = [t for t in node_types(spec).values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] > t["min_workers"] for t in gpu_types)


# ---------------------------------------------------------------- DMD placement ↔ node types


def dmd_bundles() -> list[dict[str, float]]:
    """The placement-group bundles `livetalk train dmd` asks for, with the DMD job's own config."""
    placement = stage_job(KUBERAY / "rayjobs" / "dmd.yaml")[2].train.dmd.placement
    roles = (placement.generator, placement.critic, placement.teacher, placement.rollout)
    return [bundle(role) for role in roles for _ in range(role.count)]


def ray_up_nodes() -> list[dict[str, float]]:
    config = load(CLUSTER / "ray-up.yaml")
    types = config["available_node_types"]
    count = {name: 1 if name == config["head_node_type"] else t.get("max_workers", 0) for name, t in types.items()}
    return [types[name]["resources"] for name in types for _ in range(count[name])]


def kuberay_nodes(spec: dict) -> list[dict[str, float]]:
    types = node_types(spec)
    return [t["resources"] for name, t in types.items() for _ in range(1 if name == "headgroup" else t["max_workers"])]


def first_fit(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    """The bundles that find no node with room, each placed whole on one node, biggest GPU demand first."""
    free, unplaced = [dict(n) for n in nodes], []
    for b in sorted(bundles, key=lambda b: -b.get("GPU", 0)):
        node = next((n for n in free if all(n.get(k, 0) >= v - 1e-9 for k, v in b.items())), None)
        if node is None:
            unplaced.append(b)
            continue
        for key, value in b.items():
            node[key] = node.get(key, 0) - value
    return unplaced


def stage_demand(stage: str, options: dict, cfg: LiveTalkConfig) -> list[dict[str, float]]:
    """What a stage asks Ray for at once: Ray Train workers, actor pools, DMD's placement group."""
    t, d = cfg.train, cfg.data
    workers, actors = options.get("workers") or t.workers, options.get("actors") or t.ode.actors

    def each(count: int, cpus: float, gpus: float) -> list[dict[str, float]]:
        return [{"CPU": cpus, "GPU": gpus}] * count

    return {
        "data_prepare": each(d.encode_actors, d.encode_cpus, d.encode_gpus) + each(1, d.decode_cpus, 0),
        "vae": [],  # runs in the entrypoint process (entrypointNumCpus)
        "teacher": each(workers, t.cpus_per_worker, t.gpus_per_worker),
        "ode_generate": each(actors, t.ode.cpus_per_actor, t.ode.gpus_per_actor),
        "ode": each(workers, t.cpus_per_worker, t.gpus_per_worker),
        "dmd": dmd_bundles(),
        # The distillation set is decoded by one task with a worker's resources, then the Ray Train workers start.
        "tiny_decoder": each(workers, t.cpus_per_worker, t.gpus_per_worker),
    }[stage]


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.stem)
def test_each_job_cluster_can_run_its_stage(path):
    """Job clusters do not autoscale: what the stage asks for at once must fit, or the job waits forever."""
    spec = load(path)["spec"]
    stage, options, cfg = stage_job(path)
    demand = stage_demand(stage, options, cfg)
    if spec.get("entrypointNumCpus") or spec.get("entrypointNumGpus"):
        demand.append({"CPU": spec.get("entrypointNumCpus", 0), "GPU": spec.get("entrypointNumGpus", 0)})
    assert not first_fit(demand, kuberay_nodes(spec["rayClusterSpec"])), f"{stage} does not fit its cluster"


CLUSTERS_FOR_DMD = {
    "ray-up": ray_up_nodes,
    "raycluster": lambda: kuberay_nodes(cluster_specs()["raycluster"]),
    "rayjobs/dmd": lambda: kuberay_nodes(cluster_specs()["rayjobs/dmd"]),
}


@pytest.mark.parametrize("name", CLUSTERS_FOR_DMD)
def test_dmd_node_groups_are_advertised_and_its_roles_fit(name):
    nodes, bundles = CLUSTERS_FOR_DMD[name](), dmd_bundles()
    requested = {k for b in bundles for k in b} - RAY_STANDARD_RESOURCES
    advertised = {k for n in nodes for k in n} - RAY_STANDARD_RESOURCES
    assert requested, "the DMD job's config pins no role to a node group"
    assert advertised == requested, f"nodes advertise {sorted(advertised)}, DMD placement asks for {sorted(requested)}"
    assert not first_fit(bundles, nodes), f"DMD's placement group does not fit the {name} cluster"
