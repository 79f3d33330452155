"""Job entrypoint: ODE initialisation of the causal student (`livetalk train ode`).

Locally:      python jobs/ode.py --config my.yaml ...
On a cluster: ray job submit --working-dir . -- python jobs/ode.py --config my.yaml ...
              (inside a Ray job the command joins the job's cluster through RAY_ADDRESS)
"""

import sys

from livetalk_ray.cli import app

if __name__ == "__main__":
    app(["train", "ode", *sys.argv[1:]], prog_name="ode.py")
