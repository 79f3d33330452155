"""Load test on loopback: `livetalk serve` (toy preset, shipped weights, paced real-time streams) as a real
process, then `livetalk loadtest`: N concurrent WebSocket sessions for M minutes; drops, TTFF, inter-block
gaps and replica memory over the run.

    .venv/bin/python bench/load.py [--sessions 4] [--minutes 3] [--set vae.decoder=tiny] [--out bench/results/load.json]

The server's stream is paced to the video's 16 fps, so a healthy run shows a gap near 0.75 s (12 frames
per block) for every session, and memory that stops growing once the sessions are primed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from livetalk_ray.cli.serve import served

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load.json")
    parser.add_argument("--set", action="append", default=[], help="config override for the server (repeatable)")
    args = parser.parse_args()
    cli = str(Path(sys.executable).with_name("livetalk"))
    with served(*(x for item in args.set for x in ("--set", item))) as url:
        load = [cli, "loadtest", "--url", url, "--sessions", str(args.sessions), "--minutes", str(args.minutes)]
        code = subprocess.run([*load, "--json", str(args.out)]).returncode  # prints the table, writes the JSON
    print(f"wrote {args.out}")
    sys.exit(code)


if __name__ == "__main__":
    main()
