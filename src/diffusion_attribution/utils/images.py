"""Image grids for people to look at: samples during training, fidelity reports, rankings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

matplotlib.use("Agg")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return array.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor | np.ndarray, ncol: int, scale: int = 3, pad: int = 2) -> Image.Image:
    """A plain grid (nearest-neighbour upscaled so 32-pixel images are visible)."""
    array = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    n, h, w, _ = array.shape
    nrow = (n + ncol - 1) // ncol
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = np.full((nrow * cell_h + pad, ncol * cell_w + pad, 3), 255, dtype=np.uint8)
    for k, image in enumerate(array):
        r, c = divmod(k, ncol)
        big = image.repeat(scale, 0).repeat(scale, 1)
        canvas[
            pad + r * cell_h : pad + r * cell_h + h * scale, pad + c * cell_w : pad + c * cell_w + w * scale
        ] = big
    return Image.fromarray(canvas)


def titled_grid(
    images: torch.Tensor | np.ndarray,
    titles: Sequence[str],
    path: str | Path,
    ncol: int,
    suptitle: str | None = None,
    cell_inches: float = 1.6,
) -> Path:
    """A grid with a short title over each image, saved as PNG."""
    array = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    n = len(array)
    nrow = max(1, (n + ncol - 1) // ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(ncol * cell_inches, nrow * (cell_inches + 0.3)), squeeze=False
    )
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(array[k], interpolation="nearest")
            ax.set_title(titles[k], fontsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
