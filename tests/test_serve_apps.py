"""serve_apps/: every config is a valid Serve config (Ray's own schema), names real deployments, and its
builder args build the application."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from livetalk_ray.serving.app import DEFAULTS, build

CONFIGS = sorted((Path(__file__).parents[1] / "serve_apps").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_configs_validate_and_name_real_deployments(path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (application,) = schema.applications
    assert application.import_path == "livetalk_ray.serving.app:build"
    assert {d.name for d in application.deployments} == set(DEFAULTS)


def test_the_local_config_builds():
    data = yaml.safe_load((Path(__file__).parents[1] / "serve_apps" / "local_cpu.yaml").read_text())
    assert build(data["applications"][0]["args"]) is not None
