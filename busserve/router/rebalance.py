"""The rebalancing policy: which running requests to move where. Off by default; any strategy takes it as the
parameter ``rebalance=1`` (``busserve strategy set least_loaded --param rebalance=1``).

A pure function of the cluster view and this router's running requests, called once a second. Two rules, in order:

* **Make room for a long prefill.** An engine with at least ``long_prefill`` prompt tokens still to prefill stalls
  every request decoding on it for each chunk (the adaptive strategy's worst case: a request that decodes on an
  engine which then starts prefilling long prompts). Its decoders move to the engine with the least prefill backlog,
  if that one has under a quarter of it.
* **Even out decoding.** If the busiest engine decodes ``spread`` or more requests than the idlest, one moves.

At most ``max_moves`` per call, and a request moves at most once per ``cooldown_s`` (a migration costs a pause).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from busserve.router.cluster import Engine
from busserve.router.lifecycle import Flight
from busserve.router.migration import can_migrate


@dataclass
class RebalanceConfig:
    long_prefill: int = 1024  # prompt tokens of backlog that count as "about to take a long prefill"
    spread: int = 4  # decoding requests between the busiest and the idlest engine before one moves
    max_moves: int = 2
    cooldown_s: float = 10.0


def plan_moves(engines: list[Engine], flights: list[Flight], config: RebalanceConfig,
               last_moved: dict[str, float]) -> list[tuple[Flight, Engine, str]]:
    """(request, target, reason) for the migrations worth doing now."""
    now = time.monotonic()
    decoders: dict[str, list[Flight]] = {e.id: [] for e in engines}
    for f in flights:
        if can_migrate(f) and f.req.started_on in decoders and now - last_moved.get(f.req.base_id, -1e9) > \
                config.cooldown_s:
            decoders[f.req.started_on].append(f)  # type: ignore[index]
    moves: list[tuple[Flight, Engine, str]] = []
    if len(engines) < 2:
        return moves
    by_backlog = sorted(engines, key=lambda e: (e.prefill_backlog, e.decoding, e.id))
    calm = by_backlog[0]
    for busy in reversed(by_backlog[1:]):
        if busy.prefill_backlog >= config.long_prefill and calm.prefill_backlog * 4 < busy.prefill_backlog:
            moves += [(f, calm, "long_prefill") for f in decoders[busy.id]]
    if not moves:
        by_decoding = sorted(engines, key=lambda e: (e.decoding, e.prefill_backlog, e.id))
        idle, busiest = by_decoding[0], by_decoding[-1]
        if busiest.decoding - idle.decoding >= config.spread and decoders[busiest.id]:
            # The most recent arrival has the shortest context: the cheapest to copy.
            moves.append((max(decoders[busiest.id], key=lambda f: f.started), idle, "spread"))
    return moves[: config.max_moves]
