"""The open-loop driver: requests are sent at their arrival times whatever the server is doing (capped, if asked,
at ``max_concurrency`` in flight, as vLLM's ``--max-concurrency`` does), and every token event is timed."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from busserve.bench.arrivals import arrival_times
from busserve.bench.datasets import Sample
from busserve.bench.metrics import RequestRecord
from busserve.bus.client import Bus
from busserve.errors import BusserveError
from busserve.messages import Error, Final, GenerateRequest, SamplingParams, TokenChunk


@dataclass
class LoadConfig:
    rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    timeout_s: float = 600.0


Sender = Callable[[Sample, RequestRecord], Awaitable[None]]


def bus_sender(bus: Bus, timeout_s: float) -> Sender:
    async def send(sample: Sample, rec: RequestRecord) -> None:
        req = GenerateRequest(prompt_token_ids=sample.prompt_token_ids, sampling=SamplingParams(
            max_tokens=sample.output_len, temperature=0.0, ignore_eos=True))
        async for ev in bus.generate(req, first_event_timeout_s=timeout_s):
            now = time.perf_counter()
            if isinstance(ev, TokenChunk):
                if rec.first_token_at is None:
                    rec.first_token_at = now
                rec.token_times.append(now)
                rec.tokens += len(ev.token_ids)
            elif isinstance(ev, Final) and ev.finish_reason == "cancelled":
                rec.error = "cancelled: the request was cancelled before it finished"
            elif isinstance(ev, Final):
                rec.done_at = rec.token_times[-1] if rec.token_times else now
            elif isinstance(ev, Error):
                rec.error = f"{ev.code}: {ev.message}"

    return send


def http_sender(base_url: str, model: str, timeout_s: float) -> Sender:
    import openai  # the bench extra (installed by `make setup`)

    client = openai.AsyncOpenAI(base_url=base_url, api_key="busserve-bench", max_retries=0, timeout=timeout_s)

    async def send(sample: Sample, rec: RequestRecord) -> None:
        try:
            stream = await client.completions.create(
                model=model, prompt=sample.prompt_token_ids, max_tokens=sample.output_len, temperature=0.0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].text:
                    if rec.first_token_at is None:
                        rec.first_token_at = now
                    rec.token_times.append(now)
                if chunk.usage is not None:
                    rec.tokens = chunk.usage.completion_tokens
            rec.done_at = rec.token_times[-1] if rec.token_times else time.perf_counter()
        except openai.APIError as exc:
            rec.error = str(exc)

    return send


async def run_load(samples: list[Sample], send: Sender, cfg: LoadConfig,
                   on_done: Callable[[RequestRecord], Any] | None = None) -> tuple[list[RequestRecord], float]:
    """Send ``samples`` open-loop; returns per-request records and the run's duration (first send → last end)."""
    times = arrival_times(len(samples), cfg.rate, cfg.burstiness, cfg.seed)
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    start = time.perf_counter()
    records: list[RequestRecord] = []

    async def one(sample: Sample, at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        if limit is not None:
            await limit.acquire()
        rec = RequestRecord(kind=sample.kind, prompt_len=len(sample.prompt_token_ids), output_len=sample.output_len,
                            sent_at=time.perf_counter())
        records.append(rec)
        try:
            await asyncio.wait_for(send(sample, rec), timeout=cfg.timeout_s)
        except (TimeoutError, BusserveError, OSError) as exc:
            rec.error = rec.error or f"{type(exc).__name__}: {exc}"
        finally:
            if limit is not None:
                limit.release()
            if on_done is not None:
                on_done(rec)

    await asyncio.gather(*(one(s, t) for s, t in zip(samples, times, strict=True)))
    ends = [r.done_at for r in records if r.done_at is not None]
    duration = (max(ends) if ends else time.perf_counter()) - start
    return records, duration
