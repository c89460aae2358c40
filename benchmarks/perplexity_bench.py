"""Perplexity of the default GGUF served quantized, against the same file dequantized to fp32 and against
llama.cpp's own ``llama-perplexity`` on the same file and text.

    .venv/bin/python benchmarks/perplexity_bench.py [--llama-perplexity PATH] [--ctx 512]

The text is fixed: the first 24 KB of the GNU GPL v3 (``benchmarks/data/perplexity_gpl3.txt``, copied verbatim as
the licence allows). The method is llama-perplexity's: the token stream cut into chunks of ``--ctx`` tokens, each
evaluated on its own, the negative log-likelihood averaged over the second half of every chunk (the first half
only gives context), PPL = exp(mean). busserve's side tokenizes with the transformers tokenizer built from the
GGUF; llama.cpp with its own — a few tokens' difference in the stream moves the figure slightly.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import time
from pathlib import Path

import torch

from busserve.engine.model_loader import LoadedModel, default_gguf, load_model

TEXT = Path(__file__).with_name("data") / "perplexity_gpl3.txt"


def perplexity(loaded: LoadedModel, ids: list[int], ctx: int) -> tuple[float, int]:
    """(PPL, tokens scored) over every whole chunk of ``ctx`` tokens."""
    model = loaded.model
    model.config._attn_implementation = "sdpa"  # whole chunks at once: stock attention, no paged cache
    nll, scored = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - ctx + 1, ctx):
            chunk = torch.tensor([ids[start:start + ctx]])
            logits = model(input_ids=chunk).logits[0].float()
            half = ctx // 2
            logp = torch.log_softmax(logits[half - 1:ctx - 1], dim=-1)
            nll -= logp.gather(1, chunk[0, half:].unsqueeze(1)).sum().item()
            scored += ctx - half
    return math.exp(nll / scored), scored


def llama_cpp_perplexity(binary: str, ctx: int, threads: int) -> float:
    done = subprocess.run([binary, "-m", str(default_gguf()), "-f", str(TEXT), "-c", str(ctx), "-t", str(threads),
                           "-b", str(ctx)], capture_output=True, text=True, timeout=1800)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if not found:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{(done.stdout + done.stderr)[-2000:]}")
    return float(found.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-perplexity", default=None, help="llama.cpp's llama-perplexity binary")
    ap.add_argument("--out", default=".bench/perplexity.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = TEXT.read_text()
    result: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "ctx": args.ctx, "text": TEXT.name}
    for label, dtype, mode in (("busserve, quantized (auto), bf16", torch.bfloat16, "auto"),
                               ("busserve, quantized (auto), fp32", torch.float32, "auto"),
                               ("same file dequantized, fp32", torch.float32, "none"),
                               ("same file dequantized, bf16", torch.bfloat16, "none")):
        loaded = load_model(None, dtype=dtype, quantization=mode)
        ids = loaded.tokenizer(text)["input_ids"]
        ppl, n = perplexity(loaded, ids, args.ctx)
        print(f"  {label}: PPL {ppl:.4f} over {n} tokens", flush=True)
        result[label] = ppl
    if args.llama_perplexity:
        ppl = llama_cpp_perplexity(args.llama_perplexity, args.ctx, args.threads)
        print(f"  llama.cpp llama-perplexity: PPL {ppl:.4f}", flush=True)
        result["llama.cpp llama-perplexity"] = ppl
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
