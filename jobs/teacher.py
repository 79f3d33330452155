"""Job entrypoint: teacher flow-matching fine-tune (`livetalk train teacher`).

Locally:      python jobs/teacher.py --config my.yaml ...
On a cluster: ray job submit --working-dir . -- python jobs/teacher.py --config my.yaml ...
              (inside a Ray job the command joins the job's cluster through RAY_ADDRESS)
"""

import sys

from livetalk_ray.cli import app

if __name__ == "__main__":
    app(["train", "teacher", *sys.argv[1:]], prog_name="teacher.py")
