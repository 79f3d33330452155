"""Load test on loopback: `livetalk serve` (toy preset, shipped weights, paced real-time streams) as a real
process, then N concurrent WebSocket sessions for M minutes; drops, TTFF, inter-block gaps and replica
memory over the run.

    .venv/bin/python bench/load.py [--sessions 4] [--minutes 3] [--out bench/results/load.json]

The server's stream is paced to the video's 16 fps, so a healthy run shows a gap near 0.75 s (12 frames
per block) for every session, and memory that stops growing once the sessions are primed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from livetalk_ray.serving.loadtest import local_replica_memory, run_load

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load.json")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cli = Path(sys.executable).with_name("livetalk")
    server = subprocess.Popen([str(cli), "serve", "--port", str(port)], stdout=sys.stderr, stderr=sys.stderr)
    console = Console()
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"{args.sessions} sessions × {args.minutes:g} min", total=1.0)
            report = run_load(
                url,
                args.sessions,
                args.minutes * 60,
                memory_probe=lambda: local_replica_memory("livetalk"),
                progress=lambda done: bar.update(task, completed=done),
            )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    table = Table(title=f"load test: {args.sessions} paced sessions × {args.minutes:g} min, toy preset, 2 CPU cores")
    table.add_column("measure")
    table.add_column("value")
    for row in report.rows():
        table.add_row(*row)
    console.print(table)
    for error in report.errors:
        console.print(f"[red]{error}[/]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
