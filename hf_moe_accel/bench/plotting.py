"""matplotlib for the `--plot` options, imported on first use with a headless backend."""

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
