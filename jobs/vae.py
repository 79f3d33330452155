"""Job entrypoint: toy VAE fit (`livetalk train vae`).

Locally:      python jobs/vae.py --config my.yaml ...
On a cluster: ray job submit --working-dir . -- python jobs/vae.py --config my.yaml ...
              (inside a Ray job the command joins the job's cluster through RAY_ADDRESS)
"""

import sys

from livetalk_ray.cli import app

if __name__ == "__main__":
    app(["train", "vae", *sys.argv[1:]], prog_name="vae.py")
