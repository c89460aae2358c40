"""Switching the active strategy from outside a router (the CLI, the bench)."""

from __future__ import annotations

from busserve.bus.client import Bus
from busserve.config_store import ConfigStore
from busserve.errors import NoResponders
from busserve.messages import SetStrategy, StrategyParam, StrategyState
from busserve.router.registry import load_strategy
from busserve.router.strategy import coerce_params


async def set_strategy(bus: Bus, name: str, params: dict[str, StrategyParam]) -> StrategyState:
    """Ask a router to switch (it validates and stores it for every router); with no router up, validate a
    built-in here and store it, so routers started later use it."""
    try:
        return await bus.request(bus.subjects.control_strategy(), SetStrategy(name=name, params=params),
                                 StrategyState, timeout_s=10)
    except NoResponders:
        fn = load_strategy(name)  # only a built-in can be checked without a router (ValueError otherwise)
        state = StrategyState(name=name, params=coerce_params(fn, params), updated_by="cli")
        store = await ConfigStore.open(bus)
        state.revision = await store.put_strategy(state)
        return state
