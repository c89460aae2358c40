"""Every tensor an engine step touches lives on the model's device — proven without a GPU.

The check runs each step of a real engine core with the default device set to ``meta`` and a torch function mode
that looks at every tensor going into or coming out of every torch call. A tensor made without an explicit device
(``torch.tensor(ids)``, ``torch.arange(n)``: the placement bugs that break a CUDA engine at its first step) lands on
``meta`` and is reported with the line that made it; so is any call that mixes devices. On a GPU the same code is
where host-built indices would meet CUDA caches.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from busserve.engine.model_loader import LoadedModel, load_model
from busserve.messages import SamplingParams, StructuredOutput
from tests.helpers import CoreHarness, greedy, running_core


class CrossDevice(RuntimeError):
    pass


class DeviceCheck(TorchFunctionMode):
    """Records (and raises on) every torch call whose tensors are not all on ``device``."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.found: list[str] = []

    def _stray(self, tree: Any) -> list[torch.device]:
        return [t.device for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.device != self.device]

    def _report(self, func: Callable[..., Any], where: str, devices: list[torch.device]) -> str:
        stack = [f for f in traceback.extract_stack()[:-3] if "/busserve/" in f.filename]
        line = f"{stack[-1].filename.split('/busserve/')[-1]}:{stack[-1].lineno}" if stack else "?"
        self.found.append(f"{getattr(func, '__name__', func)} {where} on {sorted(map(str, set(devices)))} at {line}")
        return self.found[-1]

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        stray = self._stray((args, kwargs))
        if stray:
            raise CrossDevice(self._report(func, "given tensors", stray))
        out = func(*args, **kwargs)
        stray = self._stray(out)
        if stray:
            raise CrossDevice(self._report(func, "made tensors", stray))
        return out


@contextmanager
def checked_steps(h: CoreHarness) -> Iterator[list[str]]:
    """Run every step of ``h``'s core under a DeviceCheck; yields the list of what it found."""
    found: list[str] = []
    step = h.core.step
    device = h.core.runner.device

    def checked() -> bool:
        check = DeviceCheck(device)
        try:
            with torch.device("meta"), check:
                return step()
        finally:
            found.extend(check.found)

    h.core.step = checked  # type: ignore[method-assign]
    try:
        yield found
    finally:
        h.core.step = step  # type: ignore[method-assign]


def test_the_check_finds_a_tensor_made_without_a_device() -> None:
    check = DeviceCheck(torch.device("cpu"))
    pages = torch.tensor([3, 1], device="cpu")
    with pytest.raises(CrossDevice, match="made tensors on \\['meta'\\]"), torch.device("meta"), check:
        pages[torch.arange(2)]
    assert len(check.found) == 1


SYSTEM = "You are a careful assistant who answers in one short sentence. " * 4


def _requests(loaded: LoadedModel) -> list[tuple[list[int], SamplingParams]]:
    tok = loaded.tokenizer
    shared = list(tok(SYSTEM + "Name a colour.")["input_ids"])
    return [
        (shared, greedy(6)),
        (shared, greedy(6, logprobs=3)),  # a prefix-cache hit: a prefill chunk over cached slots (and a mask)
        (list(tok("Once upon a time")["input_ids"]) * 12, greedy(5)),  # chunked under the step budget
        (list(tok("Count: one, two,")["input_ids"]), SamplingParams(
            max_tokens=6, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=11)),
        (list(tok("Say something.")["input_ids"]), SamplingParams(max_tokens=6, temperature=1.0)),  # shared generator
        (list(tok("Repeat after me: la la")["input_ids"]), greedy(
            6, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4, min_tokens=3,
            logit_bias={42: 5.0})),
        (list(tok("Answer in JSON.")["input_ids"]), greedy(
            8, structured_output=StructuredOutput(choice=["yes", "no"]))),
    ]


@pytest.mark.parametrize("attention", ["auto", "torch"])
def test_every_step_stays_on_the_model_device(smol: LoadedModel, attention: str) -> None:
    with running_core(smol, attention=attention, max_batch_tokens=64) as h, checked_steps(h) as found:
        rids = [h.submit(ids, sp) for ids, sp in _requests(smol)]
        ends = [h.wait(rid)[-1] for rid in rids]
    assert found == []
    assert all(type(e).__name__ == "Final" for e in ends), ends


def test_deterministic_steps_stay_on_the_model_device(tiny_dir: Path) -> None:
    from busserve.engine import deterministic

    tiny = load_model(str(tiny_dir), dtype=torch.bfloat16)
    if deterministic.unavailable_reason(tiny.model) is not None:
        pytest.skip(deterministic.unavailable_reason(tiny.model) or "")
    with running_core(tiny, deterministic=True) as h, checked_steps(h) as found:
        rids = [h.submit(ids, sp) for ids, sp in _requests(tiny)[:4]]
        ends = [h.wait(rid)[-1] for rid in rids]
    assert found == []
    assert all(type(e).__name__ == "Final" for e in ends), ends
