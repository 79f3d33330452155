"""Reading why a stage could not start from Serve's status (the message format Ray 2.60 writes)."""

from types import SimpleNamespace

from livetalk_ray.serving.startup import failure_in, parse_failure

RETRYING = """A replica failed to start with exception. Retrying 2 more time(s). Error:
ray::ServeReplica:livetalk:Denoiser.initialize_and_get_metadata() (pid=4340, ip=192.0.2.2)
  File "/x/ray/serve/_private/replica.py", line 1928, in initialize
    raise RuntimeError(traceback.format_exc()) from None
RuntimeError: Traceback (most recent call last):
  File "/x/livetalk_ray/models/checkpoint.py", line 152, in _read_file
    raise CheckpointError(f"{path}: not a safetensors or torch checkpoint")
livetalk_ray.models.checkpoint.CheckpointError: /c/model.safetensors: not a safetensors or torch checkpoint
"""
BUG = RETRYING.replace(
    "livetalk_ray.models.checkpoint.CheckpointError: /c/model.safetensors: not a safetensors or torch checkpoint",
    "ZeroDivisionError: division by zero",
)


def _app(status: str, deployments: dict[str, tuple[str, str]], message: str = ""):
    return SimpleNamespace(
        status=status,
        message=message,
        deployments={name: SimpleNamespace(status=s, message=m) for name, (s, m) in deployments.items()},
    )


def test_the_innermost_exception_names_the_reason():
    failure = parse_failure("Denoiser", RETRYING)
    assert failure.error_type == "livetalk_ray.models.checkpoint.CheckpointError" and failure.user_error
    assert failure.reason == "/c/model.safetensors: not a safetensors or torch checkpoint"
    assert failure.line() == (
        "the Denoiser stage could not start: /c/model.safetensors: not a safetensors or torch checkpoint"
    )
    bug = parse_failure("Denoiser", BUG)
    assert bug.error_type == "ZeroDivisionError" and not bug.user_error
    assert "ZeroDivisionError: division by zero" in bug.line() and "a bug" in bug.line()
    assert parse_failure("LLM", "").reason == "no reason given"


def test_user_errors_end_the_start_at_once_and_bugs_after_serves_retries():
    starting = _app("DEPLOYING", {"Ingress": ("HEALTHY", ""), "Denoiser": ("UPDATING", "")})
    assert failure_in(starting) is None
    user = _app("DEPLOYING", {"Speech": ("HEALTHY", ""), "Denoiser": ("UPDATING", RETRYING)})
    assert failure_in(user).stage == "Denoiser"
    retrying_bug = _app("DEPLOYING", {"Denoiser": ("UPDATING", BUG)})
    assert failure_in(retrying_bug) is None
    failed_bug = _app("DEPLOY_FAILED", {"Denoiser": ("DEPLOY_FAILED", BUG)})
    assert failure_in(failed_bug).error_type == "ZeroDivisionError" and not failure_in(failed_bug).user_error
    builder = _app("DEPLOY_FAILED", {}, "ValueError: bad application arguments")
    assert failure_in(builder).stage == "application"
