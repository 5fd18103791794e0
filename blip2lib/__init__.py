"""blip2lib: a faithful, checkpoint-compatible BLIP-2 (Li et al., ICML 2023) for reproduction and study."""

__version__ = "0.1.0"
from .pretrained import from_pretrained, save_pretrained_hf  # noqa: E402,F401  (torch/transformers imported lazily)
