"""The strategy API. A strategy is an async function of (request, cluster) that chains the engines' actions::

    from busserve.router.strategy import Cluster, Request, strategy

    @strategy("pd")
    async def pd(req: Request, cluster: Cluster) -> None:
        prefill = cluster.least_loaded(role="prefill")
        decode = cluster.least_loaded(role="decode", exclude=[prefill])
        end = req.prompt_len - 1
        recv = await decode.prep_recv(req, end=end, sender=prefill)
        if recv.matched < end:
            await prefill.remote_send(req, recv.kv_addr, begin=recv.matched, end=end)
        await decode.start_generate(req, begin=end)

It must end with exactly one accepted ``start_generate``; that engine then owns the request's stream. Keyword-only
parameters with defaults are the strategy's settings (``busserve strategy set balanced_pd --param f=0.3``); their
annotations (int, float, bool, str) say how values are read. Raising anything fails the request cleanly: the
router aborts what the strategy started and the client gets an Error.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from busserve.errors import BusserveError
from busserve.messages import ErrorCode, Role, StrategyParam
from busserve.router.cluster import ClusterView, Engine, least_loaded
from busserve.router.request import Request

__all__ = ["BUILTINS", "Cluster", "NoEngine", "Request", "StrategyFn", "coerce_params", "run_strategy", "strategy"]

StrategyFn = Callable[..., Awaitable[None]]
BUILTINS: dict[str, StrategyFn] = {}
log = logging.getLogger(__name__)


class NoEngine(BusserveError):
    code: ErrorCode = "no_engine"


class StrategyFailed(BusserveError):
    code: ErrorCode = "internal"


def strategy(name: str) -> Callable[[StrategyFn], StrategyFn]:
    """Register a built-in strategy under ``name``."""

    def register(fn: StrategyFn) -> StrategyFn:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"strategy {name!r} must be an async function")
        BUILTINS[name] = fn
        fn.strategy_name = name  # type: ignore[attr-defined]
        return fn

    return register


class Cluster:
    """What a strategy sees: the live engines that serve the request's model, and ways to pick among them."""

    def __init__(self, view: ClusterView, model: str = "") -> None:
        self.view = view
        self.model = model

    def engines(self, role: Role | None = None) -> list[Engine]:
        return self.view.engines(role=role, model=self.model)

    def least_loaded(self, role: Role | None = None, exclude: Iterable[Engine] = ()) -> Engine:
        engine = least_loaded(self.engines(role), exclude, routers=self.view.routers())
        if engine is None:
            what = f" with role {role}" if role else ""
            avoid = [e.id for e in exclude]
            raise NoEngine(f"no live engine{what}" + (f" besides {', '.join(avoid)}" if avoid else ""))
        return engine

    def try_least_loaded(self, role: Role | None = None, exclude: Iterable[Engine] = ()) -> Engine | None:
        return least_loaded(self.engines(role), exclude, routers=self.view.routers())

    def cheapest_candidates(self, req: Request, role: Role | None = None) -> list[tuple[Engine, int]]:
        """``(engine, cached prompt tokens)`` for the only engines that can be the cheapest place for ``req`` when
        cost grows with the tokens left to compute and with load, ties to the lower id (``prefix_aware``'s rule):
        a few per group of engines holding the same prefix, however large the cluster."""
        return self.view.cheapest_candidates(req, role=role, model=self.model)

    def longest_prefix(self, req: Request) -> tuple[Engine | None, int]:
        """The engine caching the longest prefix of the prompt, and that prefix's length in tokens."""
        scored = [(e.cached_prefix(req), -e.load, e) for e in self.engines()]
        if not scored:
            return None, 0
        cached, _, engine = max(scored, key=lambda t: (t[0], t[1], t[2].id))
        return (engine, cached) if cached else (None, 0)


async def run_strategy(fn: StrategyFn, req: Request, cluster: Cluster, params: dict[str, StrategyParam]) -> None:
    """Run a strategy on a request, renewing the leases of its parked receives until it returns (a strategy may
    wait minutes for a queued remote prefill; the receive must not lapse meanwhile — and must lapse soon after a
    router that dies stops renewing it)."""
    keeper = asyncio.create_task(_keep_leases(req, cluster.view))
    try:
        await fn(req, cluster, **params)
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper


async def _keep_leases(req: Request, view: ClusterView) -> None:
    period = view.timeouts.lease_s / 3
    while True:
        await asyncio.sleep(period)
        for eid in sorted(req.parked_on):
            engine = view.get(eid)
            if engine is None:
                continue
            try:
                await engine.renew(req)
            except BusserveError as exc:
                log.debug("lease of %s on %s not renewed: %s", req.request_id, eid, exc)


# ------------------------------------------------------------------ parameters


_TYPES: dict[Any, type] = {int: int, float: float, bool: bool, str: str, "int": int, "float": float, "bool": bool,
                           "str": str}


def parameters(fn: StrategyFn) -> dict[str, tuple[type, Any]]:
    """The settings a strategy takes: keyword-only parameters with defaults, by name → (type, default)."""
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"strategy parameter {p.name!r} needs a default")
            out[p.name] = (_TYPES.get(p.annotation, type(p.default)), p.default)
    return out


def _read(tp: type, value: StrategyParam, name: str) -> StrategyParam:
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"parameter {name!r} must be true or false, got {value!r}")
    try:
        return tp(value)  # type: ignore[no-any-return]
    except (TypeError, ValueError):
        raise ValueError(f"parameter {name!r} must be {tp.__name__}, got {value!r}") from None


def coerce_params(fn: StrategyFn, raw: dict[str, StrategyParam]) -> dict[str, StrategyParam]:
    """Check names and convert values (``"0.3"`` → 0.3) against the strategy's signature."""
    known = parameters(fn)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        name = getattr(fn, "strategy_name", fn.__name__)
        takes = ", ".join(known) or "none"
        raise ValueError(f"strategy {name!r} has no parameter {', '.join(unknown)} (it takes: {takes})")
    return {k: _read(known[k][0], v, k) for k, v in raw.items()}


def parse_param_args(items: Iterable[str]) -> dict[str, StrategyParam]:
    """``["f=0.3", "strict=true"]`` → ``{"f": "0.3", "strict": "true"}`` (typed later by coerce_params)."""
    out: dict[str, StrategyParam] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param {item!r}: expected NAME=VALUE")
        out[key.strip()] = value.strip()
    return out
