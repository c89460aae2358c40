"""The router's prefix index against the definition (walk an engine's own page-hash set until the first miss), on
random clusters and event streams; and the property that makes a request's cost independent of cluster size:
its pages are hashed once, whatever the number of engines weighing it."""

from __future__ import annotations

import random

import pytest

from busserve.kv import page_hash
from busserve.kv.page_hash import prefix_page_hashes
from busserve.messages import EngineStatus, KVCleared, KVEventBatch, KVRemoved, KVStored, SamplingParams
from busserve.router.cluster import ClusterView
from busserve.router.request import Request

PS = 4


def _status(eid: str, total_pages: int = 10_000, page_size: int = PS) -> EngineStatus:
    return EngineStatus(engine_id=eid, model="m", roles=["prefill", "decode"], running=0, waiting=0, parked=0,
                        free_pages=total_pages, total_pages=total_pages, page_size=page_size, max_model_len=4096,
                        transports=["bus"], host="h", pid=1, seq=1)


def _req(tokens: list[int]) -> Request:
    return Request(request_id="r", prompt_token_ids=tokens, sampling=SamplingParams(), stream_subject="s")


def _by_definition(cached: set[int], tokens: list[int], ps: int) -> int:
    n = 0
    for h in prefix_page_hashes(tokens, ps):
        if h not in cached:
            break
        n += ps
    return n


@pytest.mark.parametrize("seed", range(5))
def test_index_agrees_with_each_engines_own_set(seed: int) -> None:
    rng = random.Random(seed)
    view = ClusterView(bus=None)  # type: ignore[arg-type]  # fed by hand
    engines = [f"e{i}" for i in range(8)]
    for eid in engines:
        view.on_status(_status(eid))
    seqs = dict.fromkeys(engines, 0)
    truth: dict[str, set[int]] = {e: set() for e in engines}
    # Prompts sharing prefixes of several lengths: a system prompt, a few conversations, random tails.
    base = [rng.randrange(1000) for _ in range(64)]
    prompts = [base[: rng.choice([8, 16, 40, 64])] + [rng.randrange(1000) for _ in range(rng.randrange(0, 30))]
               for _ in range(30)]
    for step in range(300):
        eid = rng.choice(engines)
        tokens = rng.choice(prompts)
        hashes = prefix_page_hashes(tokens, PS)
        kind = rng.random()
        if kind < 0.6:
            event: KVStored | KVRemoved | KVCleared = KVStored(page_hashes=hashes[: rng.randrange(len(hashes) + 1)])
            truth[eid].update(event.page_hashes)
        elif kind < 0.95:
            gone = rng.sample(hashes, rng.randrange(len(hashes) + 1)) if hashes else []
            event = KVRemoved(page_hashes=gone)
            truth[eid].difference_update(gone)
        else:
            event = KVCleared()
            truth[eid].clear()
        seqs[eid] += 1
        view.on_kv_events(KVEventBatch(engine_id=eid, seq=seqs[eid], events=[event]))
        if step % 10 == 0:
            for tokens in prompts[:10]:
                req = _req(tokens)
                got = {e.id: e.cached_prefix(req) for e in view.engines()}
                assert got == {e: _by_definition(truth[e], tokens, PS) for e in engines}


def test_a_request_is_hashed_once_however_many_engines_weigh_it(monkeypatch: pytest.MonkeyPatch) -> None:
    view = ClusterView(bus=None)  # type: ignore[arg-type]
    tokens = list(range(400))
    hashes = prefix_page_hashes(tokens, PS)
    for i in range(64):
        view.on_status(_status(f"e{i:02d}"))
        view.on_kv_events(KVEventBatch(engine_id=f"e{i:02d}", seq=1, events=[KVStored(page_hashes=hashes[:i])]))
    calls = 0
    real = page_hash.page_hash

    def counting(parent: int, toks: list[int] | tuple[int, ...]) -> int:
        nonlocal calls
        calls += 1
        return real(parent, toks)

    monkeypatch.setattr(page_hash, "page_hash", counting)
    req = _req(tokens)
    prefixes = [e.cached_prefix(req) for e in view.engines()]
    assert prefixes == [i * PS for i in range(64)]
    assert calls == len(tokens) // PS  # once per page, not once per page per engine
    # A KV event changes the answer; the hashes are not computed again.
    view.on_kv_events(KVEventBatch(engine_id="e00", seq=2, events=[KVStored(page_hashes=hashes[:5])]))
    assert view.get("e00").cached_prefix(req) == 5 * PS  # type: ignore[union-attr]
    assert calls == len(tokens) // PS


def test_an_engine_claiming_more_pages_than_it_has_is_reset() -> None:
    view = ClusterView(bus=None)  # type: ignore[arg-type]
    view.on_status(_status("small", total_pages=8))
    hashes = prefix_page_hashes(list(range(100)), PS)
    view.on_kv_events(KVEventBatch(engine_id="small", seq=1, events=[KVStored(page_hashes=hashes[:20])]))
    assert view.get("small").cached_prefix(_req(list(range(100)))) == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("seed", range(6))
def test_prefix_aware_weighs_a_few_engines_and_picks_what_weighing_all_would(seed: int) -> None:
    """``prefix_aware``'s choice from ``cheapest_candidates`` (a few engines per group holding the same prefix)
    equals the minimum over every live engine of its cost — on random clusters of 4…80 engines with random
    caches, loads (heartbeats and this router's own counts), draining engines, roles and a dead one."""
    from busserve.router.strategies.prefix_aware import cheapest
    from busserve.router.strategy import Cluster

    rng = random.Random(seed)
    view = ClusterView(bus=None)  # type: ignore[arg-type]
    n = rng.choice([4, 17, 40, 80])
    base = [rng.randrange(1000) for _ in range(80)]
    prompts = [base[: rng.choice([8, 16, 40, 80])] + [rng.randrange(1000) for _ in range(rng.randrange(0, 20))]
               for _ in range(12)]
    for i in range(n):
        eid = f"e{i:02d}"
        st = _status(eid)
        st.running = rng.randrange(4)
        st.draining = rng.random() < 0.1
        st.roles = ["prefill"] if rng.random() < 0.1 else ["prefill", "decode"]
        view.on_status(st)
        held = [h for p in rng.sample(prompts, rng.randrange(0, 4)) for h in prefix_page_hashes(p, PS)]
        view.on_kv_events(KVEventBatch(engine_id=eid, seq=1, events=[KVStored(page_hashes=held)]))
        for _ in range(rng.randrange(3)):
            view.load.add(eid, 1)
    view._engines["e00"].last_seen -= 3600  # dead: silent for an hour
    cluster = Cluster(view)
    for trial in range(40):
        req = _req(rng.choice(prompts) + [rng.randrange(1000) for _ in range(rng.randrange(0, 6))])
        everyone = view.engines(role="decode")
        want = min(everyone, key=lambda e: (req.prompt_len - e.cached_prefix(req) + 256 * e.load, e.id)).id
        assert cheapest(req, cluster).id == want, (seed, trial)
        if trial % 5 == 0:  # loads move between decisions, as dispatches and heartbeats move them
            view.load.add(rng.choice(everyone).id, rng.choice([1, -1]))
