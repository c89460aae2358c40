"""Token sampling for one step's batch of logits.

Greedy rows (temperature 0) take the argmax. The others are scaled by temperature and filtered by top-k, top-p and
min-p in one vectorized pass, then drawn one row at a time with the request's own generator: a request with a
``seed`` owns a ``torch.Generator`` seeded with it, so its draws do not depend on what else is in the batch.
Everything runs on the logits' device; generators are made on that device (one shared per device for unseeded
requests), so sampling never moves a row to the host before the chosen tokens are read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from busserve.messages import SamplingParams, TokenLogprob, TopLogprob

SHARED_SEED = 0x5EED
_shared_generators: dict[torch.device, torch.Generator] = {}


def shared_generator(device: torch.device) -> torch.Generator:
    """The generator of unseeded requests on ``device`` (one per device, made on first use)."""
    gen = _shared_generators.get(device)
    if gen is None:
        gen = _shared_generators[device] = torch.Generator(device=device).manual_seed(SHARED_SEED)
    return gen


@dataclass
class SamplingState:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None  # the request's own stream of draws (None: the device's shared generator)
    _generator: torch.Generator | None = field(default=None, repr=False)

    @classmethod
    def from_params(cls, p: SamplingParams, output_offset: int = 0) -> SamplingState:
        """``output_offset``: tokens a resumed request already produced elsewhere; its seeded draws continue from a
        stream of their own (the original engine's generator state is gone)."""
        seed = p.seed + output_offset if p.seed is not None and p.temperature > 0 else None
        return cls(temperature=p.temperature, top_p=p.top_p, top_k=max(p.top_k, 0), min_p=p.min_p, seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device) -> torch.Generator:
        if self.seed is None:
            return shared_generator(device)
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator


def sample(logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
    """One token per row of ``logits`` ([rows, vocab], any float dtype)."""
    if not states:
        return []
    logits = logits.float()
    out = logits.argmax(dim=-1).tolist()
    random_rows = [i for i, s in enumerate(states) if not s.greedy]
    if not random_rows:
        return [int(t) for t in out]
    dev = logits.device
    idx = torch.tensor(random_rows, device=dev)
    rows = logits[idx]
    sts = [states[i] for i in random_rows]
    rows = rows / torch.tensor([s.temperature for s in sts], device=dev).unsqueeze(1)
    rows = _top_k(rows, [s.top_k for s in sts])
    probs = torch.softmax(rows, dim=-1)
    probs = _top_p(probs, [s.top_p for s in sts])
    probs = _min_p(probs, [s.min_p for s in sts])
    drawn = [torch.multinomial(probs[j], 1, generator=s.generator(dev)) for j, s in enumerate(sts)]
    for i, t in zip(random_rows, torch.cat(drawn).tolist(), strict=True):  # one read-back for all rows
        out[i] = t
    return [int(t) for t in out]


def _top_k(rows: torch.Tensor, ks: list[int]) -> torch.Tensor:
    if not any(ks):
        return rows
    vocab = rows.shape[-1]
    k = torch.tensor([k if 0 < k < vocab else vocab for k in ks], device=rows.device)
    kth = rows.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    return rows.masked_fill(rows < kth, float("-inf"))


def _top_p(probs: torch.Tensor, ps: list[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in ps):
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    drop_sorted = (cum - sorted_p) >= torch.tensor(ps, device=probs.device).unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _min_p(probs: torch.Tensor, mins: list[float]) -> torch.Tensor:
    if not any(mins):
        return probs
    floor = probs.max(dim=-1, keepdim=True).values * torch.tensor(mins, device=probs.device).unsqueeze(1)
    probs = probs.masked_fill(probs < floor, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def token_logprobs(logits: torch.Tensor, tokens: list[int], wanted: list[int | None]) -> list[TokenLogprob | None]:
    """For each row that asks (``wanted[i]`` alternatives, 0 for the token's own only): the chosen token's
    log-probability under the model's distribution (``log_softmax`` of the row as the model gave it) and the
    ``wanted[i]`` likeliest tokens'."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    rows = [i for i, k in enumerate(wanted) if k is not None]
    if not rows:
        return out
    dev = logits.device
    lp = torch.log_softmax(logits[torch.tensor(rows, device=dev)].float(), dim=-1)
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=dev))[:, 0].tolist()
    k_max = max(int(wanted[i] or 0) for i in rows)
    top_v, top_i = lp.topk(k_max, dim=-1) if k_max else (None, None)
    top_vs = top_v.tolist() if top_v is not None else []
    top_is = top_i.tolist() if top_i is not None else []
    for j, i in enumerate(rows):
        k = int(wanted[i] or 0)
        top = [] if not k else [
            TopLogprob(token_id=int(t), logprob=float(v)) for t, v in zip(top_is[j][:k], top_vs[j][:k], strict=True)]
        out[i] = TokenLogprob(token_id=tokens[i], logprob=float(chosen[j]), top=top)
    return out
