"""What every view of a trace shares: the confidence colour scale and which caption positions are shown.

The scale is the same everywhere (``CONFIDENCE_CMAP``), so a token chip, its heatmap cell and the
legend under them agree.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex

CONFIDENCE_CMAP = "RdYlGn"  # red: unsure, yellow: half-sure, green: sure
PAD_TOKEN = "[PAD]"


def confidence_color(c: float, lighten: float = 0.35) -> str:
    """Hex colour of a confidence in [0, 1] on the shared scale, mixed with white for text backgrounds."""
    r, g, b, _ = colormaps[CONFIDENCE_CMAP](float(np.clip(c, 0.0, 1.0)))
    return to_hex((r + (1 - r) * lighten, g + (1 - g) * lighten, b + (1 - b) * lighten))


def is_special(token: str) -> bool:
    return token.startswith("[") and token.endswith("]")


def shown_positions(tokens: Sequence[str], pad_token: str = PAD_TOKEN) -> list[int]:
    """Caption positions worth showing: all up to the last one that is not padding in ``tokens``."""
    last = max((i for i, t in enumerate(tokens) if t != pad_token), default=len(tokens) - 1)
    return list(range(last + 1))
