"""Admission for several workers: the counts and the queues live in Redis, so capacity and fairness
hold for the gateway as a whole (N workers never send N x a backend's capacity).

Each decision is one Lua script (admission/scripts.py), which Redis runs atomically:
- acquire: a backend with room, when nobody waits for the model; else the request's ticket joins its
  key's line in the model's queue, and the script hands out what room there is, in turn;
- release: one request ended; the freed slot goes to the next ticket in turn, whichever worker holds it;
- cancel: a waiting request gave up (its client left, or it timed out).

The turns are the same deficit round robin as one worker's (admission.ModelQueue), kept in Redis: a
list of the keys that wait, a FIFO of tickets per key, and each key's deficit and weight. A slot
handed to a ticket is recorded in its worker's `granted` hash; the script's answer carries those of
the calling worker, and another worker's are published on its channel, so a message lost with a
dropped connection is found again (on resubscribing, or when the request gives up). A ticket is
`worker|sequence`.

Workers announce themselves with a key that expires (HEARTBEAT_TTL). A worker that died without
releasing (SIGKILL, a crash) is found by the others: its slots go back to their backends, its tickets
leave the queues, and the slots go at once to the requests that wait.

When Redis does not answer (stopped, restarting, or silent for GATEWAY_REDIS_TIMEOUT), a request gets
503 `store_unavailable` at once, and so do the requests waiting when the connection dropped: their
tickets are Redis's, and a Redis that restarted has none. Every new connection starts with `join`,
before any other command: what Redis knew of this worker is replaced by the slots it holds (counted
here, in each backend's `in_flight`), so the counts are right again whether Redis restarted empty,
lost some answers with the old connection, or reaped this worker meanwhile. Releases that did not
reach Redis are not sent again on a new connection for the same reason.

Cost: one script (one round trip to Redis) when a request is admitted and one when it ends
(docs/performance.md, "Admission across workers").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import secrets
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from .. import errors
from ..errors import GatewayError
from ..key_limits import KeyLimits
from ..registry import Backend, BackendState, Model, Registry
from ..settings import Settings
from ..store_outage import Outage
from .local import Admission
from .redis_pipe import Call, LuaScripts, RedisConnectionError, RedisError, RedisPipe
from .scripts import COMMON, SCRIPTS

log = logging.getLogger("vllm_gateway")

# A worker is taken for dead this long after its last heartbeat; it beats every HEARTBEAT_SECONDS,
# and tries to reconnect every RECONNECT_SECONDS while Redis is away (until it is back, it cannot
# tell Redis which slots it holds, so the sooner the better).
HEARTBEAT_SECONDS = 1.0
HEARTBEAT_TTL = 10
RECONNECT_SECONDS = 0.2


class SharedAdmission(Admission):
    """Admission whose counts and queues several workers share through Redis."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        super().__init__(settings, registry)
        import redis.asyncio as redis

        assert settings.redis_url is not None  # ServeSettings refuses several workers without Redis
        # Per request, scripts go over a pipelined connection of our own (admission/redis_pipe.py); the
        # channel that grants arrive on is redis-py's.
        self.redis: Any = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=settings.redis_timeout)
        self.redis_timeout = settings.redis_timeout
        self.pipe = RedisPipe(settings.redis_url, settings.redis_timeout, prepare=self.join, lost=self.store_lost)
        self.scripts = LuaScripts(self.pipe, {name: COMMON + body for name, body in SCRIPTS.items()})
        # One namespace per gateway (its key file and port), so gateways sharing a Redis never mix.
        identity = f"{settings.key_file.resolve()}:{settings.port}".encode()
        self.prefix = "vllm_gateway:admission:" + hashlib.sha256(identity).hexdigest()[:12]
        self.worker = secrets.token_hex(6)
        self.channel = f"{self.prefix}:admit:{self.worker}"
        self.tickets = itertools.count()
        self.waiters: dict[str, tuple[Model, asyncio.Future[Backend]]] = {}  # ticket: who waits
        self.local_waiting: dict[str, int] = {}  # this worker's waiting requests, per model
        self.totals: dict[str, int] = {}  # every worker's, per model, as of the last heartbeat
        self.unreleased: list[tuple[Backend, int]] = []  # releases Redis refused, and their connection
        self.uncounted: dict[str, int] = {}  # requests in flight that Redis does not count (/tokenize)
        self.outage = Outage("admission")
        self.released_while_joining: list[Backend] | None = None  # a list from a join until its connection is in use
        self.tasks: list[asyncio.Task[None]] = []
        self.pending: set[asyncio.Task[None]] = set()
        self.delivered: set[str] = set()  # grants handed to a waiter, until Redis forgot them

    # -- life --

    async def start(self) -> None:
        await self.pipe.connect()  # loads the scripts and joins (join)
        await self.heartbeat()
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.channel)
        self.tasks = [asyncio.create_task(self.listen(pubsub)), asyncio.create_task(self.beat())]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in [*self.tasks, *self.pending]:
            with contextlib.suppress(BaseException):
                await task
        # Leaving: whatever this worker still holds goes back, and its tickets leave the queues.
        with contextlib.suppress(Exception):
            await self.pipe.call("DEL", f"{self.prefix}:alive:{self.worker}")
            await self.scripts.run("reap", [self.prefix])
        self.pipe.close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def join(self, call: Call) -> None:
        """A new connection's first commands: the scripts, then what this worker holds."""
        await self.scripts.load(call)
        held: list[str | int] = []
        for backend in self.registry.backends():
            count = backend.in_flight - self.uncounted.get(backend.spec.id, 0)
            if count > 0:
                held += [backend.spec.id, count]
        # Requests that end from here until the new connection is in use (`joined`) were counted in
        # `held` and have no connection to be given back on: they are, once it is.
        released: list[Backend] = []
        self.released_while_joining = released
        try:
            await call("EVALSHA", self.scripts.sha["join"], 0, self.prefix, self.worker, HEARTBEAT_TTL, *held)
        except BaseException:
            self.released_while_joining = None  # not joined: the next join counts what is held then
            raise
        self.unreleased.clear()  # counted in `held` already
        if self.outage.since is not None:
            self.outage.answered()
        # The connection is in use once the connect that runs this join returns: a turn of the loop
        # later at least, more on a busy machine.
        self.spawn(self.joined(released, self.pipe.generation + 1))

    async def joined(self, released: list[Backend], generation: int) -> None:
        try:
            await self.pipe.connect()  # returns once the connection that joined is in use
        except RedisConnectionError:
            return  # gone again: the next join counts these releases
        finally:
            if self.released_while_joining is released:
                self.released_while_joining = None
        for backend in released:
            await self.release_slot(backend, generation)  # not if a newer connection joined since
        # Slots this worker no longer holds may be free now, for requests of other workers.
        await self.dispatch_all()

    def store_lost(self) -> None:
        """The connection to Redis dropped: the tickets of this worker's waiting requests are gone
        with it (or will be, at the next join), so those requests are answered now."""
        dropped = 0
        for _, future in self.waiters.values():
            if not future.done():
                future.set_exception(errors.store_unavailable("this request lost its place in the queue for a server"))
                dropped += 1
        self.outage.failed(RedisConnectionError("the connection dropped"), refused=False)
        self.outage.refused += dropped

    async def beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS if self.pipe.connected else RECONNECT_SECONDS)
            try:
                async with asyncio.timeout(self.redis_timeout):
                    await self.heartbeat()
                if self.outage.since is not None:
                    self.outage.answered()
                await self.retry_releases()
            except TimeoutError:
                # Connected but silent (a stopped process, a lost network): the requests waiting on
                # this connection would hang; dropping it answers them, and the next connection joins.
                self.outage.failed(RedisConnectionError(f"no answer in {self.redis_timeout:g} s"), refused=False)
                self.pipe.abort()
            except Exception as error:
                self.outage.failed(error, refused=False)

    async def heartbeat(self) -> None:
        models = list(self.registry.models)
        reply = await self.scripts.run("heartbeat", [self.prefix, self.worker, HEARTBEAT_TTL, *models])
        self.totals = {model: int(size) for model, size in zip(models, reply[1:], strict=False)}
        if reply[0]:
            log.warning(
                "admission: a worker stopped beating for %d s; its slots go to the waiting requests", HEARTBEAT_TTL
            )
            self.spawn(self.dispatch_all())

    async def listen(self, pubsub: Any) -> None:
        """Tickets other workers handed to this one's waiting requests."""
        while True:
            try:
                async for message in pubsub.listen():
                    ticket, backend_id, model_name = message["data"].decode().split("\n", 2)
                    self.granted(ticket, backend_id, model_name)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("admission: lost the Redis channel (%s); subscribing again", error)
                await self.subscribe_again(pubsub)

    async def subscribe_again(self, pubsub: Any) -> None:
        """Subscribe until Redis answers (quietly: the outage is logged once), then take up what was
        handed out meanwhile, which the granted hash keeps."""
        while True:
            await asyncio.sleep(RECONNECT_SECONDS)
            try:
                await pubsub.subscribe(self.channel)
                grants = await self.pipe.call("HGETALL", f"{self.prefix}:granted:{self.worker}")
            except Exception:
                continue
            for ticket, grant in zip(grants[::2], grants[1::2], strict=True):
                backend_id, model_name = grant.decode().split("\n", 1)
                self.granted(ticket.decode(), backend_id, model_name)
            log.info("admission: subscribed to the Redis channel again")
            return

    # -- backends --

    def waiting(self, model_name: str) -> int:
        return self.local_waiting.get(model_name, 0)

    def waiting_everywhere(self, model_name: str) -> int:
        return max(self.totals.get(model_name, 0), self.waiting(model_name))

    async def acquire(
        self, model: Model, key: KeyLimits, exclude: Sequence[Backend] = (), at_once: bool = False
    ) -> tuple[Backend | None, float]:
        if not self.enabled or at_once:
            backend, waited = await super().acquire(model, key, exclude, at_once)
            if backend is not None:  # in flight here, not in Redis: join must not count it
                self.uncounted[backend.spec.id] = self.uncounted.get(backend.spec.id, 0) + 1
            return backend, waited
        candidates = ready_with_capacity(model, exclude)
        if not candidates:
            if not model.wakeable:
                return None, 0.0
            self.wake(model)  # and queue: the script finds no server and keeps the ticket
        ticket = f"{self.worker}|{next(self.tickets)}"
        future: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        self.waiters[ticket] = (model, future)  # before the script: a grant may come before its answer
        args = [self.prefix, model.name, self.worker, ticket, key.id, key.weight, self.queue_limit]
        call = self.scripts.send("acquire", [*args, *candidates])
        if call is None:  # not connected yet, or again
            call = asyncio.ensure_future(self.scripts.run("acquire", [*args, *candidates]))
        try:
            try:
                reply = await asyncio.shield(call)
            except RedisError as error:
                if not str(error).startswith("NOSCRIPT"):
                    raise
                reply = await self.scripts.run("acquire", [*args, *candidates])  # loads them again
        except asyncio.CancelledError:
            # The client left while Redis decided: undo what it decided, once it has.
            del self.waiters[ticket]
            # The connection that answered is the one undo gives the slot back on (pipe.generation).
            call.add_done_callback(lambda done: self.spawn(self.undo(done, model, ticket, key, self.pipe.generation)))
            raise
        except Exception as error:
            del self.waiters[ticket]
            if future.done():
                future.exception()  # failed by store_lost: nobody waits for it
            self.outage.failed(error)
            raise errors.store_unavailable("no server could be chosen for this request") from None
        if self.outage.since is not None:
            self.outage.answered()
        self.take_grants(reply, 2, model.name)
        outcome = reply[0].decode()
        if outcome == "ok":
            del self.waiters[ticket]
            backend = by_id(model, reply[1].decode())
            assert backend is not None  # one of the candidates named in the call
            backend.in_flight += 1
            return backend, 0.0
        if outcome == "full":
            del self.waiters[ticket]
            raise errors.queue_full(model.name, self.queue_limit)
        return await self.wait(model, ticket, key, future)

    async def undo(self, call: asyncio.Future[Any], model: Model, ticket: str, key: KeyLimits, generation: int) -> None:
        """An acquire whose request was cancelled before Redis answered: give back the slot it took,
        or take its ticket out of the queue."""
        if call.cancelled() or call.exception() is not None:
            return
        reply = call.result()
        self.take_grants(reply, 2, model.name)
        if reply[0] == b"ok":
            backend = by_id(model, reply[1].decode())
            if backend is not None:
                await self.release_slot(backend, generation)
        elif reply[0] == b"queued":
            await self.run("cancel", model.name, self.worker, ticket, key.id)

    async def wait(
        self, model: Model, ticket: str, key: KeyLimits, future: asyncio.Future[Backend]
    ) -> tuple[Backend | None, float]:
        started = time.perf_counter()
        self.local_waiting[model.name] = self.local_waiting.get(model.name, 0) + 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                backend = await asyncio.shield(future)
        except BaseException as error:
            await self.give_up(model, ticket, key, future)
            if isinstance(error, TimeoutError):
                raise errors.queue_timeout(model.name, self.queue_timeout) from None
            raise
        finally:
            self.waiters.pop(ticket, None)
            self.local_waiting[model.name] -= 1
        return backend, time.perf_counter() - started

    async def give_up(self, model: Model, ticket: str, key: KeyLimits, future: asyncio.Future[Backend]) -> None:
        """A waiting request leaves (its client went, it timed out, its model went down): out of the
        queue, and a slot granted to it meanwhile goes to the next in turn."""
        self.waiters.pop(ticket, None)  # a grant from now on finds nobody and is handed back
        if future.done() and not future.cancelled():
            error = future.exception()
            if error is None:
                self.release(future.result())  # granted and delivered just before it gave up
                return
            if isinstance(error, GatewayError) and error.code == "store_unavailable":
                return  # its connection dropped (store_lost): the next one's join takes its ticket out
        await asyncio.shield(self.run("cancel", model.name, self.worker, ticket, key.id))

    def granted(self, ticket: str, backend_id: str, model_name: str) -> None:
        """A slot handed to one of this worker's waiting tickets: by another worker (its channel) or
        by this one's own script (the script's answer, take_grants)."""
        if ticket in self.delivered:
            return  # a grant read again from the hash while its request runs
        entry = self.waiters.get(ticket)
        backend = by_id(entry[0], backend_id) if entry is not None else None
        if entry is None or backend is None or entry[1].done():
            # Nobody waits for it any more (or its server left the config): hand it on, unless
            # give_up's cancel found the grant first and did so already.
            self.spawn(self.run("cancel", model_name, self.worker, ticket, ""))
            return
        backend.in_flight += 1
        entry[1].set_result(backend)
        self.delivered.add(ticket)
        self.spawn(self.forget_grant(ticket))

    async def forget_grant(self, ticket: str) -> None:
        try:
            await self.pipe.call("HDEL", f"{self.prefix}:granted:{self.worker}", ticket)
        except Exception as error:
            log.warning("admission: Redis did not forget a grant: %s", error)
        finally:
            self.delivered.discard(ticket)

    def release(self, backend: Backend, at_once: bool = False) -> None:
        backend.in_flight -= 1
        if not self.enabled or at_once:
            self.uncounted[backend.spec.id] -= 1
            return
        # Sent at once on the open connection, its reply checked by a callback: no task per request.
        # Not connected: nothing to send, the next connection's join counts what this worker holds
        # (or, for a release while join's script runs, gives it back once joined).
        future = self.scripts.send("release", self.release_args(backend))
        if future is not None:
            future.add_done_callback(functools.partial(self.released, backend, self.pipe.generation))
        elif self.released_while_joining is not None:
            self.released_while_joining.append(backend)

    def release_args(self, backend: Backend) -> list[object]:
        model = self.registry.models.get(backend.spec.name)
        servers = ready_with_capacity(model) if model is not None else []
        return [self.prefix, backend.spec.name, self.worker, backend.spec.id, *servers]

    def released(self, backend: Backend, generation: int, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            # Redis refused it (busy, say): again from the heartbeat. Lost with the connection: the
            # next one's join counts it.
            if not isinstance(future.exception(), RedisConnectionError):
                self.unreleased.append((backend, generation))
        else:
            self.take_grants(future.result(), 1, backend.spec.name)

    def take_grants(self, reply: list[Any], start: int, model_name: str) -> None:
        """The (ticket, server) pairs from `start` in a script's answer: slots its dispatch handed to
        this worker's own waiting requests (not published: the answer carries them)."""
        for index in range(start, len(reply) - 1, 2):
            self.granted(reply[index].decode(), reply[index + 1].decode(), model_name)

    async def release_slot(self, backend: Backend, generation: int) -> None:
        """Give a slot back in Redis, on the connection it was counted on: after a new one's join
        there is nothing to give back (join counted what this worker holds)."""
        if generation != self.pipe.generation or not self.pipe.connected:
            return
        try:
            reply = await self.scripts.run("release", self.release_args(backend))
            self.take_grants(reply, 1, backend.spec.name)
        except RedisConnectionError:
            pass  # the next connection's join counts it
        except Exception as error:
            log.warning("admission: Redis did not take a release of %s (%s); retrying", backend.spec.id, error)
            self.unreleased.append((backend, generation))

    async def retry_releases(self) -> None:
        pending, self.unreleased = self.unreleased, []
        for backend, generation in pending:
            await self.release_slot(backend, generation)

    async def dispatch_all(self) -> None:
        """Hand out whatever room Redis sees for every model with a ready server."""
        for model in self.registry.models.values():
            if model.pick() is not None:
                await self.run("dispatch", model.name, self.worker)

    def backends_changed(self) -> None:
        """A backend came up or went down: hand out its room, or tell this worker's waiters of a
        model without a ready server (the other workers tell theirs)."""
        self.announce_change()
        if not self.enabled:
            return
        for ticket, (model, future) in list(self.waiters.items()):
            current = self.registry.models.get(model.name)
            gone = current is None or (current.pick() is None and not current.wakeable)
            if gone and not future.done():
                state = current.state if current is not None else BackendState.DOWN
                future.set_exception(errors.model_unavailable(model.name, state))
            elif current is not None and current is not model:
                self.waiters[ticket] = (current, future)
        self.spawn(self.dispatch_all())

    async def run(self, script: str, model_name: str, *args: str) -> None:
        """A script that hands out room as it goes (cancel, dispatch), with the model's servers now."""
        model = self.registry.models.get(model_name)
        candidates = ready_with_capacity(model) if model is not None else []
        try:
            reply = await self.scripts.run(script, [self.prefix, model_name, *args, *candidates])
            self.take_grants(reply, 1, model_name)
        except Exception as error:
            log.warning("admission: Redis did not run %s for %s: %s", script, model_name, error)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coroutine)
        except RuntimeError:  # no loop yet (the config loaded at start): start() hands out room
            coroutine.close()
            return
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)


def ready_with_capacity(model: Model, exclude: Sequence[Backend] = ()) -> list[str | int]:
    """The script's view of a model's servers: id and capacity (-1: none) of each ready one."""
    candidates: list[str | int] = []
    for backend in model.backends:
        if backend.state is BackendState.READY and backend not in exclude:
            capacity = backend.spec.capacity
            candidates += [backend.spec.id, -1 if capacity is None else capacity]
    return candidates


def by_id(model: Model, backend_id: str) -> Backend | None:
    return next((backend for backend in model.backends if backend.spec.id == backend_id), None)
