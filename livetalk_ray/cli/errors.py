"""How a `livetalk` command ends on an error: a user error (`livetalk_ray.errors`), wherever Ray raised it, is one
red `error:` line and exit code 2; anything else is a bug and keeps its traceback (exit 1). `--debug` or
LIVETALK_DEBUG=1 adds the traceback to user errors too.

Ray reports a failure on its own as well: Ray Data logs the failed dataset (and its traceback) to the terminal
before the exception reaches the command. The exception carries all of it, so its console lines are dropped
(`quiet_ray_console`); Ray Data's log files in the session directory keep everything.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from rich.console import Console
from rich.markup import escape

from livetalk_ray.errors import find_user_error

DEBUG_ENV = "LIVETALK_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def set_debug(enabled: bool) -> None:
    """`--debug`: through the environment, so that job entrypoints and Ray workers started here see it too."""
    if enabled:
        os.environ[DEBUG_ENV] = "1"


def one_line(exc: BaseException) -> str:
    """The message on one line (multi-line messages, e.g. rebuilt from a remote traceback, are joined)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def report_user_error(exc: BaseException, console: Console) -> bool:
    """Print the user error inside `exc` as one `error:` line (after the full traceback in debug mode) and return
    True; return False, printing nothing, when `exc` is a bug."""
    found = find_user_error(exc)
    if found is None:
        return False
    if debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.flush()
    console.print(f"[bold red]error:[/] {escape(one_line(found))}", highlight=False)
    return True


class _DropFailureRecords(logging.Filter):
    """Ray Data's console lines that repeat what the raised exception says, or that the CLI asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.levelno < logging.WARNING:
            return False  # failures travel in the exception; INFO is per-dataset chatter
        return "Progress bars disabled" not in record.getMessage()  # the commands show their own bar


def quiet_ray_console() -> None:
    """Keep Ray Data's console handler (not its log files) to warnings that are news. Ray Train and Ray Core
    log to the session's files only, as `ray.init(log_to_driver=False)` leaves them."""
    if debug_enabled():
        return
    import ray.data  # noqa: F401 - configures the "ray.data" logger and its handlers

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console" and not any(isinstance(f, _DropFailureRecords) for f in handler.filters):
            handler.addFilter(_DropFailureRecords())
