"""Memory floor of a VAEDecoder replica after its sessions end: 32 sessions decode 4 blocks each (batched, as the
deployment does), then all are released; resident memory before, at the peak and after, with and without giving
freed memory back to the system (`release_free_memory`, which the replicas call after releases). Each variant
runs in a fresh process, so one does not inherit the other's heap.

    .venv/bin/python bench/memory_floor.py [--sessions 32] [--out bench/results/memory_floor.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def measure(sessions: int, trim: bool) -> dict[str, float]:
    import psutil
    import torch

    from livetalk_ray.config import load_config
    from livetalk_ray.serving.sessions import release_free_memory
    from livetalk_ray.serving.vae_decoder import VAEDecoder

    torch.set_num_threads(1)
    cfg = load_config("toy")

    def rss() -> float:
        return psutil.Process().memory_info().rss / 2**20

    async def run() -> dict[str, float]:
        decoder = VAEDecoder(cfg.model_dump(mode="json"))
        latents = torch.randn(1, cfg.vae.z_dim, cfg.cache.frames_per_block, cfg.latent_height, cfg.latent_width)
        before = rss()
        for block in range(4):
            await asyncio.gather(*(decoder.decode(f"s{i}", block, latents) for i in range(sessions)))
        peak = rss()
        for i in range(sessions):
            decoder.core.close(f"s{i}")
        if trim:
            release_free_memory()
        return {"before_mb": before, "peak_mb": peak, "after_mb": rss()}

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_floor.json")
    parser.add_argument("--variant", choices=["trim", "keep"], help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.sessions, args.variant == "trim")))
        return
    report = {"sessions": args.sessions}
    for variant in ("keep", "trim"):
        child = [sys.executable, __file__, "--sessions", str(args.sessions), "--variant", variant]
        report[variant] = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
    table = Table(title=f"VAEDecoder memory, {args.sessions} sessions × 4 blocks, then all released")
    for column in ("freed memory", "before MB", "peak MB", "after MB"):
        table.add_column(column)
    for variant, label in (("keep", "kept by the allocator"), ("trim", "given back (malloc_trim)")):
        row = report[variant]
        table.add_row(label, *(f"{row[k]:.0f}" for k in ("before_mb", "peak_mb", "after_mb")))
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
