"""Test helpers shared across the suite: engine harnesses and the greedy-equality check."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from busserve.bus.background import BackgroundLoop
from busserve.engine.engine_core import EngineConfig, EngineCore
from busserve.engine.model_loader import LoadedModel
from busserve.engine.requests import GenerateCmd, Outbound
from busserve.messages import Error, Final, SamplingParams, TokenChunk
from busserve.testing import live_view  # noqa: F401 - the tests import it from here

# DESIGN.md: fp32 products are not batch-invariant; outputs computed under different batch shapes may part ways
# only where the top two logits nearly tie.
NEAR_TIE = 1e-4


def greedy(max_tokens: int = 16, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


@torch.inference_mode()
def reference_greedy(loaded: LoadedModel, prompt: list[int], n: int) -> list[int]:
    """transformers' own ``generate`` (greedy, no EOS stop) with its own attention."""
    from transformers import GenerationConfig

    model = reference_model(loaded)
    # eos_token_id=[]: run the full length (None would fall back to the model's EOS).
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=0)
    out = model.generate(input_ids=torch.tensor([prompt]), generation_config=cfg)
    return out[0, len(prompt):].tolist()


_REF: dict[str, Any] = {}


def reference_model(loaded: LoadedModel) -> Any:
    """The same checkpoint under transformers' stock SDPA attention, loaded once per test session."""
    from transformers import AutoModelForCausalLM

    key = str(loaded.path)
    if key not in _REF:
        dtype = next(loaded.model.parameters()).dtype
        _REF[key] = AutoModelForCausalLM.from_pretrained(key, dtype=dtype, attn_implementation="sdpa").eval()
    return _REF[key]


@torch.inference_mode()
def assert_greedy_equal(loaded: LoadedModel, prompt: list[int], got: list[int], want: list[int]) -> None:
    """Token-for-token equality, except that a first divergence at a near-tie (top-2 margin < NEAR_TIE) is fine."""
    if got == want:
        return
    n = min(len(got), len(want))
    i = next((k for k in range(n) if got[k] != want[k]), n)
    assert i < n, f"lengths differ: got {len(got)} tokens, want {len(want)}"
    model = reference_model(loaded)
    logits = model(input_ids=torch.tensor([prompt + want[:i]])).logits[0, -1].float()
    top = logits.topk(2)
    margin = float(top.values[0] - top.values[1])
    assert {got[i], want[i]} <= set(top.indices.tolist()) and margin < NEAR_TIE, (
        f"outputs diverge at token {i} ({got[i]} vs {want[i]}) where the top-2 margin is {margin:.3g}: "
        f"not a near-tie, so this is a bug\n got {got}\nwant {want}"
    )


class CoreHarness:
    """Drives an EngineCore on its own thread without NATS, collecting what it would publish."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.events: dict[str, list[Any]] = defaultdict(list)
        self._cond = threading.Condition()
        core.emit = self._emit
        self._n = 0

    def _emit(self, outs: list[Outbound]) -> None:
        with self._cond:
            for o in outs:
                self.events[o.subject].append(o.msg)
            self._cond.notify_all()

    def submit(self, token_ids: list[int], sampling: SamplingParams, rid: str | None = None) -> str:
        self._n += 1
        rid = rid or f"req{self._n}"
        self.core.submit(GenerateCmd(request_id=rid, token_ids=token_ids, sampling=sampling,
                                     stream_subject=f"stream.{rid}"))
        return rid

    def wait(self, rid: str, timeout: float = 120.0) -> list[Any]:
        subject = f"stream.{rid}"
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(isinstance(e, (Final, Error)) for e in self.events[subject]), timeout=timeout)
        assert ok, f"{rid}: no terminal event within {timeout}s"
        return list(self.events[subject])

    def tokens(self, rid: str, timeout: float = 120.0) -> list[int]:
        events = self.wait(rid, timeout)
        assert isinstance(events[-1], Final), events[-1]
        return [t for e in events if isinstance(e, TokenChunk) for t in e.token_ids]

    def text(self, rid: str) -> str:
        return "".join(e.text for e in self.wait(rid) if isinstance(e, TokenChunk))

    def assert_no_leaks(self) -> None:
        def check() -> tuple[int, int]:
            self.core.scheduler.check_pages()
            return len(self.core.scheduler.by_id), self.core.scheduler.pages_held_by_requests()

        alive, held = self.core.call(check)  # type: ignore[misc]
        assert alive == 0 and held == 0, f"{alive} requests alive, {held} pages held after the test"


@contextmanager
def running_core(loaded: LoadedModel, **config: Any) -> Iterator[CoreHarness]:
    cfg = EngineConfig(engine_id=config.pop("engine_id", "t0"), shm_kv=config.pop("shm_kv", False), **config)
    core = EngineCore(cfg, loaded, emit=lambda outs: None)
    harness = CoreHarness(core)
    core.start()
    try:
        yield harness
        harness.assert_no_leaks()
    finally:
        core.stop()


class LoopThread(BackgroundLoop):
    """A background asyncio loop for in-process services that outlive one test."""


# ------------------------------------------------------------------ clusters of engine processes




async def wait_idle_no_leaks(bus: Any, ids: set[str], timeout_s: float = 30.0) -> None:
    """Every engine in ``ids`` reports no live request and every page free or cached (nothing leaked)."""
    import time as _time

    from busserve.bus import codec
    from busserve.messages import EngineStatus

    sub = await bus.nc.subscribe(bus.subjects.engines_status())
    clean: set[str] = set()
    last: dict[str, Any] = {}
    deadline = _time.monotonic() + timeout_s
    try:
        while clean != ids:
            left = deadline - _time.monotonic()
            assert left > 0, f"engines not idle and leak-free: {last}"
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:
                continue
            st = codec.decode(msg.data, EngineStatus, msg.headers)
            if st.engine_id not in ids:
                continue
            last[st.engine_id] = st
            idle = st.running == st.waiting == st.parked == 0
            if idle and st.free_pages + st.cached_pages == st.total_pages:
                clean.add(st.engine_id)
            else:
                clean.discard(st.engine_id)
    finally:
        await sub.unsubscribe()


async def asgi_call(app: Any, path: str = "/v1/completions", key: str | None = None, body: bytes = b"{}",
                    chunks: int = 1, declare: bool = True, method: str = "POST") -> tuple[int, dict[str, str], dict[str, Any]]:
    """One HTTP request through an ASGI app, as real ASGI messages: (status, headers, the JSON body)."""
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    if declare:
        headers.append((b"content-length", str(len(body)).encode()))
    parts = [body[i * len(body) // chunks:(i + 1) * len(body) // chunks] for i in range(chunks)]
    inbox = [{"type": "http.request", "body": p, "more_body": i < chunks - 1} for i, p in enumerate(parts)]
    out: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        out.append(msg)

    await app({"type": "http", "path": path, "method": method, "headers": headers, "query_string": b"",
               "scheme": "http", "server": ("test", 80), "root_path": ""}, receive, send)
    start = out[0]
    payload = b"".join(m.get("body", b"") for m in out[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(payload or b"null")
