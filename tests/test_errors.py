"""`find_user_error` on the exceptions Ray 2.60 really delivers: tasks, actors (methods and constructors), Ray Data
tasks and actors, Ray Train's WorkerGroupError / ControllerError; a bug stays a bug."""

from __future__ import annotations

import pickle

import pytest

from livetalk_ray.config import ConfigError
from livetalk_ray.data.schema import SchemaError
from livetalk_ray.errors import defer_init_errors, find_user_error, is_user_error, user_error_from_text
from livetalk_ray.media import AudioError, ImageError
from livetalk_ray.models.checkpoint import CheckpointError
from livetalk_ray.models.text import TextError
from livetalk_ray.models.vae import VAEError
from livetalk_ray.train.dmd.placement import PlacementError
from tests import raising

USER_ERRORS = [
    ConfigError,
    SchemaError,
    AudioError,
    CheckpointError,
    ImageError,
    TextError,
    VAEError,
    PlacementError,
    FileNotFoundError,
]


@pytest.mark.parametrize("cls", USER_ERRORS)
def test_user_errors_keep_their_type_and_message_through_pickle(cls):
    exc = pickle.loads(pickle.dumps(cls("lower train.engine.micro_batch_per_worker")))
    assert type(exc) is cls and str(exc) == "lower train.engine.micro_batch_per_worker" and is_user_error(exc)


def test_plain_chains():
    assert find_user_error(ValueError("x")) is None
    try:
        try:
            raise SchemaError("too few clips")
        except SchemaError as exc:
            raise RuntimeError("wrapped on purpose") from exc
    except RuntimeError as outer:
        assert str(find_user_error(outer)) == "too few clips"
    with pytest.raises(ZeroDivisionError) as info:
        raising.bug_while_handling()
    assert info.value.__context__ is not None and find_user_error(info.value) is None


def test_ray_tasks_and_actors(ray_cluster):
    import ray

    task = ray.remote(raising.raise_)
    for cls in (ConfigError, SchemaError, AudioError, FileNotFoundError):  # the others' modules import torch
        with pytest.raises(cls) as info:  # RayTaskError(cls), whose message is the remote traceback
            ray.get(task.remote(cls("the fix")))
        found = find_user_error(info.value)
        assert type(found) is cls and str(found) == "the fix"
    with pytest.raises(ZeroDivisionError) as info:
        ray.get(ray.remote(raising.bug_while_handling).remote())
    assert find_user_error(info.value) is None

    actor = ray.remote(raising.Failing)
    with pytest.raises(SchemaError) as info:
        ray.get(actor.remote().method.remote(SchemaError("from a method")))
    assert type(find_user_error(info.value)) is SchemaError
    # A constructor's error reaches the driver as an ActorDiedError that keeps only its text.
    with pytest.raises(ray.exceptions.ActorDiedError) as info:
        ray.get(actor.remote(ConfigError("no config.yaml:\nsecond line")).method.remote(ValueError()))
    found = find_user_error(info.value)
    assert type(found) is ConfigError and str(found) == "no config.yaml:\nsecond line"
    with pytest.raises(ray.exceptions.ActorDiedError) as info:
        ray.get(actor.remote(KeyError("bug")).method.remote(ValueError()))
    assert find_user_error(info.value) is None


def test_ray_data_tasks_and_actors(ray_cluster, monkeypatch):
    import ray

    context = ray.data.DataContext.get_current()  # the driver's, shared with earlier tests in this process
    monkeypatch.setattr(context, "enable_progress_bars", False)
    monkeypatch.setattr(context, "max_errored_blocks", 0)  # the data pipeline tolerates failed blocks; not here
    ds = ray.data.from_items([{"a": 1}])
    # Ray Data wraps a UDF's error in UserCodeException, whose cause does not survive pickling.
    with pytest.raises(ray.exceptions.UserCodeException) as info:
        ds.map_batches(raising.udf_user_error).materialize()
    found = find_user_error(info.value)
    assert type(found) is SchemaError and str(found) == "from a Ray Data task"
    with pytest.raises(ray.exceptions.UserCodeException) as info:
        ds.map_batches(raising.udf_bug).materialize()
    assert find_user_error(info.value) is None
    # A constructor's user error is raised by the first call of a deferred actor: the actor stays alive.
    with pytest.raises(ray.exceptions.UserCodeException) as info:
        udf = defer_init_errors(raising.Failing)
        pool = ray.data.ActorPoolStrategy(size=1)
        ds.map_batches(udf, fn_constructor_kwargs={"exc": ConfigError("set vae.path")}, compute=pool).materialize()
    found = find_user_error(info.value)
    assert type(found) is ConfigError and str(found) == "set vae.path"


def test_ray_train_failures_and_the_callback_that_stops_retries():
    from ray.train import ControllerError, WorkerGroupError

    from livetalk_ray.train.launch import _stop_on_user_error

    def shipped(exc):  # fit() gets them from the controller actor, pickled
        return pickle.loads(pickle.dumps(exc))

    user = shipped(WorkerGroupError("rank 0 failed", {0: RuntimeError("gloo: peer gone"), 1: SchemaError("6 clips")}))
    assert str(find_user_error(user)) == "6 clips"
    assert find_user_error(shipped(WorkerGroupError("rank 0 failed", {0: ZeroDivisionError("x")}))) is None
    assert type(find_user_error(shipped(ControllerError(CheckpointError("does not fit"))))) is CheckpointError
    callback = _stop_on_user_error()
    callback.after_exception(None, {0: ZeroDivisionError()})  # a bug: Ray Train retries as configured
    with pytest.raises(ControllerError) as info:
        callback.after_exception(None, {0: RuntimeError("collateral"), 1: SchemaError("6 clips")})
    assert str(info.value.controller_failure) == "6 clips"


def test_traceback_text():
    text = (
        "The actor died because of an error raised in its creation task, \x1b[36mray::A.__init__()\x1b[39m (pid=1)\n"
        '  File "x.py", line 9, in __init__\n    raise ConfigError("bad")\n'
        "livetalk_ray.config.base.ConfigError: bad"
    )
    assert str(user_error_from_text(text)) == "bad"
    chained = text + "\n\nDuring handling of the above exception, another exception occurred:\n\nKeyError: 'x'"
    assert user_error_from_text(chained) is None
    assert user_error_from_text("Traceback (most recent call last):\nFileNotFoundError: [Errno 2] x") is not None
    assert user_error_from_text("ray::f() (pid=1)\nray.exceptions.RaySystemError: lost") is None
