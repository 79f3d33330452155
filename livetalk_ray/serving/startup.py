"""Watching the Serve app come up: which stage is still starting, and why a stage could not start.

A replica whose constructor raises is retried by Serve a few times before the deployment is marked
DEPLOY_FAILED, and the reason lives in the deployment's status message (a traceback), not in the driver.
`failed_stage` reads it. An error that means "fix a setting" (a missing model file, an unknown voice, a bad
path) ends the start at its first occurrence, since a retry cannot succeed; anything else is given Serve's
retries first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from livetalk_ray.errors import USER_ERRORS

# "package.module.SomeError: reason", the innermost exception of the replica's traceback. Serve nests the replica's
# traceback inside a RuntimeError's message, so this reads lines, not chained exception segments.
_EXCEPTION_LINE = re.compile(r"^((?:[\w]+\.)*\w*(?:Error|Exception)): (.+)$")
_FAILED = ("DEPLOY_FAILED", "UNHEALTHY")


@dataclass(frozen=True)
class StageFailure:
    stage: str
    error_type: str  # the exception's qualified class name, "" when Serve's message names none
    reason: str  # the exception's message, first line
    detail: str  # Serve's whole status message (the replica's traceback)

    @property
    def user_error(self) -> bool:
        name = self.error_type if "." in self.error_type else f"builtins.{self.error_type}"
        return name in USER_ERRORS

    def line(self) -> str:
        if self.user_error:
            return f"the {self.stage} stage could not start: {self.reason}"
        short = self.error_type.rpartition(".")[2]
        cause = f"{short}: {self.reason}" if short else self.reason
        return f"the {self.stage} stage could not start: {cause} (a bug: the replica's traceback is above)"


def parse_failure(stage: str, message: str) -> StageFailure:
    """The last `SomeError: reason` line of a Serve status message (the innermost exception of the traceback)."""
    for line in reversed(message.strip().splitlines()):
        match = _EXCEPTION_LINE.match(line.strip())
        if match:
            return StageFailure(stage, match.group(1), match.group(2).strip(), message)
    first = message.strip().splitlines()[0] if message.strip() else "no reason given"
    return StageFailure(stage, "", first, message)


def failure_in(app_status) -> StageFailure | None:
    """The first stage of an app (a Serve `ApplicationStatusOverview`) that cannot start, if any."""
    for name, deployment in app_status.deployments.items():
        status, message = str(getattr(deployment.status, "value", deployment.status)), deployment.message or ""
        if status in _FAILED or "failed to start" in message:
            failure = parse_failure(name, message)
            if status in _FAILED or failure.user_error:
                return failure
    app_state = str(getattr(app_status.status, "value", app_status.status))
    if app_state == "DEPLOY_FAILED":  # the app itself (e.g. its builder) failed before any deployment existed
        return parse_failure("application", app_status.message or "")
    return None


def failed_stage(app_name: str) -> StageFailure | None:
    from ray import serve

    app_status = serve.status().applications.get(app_name)
    return None if app_status is None else failure_in(app_status)
