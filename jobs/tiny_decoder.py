"""Job entrypoint: tiny decoder distillation (`livetalk train tiny-decoder`).

Locally:      python jobs/tiny_decoder.py --config my.yaml ...
On a cluster: ray job submit --working-dir . -- python jobs/tiny_decoder.py --config my.yaml ...
              (inside a Ray job the command joins the job's cluster through RAY_ADDRESS)
"""

import sys

from livetalk_ray.cli import app

if __name__ == "__main__":
    app(["train", "tiny-decoder", *sys.argv[1:]], prog_name="tiny_decoder.py")
