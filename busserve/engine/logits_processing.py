"""What a request's sampling settings do to its row of logits before a token is chosen: repetition, presence and
frequency penalties, ``logit_bias``, and ``min_tokens`` (no end of sequence yet). Rows that ask for none of it are
not touched, and a batch where no row asks costs one check per row.

The definitions are the ones clients know. OpenAI: ``logit -= frequency_penalty * count + presence_penalty *
(count > 0)`` over the tokens generated so far, and ``logit_bias`` added as given. vLLM / Hugging Face:
``repetition_penalty`` divides the positive logits and multiplies the negative ones of every token seen in prompt
or output. A resumed request counts the output it streamed on its earlier engine as output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitsSettings:
    """The part of a request's sampling settings that changes logits (``SamplingParams`` names)."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    end_token_ids: tuple[int, ...] = ()  # what min_tokens holds back: EOS (unless ignored) and stop_token_ids

    @property
    def active(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.logit_bias)


@dataclass
class Row:
    """One row of the batch: its settings, every token of the sequence, and where its output starts."""

    settings: LogitsSettings
    token_ids: list[int]
    output_start: int


def process(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """``logits`` ([len(rows), vocab]) with every row's settings applied; the input itself if no row has any."""
    todo = [i for i, r in enumerate(rows) if r.settings.active]
    if not todo:
        return logits
    out = logits.float().clone()
    vocab, dev = out.shape[-1], out.device
    for i in todo:
        s, ids = rows[i].settings, rows[i].token_ids
        row = out[i]
        output = ids[rows[i].output_start:]
        if s.repetition_penalty != 1.0 and ids:
            seen = torch.tensor(sorted(set(ids)), dtype=torch.long, device=dev)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
        if (s.presence_penalty or s.frequency_penalty) and output:
            counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=dev), minlength=vocab)[:vocab].float()
            row -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).float()
        for tok, bias in s.logit_bias:
            if tok < vocab:
                row[tok] += bias
        if s.min_tokens and len(output) < s.min_tokens:
            ends = [t for t in s.end_token_ids if t < vocab]
            if ends:
                row[torch.tensor(ends, dtype=torch.long, device=dev)] = float("-inf")
    return out
