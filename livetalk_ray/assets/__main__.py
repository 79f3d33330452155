"""Install toy weights into the package:

python -m livetalk_ray.assets PIPELINE_DIR                      # a finished `livetalk pipeline --preset toy`
python -m livetalk_ray.assets --student DIR --vae DIR --eval EVAL_JSON --built-by "how they were made"
"""

import argparse
import json
import sys

from livetalk_ray.assets import TOY_DIR, install_from_pipeline, install_toy_weights

parser = argparse.ArgumentParser(prog="python -m livetalk_ray.assets", description=__doc__.split("\n")[0])
parser.add_argument("pipeline_dir", nargs="?")
parser.add_argument("--student")
parser.add_argument("--vae")
parser.add_argument("--eval", help="`livetalk eval --json` output or its eval.json")
parser.add_argument("--built-by", default="the README's stage commands")
args = parser.parse_args()
try:
    if args.pipeline_dir:
        manifest = install_from_pipeline(args.pipeline_dir)
    elif args.student and args.vae and args.eval:
        text = open(args.eval).read().strip()
        try:  # eval.json, or captured `livetalk eval --json` output (the object is its last line)
            rows = json.loads(text)["rows"]
        except json.JSONDecodeError:
            rows = json.loads(text.splitlines()[-1])["rows"]
        manifest = install_toy_weights(args.student, args.vae, rows, {"built_by": args.built_by})
    else:
        parser.error("give a PIPELINE_DIR, or --student, --vae and --eval")
except FileNotFoundError as exc:
    sys.exit(f"error: {exc}")
print(f"installed {len(manifest['sha256'])} files into {TOY_DIR}")
