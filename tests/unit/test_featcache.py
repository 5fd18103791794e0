"""Frozen-ViT feature cache (blip2lib/featcache.py): same features, one tower pass per image, misuse refused."""

import pytest
import torch

from blip2lib.config import tiny_config
from blip2lib.featcache import VisionFeatureCache
from blip2lib.model import Blip2QFormerModel
from blip2lib.tasks import vision_keys


def _model() -> tuple[Blip2QFormerModel, list[int]]:
    torch.manual_seed(0)
    model = Blip2QFormerModel(tiny_config()).eval()
    calls: list[int] = []
    tower_pass = model.vision_model.forward_features  # what vision_features calls

    def counted(px: torch.Tensor) -> torch.Tensor:
        calls.append(px.shape[0])  # images per tower pass
        return tower_pass(px)

    model.vision_model.forward_features = counted
    return model, calls


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_cached_features_equal_the_tower_and_only_unseen_images_run_it():
    model, calls = _model()
    px = _images(4)
    with torch.no_grad():
        want = model.encode_vision(px)  # no cache: (4, N, Dv)
        model.vision_cache = VisionFeatureCache()
        with vision_keys(model, {"image_id": ["a", "b", "c", "d"]}):
            first = model.encode_vision(px)
        with vision_keys(model, {"image_id": ["c", "e", "a", "e"]}):  # two hits, one new image given twice
            mixed = model.encode_vision(torch.stack([px[2], px[0] * 0 + 1, px[0], px[0] * 0 + 1]))
        outside = model.encode_vision(px[:1])  # no keys named: the tower runs, nothing is stored
    assert torch.allclose(first, want, atol=1e-6)
    assert torch.allclose(mixed[0], want[2], atol=1e-6) and torch.allclose(mixed[2], want[0], atol=1e-6)
    assert torch.equal(mixed[1], mixed[3])
    assert calls == [4, 4, 1, 1]  # plain pass, 4 misses, 1 miss (the repeated "e" computed once), plain pass
    assert model.vision_cache.stats() == {"images": 5, "hits": 3, "misses": 5}
    assert torch.allclose(outside, want[:1], atol=1e-6)


def test_integer_tensor_ids_and_gradients_reach_ln_vision():
    model, calls = _model()
    model.vision_cache = VisionFeatureCache()
    px = _images(3)
    for _ in range(2):
        model.zero_grad()
        with vision_keys(model, {"image_id": torch.tensor([7, 8, 9])}):
            model.encode_vision(px).sum().backward()
    assert calls == [3]  # second epoch: all hits
    assert model.ln_vision.weight.grad is not None and model.ln_vision.weight.grad.abs().sum() > 0


def test_changed_pixels_under_one_id_are_an_error():
    model, _ = _model()
    model.vision_cache = VisionFeatureCache()
    with torch.no_grad(), vision_keys(model, {"image_id": ["x"]}):
        model.encode_vision(_images(1, seed=1))
    with torch.no_grad(), vision_keys(model, {"image_id": ["x"]}), pytest.raises(ValueError, match="image_id 'x'"):
        model.encode_vision(_images(1, seed=2))


def test_misuse_is_refused():
    model, _ = _model()
    model.vision_cache = VisionFeatureCache()
    assert vision_keys(model, {"image": _images(2)}).__class__.__name__ == "nullcontext"  # eval: validation passes
    with pytest.raises(ValueError, match="needs an image_id per sample"):
        vision_keys(model.train(), {"image": _images(2)})  # a training batch without ids
    with vision_keys(model, {"image_id": ["a"]}), pytest.raises(ValueError, match="1 image ids for a batch of 2"):
        model.encode_vision(_images(2))
    model.vision_model.requires_grad_(True)  # an unfrozen tower must never be cached
    with vision_keys(model, {"image_id": ["a", "b"]}), pytest.raises(RuntimeError, match="frozen vision tower"):
        model.encode_vision(_images(2))
    assert vision_keys(Blip2QFormerModel(tiny_config()), {}).__class__.__name__ == "nullcontext"  # no cache: no-op
