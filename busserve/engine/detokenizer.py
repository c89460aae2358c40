"""Incremental detokenization with stop strings.

Text is produced token by token with the ``tokenizers`` library's DecodeStream (which withholds bytes until they
form whole characters). Stop strings are matched on the text: output stops right before the first match, and text
that could still turn into a stop string is held back until it cannot — so no client ever sees part of a stop
(unless it asked for the stop string itself: ``include_stop``).
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class Detokenizer:
    def __init__(self, tokenizer: Any, stop: list[str] | None = None, *, skip_special_tokens: bool = True,
                 include_stop: bool = False) -> None:
        """``include_stop``: the stop string that ends the output is part of it (vLLM's
        ``include_stop_str_in_output``); by default output ends right before it."""
        self.include_stop = include_stop
        self._backend = tokenizer._tokenizer  # the Rust tokenizer behind a transformers "fast" tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.stop = [s for s in (stop or []) if s]
        self._text = ""
        self._emitted = 0
        self.stopped_by: str | None = None

    def prime(self, token_ids: list[int]) -> None:
        """Take over a stream another engine started: feed the tokens it already streamed, emitting nothing. The
        state afterwards — text held back for stop strings or unfinished characters included — is the one that
        engine had, so the text goes on exactly where its left off."""
        for t in token_ids:
            self.push(t)

    def push(self, token_id: int) -> str:
        """Feed one token; return the text that is now safe to emit ("" when held back or stopped)."""
        if self.stopped_by is not None:
            return ""
        piece = self._stream.step(self._backend, token_id)
        if piece:
            self._text += piece
        return self._release()

    def _release(self) -> str:
        if self.stop:
            # A stop string can only begin within the held-back tail or the new text.
            start = max(0, self._emitted - max(len(s) for s in self.stop) + 1)
            hits = [(i, s) for s in self.stop if (i := self._text.find(s, start)) >= 0]
            if hits:
                at, which = min(hits)
                self.stopped_by = which
                out = self._text[self._emitted : at + (len(which) if self.include_stop else 0)]
                self._emitted = len(self._text)
                return out
            end = len(self._text) - self._held_tail()
        else:
            end = len(self._text)
        out = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_tail(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """At the end of the request: whatever was held back (no stop string completed)."""
        if self.stopped_by is not None:
            return ""
        out = self._text[self._emitted :]
        self._emitted = len(self._text)
        return out

    @property
    def text(self) -> str:
        return self._text
