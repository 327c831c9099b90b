"""The trace figures: what the heatmap and the trajectory map draw, and that they render to real pictures."""
import io

import numpy as np
import pytest
from matplotlib.collections import LineCollection
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from PIL import Image

from diffusion_caption.viz import plots
from diffusion_caption.viz.vocab_map import fit_vocab_map


@pytest.fixture(scope="module")
def trace_and_map(tokenizer, clip_encoder, scene_image):
    import torch

    from diffusion_caption import Captioner
    from diffusion_caption.config import preset
    from diffusion_caption.denoiser import Denoiser

    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, cond_dim=clip_encoder.feature_dim)
    cap = Captioner(cfg, Denoiser(cfg), clip_encoder, tokenizer)
    trace = cap.caption(scene_image, steps=6, seed=1)
    toks = tokenizer.token_strings(list(range(tokenizer.vocab_size)))
    vmap = fit_vocab_map(cap.denoiser.embeddings, toks, method="pca")
    return trace, vmap


def _png_colours(fig) -> int:
    img = np.asarray(Image.open(io.BytesIO(plots.figure_png(fig, dpi=50))).convert("RGB"))
    return len(np.unique(img.reshape(-1, 3), axis=0))


def test_shown_positions_and_colours():
    assert plots.shown_positions(["[CLS]", "a", "[SEP]", "[PAD]", "[PAD]"]) == [0, 1, 2]
    assert plots.shown_positions(["[CLS]", "a", "[SEP]", "x", "[PAD]"]) == [0, 1, 2, 3]
    assert plots.shown_positions(["[PAD]", "[PAD]"]) == [0, 1]
    low, high = plots.confidence_color(0.0, lighten=0), plots.confidence_color(1.0, lighten=0)
    r0, g0 = int(low[1:3], 16), int(low[3:5], 16)
    r1, g1 = int(high[1:3], 16), int(high[3:5], 16)
    assert r0 > g0 and g1 > r1  # red when unsure, green when sure


def test_heatmap_draws_the_confidences_and_boxes_the_current_step(trace_and_map):
    trace, _ = trace_and_map
    fig = plots.confidence_heatmap(trace.steps, current=2)
    ax = fig.axes[0]
    images = [a for a in ax.get_children() if isinstance(a, AxesImage)]
    assert len(images) == 1
    shown = plots.shown_positions(trace.final.tokens)
    expected = np.array([[s.confidence[p] for s in trace.steps] for p in shown])
    np.testing.assert_allclose(images[0].get_array(), expected, atol=1e-6)
    boxes = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(boxes) == 1 and boxes[0].get_x() == pytest.approx(1.5)
    # the current column carries every shown token, in bold
    bold = [t.get_text() for t in ax.texts if t.get_fontweight() == "bold"]
    assert len(bold) == len(shown)
    assert "step 3 of 6" in ax.get_title()
    assert _png_colours(fig) > 50
    with pytest.raises(ValueError, match="outside"):
        plots.confidence_heatmap(trace.steps, current=6)
    with pytest.raises(ValueError, match="no steps"):
        plots.confidence_heatmap([])


def test_trajectory_map_draws_one_path_per_word_position(trace_and_map):
    trace, vmap = trace_and_map
    pts = vmap.place(trace.x0_preds())
    positions = [1, 2, 3]
    fig = plots.trajectory_map(vmap.coords, vmap.tokens, pts, trace.steps, current=4, positions=positions)
    ax = fig.axes[0]
    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(lines) == len(positions)
    # later steps than the current one are faint
    alphas = lines[0].get_colors()[:, 3]
    assert (alphas[:4] > 0.5).all() and (alphas[4:] < 0.2).all()
    labels = [t.get_text() for t in ax.texts]
    for p in positions:
        assert trace.steps[4].tokens[p] in labels
    assert "step 5 of 6" in ax.get_title()
    assert _png_colours(fig) > 50
    with pytest.raises(ValueError, match="points must have shape"):
        plots.trajectory_map(vmap.coords, vmap.tokens, pts[:-1], trace.steps)
    with pytest.raises(ValueError, match="do not match"):
        plots.trajectory_map(vmap.coords[:-1], vmap.tokens, pts, trace.steps)


def test_default_positions_leave_out_special_tokens(trace_and_map):
    trace, vmap = trace_and_map
    pts = vmap.place(trace.x_t())
    fig = plots.trajectory_map(vmap.coords, vmap.tokens, pts, trace.steps, what="noisy x_t")
    n_words = sum(not plots.is_special(trace.final.tokens[p]) for p in plots.shown_positions(trace.final.tokens))
    assert sum(isinstance(c, LineCollection) for c in fig.axes[0].collections) == n_words
    assert fig.axes[0].get_title().startswith("noisy x_t")
