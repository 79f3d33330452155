"""Serve application builders for a checkout: `serve run serve_apps.avatar:app` (toy defaults) or
`serve run serve_apps/local_cpu.yaml`. Installed deployments (RayService, `serve deploy`) import the same
builder from the package: `livetalk_ray.serving.app:build`."""

from livetalk_ray.serving.app import build

app = build({})

__all__ = ["app", "build"]
