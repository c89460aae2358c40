"""Log-probabilities as OpenAI's API shows them: per token its text, its UTF-8 bytes and its log-probability, with
the likeliest alternatives — ``logprobs.content`` for chat, and the older ``tokens`` / ``token_logprobs`` /
``top_logprobs`` / ``text_offset`` lists for completions. The engine sends token ids (``TokenLogprob``); their
texts and bytes come from the router's tokenizer.

A token's bytes are its own, not its text re-encoded: byte-level BPE tokens (GPT-2's alphabet, SmolLM2's and most
others') map each character back to one byte, so a token that ends half-way through a UTF-8 character reports the
bytes it holds, as OpenAI does. Special tokens (EOS, chat markers) are not listed: they are not in the text.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from busserve.messages import TokenLogprob


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's byte → printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenTexts:
    """Token id → (text, bytes), cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        # Special tokens (EOS, chat markers) never reach the text (skip_special_tokens), so they are not listed.
        self.hidden = frozenset(getattr(tokenizer, "all_special_ids", []) or [])

    def for_request(self, skip_special_tokens: bool) -> TokenTexts:
        """The same table (one cache), listing special tokens too where the request keeps them in its text."""
        if skip_special_tokens:
            return self
        view = TokenTexts.__new__(TokenTexts)
        view.tokenizer, view._cache, view.hidden = self.tokenizer, self._cache, frozenset()
        return view

    def shown(self, lps: list[TokenLogprob]) -> list[TokenLogprob]:
        return [lp for lp in lps if lp.token_id not in self.hidden]

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            text = self.tokenizer.decode([token_id])
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            table = _byte_of_char()
            if isinstance(piece, str) and piece and all(ch in table for ch in piece):
                raw = [table[ch] for ch in piece]
            else:
                raw = list(text.encode("utf-8"))
            found = self._cache[token_id] = (text, raw)
        return found


def chat_content(lps: list[TokenLogprob], texts: TokenTexts) -> list[dict[str, Any]]:
    """Entries of a chat choice's ``logprobs.content``."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = texts(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return [{**one(lp.token_id, lp.logprob), "top_logprobs": [one(t.token_id, t.logprob) for t in lp.top]}
            for lp in texts.shown(lps)]


class CompletionLogprobs:
    """The completions API's parallel lists, built up as tokens arrive."""

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts
        self.offset = 0

    def part(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in self.texts.shown(lps):
            text, _ = self.texts(lp.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({self.texts(t.token_id)[0]: t.logprob for t in lp.top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


