"""The autoregressive baseline: ClipCap (a CLIP prefix through a mapping network into GPT-2).

``captioner`` holds the model, its config and checkpoint plumbing; ``mapping`` the prefix networks;
``decoding`` greedy and beam search with the KV cache.
"""
from .captioner import BaselineCaption, BaselineCaptioner, BaselineConfig, baseline_preset

__all__ = ["BaselineCaption", "BaselineCaptioner", "BaselineConfig", "baseline_preset"]
