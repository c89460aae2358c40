"""The strategy API without processes: registry, parameters, loading user strategies, engine choice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from busserve.kv.page_hash import prefix_page_hashes
from busserve.messages import EngineStatus, KVEventBatch, KVStored, SamplingParams
from busserve.router.cluster import ClusterView
from busserve.router.registry import BUILTINS, load_strategy
from busserve.router.request import Request
from busserve.router.strategies.adaptive import EngineLoad
from busserve.router.strategy import Cluster, NoEngine, coerce_params, parse_param_args

HERE = Path(__file__).parent


def test_every_built_in_is_registered() -> None:
    load_strategy("least_loaded")
    assert {"least_loaded", "round_robin", "pd", "balanced_pd", "prefix_aware", "migrate", "adaptive"} <= set(BUILTINS)


def test_params_are_typed_by_the_signature() -> None:
    fn = load_strategy("balanced_pd")
    assert coerce_params(fn, parse_param_args(["f=0.3"])) == {"f": 0.3}
    with pytest.raises(ValueError, match="no parameter g"):
        coerce_params(fn, {"g": 1})
    with pytest.raises(ValueError, match="must be float"):
        coerce_params(fn, {"f": "lots"})
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_param_args(["f"])


def test_user_strategies_load_from_a_module_or_a_file() -> None:
    by_module = load_strategy("tests.router.custom_strategy:pinned")
    by_file = load_strategy(f"{HERE / 'custom_strategy.py'}:pinned")
    assert by_module.__name__ == by_file.__name__ == "pinned"
    assert coerce_params(by_module, {"target": "A"}) == {"target": "A"}
    with pytest.raises(ValueError, match="unknown strategy"):
        load_strategy("no_such_strategy")
    with pytest.raises(ValueError, match="not an async function"):
        load_strategy("tests.router.custom_strategy:Request")


def _status(eid: str, load: int, roles: list[str] | None = None) -> EngineStatus:
    return EngineStatus(engine_id=eid, model="m", roles=roles or ["prefill", "decode"], running=load, waiting=0,
                        parked=0, free_pages=100, total_pages=100, page_size=4, max_model_len=1024,
                        transports=["shm", "bus"], host="h", pid=1, seq=1)


def _req(tokens: list[int]) -> Request:
    return Request(request_id="r", prompt_token_ids=tokens, sampling=SamplingParams(), stream_subject="s")


def test_cluster_picks_by_role_load_and_cached_prefix() -> None:
    view = ClusterView(bus=None)  # type: ignore[arg-type]  # fed by hand: no bus needed
    for eid, load, roles in (("a", 3, ["prefill"]), ("b", 1, ["decode"]), ("c", 0, ["prefill", "decode"])):
        view.on_status(_status(eid, load, roles))
    cluster = Cluster(view)
    assert cluster.least_loaded().id == "c"
    assert cluster.least_loaded(role="prefill", exclude=[cluster.least_loaded()]).id == "a"
    with pytest.raises(NoEngine):
        cluster.least_loaded(role="decode", exclude=view.engines())
    tokens = list(range(40))
    view.on_kv_events(KVEventBatch(engine_id="b", seq=1, events=[KVStored(page_hashes=prefix_page_hashes(tokens, 4)[:6])]))
    engine, cached = cluster.longest_prefix(_req(tokens))
    assert engine is not None and engine.id == "b" and cached == 24


def test_engines_that_stop_heartbeating_drop_out() -> None:
    view = ClusterView(bus=None)  # type: ignore[arg-type]
    view.on_status(_status("a", 0))
    view._engines["a"].last_seen = time.monotonic() - 10
    assert view.engines() == [] and not view.is_alive("a")


def test_load_tracker_counts_requests_prefill_and_decodes() -> None:
    from busserve.router.cluster import LoadTracker

    t = LoadTracker()
    req = _req(list(range(100)))
    t.assign(req, "d")
    t.assign(req, "d")  # once per engine
    t.charge_prefill(req, "p", 80)
    t.charge_prefill(req, "d", 20)
    assert (t.get("d"), t.prefill("p"), t.prefill("d")) == (1, 80, 20)
    t.prefill_done(req, "p")  # remote_send returned
    req.started_on = "d"
    t.first_token(req)
    assert (t.prefill("p"), t.prefill("d"), t.decoding("d")) == (0, 0, 1)
    t.release(req)
    assert (t.get("d"), t.decoding("d")) == (0, 0)
    t.release(req)  # idempotent
    assert t.get("d") == 0 and t.decoding("d") == 0


def _eload(eid: str, backlog: int = 0, decoding: int = 0, cached: int = 0, requests: float = 0,
           roles: tuple[bool, bool] = (True, True), rate: float = 1000.0) -> EngineLoad:
    return EngineLoad(id=eid, can_prefill=roles[0], can_decode=roles[1], requests=requests, backlog=backlog,
                      decoding=decoding, cached=cached, prefill_rate=rate)


def test_adaptive_splits_dual_role_engines_by_id() -> None:
    from busserve.router.strategies.adaptive import sides

    prefill, decode = sides([_eload("c"), _eload("a"), _eload("b"), _eload("d")])
    assert [e.id for e in prefill] == ["a", "b"] and [e.id for e in decode] == ["c", "d"]
    prefill, decode = sides([_eload("b"), _eload("a"), _eload("c")])
    assert [e.id for e in prefill] == ["a", "b"] and [e.id for e in decode] == ["c"]
    # Operator roles win over the split.
    prefill, decode = sides([_eload("a", roles=(True, False)), _eload("b", roles=(False, True))])
    assert [e.id for e in decode] == ["b"] and [e.id for e in prefill] == ["a"]


def test_adaptive_plans_per_request() -> None:
    from busserve.router.strategies.adaptive import plan

    # Two engines that do both: "a" is the prefill side, "b" the decode side.
    # Short prompts run whole on the least-loaded engine, on either side: chat is data parallel.
    p = plan(128, [_eload("a", requests=1), _eload("b", requests=2)])
    assert p.data_parallel and p.decode == "a"
    p = plan(128, [_eload("a", requests=3), _eload("b", requests=2)])
    assert p.data_parallel and p.decode == "b" and p.short
    # ...unless long prompts came recently: then they keep to the decode side, off the long prefills' engine.
    p = plan(128, [_eload("a"), _eload("b", requests=4)], since_long_s=3.0)
    assert p.data_parallel and p.decode == "b"
    assert plan(128, [_eload("a"), _eload("b", requests=4)], since_long_s=30.0).decode == "a"
    assert plan(128, [_eload("a"), _eload("b", requests=4)], since_long_s=3.0, memory_s=0).decode == "a"
    # With requests decoding there, the prompt is prefilled on the prefill side (as in PD) while that has at most
    # short_wait_s (0.5 s at the engine's measured 1,000 tokens/s) queued; past that, or with nobody to stall, it runs whole on "b".
    p = plan(128, [_eload("a", backlog=400), _eload("b", decoding=2)], since_long_s=3.0)
    assert (p.prefill, p.decode, p.end, p.f, p.short) == ("a", "b", 127, 0.0, True)
    assert plan(128, [_eload("a", backlog=600), _eload("b", decoding=2)], since_long_s=3.0).data_parallel
    assert plan(128, [_eload("a", backlog=600), _eload("b", decoding=2)], since_long_s=3.0,
                short_wait_s=1.0).prefill == "a"
    assert plan(128, [_eload("a", decoding=1), _eload("b", decoding=2)], since_long_s=3.0).data_parallel
    assert plan(128, [_eload("a"), _eload("b", decoding=2, cached=127)], since_long_s=3.0).data_parallel
    assert not plan(1000, [_eload("a"), _eload("b")]).short
    # Long prompts: prefill on "a", the last tenth and decode on "b" (balanced PD, f = 0.1)...
    p = plan(1000, [_eload("a"), _eload("b", decoding=3)])
    assert (p.prefill, p.decode, p.end, p.f, p.chunk) == ("a", "b", 900, 0.1, 256)
    # ...or plain PD while "b" already has prefill queued (the last tenth would wait behind it).
    p = plan(1000, [_eload("a"), _eload("b", decoding=3, backlog=100)])
    assert (p.prefill, p.decode, p.end, p.f, p.chunk) == ("a", "b", 999, 0.0, 0)
    assert plan(1000, [_eload("a"), _eload("b")], f=0.3).end == 700
    # The prefill side's queue raises f: 2 s queued → 0.2, and never past f_max.
    busy = _eload("b", decoding=4)
    assert plan(1000, [_eload("a", backlog=2000), busy]).f == pytest.approx(0.2)
    assert plan(1000, [_eload("a", backlog=20000), busy], absorb_decoders=-1).f == pytest.approx(0.3)
    assert plan(1000, [_eload("a", backlog=2000), busy], f_per_queued_s=0).f == pytest.approx(0.1)
    # A queue on the prefill side (≥ 0.5 s) while the decode engine has at most 3 decoders and nothing to
    # prefill: the decode engine takes the whole prompt.
    p = plan(1000, [_eload("a", backlog=600), _eload("b", decoding=3)])
    assert p.data_parallel and p.decode == "b" and p.chunk == 256  # beside its decoders, 256 tokens per step
    assert plan(1000, [_eload("a", backlog=600), _eload("b", decoding=3)], prefill_chunk=0).chunk == 0
    # Also with prefill of its own queued, while the prefill side's queue is still >= 0.5 s longer (the shorter
    # queue: a burst spreads over both engines)...
    assert plan(1000, [_eload("a", backlog=2000), _eload("b", decoding=1, backlog=1000)]).data_parallel
    # ...but not below the threshold, not with more decoders there.
    assert not plan(1000, [_eload("a", backlog=400), _eload("b", decoding=3)]).data_parallel
    assert not plan(1000, [_eload("a", backlog=600), _eload("b", decoding=4)]).data_parallel
    assert not plan(1000, [_eload("a", backlog=600), _eload("b", decoding=1, backlog=150)]).data_parallel
    assert not plan(1000, [_eload("a", backlog=600), _eload("b")], absorb_decoders=-1).data_parallel
    # Past absorb_decoders it still absorbs when the prefill side's queue is longer than the stall it causes:
    # 6 decoders each waiting 1 s for this prompt, against 10 s ahead of it on the prefill side.
    assert plan(1000, [_eload("a", backlog=10000), _eload("b", decoding=6)]).data_parallel
    assert not plan(1000, [_eload("a", backlog=5000), _eload("b", decoding=6)]).data_parallel
    assert not plan(1000, [_eload("a", backlog=10000), _eload("b", decoding=6)], absorb_decoders=-1).data_parallel
    # Queues are compared in seconds at each engine's measured rate: the same 600 tokens are 0.15 s on an engine
    # prefilling 4,000 tokens/s (not worth absorbing) and 0.6 s at 1,000; a set prefill_tokens_per_s overrides both.
    assert not plan(1000, [_eload("a", backlog=600, rate=4000), _eload("b", decoding=3)]).data_parallel
    assert plan(1000, [_eload("a", backlog=1200, rate=2000), _eload("b", decoding=3)]).data_parallel
    assert plan(1000, [_eload("a", backlog=600, rate=4000), _eload("b", decoding=3)],
                prefill_tokens_per_s=1000).data_parallel
    # An engine that has not measured its rate yet counts at the fallback (2,000 tokens/s).
    assert not plan(1000, [_eload("a", backlog=600, rate=0), _eload("b", decoding=3)]).data_parallel
    assert plan(1000, [_eload("a", backlog=1200, rate=0), _eload("b", decoding=3)]).data_parallel
    # Nor while short prompts are arriving: their decoders have long answers ahead.
    p = plan(1000, [_eload("a", backlog=600), _eload("b")], since_short_s=2.0)
    assert (p.data_parallel, p.end, p.f) == (False, 999, 0.0)  # nor a tail: plain PD
    assert plan(1000, [_eload("a", backlog=600), _eload("b")], since_short_s=20.0).data_parallel
    # A decode-only engine (operator roles) never takes a whole prompt.
    p = plan(1000, [_eload("a", backlog=5000, roles=(True, False)), _eload("b", roles=(False, True))])
    assert (p.prefill, p.decode, p.data_parallel) == ("a", "b", False)
    # A long prompt runs whole while every prefill-side engine has requests decoding (short prompts that ran
    # there): disaggregating would stall them for the whole prefill.
    p = plan(1000, [_eload("a", requests=2, decoding=2), _eload("b", requests=1, decoding=1)])
    assert p.data_parallel and p.decode == "b"
    p = plan(1000, [_eload("a", requests=1, decoding=1), _eload("b", requests=3, decoding=3)])
    assert p.data_parallel and p.decode == "a"
    # With a quiet prefill-side engine left, that one prefills, even with more queued.
    p = plan(1000, [_eload("a", decoding=1), _eload("b", backlog=1500), _eload("c", decoding=4),
                    _eload("d", decoding=4)])
    assert (p.prefill, p.data_parallel) == ("b", False)
    # A cached prefix shortens what is left: a long prompt mostly cached on "b" runs whole there.
    p = plan(1000, [_eload("a"), _eload("b", cached=900)])
    assert p.data_parallel and p.decode == "b"
    # More engines: the decode side's ("c", "d") least-loaded decodes, the prefill side's soonest-free prefills.
    p = plan(1000, [_eload("a", backlog=2000), _eload("b"), _eload("c", decoding=4), _eload("d", decoding=1)])
    assert (p.prefill, p.decode) == ("b", "d")
    # One engine: everything whole.
    assert plan(1000, [_eload("a")]).data_parallel
    # Operator roles are respected, short prompts too: a prefill-only engine never decodes.
    roles = [_eload("a", roles=(True, False)), _eload("b", roles=(False, True))]
    assert (plan(50, roles).prefill, plan(50, roles).decode) == ("a", "b")
    with pytest.raises(NoEngine):
        plan(1000, [_eload("a", roles=(True, False))])
    with pytest.raises(NoEngine):
        plan(1000, [_eload("b", roles=(False, True))])
