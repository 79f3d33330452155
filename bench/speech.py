"""Speech synthesis benchmark: eSpeak NG in process (what the Speech deployment runs), in a fresh process
(`isolated=True`, the toy world's bit-identical path) and, where installed, the `espeak-ng` program (the
Speech deployment's path before the library was used), for the same sentences, interleaved.

    .venv/bin/python bench/speech.py [--rounds 5] [--out bench/results/speech.json]

Reports the median seconds per sentence of each path, and how far the library's output is from the
program's in duration and energy (the program is espeak-ng 1.51 from Debian; the library 1.52 from PyPI).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from livetalk_ray import espeak
from livetalk_ray.media import load_audio

SENTENCES = (
    "Paris is the capital of France.",
    "Hello there. The Eiffel Tower was finished in 1889 and is three hundred metres tall.",
    "I think the kettle has just boiled, so let us have some tea before we go.",
)
VOICE, WPM, RATE = "en-us", 165, 16000


def program(text: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        cmd = ["espeak-ng", "-b", "1", "-v", VOICE, "-s", str(WPM), "-w", str(path)]
        subprocess.run(cmd, input=text.encode(), check=True, capture_output=True)
        return np.clip(load_audio(path, RATE), -1.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/speech.json"))
    args = parser.parse_args()
    paths = {
        "in process": lambda t: espeak.speak(t, voice=VOICE, words_per_minute=WPM, sample_rate=RATE),
        "fresh process": lambda t: espeak.speak(t, voice=VOICE, words_per_minute=WPM, sample_rate=RATE, isolated=True),
    }
    if shutil.which("espeak-ng"):
        paths["espeak-ng program"] = program
    paths["in process"]("Warm up.")  # loads the library once, as a replica does at start-up
    times: dict[str, list[float]] = {name: [] for name in paths}
    outputs: dict[str, dict[str, np.ndarray]] = {name: {} for name in paths}
    for _ in range(args.rounds):  # interleaved: the machine's load hits every path alike
        for text in SENTENCES:
            for name, speak in paths.items():
                started = time.perf_counter()
                outputs[name][text] = speak(text)
                times[name].append(time.perf_counter() - started)

    console = Console(width=120)
    table = Table(title=f"{len(SENTENCES)} sentences x {args.rounds} rounds, voice {VOICE}, {WPM} wpm")
    table.add_column("path")
    table.add_column("median ms / sentence", justify="right")
    table.add_column("x in process", justify="right")
    base = statistics.median(times["in process"])
    result: dict = {"library": espeak.library_info().origin, "paths": {}}
    for name, values in times.items():
        median = statistics.median(values)
        table.add_row(name, f"{median * 1000:.1f}", f"{median / base:.1f}")
        result["paths"][name] = {"median_s": median}
    console.print(table)
    if "espeak-ng program" in outputs:
        rows = []
        for text in SENTENCES:
            ours, theirs = outputs["in process"][text], outputs["espeak-ng program"][text]
            rms = [float(np.sqrt(np.mean(w.astype(np.float64) ** 2))) for w in (ours, theirs)]
            rows.append({"text": text, "duration_ratio": len(ours) / len(theirs), "rms_ratio": rms[0] / rms[1]})
            console.print(
                f"{text[:40]:40s} duration x{rows[-1]['duration_ratio']:.3f}  rms x{rows[-1]['rms_ratio']:.3f}"
            )
        result["library_vs_program"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
