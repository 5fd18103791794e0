"""blip2lib: a faithful, checkpoint-compatible BLIP-2 (Li et al., ICML 2023) for reproduction and study."""

__version__ = "0.1.0"
