"""Job entrypoint: teacher ODE trajectories (`livetalk ode generate`).

Locally:      python jobs/ode_generate.py --config my.yaml ...
On a cluster: ray job submit --working-dir . -- python jobs/ode_generate.py --config my.yaml ...
              (inside a Ray job the command joins the job's cluster through RAY_ADDRESS)
"""

import sys

from livetalk_ray.cli import app

if __name__ == "__main__":
    app(["ode", "generate", *sys.argv[1:]], prog_name="ode_generate.py")
