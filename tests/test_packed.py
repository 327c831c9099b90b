"""Prepacked linear layers (``diffusion_caption.packed``) compute what ``F.linear`` does, and the denoiser's
sampling path that uses them gives what its training pass gives."""
import pytest
import torch
import torch.nn.functional as F

from diffusion_caption import packed
from diffusion_caption.packed import PackedLinear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 33, 128])
def test_packed_linear_computes_the_layer_its_activation_and_a_residual_sum(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(48, 24, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    x, r = torch.randn(rows, 24, generator=g).to(dtype), torch.randn(rows, 48, generator=g).to(dtype)
    lin = PackedLinear(w, b)
    assert (lin.packed is not None) == packed.onednn(w)
    y = F.linear(x, w, b).float()
    tol = 1e-4 if dtype == torch.float32 else 0.05 * y.abs().max().item()  # bfloat16: one rounding of the sum
    torch.testing.assert_close(lin(x).float(), y, atol=tol, rtol=0)
    torch.testing.assert_close(lin(x, "tanh").float(), torch.tanh(y), atol=tol, rtol=0)
    torch.testing.assert_close(lin(x, "gelu").float(), F.gelu(y), atol=tol, rtol=0)
    torch.testing.assert_close(lin(x, add=r).float(), y + r.float(), atol=tol, rtol=0)
    assert lin(x.view(1, rows, 24)).shape == (1, rows, 48)  # leading dimensions pass through


def test_packed_linear_falls_back_to_the_plain_product_where_onednn_cannot_pack(monkeypatch):
    monkeypatch.setattr(packed, "onednn", lambda weight: False)
    w, b, x = torch.randn(8, 4), torch.randn(8), torch.randn(5, 4)
    lin = PackedLinear(w, b)
    assert lin.packed is None
    torch.testing.assert_close(lin(x, "tanh"), torch.tanh(F.linear(x, w, b)))
    torch.testing.assert_close(lin(x, add=x @ w.T), F.linear(x, w, b) + x @ w.T)


def test_the_denoisers_packed_layers_follow_its_weights():
    """Changed in place (a training step, ``load_state_dict``), a weight is packed again; copies and pickles
    carry no packed layers."""
    import copy
    import pickle

    from diffusion_caption.config import CaptionerConfig
    from diffusion_caption.denoiser import Denoiser

    cfg = CaptionerConfig(seq_len=8, vocab_size=12, emb_dim=8, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                          cond_dim=6, block_size=2, fusion="add")
    net = Denoiser(cfg).eval()
    x = torch.randn(3, 8)
    first = net._packed()
    assert net._packed() is first  # made once while nothing changes
    assert first["down2"](first["down0"](torch.randn(3, 16), "tanh")).shape == (3, 8)
    with torch.no_grad():
        net.input_up_proj[0].weight.mul_(2.0)
    again = net._packed()
    assert again is not first
    torch.testing.assert_close(again["up0"](x), net.input_up_proj[0](x), atol=1e-5, rtol=0)
    assert "_packed_memo" not in copy.deepcopy(net).__dict__
    assert "_packed_memo" not in pickle.loads(pickle.dumps(net)).__dict__
