"""Vision towers: shapes, exact forward against hand-written math, freezing, key mappings.

See docs/paper_map.md §1.2, §1.6, §8.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blip2lib.config import VIT_G, VIT_L, VisionConfig, tiny_config
from blip2lib.vision import (
    build_vision_tower,
    freeze_vision_,
    interpolate_pos_embed,
    load_vision_weights,
    set_grad_checkpointing,
    vision_dtype,
    vision_features,
    vision_state_dict_from_hf,
    vision_state_dict_from_lavis,
    vision_state_dict_to_hf,
)

TINY_EVA = tiny_config(arch="eva").vision  # width 32, depth 2, 4 heads, mlp 64, image 28, patch 7 → 17 tokens
TINY_CLIP = tiny_config(arch="clip").vision


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Independent reference: LAVIS-named random state dicts and hand-written forwards (no timm involved)


def rand_lavis_eva(c: VisionConfig, depth: int, gen: torch.Generator, grid: int | None = None) -> dict:
    d, h, p, g = c.width, c.mlp_hidden, c.patch_size, grid or c.image_size // c.patch_size

    def r(*shape, base=0.0, std=0.1):
        return base + std * torch.randn(*shape, generator=gen, dtype=torch.float64)

    sd = {
        "cls_token": r(1, 1, d),
        "pos_embed": r(1, g * g + 1, d),
        "patch_embed.proj.weight": r(d, 3, p, p),
        "patch_embed.proj.bias": r(d),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": r(d, base=1.0),
            b + "norm1.bias": r(d),
            b + "attn.q_bias": r(d),
            b + "attn.v_bias": r(d),
            b + "attn.qkv.weight": r(3 * d, d),
            b + "attn.proj.weight": r(d, d),
            b + "attn.proj.bias": r(d),
            b + "norm2.weight": r(d, base=1.0),
            b + "norm2.bias": r(d),
            b + "mlp.fc1.weight": r(h, d),
            b + "mlp.fc1.bias": r(h),
            b + "mlp.fc2.weight": r(d, h),
            b + "mlp.fc2.bias": r(d),
        }
    return sd


def rand_lavis_clip(c: VisionConfig, depth: int, gen: torch.Generator, grid: int | None = None) -> dict:
    d, h, p, g = c.width, c.mlp_hidden, c.patch_size, grid or c.image_size // c.patch_size

    def r(*shape, base=0.0, std=0.1):
        return base + std * torch.randn(*shape, generator=gen, dtype=torch.float64)

    sd = {
        "class_embedding": r(d),
        "positional_embedding": r(g * g + 1, d),
        "conv1.weight": r(d, 3, p, p),
        "ln_pre.weight": r(d, base=1.0),
        "ln_pre.bias": r(d),
        "ln_post.weight": r(d),
        "ln_post.bias": r(d),
        "proj": r(d, 8),
    }
    for i in range(depth):
        b = f"transformer.resblocks.{i}."
        sd |= {
            b + "ln_1.weight": r(d, base=1.0),
            b + "ln_1.bias": r(d),
            b + "attn.in_proj_weight": r(3 * d, d),
            b + "attn.in_proj_bias": r(3 * d),
            b + "attn.out_proj.weight": r(d, d),
            b + "attn.out_proj.bias": r(d),
            b + "ln_2.weight": r(d, base=1.0),
            b + "ln_2.bias": r(d),
            b + "mlp.c_fc.weight": r(h, d),
            b + "mlp.c_fc.bias": r(h),
            b + "mlp.c_proj.weight": r(d, h),
            b + "mlp.c_proj.bias": r(d),
        }
    return sd


def ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def erf_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def attention(x, w_qkv, b_qkv, w_o, b_o, heads):
    bsz, n, d = x.shape
    hd = d // heads
    qkv = x @ w_qkv.T + b_qkv  # (B, N, 3D), rows q | k | v
    q, k, v = (t.reshape(bsz, n, heads, hd).transpose(1, 2) for t in qkv.split(d, dim=-1))  # (B, h, N, hd)
    a = torch.softmax((q @ k.transpose(-1, -2)) * hd**-0.5, dim=-1)
    return (a @ v).transpose(1, 2).reshape(bsz, n, d) @ w_o.T + b_o


def eva_block(p, b, x, heads, eps):
    zeros = torch.zeros_like(p[b + "attn.q_bias"])
    b_qkv = torch.cat([p[b + "attn.q_bias"], zeros, p[b + "attn.v_bias"]])  # no k bias (docs/paper_map.md §1.2)
    h = ln(x, p[b + "norm1.weight"], p[b + "norm1.bias"], eps)
    x = x + attention(h, p[b + "attn.qkv.weight"], b_qkv, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"], heads)
    h = ln(x, p[b + "norm2.weight"], p[b + "norm2.bias"], eps)
    h = erf_gelu(h @ p[b + "mlp.fc1.weight"].T + p[b + "mlp.fc1.bias"])
    return x + h @ p[b + "mlp.fc2.weight"].T + p[b + "mlp.fc2.bias"]


def patchify(x, w, bias, ps):
    """Conv with kernel = stride = ps as an explicit matmul over flattened patches: (B, 3, S, S) → (B, G*G, D)."""
    bsz, c, s, _ = x.shape
    g = s // ps
    patches = x.reshape(bsz, c, g, ps, g, ps).permute(0, 2, 4, 1, 3, 5).reshape(bsz, g * g, c * ps * ps)
    out = patches @ w.reshape(w.shape[0], -1).T
    return out if bias is None else out + bias


def manual_eva(p, x, cfg):
    h = patchify(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], cfg.patch_size)
    h = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), h], dim=1) + p["pos_embed"]
    for i in range(cfg.depth):
        h = eva_block(p, f"blocks.{i}.", h, cfg.num_heads, cfg.ln_eps)
    return h  # raw residual stream, no final norm


def manual_clip(p, x, cfg):
    h = patchify(x, p["conv1.weight"], None, cfg.patch_size)
    h = torch.cat([p["class_embedding"].expand(x.shape[0], 1, -1), h], dim=1) + p["positional_embedding"]
    h = ln(h, p["ln_pre.weight"], p["ln_pre.bias"], cfg.ln_eps)
    for i in range(cfg.depth):
        b = f"transformer.resblocks.{i}."
        a = ln(h, p[b + "ln_1.weight"], p[b + "ln_1.bias"], cfg.ln_eps)
        h = h + attention(
            a,
            p[b + "attn.in_proj_weight"],
            p[b + "attn.in_proj_bias"],
            p[b + "attn.out_proj.weight"],
            p[b + "attn.out_proj.bias"],
            cfg.num_heads,
        )
        a = ln(h, p[b + "ln_2.weight"], p[b + "ln_2.bias"], cfg.ln_eps)
        h = h + quick_gelu(a @ p[b + "mlp.c_fc.weight"].T + p[b + "mlp.c_fc.bias"]) @ p[b + "mlp.c_proj.weight"].T
        h = h + p[b + "mlp.c_proj.bias"]
    return h  # no ln_post, no proj


def pixels(cfg, bsz=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, 3, cfg.image_size, cfg.image_size, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Full-size structure and parameter counts (meta device)


def test_full_size_parameter_counts_eva_and_clip():
    # EVA ViT-g (docs/paper_map.md §1.2): conv 3→D k14 with bias, CLS, pos (257 rows), per block 2 LNs, fused qkv weight
    # without bias + q/v biases, proj with bias, fc1/fc2 with biases. No final norm, no head.
    d, h, n = 1408, 6144, 16 * 16 + 1
    per_block = 2 * d + (3 * d * d + 2 * d) + (d * d + d) + 2 * d + (h * d + h) + (d * h + d)
    expected_g = (3 * 14 * 14 * d + d) + d + n * d + 39 * per_block
    eva = build_vision_tower(VIT_G, device="meta")
    assert n_params(eva) == expected_g == 985_894_528  # "0.99 B" (docs/paper_map.md §1.6)
    assert all(p.is_meta for p in eva.parameters())
    # CLIP ViT-L: conv without bias, CLS, pos, ln_pre, per block 2 LNs, qkv with bias, proj, fc1/fc2. No ln_post/proj.
    d, h = 1024, 4096
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (h * d + h) + (d * h + d)
    expected_l = 3 * 14 * 14 * d + d + n * d + 2 * d + 23 * per_block
    assert n_params(build_vision_tower(VIT_L, device="meta")) == expected_l == 290_581_504  # "290.6 M"


def test_full_size_eva_structure():
    t = build_vision_tower(VIT_G, device="meta")
    assert type(t).__name__ == "Eva" and len(t.blocks) == 39
    for name in ("norm", "fc_norm", "head", "norm_pre"):
        assert isinstance(getattr(t, name), nn.Identity), name
    assert t.rope is None and t.patch_embed.proj.bias is not None
    assert t.cls_token.shape == (1, 1, 1408) and t.pos_embed.shape == (1, 257, 1408)
    blk = t.blocks[38]
    assert blk.attn.num_heads == 16 and blk.attn.head_dim == 88 and blk.attn.scale == 88**-0.5
    assert blk.mlp.fc1.out_features == 6144 and blk.mlp.fc1.in_features == 1408
    assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"
    assert blk.norm1.eps == blk.norm2.eps == 1e-6
    assert blk.gamma_1 is None and blk.gamma_2 is None  # no layer scale
    assert blk.attn.qkv.bias is None and blk.attn.qkv.weight.shape == (4224, 1408)
    params = {n for n, _ in blk.named_parameters()}
    assert params == {
        "norm1.weight",
        "norm1.bias",
        "attn.q_bias",
        "attn.v_bias",
        "attn.qkv.weight",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    }
    # timm models EVA's missing k bias as a non-persistent buffer (not trainable, not saved)
    assert "attn.k_bias" in dict(blk.named_buffers()) and "blocks.0.attn.k_bias" not in t.state_dict()
    assert not any("k_bias" in n or "rel_pos" in n or "relative" in n for n, _ in t.named_parameters())
    # N = (S/14)^2 + 1 (docs/paper_map.md §1.1), shapes only
    for s, n in ((224, 257), (364, 677), (490, 1226)):
        tt = build_vision_tower(VisionConfig(image_size=s), device="meta") if s != 224 else t
        assert vision_features(tt, torch.empty(1, 3, s, s, device="meta")).shape == (1, n, 1408)


def test_full_size_clip_structure():
    t = build_vision_tower(VIT_L, device="meta")
    assert type(t).__name__ == "VisionTransformer" and len(t.blocks) == 23
    assert t.patch_embed.proj.bias is None
    assert isinstance(t.norm_pre, nn.LayerNorm) and t.norm_pre.eps == 1e-5
    assert isinstance(t.norm, nn.Identity) and isinstance(t.fc_norm, nn.Identity) and isinstance(t.head, nn.Identity)
    blk = t.blocks[22]
    assert type(blk.mlp.act).__name__ == "QuickGELU" and blk.mlp.fc1.out_features == 4096
    assert blk.attn.qkv.bias.shape == (3072,) and blk.norm1.eps == 1e-5
    assert vision_features(t, torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 257, 1024)


# ---------------------------------------------------------------------------------------------------------------
# Exact forward against hand-written math (float64 so the tolerance reflects structure, not rounding)


def test_eva_block_matches_handwritten():
    gen = torch.Generator().manual_seed(0)
    sd = rand_lavis_eva(TINY_EVA, TINY_EVA.depth, gen)
    tower = build_vision_tower(TINY_EVA).double()
    tower.load_state_dict(vision_state_dict_from_lavis(sd, TINY_EVA))
    x = torch.randn(2, 17, 32, generator=gen, dtype=torch.float64)
    ref = eva_block(sd, "blocks.1.", x, 4, 1e-6)
    assert (tower.blocks[1](x) - ref).abs().max() < 1e-6
    # the tanh-approximate GELU would be caught at this tolerance
    tower.blocks[1].mlp.act.approximate = "tanh"
    assert (tower.blocks[1](x) - ref).abs().max() > 1e-5


@pytest.mark.parametrize("wrap", ["bare", "prefixed", "model_wrapper", "file_pth", "file_safetensors"])
def test_eva_tower_matches_handwritten_after_lavis_load(wrap, tmp_path):
    gen = torch.Generator().manual_seed(1)
    sd = rand_lavis_eva(TINY_EVA, TINY_EVA.depth + 1, gen)  # file holds one block more than is built
    src = sd
    if wrap != "bare":
        src = {"visual_encoder." + k: v for k, v in sd.items()} | {"Qformer.x": torch.zeros(1)}
    if wrap == "model_wrapper":
        src = {"model": src}
    elif wrap == "file_pth":
        torch.save({"model": src}, tmp_path / "w.pth")
        src = str(tmp_path / "w.pth")
    elif wrap == "file_safetensors":
        from safetensors.torch import save_file

        save_file(src, str(tmp_path / "w.safetensors"))
        src = tmp_path / "w.safetensors"
    tower = build_vision_tower(TINY_EVA).double()
    missing, unexpected = load_vision_weights(tower, src, TINY_EVA)
    assert missing == []
    assert sorted(unexpected) == sorted(k for k in sd if k.startswith("blocks.2."))
    x = pixels(TINY_EVA)
    out = vision_features(tower, x)
    assert out.shape == (2, 17, 32)
    assert (out - manual_eva(sd, x, TINY_EVA)).abs().max() < 1e-6
    # no final norm: the output is not layer-normalised (a normed output would have per-token std 1)
    assert (out.std(-1) - 1).abs().max() > 0.05


def test_clip_tower_matches_handwritten_after_lavis_load():
    gen = torch.Generator().manual_seed(2)
    sd = rand_lavis_clip(TINY_CLIP, TINY_CLIP.depth + 1, gen)
    tower = build_vision_tower(TINY_CLIP).double()
    missing, unexpected = load_vision_weights(tower, sd, TINY_CLIP)
    assert missing == []
    extra = sorted(k for k in sd if k.startswith("transformer.resblocks.2.")) + ["ln_post.bias", "ln_post.weight"]
    assert sorted(unexpected) == sorted(extra + ["proj"])
    x = pixels(TINY_CLIP)
    assert (vision_features(tower, x) - manual_clip(sd, x, TINY_CLIP)).abs().max() < 1e-6


def test_forty_block_lavis_file_into_thirty_nine_block_tower():
    cfg = VisionConfig(image_size=14, patch_size=7, width=8, depth=39, num_heads=2, mlp_hidden=16)
    sd = rand_lavis_eva(cfg, 40, torch.Generator().manual_seed(3))
    tower = build_vision_tower(cfg).double()
    missing, unexpected = load_vision_weights(tower, sd, cfg)
    assert len(tower.blocks) == 39 and missing == []
    assert sorted(unexpected) == sorted(k for k in sd if k.startswith("blocks.39."))
    assert len(unexpected) == 13
    mapped = vision_state_dict_from_lavis(sd, cfg)
    assert not any(k.startswith("blocks.39.") for k in mapped) and len(mapped) == len(sd) - 13


def test_pretraining_checkpoint_without_vit_is_rejected():
    with pytest.raises(ValueError, match="visual_encoder"):
        vision_state_dict_from_lavis({"Qformer.bert.x": torch.zeros(1), "query_tokens": torch.zeros(1)}, TINY_EVA)


# ---------------------------------------------------------------------------------------------------------------
# Freezing, precision, grad checkpointing


def test_freeze_pins_eval_no_grads_and_casts():
    tower = build_vision_tower(TINY_EVA)
    parent = nn.ModuleDict({"vit": tower, "head": nn.Linear(32, 2)})
    assert freeze_vision_(tower, torch.bfloat16) is tower and tower.is_frozen is True
    parent.train()
    assert parent["head"].training and not any(m.training for m in tower.modules())
    tower.train(True)
    assert not tower.training
    assert not any(p.requires_grad for p in tower.parameters())
    assert all(t.dtype == torch.bfloat16 for t in list(tower.parameters()) + list(tower.buffers()))
    out = vision_features(tower, torch.randn(1, 3, 28, 28, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 17, 32)
    # without a dtype nothing is cast
    t2 = freeze_vision_(build_vision_tower(TINY_CLIP))
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in t2.parameters())


def test_vision_dtype_policy():
    assert vision_dtype(VIT_G, "cpu") == torch.float32
    assert vision_dtype(VIT_G, "cuda") == torch.float16
    assert vision_dtype(VisionConfig(precision="bf16"), "cuda:0") == torch.bfloat16
    assert vision_dtype(VisionConfig(freeze=False), "cuda") == torch.float32  # a trained ViT stays fp32


@pytest.mark.parametrize("cfg", [TINY_EVA, TINY_CLIP], ids=["eva", "clip"])
def test_grad_checkpointing_same_values_and_grads(cfg):
    tower = build_vision_tower(cfg).double()
    x = pixels(cfg)
    out = vision_features(tower, x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in tower.named_parameters()}
    tower.zero_grad()
    set_grad_checkpointing(tower, True)
    assert tower.grad_checkpointing
    out2 = vision_features(tower, x)
    out2.square().sum().backward()
    assert torch.equal(out, out2)
    for n, p in tower.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Position-embedding resize


def test_interpolate_pos_embed():
    g = torch.Generator().manual_seed(4)
    pe = torch.randn(1, 1 + 16 * 16, 8, generator=g)
    assert torch.equal(interpolate_pos_embed(pe, 16, align_corners=False), pe)
    for ac in (False, True):
        out = interpolate_pos_embed(pe, 26, align_corners=ac)  # 364 px
        assert out.shape == (1, 1 + 26 * 26, 8)
        assert torch.equal(out[:, 0], pe[:, 0])
        grid = pe[0, 1:].reshape(16, 16, 8).permute(2, 0, 1)[None]  # (1, D, 16, 16), row-major patches
        ref = F.interpolate(grid, size=(26, 26), mode="bicubic", align_corners=ac)[0].permute(1, 2, 0)
        assert torch.equal(out[0, 1:].reshape(26, 26, 8), ref)
    assert interpolate_pos_embed(pe, 35, align_corners=False).shape == (1, 1226, 8)  # 490 px
    assert not torch.allclose(interpolate_pos_embed(pe, 26, False), interpolate_pos_embed(pe, 26, True))


@pytest.mark.parametrize("arch", ["eva", "clip"])
def test_lavis_load_resizes_pos_embed_with_arch_specific_corners(arch):
    cfg = tiny_config(arch=arch, image_size=42).vision  # grid 6; file made for grid 4 (28 px)
    make = rand_lavis_eva if arch == "eva" else rand_lavis_clip
    sd = make(cfg, cfg.depth, torch.Generator().manual_seed(5), grid=4)
    mapped = vision_state_dict_from_lavis(sd, cfg)
    src = sd["pos_embed"] if arch == "eva" else sd["positional_embedding"][None]
    assert mapped["pos_embed"].shape == (1, 37, 32)
    assert torch.equal(mapped["pos_embed"], interpolate_pos_embed(src, 6, align_corners=arch == "clip"))


# ---------------------------------------------------------------------------------------------------------------
# transformers naming


def test_lavis_ours_hf_ours_round_trip():
    sd = rand_lavis_eva(TINY_EVA, TINY_EVA.depth, torch.Generator().manual_seed(6))
    tower = build_vision_tower(TINY_EVA).double()
    tower.load_state_dict(vision_state_dict_from_lavis({"visual_encoder." + k: v for k, v in sd.items()}, TINY_EVA))
    ours = tower.state_dict()
    hf = vision_state_dict_to_hf(ours, TINY_EVA)
    assert len(hf) == len(ours) - TINY_EVA.depth  # q_bias + v_bias → one qkv.bias per layer
    assert not any(k.startswith("vision_model.") for k in hf)
    for i in range(TINY_EVA.depth):
        q, k, v = hf[f"encoder.layers.{i}.self_attn.qkv.bias"].chunk(3)
        assert torch.equal(q, sd[f"blocks.{i}.attn.q_bias"]) and torch.equal(v, sd[f"blocks.{i}.attn.v_bias"])
        assert torch.equal(k, torch.zeros_like(k))
        assert torch.equal(hf[f"encoder.layers.{i}.self_attn.projection.weight"], sd[f"blocks.{i}.attn.proj.weight"])
        assert torch.equal(hf[f"encoder.layers.{i}.layer_norm2.bias"], sd[f"blocks.{i}.norm2.bias"])
    assert torch.equal(hf["embeddings.class_embedding"], sd["cls_token"])
    assert torch.equal(hf["embeddings.patch_embedding.bias"], sd["patch_embed.proj.bias"])
    back = vision_state_dict_from_hf(hf, TINY_EVA)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    # the whole-model form (prefix, post_layernorm = our ln_vision) is accepted too
    full = {"vision_model." + k: v for k, v in hf.items()} | {"vision_model.post_layernorm.weight": torch.ones(32)}
    assert (
        vision_state_dict_from_hf(full | {"qformer.layernorm.weight": torch.ones(32)}, TINY_EVA).keys() == ours.keys()
    )
    # a non-zero k-bias slice cannot be represented by EVA
    bad = dict(hf)
    bad["encoder.layers.1.self_attn.qkv.bias"] = bad["encoder.layers.1.self_attn.qkv.bias"].clone()
    bad["encoder.layers.1.self_attn.qkv.bias"][32 + 5] = 1e-3
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\."):
        vision_state_dict_from_hf(bad, TINY_EVA)
    bad["encoder.layers.1.self_attn.qkv.bias"][32 + 5] = 5e-7  # below 1e-6: tolerated
    vision_state_dict_from_hf(bad, TINY_EVA)


def test_clip_has_no_hf_export():
    sd = build_vision_tower(TINY_CLIP).state_dict()
    with pytest.raises(NotImplementedError, match="ViT-L"):
        vision_state_dict_to_hf(sd, TINY_CLIP)
    with pytest.raises(NotImplementedError, match="ViT-L"):
        vision_state_dict_from_hf({}, TINY_CLIP)


def test_matches_transformers_blip2_vision_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        layer_norm_eps=1e-6,
    )
    cfg._attn_implementation = "eager"
    hf = transformers.Blip2VisionModel(cfg).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # HF init is ~0 (std 1e-10): re-randomise so the comparison exercises every weight
        for name, p in hf.named_parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
            if name.endswith("self_attn.qkv.bias"):
                p[32:64] = 0.0  # EVA has no k bias
    tower = build_vision_tower(TINY_EVA).eval()
    missing, unexpected = tower.load_state_dict(vision_state_dict_from_hf(hf.state_dict(), TINY_EVA), strict=True)
    assert missing == [] and unexpected == []
    x = torch.randn(2, 3, 28, 28, generator=g)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        pre_ln = hf.encoder(hf.embeddings(x)).last_hidden_state  # encoder output BEFORE post_layernorm
        ours = vision_features(tower, x)
    # v5: hidden_states = (embeddings, layer 1, layer 2); the last entry is the pre-post_layernorm output
    assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[-1], pre_ln)
    assert (ours - pre_ln).abs().max() < 1e-5
    assert (hf.post_layernorm(ours) - out.last_hidden_state).abs().max() < 1e-5


def test_device_kwarg_for_old_and_new_timm():
    """timm >= 1.0.21 takes ``device=``; an older preinstalled timm builds under the context alone, never on meta."""
    from timm.models.eva import Eva

    from blip2lib.vision import _device_kwarg

    class OldTimmModel:
        def __init__(self, embed_dim: int = 8):
            pass

    assert _device_kwarg(Eva, "cpu") == {"device": "cpu"}
    assert _device_kwarg(OldTimmModel, "cpu") == {} and _device_kwarg(OldTimmModel, None) == {}
    with pytest.raises(RuntimeError, match="meta device needs timm >= 1.0.21"):
        _device_kwarg(OldTimmModel, torch.device("meta"))
