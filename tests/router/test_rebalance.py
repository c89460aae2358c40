"""The rebalancing policy as a function of the cluster view: which running requests it moves, where, and when not."""

from __future__ import annotations

import time

import pytest

from busserve.messages import EngineStatus, SamplingParams
from busserve.router.cluster import ClusterView
from busserve.router.lifecycle import Flight, State
from busserve.router.rebalance import RebalanceConfig, plan_moves
from busserve.router.request import Request


class _Bus:
    def connected_for(self) -> float:
        return 100.0


def view_of(*engines: tuple[str, int, int]) -> ClusterView:
    """Engines as (id, decoding, prefill backlog in tokens)."""
    view = ClusterView(_Bus())  # type: ignore[arg-type]
    for eid, decoding, backlog in engines:
        view.on_status(EngineStatus(engine_id=eid, model="m", roles=["prefill", "decode"], running=decoding,
                                    waiting=0, parked=0, free_pages=100, total_pages=100, page_size=16,
                                    max_model_len=2048, transports=["shm"], decoding=decoding,
                                    pending_prefill_tokens=backlog))
    return view


def running_on(eid: str, n: int, tag: str) -> list[Flight]:
    out = []
    for i in range(n):
        req = Request(request_id=f"{tag}{i}", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(), stream_subject="s")
        req.started_on = eid
        f = Flight(req=req, strategy="least_loaded", state=State.RUNNING)
        f.started = time.monotonic() + i  # later arrivals have shorter contexts
        out.append(f)
    return out


def test_decoders_leave_an_engine_about_to_prefill_a_long_prompt() -> None:
    view = view_of(("A", 3, 4000), ("B", 3, 0))
    flights = running_on("A", 3, "a") + running_on("B", 3, "b")
    moves = plan_moves(view.engines(), flights, RebalanceConfig(max_moves=8), {})
    assert {(f.req.request_id, t.id, why) for f, t, why in moves} == {(f"a{i}", "B", "long_prefill") for i in range(3)}


def test_a_short_backlog_or_a_busy_alternative_moves_nothing() -> None:
    flights = running_on("A", 3, "a") + running_on("B", 3, "b")
    assert plan_moves(view_of(("A", 3, 900), ("B", 3, 0)).engines(), flights, RebalanceConfig(), {}) == []
    # The other engine has a backlog of its own (more than a quarter of A's): moving would not help.
    assert plan_moves(view_of(("A", 3, 4000), ("B", 3, 1500)).engines(), flights, RebalanceConfig(), {}) == []


def test_uneven_decoding_moves_the_newest_request_to_the_idlest_engine() -> None:
    view = view_of(("A", 6, 0), ("B", 1, 0), ("C", 2, 0))
    flights = running_on("A", 6, "a") + running_on("B", 1, "b")
    moves = plan_moves(view.engines(), flights, RebalanceConfig(spread=4), {})
    assert [(f.req.request_id, t.id, why) for f, t, why in moves] == [("a5", "B", "spread")]
    assert plan_moves(view.engines(), flights, RebalanceConfig(spread=6), {}) == []


@pytest.mark.parametrize("blocker", ["cooldown", "cancelled", "migrating", "missed_tokens"])
def test_requests_that_must_not_move_stay(blocker: str) -> None:
    view = view_of(("A", 2, 4000), ("B", 0, 0))
    flights = running_on("A", 2, "a")
    last: dict[str, float] = {}
    for f in flights:
        if blocker == "cooldown":
            last[f.req.base_id] = time.monotonic()
        elif blocker == "cancelled":
            f.cancelled = True
        elif blocker == "migrating":
            f.migrating = True
        else:
            f.resumable = False
    assert plan_moves(view.engines(), flights, RebalanceConfig(), last) == []


def test_rebalance_is_a_parameter_every_strategy_takes() -> None:
    from busserve.router.dispatcher import Router

    router = Router(_Bus(), tokenizer=None)  # type: ignore[arg-type]
    on = router.resolve("least_loaded", {"rebalance": 1, "prefill_chunk": 16})
    assert on.rebalance and on.params == {"prefill_chunk": 16}
    assert on.stored_params == {"prefill_chunk": 16, "rebalance": 1}
    off = router.resolve("pd", {})
    assert not off.rebalance and off.stored_params == {}
    external = router.resolve("my_strategy", {"rebalance": "1", "k": 2})
    assert external.rebalance and external.params == {"k": 2}
    with pytest.raises(ValueError, match="rebalance must be 0 or 1"):
        router.resolve("least_loaded", {"rebalance": 5})
