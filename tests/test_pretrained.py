"""The real loading paths for pretrained components, exercised offline on tiny models saved locally."""
import json

import pytest
import torch

from diffusion_caption import Captioner, CheckpointError
from diffusion_caption.config import CaptionerConfig
from diffusion_caption.denoiser import Denoiser
from diffusion_caption.image_encoder import ImageEncoder


def test_denoiser_from_a_local_distilbert(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    bert = DistilBertModel(DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=64))
    bert.save_pretrained(str(tmp_path / "bert"))
    cfg = CaptionerConfig(encoder=str(tmp_path / "bert"), vocab_size=40, emb_dim=32, dim=32, n_layers=2, n_heads=2,
                          hidden_dim=64, cond_dim=16, seq_len=10, T=50)
    d = Denoiser(cfg)
    # the seed paper's setting: token embeddings start from the pretrained word embeddings
    assert torch.equal(d.token_embedding.weight, bert.embeddings.word_embeddings.weight)
    w = "transformer.layer.1.ffn.lin2.weight"
    assert torch.equal(d.encoder.state_dict()[w], bert.state_dict()[w])
    out, _ = d(torch.randn(2, 10, 32), torch.tensor([3, 40]), torch.randn(2, 16))
    assert out.shape == (2, 10, 32)
    # a checkpoint rebuilt from its stored architecture needs no access to the original weights
    again = Denoiser(cfg, encoder_config=d.encoder_config)
    again.load_state_dict(d.state_dict())
    d.eval(), again.eval()
    assert torch.equal(again(torch.ones(1, 10, 32), torch.tensor([5]), torch.ones(1, 16))[0],
                       d(torch.ones(1, 10, 32), torch.tensor([5]), torch.ones(1, 16))[0])


def test_open_clip_architecture_with_a_local_weights_file(tmp_path, scene_image):
    """The ``base`` preset's path: an open_clip model name plus a local pretrained file (not a download)."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # open_clip's BPE
    (tmp_path / "tiny-test-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "tiny-test-vit.json"))
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-test-vit", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    enc = ImageEncoder.from_open_clip("tiny-test-vit", str(tmp_path / "weights.safetensors"))
    assert enc.feature_dim == 32
    pix = enc.pixels([scene_image])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.eval().encode_image(pix), dim=-1)
    assert torch.allclose(enc.encode([scene_image]), expected, atol=1e-5)
    # its text side uses open_clip's own tokenizer for the named model, at the model's context length
    texts = ["a red circle", "two blue squares on a black background"]
    ids = open_clip.get_tokenizer("tiny-test-vit")(texts)
    assert ids.shape == (2, 16)
    with torch.no_grad():
        expected_text = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
    assert torch.allclose(enc.encode_text(texts), expected_text, atol=1e-5)
    with pytest.raises(RuntimeError, match="could not load open_clip"):
        ImageEncoder.from_open_clip("tiny-test-vit", str(tmp_path / "missing.safetensors"))


def test_shapes_clip_local_dir_round_trip(clip_encoder, tmp_path, scene_image):
    clip_encoder.save_pretrained(str(tmp_path / "clip"))
    again = ImageEncoder.from_pretrained(str(tmp_path / "clip"))
    assert torch.allclose(again.encode([scene_image]), clip_encoder.encode([scene_image]), atol=1e-6)
    (tmp_path / "clip" / "open_clip_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(Exception):
        ImageEncoder.from_pretrained(str(tmp_path / "clip"))


def test_hub_id_offline_says_so(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="offline"):
        Captioner.from_pretrained("nobody-here/no-such-captioner")
