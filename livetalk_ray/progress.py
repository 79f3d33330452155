"""Progress bars for long jobs that also work in logs.

On a terminal this is rich's live bar. Off one (a Ray job's log, CI, nohup) a live bar never draws and rich
prints only the last state when it stops, so a long job would show nothing until its end: there the same
columns are printed as a plain line at most every `every_s` seconds.
"""

from __future__ import annotations

import time

from rich import get_console
from rich.console import Console
from rich.progress import Progress, ProgressColumn


class ProgressLines(Progress):
    """A rich Progress that also prints its tasks as plain lines, at most every `every_s` seconds."""

    def __init__(self, *columns: str | ProgressColumn, every_s: float = 30.0, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self.every_s, self.printed_at = every_s, time.monotonic()

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if not self.disable and time.monotonic() - self.printed_at >= self.every_s:
            self.printed_at = time.monotonic()
            self.console.print(self.make_tasks_table(self.tasks), soft_wrap=True)

    def advance(self, task_id, advance: float = 1) -> None:
        self.update(task_id, advance=advance)


def progress_bar(
    *columns: str | ProgressColumn, console: Console | None = None, every_s: float = 30.0, disable: bool = False
) -> Progress:
    """A live bar on a terminal, progress lines in a log (on rich's shared console unless given one, as a
    plain `Progress` would be)."""
    console = console or get_console()
    if console.is_terminal:
        return Progress(*columns, console=console, disable=disable)
    return ProgressLines(*columns, console=console, every_s=every_s, disable=disable)
