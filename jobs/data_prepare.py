"""Job entrypoint: curate and encode clips into shards (`livetalk data prepare`).

Locally:      python jobs/data_prepare.py --config my.yaml ...
On a cluster: ray job submit --working-dir . -- python jobs/data_prepare.py --config my.yaml ...
              (inside a Ray job the command joins the job's cluster through RAY_ADDRESS)
"""

import sys

from livetalk_ray.cli import app

if __name__ == "__main__":
    app(["data", "prepare", *sys.argv[1:]], prog_name="data_prepare.py")
