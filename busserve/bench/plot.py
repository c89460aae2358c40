"""Latency CDFs per strategy (TTFT, end-to-end/JCT, TPOT) as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_cdfs(runs: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in zip(axes, ("ttft", "e2e", "tpot"), ("TTFT (s)", "JCT / end-to-end (s)", "TPOT (s)"),
                              strict=True):
        for run in runs:
            xs = sorted(x for x in run["requests"][key] if x is not None)
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=run["label"])
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
