"""Structured outputs: a request's :class:`~busserve.messages.StructuredOutput` as an llguidance grammar, checked
where requests come in and enforced on the engine as a token mask.

Where each part runs:

* **Routers** (and an engine's direct path) call :func:`check` when a request arrives: the grammar is compiled
  without a tokenizer, so a bad schema, regex or grammar is refused before any engine sees it, with the
  field that was wrong.
* **Engines** hold one :class:`Grammars` per tokenizer. It builds llguidance's tokenizer view once, on the first
  constrained request (about half a second for a 49k vocabulary), and a matcher per request (about a millisecond
  for a small schema). A
  resumed request's matcher is advanced over the output it already streamed, so it continues the same format.
* **Each step**, :func:`constrain` computes the masks of the constrained rows in one call (llguidance's executor,
  in parallel, without the GIL) and sets every token the format forbids to ``-inf``. Rows without a format are not
  touched, so constrained and free requests share the batch. After sampling, the engine feeds the token to the
  matcher (:meth:`Grammars.advance`); a matcher that is done ends the request with ``stop``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from busserve.errors import BusserveError
from busserve.messages import StructuredOutput

# StructuredOutput's fields and the llguidance format each one is.
_FORMATS = {"json_schema": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


# JSON is written on one line, with the separators OpenAI's own structured outputs use: free whitespace lets a
# small model pad a value with newlines until max_tokens (seen with SmolLM2 and with random weights). A schema's
# own "x-guidance" options, or the request's whitespace_pattern, override this.
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarRejected(BusserveError):
    """A structured output that does not compile; ``field`` names the part of the request at fault."""

    code = "invalid_request"


def _field(so: StructuredOutput) -> str:
    for name in _FORMATS:
        if getattr(so, name) is not None:
            return name
    raise AssertionError("StructuredOutput checks that one format is given")


def grammar_text(so: StructuredOutput) -> str:
    """The llguidance grammar of ``so`` (not yet checked: :func:`check` compiles it)."""
    from llguidance import LLMatcher
    from llguidance._grammar_from import grammar_from

    name = _field(so)
    value: Any = getattr(so, name)
    try:
        if name == "json_schema":
            overrides: dict[str, Any] = {}
            if so.whitespace_pattern is not None:
                overrides = {"whitespace_flexible": True, "whitespace_pattern": so.whitespace_pattern}
            return LLMatcher.grammar_from_json_schema(json.dumps(value), defaults=JSON_LAYOUT,  # type: ignore[arg-type]
                                                      overrides=overrides or None)  # type: ignore[arg-type]
        text = json.dumps(value) if name == "choice" else value
        return grammar_from(_FORMATS[name], text)  # type: ignore[arg-type]
    except ValueError as exc:  # GBNF that does not convert to Lark
        raise GrammarRejected(f"structured_output.{name}: {exc}", field=f"structured_output.{name}") from None


def check(so: StructuredOutput | None) -> None:
    """Compile ``so`` (no tokenizer needed); :class:`GrammarRejected` with llguidance's message if it does not."""
    if so is None:
        return
    from llguidance import LLMatcher

    name = _field(so)
    problem = LLMatcher.validate_grammar(grammar_text(so))
    if problem:
        raise GrammarRejected(f"structured_output.{name} does not compile: {problem.strip()}",
                              field=f"structured_output.{name}")


class _Refused:
    """The matcher of a grammar that does not even convert (answers as llguidance's matchers in error do)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def is_error(self) -> bool:
        return True

    def get_error(self) -> str:
        return self.message

    def is_stopped(self) -> bool:
        return True


class Grammars:
    """An engine's matchers: llguidance's view of the tokenizer, built once, and one matcher per request."""

    def __init__(self, tokenizer: Any, eos_token_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._eos = list(eos_token_ids)
        self._ll: Any = None
        self._lock = threading.Lock()
        self._executor: Any = None

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                import llguidance
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(self._tokenizer, eos_token=self._eos or None)
                self._executor = llguidance.LLExecutor()
            return self._ll

    def matcher(self, so: StructuredOutput, streamed: Sequence[int] = ()) -> Any:
        """A matcher at the start of the output, or after ``streamed`` (a resumed request's output so far). It may
        be in llguidance's error state (a grammar no router checked); :func:`constrain` reports that."""
        from llguidance import LLMatcher

        try:
            text = grammar_text(so)
        except GrammarRejected as exc:
            return _Refused(str(exc))
        m = LLMatcher(self._ll_tokenizer(), text, log_level=0)
        if streamed and not m.is_error():
            m.consume_tokens(list(streamed))
        return m

    @staticmethod
    def advance(matcher: Any, token: int) -> str | None:
        """Feed the sampled token; an error message if the matcher refused it (None when it took it)."""
        if matcher.consume_token(token):
            return None
        return matcher.get_error() or f"token {token} is outside the format"

    def constrain(self, logits: torch.Tensor, matchers: list[Any]) -> tuple[torch.Tensor, dict[int, str]]:
        """``logits`` ([rows, vocab], float32, changed in place) with each constrained row's forbidden tokens at
        ``-inf``; ``matchers[i]`` is row i's matcher or None. Also the rows whose matcher is in error, with why."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        failed = {i: matchers[i].get_error() or "the structured output cannot continue"
                  for i in rows if matchers[i].is_error()}
        rows = [i for i in rows if i not in failed]
        if not rows:
            return logits, failed
        self._ll_tokenizer()
        vocab = logits.shape[1]
        words = (self._ll.vocab_size + 31) // 32
        # llguidance fills a host bitmask; it reaches the logits' device as one boolean copy.
        bitmask = np.zeros((len(rows), words), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr([(matchers[i], j) for j, i in enumerate(rows)],
                                               bitmask.ctypes.data, words * 4, len(rows))
        allowed_np = np.zeros((len(rows), vocab), dtype=np.bool_)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        n = min(vocab, bits.shape[1])
        allowed_np[:, :n] = bits[:, :n]
        dev = logits.device
        allowed = torch.from_numpy(allowed_np).to(dev)
        index = torch.tensor(rows, dtype=torch.long, device=dev)
        masked = logits[index].masked_fill(~allowed, float("-inf"))
        # Where penalties or min_tokens pushed every allowed token to -inf, the format wins: its tokens keep
        # their scores (a format that can only end must end even before min_tokens).
        dead = torch.isinf(masked).all(dim=1)
        if bool(dead.any()):
            base = logits[index[dead]].nan_to_num(neginf=0.0)
            masked[dead] = base.masked_fill(~allowed[dead], float("-inf"))
        logits[index] = masked
        return logits, failed
