"""Report figures, drawn with matplotlib's object API on the Agg canvas.

The figures never touch ``pyplot``, so no global backend is selected and nothing opens a window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_confusion_png(confusion: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Write a confusion matrix as a PNG: cell colour is the row-normalised recall, text the count.

    Args:
        confusion: (K, K) counts, rows true and columns predicted.
        class_names: K class names in index order.
        path: output PNG file.
        title: figure title.
    """
    n = len(class_names)
    support = confusion.sum(axis=1, keepdims=True)
    recall = np.divide(confusion, support, out=np.zeros(confusion.shape, dtype=float), where=support > 0)

    size = max(4.0, 0.6 * n + 2.5)
    figure = Figure(figsize=(size, size))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true class")

    axes.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    axes.set_yticks(range(n), labels=class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for i in range(n):
        for j in range(n):
            colour = "white" if recall[i, j] > 0.5 else "black"
            axes.text(j, i, str(int(confusion[i, j])), ha="center", va="center", color=colour, fontsize=8)

    figure.tight_layout()
    figure.savefig(path, dpi=120)
