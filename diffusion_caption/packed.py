"""Linear layers as sampling multiplies them: each weight prepacked once into oneDNN's blocked layout.

A block sampling step multiplies a few rows per caption by every weight matrix of the denoiser. ``F.linear``
lays each weight out again at every call, which for such small products costs as much as the product itself;
prepacking it once (what ``torch.compile``'s freezing pass does on a CPU) makes the step's matrix products
1.2 to 2.2 times faster from a few dozen rows on, and the activation after a layer (tanh, GELU) rides along in
the same call, as does a residual connection's sum. The results are ``F.linear``'s to float rounding
(``tests/test_packed.py``); where oneDNN does not run (another device, a build without it) the layer falls
back to ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ACT = {"none": None, "tanh": torch.tanh, "gelu": F.gelu}
MIN_FLOAT32_ROWS = 16  # fewer float32 rows are multiplied unpacked (2 CPU cores: unpacked is faster up to ~8)


def onednn(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be prepacked: a float32 or bfloat16 CPU tensor, with oneDNN in this build."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear:
    """``y = act(x W^T + b)`` for inputs of the weight's dtype, the weight prepacked once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.packed = None
        if onednn(self.weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 32)
            except RuntimeError:  # a oneDNN that cannot pack this dtype here: the plain product
                self.packed = None

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> "PackedLinear":
        return cls(linear.weight, linear.bias)

    def __call__(self, x: torch.Tensor, act: str = "none", add: torch.Tensor | None = None) -> torch.Tensor:
        """``act(x W^T + b)``, or with ``add`` (no activation) ``x W^T + b + add``: a residual connection."""
        # a oneDNN call costs some 15 us however small; float32 products of a few rows are cheaper unpacked
        if (self.packed is not None and x.dtype == self.weight.dtype and x.device.type == "cpu"
                and (x.dtype == torch.bfloat16 or x.numel() >= MIN_FLOAT32_ROWS * x.shape[-1])):
            if add is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, add.contiguous(), self.packed, self.bias, "add")
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, act, [],
                                                      "none" if act == "gelu" else "")
        y = F.linear(x, self.weight, self.bias)
        if add is not None:
            return y + add
        return y if _ACT[act] is None else _ACT[act](y)
