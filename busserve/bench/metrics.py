"""Serving metrics, defined as vLLM's ``bench serve`` defines them.

Per request: TTFT (send → first token), E2E latency / JCT (send → last token), ITL (gaps between consecutive
token events), TPOT = (E2E − TTFT) / (output tokens − 1). Over a run: mean, median (p50) and p99 of each; request
throughput (completed / duration) and output-token throughput; goodput = completed requests per second that met
every given SLO (TTFT, TPOT, E2E, in milliseconds, like vLLM's ``--goodput``).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    kind: str
    prompt_len: int
    output_len: int  # tokens asked for
    sent_at: float
    first_token_at: float | None = None
    done_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.done_at is not None and self.tokens > 0

    @property
    def ttft(self) -> float:
        assert self.first_token_at is not None
        return self.first_token_at - self.sent_at

    @property
    def e2e(self) -> float:
        assert self.done_at is not None
        return self.done_at - self.sent_at

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def percentile(xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), as vLLM reports percentiles."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    return {"mean": statistics.fmean(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99)}


@dataclass
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and r.ttft * 1e3 > self.ttft_ms:
            return False
        tpot = r.tpot
        if self.tpot_ms is not None and tpot is not None and tpot * 1e3 > self.tpot_ms:
            return False
        return not (self.e2e_ms is not None and r.e2e * 1e3 > self.e2e_ms)


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO | None = None) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.tokens for r in ok)
    summary: dict[str, Any] = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else float("nan"),
        "output_throughput": out_tokens / duration_s if duration_s > 0 else float("nan"),
        "total_token_throughput": (out_tokens + sum(r.prompt_len for r in ok)) / duration_s if duration_s > 0
        else float("nan"),
        "ttft_s": _stats([r.ttft for r in ok]),
        "tpot_s": _stats([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": _stats([g for r in ok for g in r.itls]),
        "e2e_s": _stats([r.e2e for r in ok]),
    }
    if slo is not None:
        good = sum(1 for r in records if slo.met(r))
        summary["goodput"] = good / duration_s if duration_s > 0 else float("nan")
        summary["slo"] = asdict(slo)
    return summary
