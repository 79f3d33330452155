"""Job entrypoint: on-policy DMD with Ray actor roles (`livetalk train dmd`).

Locally:      python jobs/dmd.py --config my.yaml ...
On a cluster: ray job submit --working-dir . -- python jobs/dmd.py --config my.yaml ...
              (inside a Ray job the command joins the job's cluster through RAY_ADDRESS)
"""

import sys

from livetalk_ray.cli import app

if __name__ == "__main__":
    app(["train", "dmd", *sys.argv[1:]], prog_name="dmd.py")
