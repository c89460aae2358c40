"""What this engine's steps cost, measured as it serves and published in its heartbeats.

``EngineStatus.prefill_tokens_per_s``, ``decode_step_s`` and ``prefill_share`` let a strategy estimate what a plan
costs on this engine — how long a prompt waits and computes here, how long a request decodes here — from what the
engine measures of itself rather than from constants fitted to one machine (``router/strategies/adaptive.py``).

* A step that computes prompt tokens costs about prompt tokens ÷ prefill rate, plus one decode step when requests
  decode beside them. So a step of at least ``MIN_PROMPT_TOKENS`` prompt tokens updates the rate from its time less
  the current decode-step figure (smaller ones say more about fixed per-step costs than about the rate); a step with
  no prompt tokens updates the decode-step figure. Both are exponentially weighted, ``ALPHA`` per step, so that they
  follow an engine whose load or neighbours change; 0 until measured.
* ``prefill_share`` is the share of the last ``WINDOW_S`` seconds (exponentially decayed) that the engine spent
  computing prompts: a request decoding here is stalled that share of the time, so its decode takes 1 / (1 − share)
  times as long as the steps alone would.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

ALPHA = 0.2
MIN_PROMPT_TOKENS = 32
WINDOW_S = 30.0
MAX_SHARE = 0.95


def _ewma(old: float, new: float) -> float:
    return new if old == 0.0 else old + ALPHA * (new - old)


@dataclass
class StepRates:
    prefill_tokens_per_s: float = 0.0
    decode_step_s: float = 0.0
    since: float = field(default_factory=time.monotonic)  # the clock at the last update (any monotonic clock)
    _prefill_s: float = 0.0  # decayed seconds of prompt computation, as of ``since``

    def observe(self, prompt_tokens: int, decode_rows: int, seconds: float, now: float | None = None) -> None:
        if prompt_tokens == 0:
            if decode_rows:
                self.decode_step_s = _ewma(self.decode_step_s, seconds)
            return
        prefill_s = seconds - (self.decode_step_s if decode_rows else 0.0)
        if prefill_s <= 0:
            return
        self._prefill_s = self._decayed(time.monotonic() if now is None else now) + prefill_s
        if prompt_tokens >= MIN_PROMPT_TOKENS:
            self.prefill_tokens_per_s = _ewma(self.prefill_tokens_per_s, prompt_tokens / prefill_s)

    def prefill_share(self, now: float | None = None) -> float:
        return min(MAX_SHARE, self._decayed(time.monotonic() if now is None else now, keep=False) / WINDOW_S)

    def _decayed(self, now: float, keep: bool = True) -> float:
        value = self._prefill_s * math.exp(-max(0.0, now - self.since) / WINDOW_S)
        if keep:
            self._prefill_s, self.since = value, now
        return value
