"""diffusion-caption: image captions denoised from Gaussian noise, with every step inspectable."""
from .baseline import BaselineCaptioner
from .captioner import Captioner
from .checkpoint import CheckpointError
from .config import CaptionerConfig, preset
from .images import ImageLoadError, load_image
from .trace import DenoisingStep, Trace

__all__ = ["BaselineCaptioner", "Captioner", "CaptionerConfig", "CheckpointError", "DenoisingStep", "ImageLoadError",
           "Trace", "load_image", "preset"]
__version__ = "0.1.0"
