"""A session's view of one stage (Denoiser, VAEDecoder, LLM, Speech): calls with timeouts, routed by session
id, that end as `StageLost` as soon as the stage no longer holds the session (its replica died, hung, or reaped
it), so the driver can re-prime instead of waiting on a replica that is gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from livetalk_ray.serving.routing import routing_key
from livetalk_ray.serving.sessions import SessionLost

PROBE_EVERY_S = 0.25  # how often a waiting call checks that the replica holding its session still exists
SERVE_NAMESPACE = "serve"  # the Ray namespace of Serve's replica actors


class StageLost(RuntimeError):
    """A stage no longer holds the session: its replica died, hung, or the session was reaped there. The message
    is short and safe to show a client (no Ray internals)."""

    def __init__(self, stage: str, why: str) -> None:
        super().__init__(f"the {stage} stage {why}")
        self.stage = stage


def _why_lost(exc: BaseException) -> str | None:
    """Why a stage call failed, if the failure means the stage lost the session; None for other errors."""
    import ray
    from ray.serve.exceptions import DeploymentUnavailableError

    from livetalk_ray.serving.llm import UnknownSession

    cause = getattr(exc, "cause", None)
    if isinstance(exc, SessionLost | UnknownSession) or isinstance(cause, SessionLost | UnknownSession):
        return "no longer holds this session"
    if isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError):
        return "lost this session: its replica stopped"
    if isinstance(exc, DeploymentUnavailableError):
        return "has no replica that can take this session"
    return None


class Stage:
    """A deployment as the driver calls it: a Serve handle (routed by session id) or a local object. Every call
    has a timeout; a call that finds the session lost raises `StageLost`.

    Serve retries a call whose replica died before the call reached it, and waits for a replacement to start
    (seconds to minutes), so a dead replica can look like a slow one. Once `locate` has learnt which replica holds
    the session, a call still waiting after `probe_after_s` checks that replica every PROBE_EVERY_S and ends as
    lost as soon as it is gone."""

    def __init__(self, name: str, target, session_id: str, probe_after_s: float = 1.0) -> None:
        self.name, self.session_id, self.probe_after_s = name, session_id, probe_after_s
        is_handle = hasattr(target, "options") and hasattr(target, "deployment_name")
        self.handle = target
        self.target = target.options(session_id=session_id) if is_handle else target
        self.is_handle = is_handle
        self.replica: str | None = None  # the actor name of the replica holding the session, once located

    def place(self, replica: str | None) -> None:
        """Send the session's calls to `replica` (a lease from serving/placement.py); None: to its router pin."""
        if self.is_handle:
            self.target = self.handle.options(session_id=routing_key(self.session_id, replica))
            self.replica = replica

    async def locate(self, timeout: float) -> None:
        """Ask the replica that now holds the session for its name (after it was opened or moved there)."""
        self.replica = await self.call("replica_name", timeout=timeout) if self.is_handle else None

    async def call(self, method: str, *args, timeout: float):
        response = getattr(self.target, method).remote(*args) if self.is_handle else getattr(self.target, method)(*args)
        waiter = asyncio.ensure_future(_awaited(response))
        try:
            return await self._wait(waiter, method, timeout)
        except BaseException as exc:
            waiter.cancel()
            if self.is_handle:
                response.cancel()  # the replica stops working on it, too
            lost = self._as_lost(exc)
            if lost is not None:
                raise lost from exc
            raise

    def _as_lost(self, exc: BaseException) -> StageLost | None:
        """`exc` as this stage losing the session, if that is what it means."""
        why = _why_lost(exc) if isinstance(exc, Exception) else None
        return StageLost(self.name, why) if why is not None else None

    async def _wait(self, waiter: asyncio.Future, method: str, timeout: float):
        loop = asyncio.get_running_loop()
        deadline, step = loop.time() + timeout, self.probe_after_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise StageLost(self.name, f"did not answer `{method}` within {timeout:g} s")
            done, _ = await asyncio.wait({waiter}, timeout=left if self.replica is None else min(left, step))
            if done:
                return waiter.result()
            step = PROBE_EVERY_S
            if self.replica is not None and not await replica_alive(self.replica):
                raise StageLost(self.name, "lost this session: its replica stopped")

    async def stream(self, method: str, *args, timeout: float) -> AsyncIterator:
        """Items of a streaming method; `timeout` bounds the wait for each item."""
        if self.is_handle:
            items = getattr(self.target.options(stream=True), method).remote(*args)
        else:
            items = getattr(self.target, method)(*args).__aiter__()
        try:
            while True:
                waiter = asyncio.ensure_future(_awaited(items.__anext__()))
                try:
                    item = await self._wait(waiter, method, timeout)
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    waiter.cancel()
                    lost = self._as_lost(exc)
                    if lost is not None:
                        raise lost from exc
                    raise
                yield item
        finally:
            if self.is_handle:
                items.cancel()  # a no-op once the stream has ended; stops the replica when the caller gave up


async def replica_alive(actor_name: str) -> bool:
    """Whether a Serve replica's actor still exists (asked of Ray's GCS; a dead replica's name is gone at once)."""
    import ray

    def look() -> bool:
        try:
            ray.get_actor(actor_name, namespace=SERVE_NAMESPACE)
            return True
        except ValueError:
            return False

    return await asyncio.to_thread(look)


async def _awaited(awaitable):
    return await awaitable
