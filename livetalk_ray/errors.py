"""User errors, wherever they are raised: in this process, a Ray task or actor, a Ray Train worker or a Ray Data
task or actor.

A user error is an exception the user causes and can fix (bad config, missing data, a checkpoint that does not
fit, too few clips, an unreachable cluster); its message says what to do. Ray delivers such an error wrapped:
`RayTaskError(X)` with `.cause`, Ray Train's `WorkerGroupError.worker_failures` or `ControllerError
.controller_failure`, a Ray Data `UserCodeException` whose cause did not survive pickling (only the traceback
text keeps it), an `ActorDiedError` from a failed constructor (text only). `find_user_error` digs it out.
"""

from __future__ import annotations

import importlib
import re
import sys

# Qualified class names, so that classifying an error does not import the model stack (torch, transformers):
# an instance of one of these classes exists only if its module is loaded. (Rebuilding one from a traceback's
# text imports its module.)
USER_ERRORS = frozenset(
    {
        "livetalk_ray.config.base.ConfigError",
        "livetalk_ray.data.schema.SchemaError",
        "livetalk_ray.media.AudioError",
        "livetalk_ray.media.ImageError",
        "livetalk_ray.models.checkpoint.CheckpointError",
        "livetalk_ray.models.text.TextError",
        "livetalk_ray.models.vae.VAEError",
        "livetalk_ray.train.dmd.placement.PlacementError",
        "livetalk_ray.espeak.EspeakError",
        "livetalk_ray.serving.speech.SpeechError",
        "builtins.FileNotFoundError",
    }
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Python prints chained exceptions as segments joined by one of these lines.
_SEPARATOR = re.compile(
    r"^(The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)$",
    re.M,
)
# "package.module.Name: message" (a traceback's last line); builtins have no module prefix.
_EXCEPTION_LINE = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Z]\w*)(?:: ?(.*))?$")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_user_error(exc: BaseException) -> bool:
    """An instance of a user-error class, not a Ray wrapper that merely inherits from one (`RayTaskError(X)`,
    whose message is the remote traceback)."""
    if _is_ray(exc):
        return False
    return any(_qualname(cls) in USER_ERRORS for cls in type(exc).__mro__)


def _is_ray(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "ray"


def _children(exc: BaseException) -> list[BaseException]:
    """The exceptions `exc` carries. A plain exception's implicit context is not followed: a bug raised while
    handling a user error is still a bug."""
    out = [exc.__cause__]
    if _is_ray(exc):
        out += [getattr(exc, "cause", None), getattr(exc, "controller_failure", None), exc.__context__]
        out += list((getattr(exc, "worker_failures", None) or {}).values())
    return [e for e in out if isinstance(e, BaseException)]


def find_user_error(exc: BaseException | None) -> BaseException | None:
    """The user error in `exc` or anything it wraps, or None (a bug: keep its traceback)."""
    seen: set[int] = set()
    queue = [exc] if exc is not None else []
    wrappers = []
    while queue:
        node = queue.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if is_user_error(node):
            return node
        if _is_ray(node):
            wrappers.append(node)
        queue += _children(node)
    for node in wrappers:  # types lost on the way (actor constructors, Ray Data UDFs): read the traceback text
        if (found := user_error_from_text(str(node))) is not None:
            found.__cause__ = node
            return found
    return None


def user_error_from_text(text: str) -> BaseException | None:
    """Rebuild the user error a Ray traceback text ends with, looking through Ray's own wrappers (the UDF
    wrapper of Ray Data) to what they wrap."""
    segments = _SEPARATOR.split(_ANSI.sub("", text))
    exceptions = [_exception_line(s) for s in segments[::2]]
    for qual, message in reversed(exceptions):
        if qual is None:
            return None
        if not qual.startswith("ray."):
            return _rebuild(qual, message)
    return None


def _exception_line(segment: str) -> tuple[str | None, str]:
    lines = segment.strip("\n").splitlines()
    for i, line in enumerate(lines):
        if not line or line[0].isspace():
            continue  # traceback frames and their carets
        if m := _EXCEPTION_LINE.match(line):
            return m[1], "\n".join([m[2] or "", *lines[i + 1 :]]).strip()
    return None, ""


def _rebuild(qual: str, message: str) -> BaseException | None:
    name = qual if "." in qual else f"builtins.{qual}"
    if name not in USER_ERRORS:
        return None
    module, _, cls_name = name.rpartition(".")
    try:
        cls = getattr(sys.modules.get(module) or importlib.import_module(module), cls_name)
        return cls(message)
    except Exception:  # noqa: BLE001 - a class that cannot be rebuilt: the caller shows the original traceback
        return None


def defer_init_errors(cls: type) -> type:
    """`cls` as a Ray Data actor whose constructor's user error is raised by its first call instead. An actor
    whose constructor raises dies: Ray then prints its readiness probe's failure to the terminal, and the
    driver gets an ActorDiedError that keeps only the text of the error. (Only for a stage whose failed
    batch fails the dataset, i.e. not under DataContext.max_errored_blocks.)"""

    class Deferred(cls):
        def __init__(self, *args, **kwargs) -> None:
            self._init_error: BaseException | None = None
            try:
                super().__init__(*args, **kwargs)
            except Exception as exc:
                if not is_user_error(exc):
                    raise
                self._init_error = exc

        def __call__(self, *args, **kwargs):
            if self._init_error is not None:
                raise self._init_error
            return super().__call__(*args, **kwargs)

    Deferred.__name__ = cls.__name__  # Ray Data names the stage after it
    return Deferred
