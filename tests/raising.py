"""Raisers for tests/test_errors.py that Ray workers import cheaply (no torch): functions, an actor, a UDF."""

from __future__ import annotations


def raise_(exc: BaseException) -> None:
    raise exc


def bug_while_handling() -> None:
    from livetalk_ray.config import ConfigError

    try:
        raise ConfigError("a user error")
    except ConfigError:
        _ = 1 / 0  # a bug in the handler is still a bug


class Failing:
    """An actor whose constructor or method raises what it is given; also a Ray Data UDF class."""

    def __init__(self, exc: BaseException | None = None) -> None:
        if exc is not None:
            raise exc

    def method(self, exc: BaseException) -> None:
        raise exc

    def __call__(self, batch: dict) -> dict:
        return batch


def udf_user_error(batch: dict) -> dict:
    from livetalk_ray.data.schema import SchemaError

    raise SchemaError("from a Ray Data task")


def udf_bug(batch: dict) -> dict:
    return {"a": batch["missing"]}  # KeyError: a bug
