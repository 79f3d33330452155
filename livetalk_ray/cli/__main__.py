"""`python -m livetalk_ray.cli`: the same as the `livetalk` command."""

from livetalk_ray.cli import app

app()
