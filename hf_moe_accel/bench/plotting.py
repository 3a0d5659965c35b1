"""matplotlib for the `--plot` options, imported on first use with a headless backend, and the
grouped bar panel the bench plots share."""

from __future__ import annotations


def pyplot():
    """`matplotlib.pyplot` on the Agg backend; ImportError saying how to install it when it's missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or the [plot] extra)") from error
    return plt


def bar_panel(ax, labels: list[str], series: dict[str, list[float | None]], ylabel: str, title: str,
              log: bool = True) -> None:
    """Grouped bars on `ax`: one group per label, one bar per series (`None`: no bar), a log scale
    unless `log` is False, a legend."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        heights = [float("nan") if v is None else v for v in values]
        ax.bar([x + i * width for x in range(len(labels))], heights, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
