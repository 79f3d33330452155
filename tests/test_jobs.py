"""Every job entrypoint in jobs/ is a working `python jobs/X.py` command (what `ray job submit` runs)."""

import subprocess
import sys
from pathlib import Path

import pytest

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.py"))


def test_there_is_a_job_per_stage():
    assert {p.stem for p in JOBS} >= {"data_prepare", "vae", "teacher", "ode_generate", "ode"}


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_job_shows_its_options(job):
    out = subprocess.run([sys.executable, str(job), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout and "--config" in out.stdout
