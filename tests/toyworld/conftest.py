"""Toy-world datasets shared by the tests of this directory: built once per session, a few seconds each."""

from __future__ import annotations

from pathlib import Path

import pytest

from livetalk_ray.toyworld import ClipInfo, make_demo_dataset


@pytest.fixture(scope="session")
def clean_set(tmp_path_factory: pytest.TempPathFactory) -> list[ClipInfo]:
    """12 clean clips of 6 people (2 clips each), 2-2.5 s, default speech engine."""
    out = tmp_path_factory.mktemp("toy_clean")
    return make_demo_dataset(out, 12, seed=11, seconds_range=(2.0, 2.5), num_identities=6, progress=False)


@pytest.fixture(scope="session")
def broken_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ClipInfo]]:
    """10 short clips, 8 of them corrupted: every corruption kind exactly once."""
    out = tmp_path_factory.mktemp("toy_broken")
    infos = make_demo_dataset(out, 10, seed=5, corrupt_fraction=0.8, seconds_range=(1.0, 1.5), progress=False)
    return out, infos
