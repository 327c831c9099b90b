"""Encoding as it runs (batched preprocessing, the inference copy of the image tower) gives open_clip's own
pixels and features."""
import numpy as np
import torch
from PIL import Image

from diffusion_caption.image_encoder import ImageEncoder
from diffusion_caption.images import load_image


def _images():
    rng = np.random.default_rng(0)
    sizes = [(128, 128), (100, 200), (37, 41), (300, 90), (64, 64), (1, 5), (128, 128)]
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    smooth = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((16, 16, 1))).astype(np.uint8)  # flat regions
    return ims + [Image.fromarray(smooth), Image.fromarray(smooth[:, :, 0]).convert("L"),
                  Image.fromarray(rng.integers(0, 256, (50, 60, 4), dtype=np.uint8), "RGBA")]


def test_batched_preprocessing_gives_the_transforms_pixels_in_order(clip_encoder):
    """Grouped by size and resized as uint8 tensors: PIL's pixels to one level of 255 (its rounding), in the
    input order, whatever the sizes and modes; a transform it does not know runs per image."""
    ims = _images()
    expected = torch.stack([clip_encoder.preprocess(load_image(im)) for im in ims])
    got = clip_encoder.pixels(ims)
    std = torch.tensor(clip_encoder.preprocess.transforms[-1].std).max()
    levels = (got - expected).abs().amax(dim=(1, 2, 3)) * std * 255
    assert got.shape == expected.shape and bool((levels <= 1.01).all()), levels
    assert (levels[-3] == 0).item()  # flat regions: exactly PIL's
    odd = ImageEncoder(clip_encoder.model, lambda im: torch.zeros(3, 4, 4), clip_encoder.source)
    assert odd.pixels(ims[:2]).shape == (2, 3, 4, 4)


def test_the_inference_tower_gives_open_clips_features_and_follows_the_weights(clip_encoder, scene_image):
    """Batch norms folded into the convolutions, the attention pool's one query: open_clip's features to float
    rounding; a weight changed in place (a training step) makes the copy again; the checkpoint's own modules
    keep their batch norms (saving reads them)."""
    import copy

    enc = ImageEncoder(copy.deepcopy(clip_encoder.model), clip_encoder.preprocess, clip_encoder.source)  # the
    # session's CLIP stays as it is
    pix = enc.pixels([scene_image] * 3)
    model = enc.model
    with torch.no_grad():
        for _ in range(2):
            expected = torch.nn.functional.normalize(model.encode_image(pix), dim=-1)
            assert torch.allclose(enc.encode_pixels(pix), expected, atol=1e-5)
            model.visual.attnpool.c_proj.bias.add_(0.5)
            model.visual.bn1.running_mean.add_(0.1)
    tower = enc.tower()
    assert tower is enc.tower()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.visual.modules())
