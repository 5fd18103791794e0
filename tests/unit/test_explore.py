"""The exploration notebook's library helpers (blip2lib/workbook/explore.py)."""

import math

import torch

from blip2lib.config import tiny_config
from blip2lib.model import Blip2QFormerModel
from blip2lib.workbook import explore


def test_cross_attention_maps_are_the_layers_softmax_over_the_image_tokens():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = Blip2QFormerModel(cfg).eval()
    with torch.no_grad():  # spread the weights, so the maps are far from uniform
        for p in model.qformer.parameters():
            p.mul_(4.0)
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    attn = model.qformer.encoder.layer[0].crossattention.attention
    got: dict = {}  # the query and key projections' own outputs, whatever form the image input takes
    hooks = [attn.query.register_forward_hook(lambda m, a, out: got.setdefault("q", out)),
             attn.key.register_forward_hook(lambda m, a, out: got.setdefault("k", out))]  # fmt: skip
    try:
        maps = explore.cross_attention(model, pixels, layer=0)  # (B, Q, g, g)
    finally:
        for h in hooks:
            h.remove()
    b, q_len, n = 2, cfg.qformer.num_query_tokens, got["k"].shape[1]
    nh = cfg.qformer.num_attention_heads
    hd = got["q"].shape[-1] // nh
    q = got["q"].view(b, q_len, nh, hd).transpose(1, 2)  # (B, nh, Q, hd)
    k = got["k"].view(b, n, nh, hd).transpose(1, 2)  # (B, nh, N, hd)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1).mean(dim=1)  # (B, Q, N)
    g = math.isqrt(n)
    if g * g != n:
        probs, g = probs[..., 1:], math.isqrt(n - 1)
    assert maps.shape == (b, q_len, g, g)
    torch.testing.assert_close(maps, probs.reshape(b, q_len, g, g), rtol=1e-5, atol=1e-6)
    assert maps.flatten(2).std(-1).min() > 1e-3  # not uniform: the check compares real maps
