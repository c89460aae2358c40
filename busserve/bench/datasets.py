"""Workloads: lists of (prompt token ids, output length). Token ids are drawn from the model's ordinary range so
that prompts are real inputs but never share a prefix unless the workload says so.

* ``synthetic`` — input and output lengths from distributions (``fixed:N``, ``uniform:A-B``, ``normal:MEAN,SD``);
* ``long``      — shaped like the microserving paper's long-input experiment (long inputs, short outputs),
                  scaled by ``--input-len`` / ``--output-len``;
* ``chat``      — short prompts, longer answers;
* ``prefix``    — groups of requests sharing a long prefix (system prompt, document) with distinct suffixes;
* ``mixed``     — long and chat requests interleaved;
* ``sharegpt``  — a ShareGPT-format JSON file: first human turn as prompt, the first answer's length as output.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VOCAB_LO, VOCAB_HI = 100, 40000  # ordinary tokens of SmolLM2's vocabulary (specials are below 100)


@dataclass
class Sample:
    prompt_token_ids: list[int]
    output_len: int
    kind: str = ""


def length_sampler(spec: str, rng: random.Random):  # type: ignore[no-untyped-def]
    """``fixed:N``, ``uniform:A-B`` or ``normal:MEAN,SD`` (clipped to [MEAN/4, 2·MEAN]) → a zero-arg sampler."""
    kind, _, arg = spec.partition(":")
    if kind == "fixed":
        n = int(arg)
        return lambda: n
    if kind == "uniform":
        a, b = (int(x) for x in re.split(r"[-,]", arg))
        return lambda: rng.randint(a, b)
    if kind == "normal":
        mean, sd = (float(x) for x in arg.split(","))
        lo, hi = max(1, int(mean / 4)), int(2 * mean)
        return lambda: int(min(hi, max(lo, round(rng.gauss(mean, sd)))))
    raise ValueError(f"length spec {spec!r}: use fixed:N, uniform:A-B or normal:MEAN,SD")


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(VOCAB_LO, VOCAB_HI) for _ in range(n)]


def salted(samples: list[Sample], salt: str) -> list[Sample]:
    """The same requests behind a 2-token head unique to ``salt``.

    Benchmarks replay one request list per strategy; without this, every run after the first would be served from
    the prefix cache the runs before it filled. Prefixes shared inside a run stay shared.
    """
    head = _tokens(random.Random(f"salt:{salt}"), 2)
    return [Sample(head + s.prompt_token_ids, s.output_len, s.kind) for s in samples]


def synthetic(n: int, input_len: str, output_len: str, seed: int = 0, kind: str = "synthetic") -> list[Sample]:
    rng = random.Random(seed)
    lin, lout = length_sampler(input_len, rng), length_sampler(output_len, rng)
    return [Sample(_tokens(rng, lin()), lout(), kind) for _ in range(n)]


# (input, output) length specs of the paper experiment's workloads (docs/BENCHMARKS.md, "The paper's experiment"; benchmarks/strategy_model.py draws
# the same lengths).
LONG_INPUT_LENGTHS = ("normal:1024,256", "normal:32,8")
CHAT_LENGTHS = ("normal:128,32", "normal:128,32")


def long_input(n: int, seed: int = 0, input_len: str = LONG_INPUT_LENGTHS[0], output_len: str = LONG_INPUT_LENGTHS[1]
               ) -> list[Sample]:
    return synthetic(n, input_len, output_len, seed, kind="long")


def chat(n: int, seed: int = 0, input_len: str = CHAT_LENGTHS[0], output_len: str = CHAT_LENGTHS[1]) -> list[Sample]:
    return synthetic(n, input_len, output_len, seed, kind="chat")


def prefix_groups(n: int, groups: int, prefix_len: int, suffix_len: str, output_len: str, seed: int = 0
                  ) -> list[Sample]:
    rng = random.Random(seed)
    prefixes = [_tokens(rng, prefix_len) for _ in range(groups)]
    lsuf, lout = length_sampler(suffix_len, rng), length_sampler(output_len, rng)
    return [Sample(rng.choice(prefixes) + _tokens(rng, lsuf()), lout(), "prefix") for _ in range(n)]


def mixed(n: int, seed: int = 0, long_share: float = 0.5, **kw: Any) -> list[Sample]:
    """Long-input and chat requests interleaved in a random order (``long_share`` of them long)."""
    rng = random.Random(seed)
    n_long = round(n * long_share)
    out = long_input(n_long, seed + 1) + chat(n - n_long, seed + 2)
    rng.shuffle(out)
    return out


def sharegpt(path: str | Path, n: int, tokenizer: Any, seed: int = 0, max_input: int = 4096) -> list[Sample]:
    data = json.loads(Path(path).read_text())
    rng = random.Random(seed)
    rng.shuffle(data)
    out: list[Sample] = []
    for conv in data:
        turns = conv.get("conversations") or conv.get("conversation") or []
        human = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        answer = next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")), None)
        if not human or not answer:
            continue
        ids = tokenizer(human)["input_ids"]
        out_len = len(tokenizer(answer)["input_ids"])
        if 4 <= len(ids) <= max_input and out_len >= 4:
            out.append(Sample(ids, out_len, "sharegpt"))
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"{path}: no usable conversations (ShareGPT format: [{{'conversations': [...]}}])")
    return out
