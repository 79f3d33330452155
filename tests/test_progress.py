"""Progress in logs: the data and trajectory bars print lines off a terminal, and can be switched off."""

import io

from rich.console import Console
from rich.progress import MofNCompleteColumn, TextColumn

from livetalk_ray.progress import progress_bar


def test_a_disabled_bar_prints_nothing_off_a_terminal():
    log = io.StringIO()
    with progress_bar(TextColumn("x"), console=Console(file=log), every_s=0.0, disable=True) as bar:
        task = bar.add_task("t", total=3)
        bar.advance(task)
    assert log.getvalue() == ""


def test_advance_prints_lines_too():
    log = io.StringIO()
    with progress_bar(TextColumn("prepare"), MofNCompleteColumn(), console=Console(file=log), every_s=0.0) as bar:
        task = bar.add_task("clips", total=3)
        bar.advance(task)
    assert "prepare 1/3" in log.getvalue().splitlines()[0]
