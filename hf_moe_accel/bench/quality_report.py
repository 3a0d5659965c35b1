"""An evaluation's results (`eval.evaluate`) as a markdown table and as a quality-against-speed plot."""

from __future__ import annotations

from pathlib import Path

from .plotting import pyplot


def markdown_table(result: dict) -> str:
    rows = result["settings"]
    has_speed = any("decode_tokens_per_s" in r for r in rows)
    has_offload = any("hit_rate" in r for r in rows)  # offload rows (bench.quality_offload)
    header = ["setting", "experts/token", "share of experts", "perplexity", "ppl change", "greedy agreement"]
    if has_speed:
        header += ["decode tok/s", "speed vs full"]
    if has_offload:
        header += ["hit rate", "dropped pairs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["name"],
            f"{r['experts_per_token']:.2f}",
            f"{100 * r['experts_fraction']:.0f}%",
            f"{r['ppl']:.3f}",
            f"{r['ppl_change_pct']:+.2f}%",
            f"{100 * r['agreement']:.1f}%",
        ]
        if has_speed:  # rows measured without speed (offload rows) show a dash
            cells += ([f"{r['decode_tokens_per_s']:.1f}", f"{r['speed_vs_full']:.2f}x"] if "decode_tokens_per_s" in r
                      else ["-", "-"])
        if has_offload:
            cells += [f"{100 * r['hit_rate']:.1f}%", str(r["miss_dropped"])] if "hit_rate" in r else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str | Path, title: str = "") -> None:
    """Perplexity and greedy agreement against decode tokens/s (or experts per token without speed)."""
    plt = pyplot()
    rows = result["settings"]
    has_speed = all("decode_tokens_per_s" in r for r in rows)
    x_key, x_label = ("decode_tokens_per_s", "decode tokens/s") if has_speed else ("experts_per_token", "experts per token")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (y_key, y_label, scale) in zip(axes, [("ppl", "perplexity", 1), ("agreement", "greedy agreement (%)", 100)]):
        for kind, marker in (("top_k", "o"), ("expert_threshold", "s")):
            points = [r for r in rows if r[kind] is not None]
            ax.plot([r[x_key] for r in points], [scale * r[y_key] for r in points], marker=marker, linestyle="-",
                    label="static top-k" if kind == "top_k" else "threshold")
        full = [r for r in rows if r["top_k"] is None and r["expert_threshold"] is None]
        ax.scatter([r[x_key] for r in full], [scale * r[y_key] for r in full], marker="*", s=120, color="k",
                   label="full", zorder=3)
        for r in rows:
            ax.annotate(r["name"], (r[x_key], scale * r[y_key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title or f"Fewer activated experts: quality against {x_label} ({result['device']}, {result['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
