"""The training commands' progress: a live bar on a terminal, plain lines in a log."""

import io

from rich.console import Console

from livetalk_ray.cli.train import step_progress


def test_progress_off_a_terminal_prints_lines_a_log_can_show():
    log = io.StringIO()
    out = Console(file=log, force_terminal=False, width=120)
    with step_progress("vae", "loss {task.fields[loss]}", out=out, every_s=0.0) as bar:
        task = bar.add_task("steps", total=4000, loss="-")
        bar.update(task, completed=250, loss="0.1234")
        bar.update(task, completed=500, loss="0.0987")
    lines = log.getvalue().splitlines()
    assert any("250/4000" in line and "loss 0.1234" in line for line in lines), lines
    assert "500/4000" in lines[-1] and "loss 0.0987" in lines[-1], lines  # and once more at the end


def test_progress_lines_are_rate_limited():
    log = io.StringIO()
    out = Console(file=log, force_terminal=False, width=120)
    with step_progress("vae", "loss {task.fields[loss]}", out=out, every_s=3600.0) as bar:
        task = bar.add_task("steps", total=100, loss="-")
        for step in range(1, 101):
            bar.update(task, completed=step, loss=f"{1 / step:.4f}")
    lines = [line for line in log.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1 and "100/100" in lines[0], lines  # only the line at the end


def test_progress_on_a_terminal_is_a_live_bar():
    out = Console(file=io.StringIO(), force_terminal=True)
    with step_progress("vae", "loss {task.fields[loss]}", out=out) as bar:
        assert type(bar).__name__ == "Progress" and bar.live.is_started
