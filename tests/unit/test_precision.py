"""LAVIS's precision policy: which ViT tensors are halved, the tower's autocast policy, the LLM's autocast region.

fp16 kernels are GPU-only, so the forward checks run the same code with bf16 under CPU autocast. The references are
written here from LAVIS's ``eva_vit.py`` / ``clip_vit.py`` forwards on hand-converted weights (LAVIS's
``convert_weights_to_fp16``: Linear/Conv weight and bias only; CLIP's ``in_proj`` stays fp32 there).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from blip2lib.config import tiny_config
from blip2lib.precision import autocast_region_, lavis_half_, precision_context, set_vision_precision_
from blip2lib.vision import build_vision_tower, freeze_vision_, vision_dtype, vision_features

EVA = tiny_config(arch="eva").vision  # width 32, depth 2, 4 heads, image 28, patch 7 → 17 tokens
CLIP = tiny_config(arch="clip").vision
LOW = torch.bfloat16  # stands in for fp16 on the CPU


def _tower(cfg, seed=0):
    torch.manual_seed(seed)
    tower = freeze_vision_(build_vision_tower(cfg))
    with torch.no_grad():  # non-trivial LayerNorm affine and biases (timm initialises them to 1 / 0)
        for name, p in tower.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return tower


def _pixels(cfg, seed=1):
    return torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


def _dtypes(tower) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in tower.named_parameters()}


def _per_block(depth, *names):
    return {f"blocks.{i}.{n}" for i in range(depth) for n in names}


EVA_HALF = {"patch_embed.proj.weight", "patch_embed.proj.bias"} | _per_block(
    EVA.depth, "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)  # fmt: skip
EVA_FULL = {"cls_token", "pos_embed"} | _per_block(
    EVA.depth, "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.q_bias", "attn.v_bias"
)
# CLIP: LAVIS's halved tensors plus the fused qkv (its in_proj, fp32 there but cast to fp16 by autocast at every call)
# and cls/pos (cast to the fp16 stream dtype at every call in LAVIS).
CLIP_HALF = {"patch_embed.proj.weight", "cls_token", "pos_embed"} | _per_block(
    CLIP.depth, "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)  # fmt: skip
CLIP_LAVIS_HALF = CLIP_HALF - {"cls_token", "pos_embed"} - _per_block(CLIP.depth, "attn.qkv.weight", "attn.qkv.bias")
CLIP_FULL = {"norm_pre.weight", "norm_pre.bias"} | _per_block(
    CLIP.depth, "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"
)


@pytest.mark.parametrize(("cfg", "half", "full"), [(EVA, EVA_HALF, EVA_FULL), (CLIP, CLIP_HALF, CLIP_FULL)])
def test_lavis_conversion_exact_dtype_sets(cfg, half, full):
    tower = lavis_half_(_tower(cfg), torch.float16)
    got = _dtypes(tower)
    assert set(got) == half | full  # no parameter unaccounted for
    assert {n for n, d in got.items() if d == torch.float16} == half
    assert {n for n, d in got.items() if d == torch.float32} == full
    assert all(b.dtype == torch.float32 for b in tower.buffers())  # EVA's zero k_bias
    assert tower.precision_policy == ("autocast", torch.float16)
    fused = [m.fused_attn for m in tower.modules() if hasattr(m, "fused_attn")]
    assert fused == [cfg.arch == "clip"] * cfg.depth  # EVA: LAVIS's explicit softmax; CLIP: SDPA as torch MHA


def test_clip_layernorms_return_their_input_dtype_eva_ones_are_untouched():
    # CUDA autocast runs layer_norm in fp32 and returns fp32; LAVIS's CLIP LayerNorm returns the input's dtype, which
    # keeps its residual stream fp16 (CPU autocast leaves layer_norm alone, so the CPU forward cannot show it).
    from torch import nn

    clip, eva = lavis_half_(_tower(CLIP), LOW), lavis_half_(_tower(EVA), LOW)
    clip_norms = [m for m in clip.modules() if isinstance(m, nn.LayerNorm)]
    assert len(clip_norms) == 1 + 2 * CLIP.depth  # norm_pre + norm1/norm2 per block
    x = torch.randn(2, 3, CLIP.width, dtype=LOW)
    for m in clip_norms:
        (hook,) = m._forward_hooks.values()
        out = hook(m, (x,), F.layer_norm(x.float(), (CLIP.width,), m.weight, m.bias, m.eps))  # fp32, as on CUDA
        assert out.dtype == LOW and torch.equal(
            out, F.layer_norm(x.float(), (CLIP.width,), m.weight, m.bias, m.eps).to(LOW)
        )
    lavis_half_(clip, LOW)  # converting twice adds no second hook
    assert all(len(m._forward_hooks) == 1 for m in clip_norms)
    assert all(not m._forward_hooks for m in eva.modules() if isinstance(m, nn.LayerNorm))


def _ln32(x, w, b, eps):  # LAVIS CLIP LayerNorm: fp32 compute, input dtype out
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


def lavis_eva(sd, x, cfg):
    """LAVIS ``eva_vit.VisionTransformer.forward_features`` (no rel-pos, no layer scale, no final norm)."""
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.patch_size)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), h], dim=1) + sd["pos_embed"]
    bsz, n, d = h.shape
    for i in range(cfg.depth):
        p = {k[len(f"blocks.{i}.") :]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        a = F.layer_norm(h, (d,), p["norm1.weight"], p["norm1.bias"], cfg.ln_eps)
        qkv_bias = torch.cat([p["attn.q_bias"], torch.zeros_like(p["attn.v_bias"]), p["attn.v_bias"]])
        qkv = F.linear(a, p["attn.qkv.weight"], qkv_bias).reshape(bsz, n, 3, cfg.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (d // cfg.num_heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(bsz, n, -1)
        h = h + F.linear(a, p["attn.proj.weight"], p["attn.proj.bias"])
        a = F.layer_norm(h, (d,), p["norm2.weight"], p["norm2.bias"], cfg.ln_eps)
        h = h + F.linear(
            F.gelu(F.linear(a, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"]
        )
    return h


def lavis_clip(sd, x, cfg):
    """LAVIS ``clip_vit.VisionTransformer.forward`` (torch >= 2 MHA with need_weights=False → SDPA)."""
    h = F.conv2d(x, sd["patch_embed.proj.weight"], None, stride=cfg.patch_size).flatten(2).transpose(1, 2)
    cls = sd["cls_token"].reshape(1, 1, -1).to(h.dtype) + torch.zeros(x.shape[0], 1, h.shape[-1], dtype=h.dtype)
    h = torch.cat([cls, h], dim=1) + sd["pos_embed"].to(h.dtype)
    h = _ln32(h, sd["norm_pre.weight"], sd["norm_pre.bias"], cfg.ln_eps)
    bsz, n, d = h.shape
    for i in range(cfg.depth):
        p = {k[len(f"blocks.{i}.") :]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        a = _ln32(h, p["norm1.weight"], p["norm1.bias"], cfg.ln_eps)
        q, k, v = F.linear(a, p["attn.qkv.weight"], p["attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(bsz, n, cfg.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(bsz, n, d)
        h = h + F.linear(a, p["attn.proj.weight"], p["attn.proj.bias"])
        a = _ln32(h, p["norm2.weight"], p["norm2.bias"], cfg.ln_eps)
        a = F.linear(a, p["mlp.fc1.weight"], p["mlp.fc1.bias"])
        h = h + F.linear(a * torch.sigmoid(1.702 * a), p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return h


@pytest.mark.parametrize(("cfg", "ref", "lavis_half"), [
    (EVA, lavis_eva, EVA_HALF),
    (CLIP, lavis_clip, CLIP_LAVIS_HALF),
])  # fmt: skip
def test_lavis_forward_equals_lavis_reference_on_hand_converted_weights(cfg, ref, lavis_half):
    tower = _tower(cfg)
    x = _pixels(cfg)
    sd32 = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    sd = {k: v.to(LOW) if k in lavis_half else v for k, v in sd32.items()}  # LAVIS's own storage, by hand
    lavis_half_(tower, LOW)
    out = vision_features(tower, x)  # the tower's policy enters autocast by itself
    with torch.autocast("cpu", dtype=LOW):
        want = ref(sd, x, cfg)
    assert out.dtype == want.dtype == (torch.float32 if cfg.arch == "eva" else LOW)  # EVA: fp32 residual stream
    assert out.shape == (2, 17, cfg.width)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    with torch.no_grad():  # the policy matters: LAVIS's partial cast is not fp32 and not the whole cast
        full = ref(sd32, x, cfg).float()
        whole = vision_features(build_whole(cfg), x.to(LOW)).float()
    assert 0 < (out.float() - full).abs().max() < 0.1
    assert (out.float() - whole).abs().max() > 0


@pytest.mark.gpu
@pytest.mark.parametrize(("cfg", "ref", "lavis_half"), [
    (EVA, lavis_eva, EVA_HALF),
    (CLIP, lavis_clip, CLIP_LAVIS_HALF),
])  # fmt: skip
def test_lavis_fp16_forward_on_cuda_equals_the_lavis_reference(cfg, ref, lavis_half):
    """The real thing on a GPU: fp16 storage and fp16 autocast (the CPU test above stands in with bf16)."""
    tower = _tower(cfg).cuda()
    x = _pixels(cfg).cuda()
    sd = {k: v.detach().clone().to(torch.float16) if k in lavis_half else v.detach().clone()
          for k, v in tower.state_dict().items()}  # fmt: skip
    set_vision_precision_(tower, "fp16_lavis", "cuda")
    assert {n for n, dt in _dtypes(tower).items() if dt == torch.float16} >= lavis_half
    with torch.no_grad():
        out = vision_features(tower, x)
        with torch.autocast("cuda", dtype=torch.float16):
            want = ref(sd, x, cfg)
    assert out.dtype == want.dtype == (torch.float32 if cfg.arch == "eva" else torch.float16)
    # same op order; fused GPU kernels may still round differently from one call to the other
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-3, atol=2e-3)


def build_whole(cfg):
    return set_vision_precision_(_tower(cfg), "bf16", "cuda")  # device "cuda": the GPU policy, on CPU tensors


def test_lavis_policy_overrides_the_callers_autocast():
    tower = lavis_half_(_tower(EVA), LOW)
    x = _pixels(EVA)
    with torch.autocast("cpu", enabled=False):
        out = vision_features(tower, x)
    with torch.autocast("cpu", dtype=torch.float16):  # an outer fp16 autocast (say amp fp16) is replaced by the tower's
        assert torch.equal(vision_features(tower, x), out)


def test_whole_cast_runs_in_its_own_dtype_outside_the_callers_autocast():
    tower = build_whole(EVA)
    assert set(_dtypes(tower).values()) == {LOW} and tower.precision_policy == ("own", LOW)
    x = _pixels(EVA).to(LOW)
    plain = tower.forward_features(x)  # no autocast at all
    with torch.autocast("cpu", dtype=torch.float16):  # e.g. amp fp16: the tower's weights are NOT recast to fp16
        inside = vision_features(tower, x)
        assert torch.is_autocast_enabled("cpu")  # and the caller's region is back afterwards
    assert torch.equal(inside, plain) and inside.dtype == LOW


@pytest.mark.parametrize("precision", ["fp16_lavis", "fp16", "bf16", "fp32"])
def test_cpu_and_trained_towers_stay_fp32_without_policy(precision):
    frozen = set_vision_precision_(_tower(EVA), precision, "cpu")
    trained = build_vision_tower(EVA)
    set_vision_precision_(trained, precision, "cuda")  # not frozen: LAVIS fine-tunes its ViT in fp32
    for t in (frozen, trained):
        assert set(_dtypes(t).values()) == {torch.float32} and not hasattr(t, "precision_policy")
        assert isinstance(precision_context(t, "cpu"), contextlib.nullcontext)


def test_gpu_policy_table_and_unknown_mode():
    fp16_lavis = set_vision_precision_(_tower(EVA), "fp16_lavis", "cuda")
    assert {n for n, d in _dtypes(fp16_lavis).items() if d == torch.float16} == EVA_HALF
    assert set_vision_precision_(_tower(EVA), "fp16", "cuda").precision_policy == ("own", torch.float16)
    assert not hasattr(set_vision_precision_(_tower(EVA), "fp32", "cuda"), "precision_policy")
    assert vision_dtype(EVA.__class__(precision="fp16_lavis"), "cuda") == torch.float16
    assert vision_dtype(EVA.__class__(precision="fp16_lavis"), "cpu") == torch.float32
    with pytest.raises(ValueError, match="vit_precision must be one of"):
        set_vision_precision_(_tower(EVA), "fp8", "cuda")
    with pytest.raises(ValueError, match="vit_precision must be one of"):
        vision_dtype(EVA.__class__(precision="half"), "cuda")


def test_default_tower_precision_is_lavis():
    from blip2lib.config import PRESETS, VisionConfig

    assert VisionConfig().precision == "fp16_lavis"
    assert {c.vision.precision for c in PRESETS.values()} == {"fp16_lavis"}
    assert tiny_config().vision.precision == "fp32"


# ---- the LLM's own autocast region (LAVIS: maybe_autocast(dtype=torch.bfloat16) around the T5) ----


def _tiny_t5():
    from blip2lib.llm import build_llm

    torch.manual_seed(0)
    return build_llm(tiny_config(llm="t5").llm).to(LOW).eval()


def _probe(module, seen):
    def hook(mod, args, out):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    return module.register_forward_hook(hook)


def test_autocast_region_overrides_outer_autocast_for_forward_encoder_and_generate():
    lm = autocast_region_(_tiny_t5(), LOW, "cpu")
    autocast_region_(lm, LOW, "cpu")  # idempotent: one pair of hooks each
    assert len(lm._forward_pre_hooks) == 1 and len(lm.get_encoder()._forward_pre_hooks) == 1
    seen = []
    _probe(lm.get_encoder().block[0], seen)
    _probe(lm.get_decoder().block[0], seen)
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        lm(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5]]))
        lm.get_encoder()(input_ids=ids)
        lm.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
        assert torch.get_autocast_dtype("cpu") == torch.float16  # the outer region is back after each call
    assert len(seen) >= 5 and set(seen) == {(True, LOW)}
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.raises(ValueError):
            lm(input_ids=ids)  # no decoder inputs: raises inside the region
        assert torch.get_autocast_dtype("cpu") == torch.float16  # the region was left on the exception path too


def test_place_on_cpu_keeps_fp32_and_no_policies():
    from blip2lib.model import Blip2

    model = Blip2(tiny_config(llm="t5")).place("cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not hasattr(model.vision_model, "precision_policy")
    assert getattr(model.language_model, "_autocast_region", None) is None


def test_t5_in_its_region_gets_an_fp32_encoder_input_like_lavis_cat_promotion():
    """LAVIS: cat([fp16/fp32 prefix, bf16 token embeddings]) promotes to fp32; outside a region we cast to the LLM's."""
    from blip2lib.llm import llm_loss, prepend_prefix

    lm = _tiny_t5()
    d = lm.config.d_model
    prefix = torch.randn(2, 3, d, dtype=torch.float32, requires_grad=True)  # the Q-Former side: fp32 master weights
    ids, mask = torch.tensor([[5, 6, 1], [7, 1, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    embeds, full = prepend_prefix(lm, prefix, ids, mask)
    assert embeds.dtype == LOW  # no region: everything in the LLM's dtype (a bare bf16 model needs bf16 inputs)
    expected_tok = lm.get_input_embeddings()(ids)  # (B, T, D) bf16
    torch.testing.assert_close(embeds[:, 3:], expected_tok, rtol=0, atol=0)
    assert full.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]

    autocast_region_(lm, LOW, "cpu")
    embeds, _ = prepend_prefix(lm, prefix, ids, mask)
    assert embeds.dtype == torch.float32
    torch.testing.assert_close(embeds[:, :3], prefix, rtol=0, atol=0)  # the prefix keeps its fp32 values
    torch.testing.assert_close(embeds[:, 3:], expected_tok.float(), rtol=0, atol=0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([[5, 1]]).repeat(2, 1),
             "decoder_attention_mask": torch.ones(2, 2, dtype=torch.long)}  # fmt: skip
    loss = llm_loss(lm, "t5", prefix, batch)  # the region runs the bf16 model on the fp32 input
    assert torch.isfinite(loss)
    loss.backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
