"""`python -m livetalk_ray.assets PIPELINE_DIR`: install a finished toy pipeline run as the shipped weights."""

import sys

from livetalk_ray.assets import TOY_DIR, install_toy_weights

if len(sys.argv) != 2:
    sys.exit("usage: python -m livetalk_ray.assets PIPELINE_DIR   (a finished `livetalk pipeline --preset toy` run)")
try:
    manifest = install_toy_weights(sys.argv[1])
except FileNotFoundError as exc:
    sys.exit(f"error: {exc}")
print(f"installed {len(manifest['sha256'])} files into {TOY_DIR}")
