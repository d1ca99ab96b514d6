"""Tests for teacher_mmdit.py: parity with diffusers' SD3 / FLUX transformers (tiny, random weights) loaded from
diffusers folders and from original-layout files written here with our key map inverted; full-size key/shape
checks on meta against tests/layouts; attention maps; LoRA; gradient checkpointing; bad input."""
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import teacher_mmdit as T
import teachers as TL
from weights import CheckpointError, build_meta, save_atomic

LAYOUTS = Path(__file__).parent / "layouts"
SD3_PREFIX = "model.diffusion_model."


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def perturb(model):
    """Random values for every parameter and buffer (zero-initialised gates and pos_embed included)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            is_norm = "norm_q" in name or "norm_k" in name or "norm_added" in name
            t.copy_((1.0 if is_norm else 0.0) + 0.1 * torch.randn_like(t))
    return model.eval()


def make_sd3(mmdit_x):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    depth = 3 if mmdit_x else 2  # = tiny_sd35 / tiny_sd3: heads = depth, head_dim 16
    return perturb(SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=16,
        num_attention_heads=depth, joint_attention_dim=4096, caption_projection_dim=16 * depth,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=16,
        dual_attention_layers=(0, 1) if mmdit_x else (), qk_norm="rms_norm" if mmdit_x else None))


def make_flux(guidance):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return perturb(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=guidance,
        axes_dims_rope=(4, 14, 14)))


CASES = {  # name: (diffusers builder, our preset, original-layout prefix)
    "tiny_sd35": (lambda: make_sd3(True), SD3_PREFIX),
    "tiny_sd3": (lambda: make_sd3(False), SD3_PREFIX),
    "tiny_flux_dev": (lambda: make_flux(True), ""),  # BFL names, no prefix
    "tiny_flux_schnell": (lambda: make_flux(False), SD3_PREFIX),  # a repacked file with the prefix
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """A random diffusers model, saved as a pipeline root (sharded for dev) and as an original single file."""
    name = request.param
    build, prefix = CASES[name]
    ref = build()
    tmp = tmp_path_factory.mktemp(name)
    ref.save_pretrained(tmp / "pipe" / "transformer", max_shard_size="300KB" if name == "tiny_flux_dev" else "10GB")
    original = TL.from_diffusers(dict(ref.state_dict()), T.PRESETS[name])  # our map, inverted
    extra = {"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 16, 3, 3)} if prefix else {}
    save_atomic({prefix + k: v for k, v in original.items()} | extra, tmp / "original.safetensors")
    return name, ref, tmp


def inputs(family, B, H, W, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    pooled = 2048 if family == "sd3" else 768
    return (torch.randn(B, 16, H, W, generator=g), torch.rand(B, generator=g), torch.randn(B, L, 4096, generator=g),
            torch.randn(B, pooled, generator=g), 1 + 4 * torch.rand(B, generator=g))


def reference(ref, x, sigma, context, pooled, guidance):
    """The diffusers model called as its pipeline calls it."""
    if hasattr(ref, "pos_embed") and hasattr(ref.pos_embed, "proj"):  # SD3: timestep = 1000 sigma
        return ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                   timestep=1000 * sigma).sample
    from diffusers import FluxPipeline
    B, C, H, W = x.shape
    packed = FluxPipeline._pack_latents(x, B, C, H, W)
    img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype)
    txt_ids = torch.zeros(context.shape[1], 3)
    out = ref(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma,
              img_ids=img_ids, txt_ids=txt_ids, guidance=guidance if ref.config.guidance_embeds else None).sample
    return FluxPipeline._unpack_latents(out, H * 8, W * 8, 8)


@torch.no_grad()
def test_parity_with_diffusers(case):
    name, ref, tmp = case
    family = "sd3" if "sd3" in name else "flux"
    models = {"diffusers": TL.load_teacher(tmp / "pipe"), "original": TL.load_teacher(tmp / "original.safetensors")}
    for m in models.values():
        assert m.variant == name and not any(p.requires_grad for p in m.parameters())
    for B, H, W in [(1, 8, 8), (2, 12, 8), (1, 16, 20)]:  # incl. non-square; SD3 table here covers 32x32
        x, sigma, context, pooled, guidance = inputs(family, B, H, W)
        expected = reference(ref, x, sigma, context, pooled, guidance)
        g = guidance if models["original"].takes_guidance else None
        for layout, m in models.items():
            err = rel_err(m(x, sigma, context, pooled, guidance=g), expected)
            assert err <= 1e-4, (name, layout, (B, H, W), err)
    bf16 = TL.load_teacher(tmp / "original.safetensors", dtype=torch.bfloat16)  # straight to bf16, no fp32 copy
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    x, sigma, context, pooled, guidance = inputs(family, 1, 8, 8)
    g = guidance if bf16.takes_guidance else None
    assert rel_err(bf16(x, sigma, context, pooled, guidance=g).float(), reference(ref, x, sigma, context, pooled,
                                                                                  guidance)) < 0.05


@torch.no_grad()
def test_attention_maps(case, monkeypatch):
    """Our maps equal the image->text block of the joint softmax recorded from diffusers' own SDPA calls."""
    name, ref, tmp = case
    family = "sd3" if "sd3" in name else "flux"
    m = TL.load_teacher(tmp / "pipe")
    B, H, W, L = 2, 8, 12, 5
    n_img = H * W // 4
    x, sigma, context, pooled, guidance = inputs(family, B, H, W, L)
    g = guidance if m.takes_guidance else None
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def record(*args, **kwargs):  # diffusers calls it positionally (SD3) or by keyword (FLUX)
        names = dict(zip(("query", "key", "value"), args, strict=False)) | kwargs
        seen.append((names["query"], names["key"]))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record)
    reference(ref, x, sigma, context, pooled, guidance)
    monkeypatch.undo()
    joint = [(q, k) for q, k in seen if q.shape[2] == n_img + L][:m.cfg.depth]  # drops attn2 and single blocks
    blocks = tuple(range(m.cfg.depth))
    out = m(x, sigma, context, pooled, guidance=g, attn_blocks=blocks)
    assert torch.equal(out.v, m(x, sigma, context, pooled, guidance=g))  # asking for maps leaves v alone
    assert set(out.attn) == set(blocks)
    for i, (q, k) in enumerate(joint):
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(1)  # (B, N, N)
        img_rows = probs[:, :n_img] if family == "sd3" else probs[:, L:]  # diffusers SD3 orders [img, txt]
        txt_part = img_rows[..., n_img:] if family == "sd3" else img_rows[..., :L]
        img_part = img_rows[..., :n_img] if family == "sd3" else img_rows[..., L:]
        ours = out.attn[i]
        assert ours.shape == (B, n_img, L) and ours.dtype == torch.float32
        assert (ours - txt_part).abs().max() < 1e-5
        assert (ours.sum(-1) - (1 - img_part.sum(-1))).abs().max() < 1e-5  # rows sum to 1 over ALL keys
        assert ours.sum(-1).max() < 1


@pytest.mark.parametrize("name,layout,diffusers_layout", [
    ("sd3_medium", "sd3_medium_single_file", None),
    ("sd35_medium", "sd35_medium_single_file", "sd35_medium_diffusers_transformer"),
    ("sd35_large", "sd35_large_single_file", "sd35_large_diffusers_transformer"),
    ("flux_dev", "flux_dev_bfl", "flux_dev_diffusers_transformer"),
    ("flux_schnell", "flux_schnell_bfl", None)])
def test_full_size_layouts(name, layout, diffusers_layout):
    cfg = T.PRESETS[name]
    model = build_meta(T.MMDiT if isinstance(cfg, T.MMDiTConfig) else T.Flux, cfg)
    prefix = SD3_PREFIX if isinstance(cfg, T.MMDiTConfig) else ""
    ours = {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
    real = {k: tuple(v) for k, v in json.loads((LAYOUTS / f"{layout}.json").read_text()).items()}
    assert ours == {k: v for k, v in real.items() if k.startswith(prefix)}  # drops first_stage_model.* (VAE)
    found = TL.detect_teacher(real)
    assert (found.cfg, found.diffusers, found.prefix) == (cfg, False, prefix)
    if diffusers_layout:
        real_d = {k: tuple(v) for k, v in json.loads((LAYOUTS / f"{diffusers_layout}.json").read_text()).items()}
        mapped = {k: tuple(v.shape) for k, v in TL.to_diffusers(model.state_dict(), cfg).items()}
        assert mapped == real_d
        found = TL.detect_teacher(real_d)
        assert (found.cfg.variant, found.diffusers) == (name, True)


def tiny(name, seed=0):
    torch.manual_seed(seed)
    cfg = T.PRESETS[name]
    model = (T.MMDiT if isinstance(cfg, T.MMDiTConfig) else T.Flux)(cfg)
    if isinstance(model, T.MMDiT):
        torch.nn.init.normal_(model.pos_embed)  # the stored table (zeros at init)
    return model.eval()


@pytest.mark.parametrize("name,n_wrapped", [("tiny_flux_dev", 2 * 8 + 2 * 2), ("tiny_sd35", 3 * 4 + 2 * 2 + 2 * 4 + 1)])
def test_lora(name, n_wrapped):
    m = tiny(name)
    family = "sd3" if "sd3" in name else "flux"
    x, sigma, context, pooled, guidance = inputs(family, 2, 8, 8)
    g = guidance if m.takes_guidance else None
    base_sd = m.state_dict()
    with torch.no_grad():
        v0 = m(x, sigma, context, pooled, guidance=g)
    params = TL.add_lora(m, rank=4)
    assert len(params) == 2 * n_wrapped
    sd = m.state_dict()
    assert set(base_sd) <= set(sd) and all(".lora_" in k for k in set(sd) - set(base_sd))
    assert all(sd[k].data_ptr() == base_sd[k].data_ptr() for k in base_sd)  # base weights shared, not copied
    assert m.load_state_dict(base_sd, strict=False).unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(m(x, sigma, context, pooled, guidance=g), v0)  # zero-init up: LoRA on == base
        for p in params[1::2]:
            p.normal_(0, 0.1)
        v_on = m(x, sigma, context, pooled, guidance=g)
        with TL.lora_enabled(m, False):
            assert torch.equal(m(x, sigma, context, pooled, guidance=g), v0)  # off: exactly the base
        assert torch.equal(m(x, sigma, context, pooled, guidance=g), v_on)  # restored on exit
    assert (v_on - v0).abs().max() > 1e-3
    TL.lora_enabled(m, False)  # as a plain setter
    assert torch.equal(m(x, sigma, context, pooled, guidance=g), v0)
    TL.lora_enabled(m, True)
    m(x, sigma, context, pooled, guidance=g).square().mean().backward()
    n_mod = sum(".adaLN_modulation.1" in n or n.endswith(("_mod.lin", "modulation.lin"))
                for n, _ in tiny(name).named_modules() if "blocks." in n)
    assert len(TL.add_lora(tiny(name), 2, targets=TL.LORA_TARGETS + TL.LORA_MODULATION)) == 2 * (n_wrapped + n_mod)
    lora_ids = {id(p) for p in params}
    for n, p in m.named_parameters():
        if id(p) in lora_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize("name", ["tiny_flux_dev", "tiny_sd35"])
def test_gradient_checkpointing(name, monkeypatch):
    m = tiny(name)
    params = TL.add_lora(m, rank=2)
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.1)
    family = "sd3" if "sd3" in name else "flux"
    x, sigma, context, pooled, guidance = inputs(family, 2, 8, 8)
    g = guidance if m.takes_guidance else None
    calls, cls = [], T.DoubleBlock if family == "flux" else T.JointBlock
    forward = cls.forward
    monkeypatch.setattr(cls, "forward", lambda *a: calls.append(1) or forward(*a))  # (hooks skip the recompute)
    results = []
    for flag in (False, True):
        m.gradient_checkpointing = flag
        xg = x.clone().requires_grad_(True)
        calls.clear()
        out = m(xg, sigma, context, pooled, guidance=g, attn_blocks=(0,))
        (out.v.square().mean() + out.attn[0].mean()).backward()
        results.append((out.v.detach(), xg.grad, [p.grad.clone() for p in params], len(calls)))
        for p in params:
            p.grad = None
    (v0, gx0, gp0, n0), (v1, gx1, gp1, n1) = results
    assert (n0, n1) == (m.cfg.depth, 2 * m.cfg.depth)  # checkpointing re-runs each block in backward
    assert torch.allclose(v0, v1, atol=1e-6) and torch.allclose(gx0, gx1, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gp0, gp1, strict=True))


def test_bad_input(tmp_path):
    dev, schnell, sd3 = tiny("tiny_flux_dev"), tiny("tiny_flux_schnell"), tiny("tiny_sd3")
    x, sigma, context, pooled, guidance = inputs("flux", 1, 8, 8)
    with pytest.raises(ValueError, match="guidance"):
        dev(x, sigma, context, pooled)
    with pytest.raises(ValueError, match="guidance"):
        schnell(x, sigma, context, pooled, guidance=guidance)
    x, sigma, context, pooled, _ = inputs("sd3", 1, 34, 32)  # 17x16 patches > the 16x16 table
    with pytest.raises(ValueError, match="17x16"):
        sd3(x, sigma, context, pooled)
    with pytest.raises(ValueError, match="attn_blocks"):
        sd3(x[..., :8, :8], sigma, context, pooled, attn_blocks=(5,))
    save_atomic({"decoder.conv_in.weight": torch.zeros(4, 16, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"vae\.safetensors.*a VAE"):
        TL.load_teacher(tmp_path / "vae.safetensors")


def non_released(kind):
    """Diffusers transformers at configs no released model has: heads != layers, head width 16, FLUX rotary axes
    (4, 6, 6)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    torch.manual_seed(0)
    if kind == "flux":
        return perturb(FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6)))
    qk = kind == "sd35"  # SD3.5: qk-norm weights show the head width; SD3: only config.json does
    return perturb(SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=4096, caption_projection_dim=64, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=16, dual_attention_layers=(0,) if qk else (), qk_norm="rms_norm" if qk else None))


@pytest.mark.parametrize("kind", ["sd35", "sd3", "flux"])
@torch.no_grad()
def test_diffusers_config_json(kind, tmp_path):
    """A diffusers folder's config.json is honoured: parity at a non-released config, while the same weights read
    with the released conventions (heads = layers; BFL's rotary proportions) compute something else; a config that
    contradicts the weights is one error naming the field."""
    ref = non_released(kind)
    ref.save_pretrained(tmp_path / "transformer")
    m = TL.load_teacher(tmp_path / "transformer")
    assert m.variant.endswith("_custom") and m.cfg.heads == (2 if kind == "flux" else 4)
    family = "flux" if kind == "flux" else "sd3"
    x, sigma, context, pooled, guidance = inputs(family, 2, 8, 12)
    g = guidance if m.takes_guidance else None
    want = reference(ref, x, sigma, context, pooled, guidance)
    assert rel_err(m(x, sigma, context, pooled, guidance=g), want) <= 1e-4
    shapes_only = TL.detect_teacher({k: v.shape for k, v in TL.to_diffusers(m.state_dict(), m.cfg).items()}).cfg
    if kind != "sd35":  # SD3 without qk-norm, FLUX's rotary axes: the shapes alone cannot tell
        assert shapes_only != m.cfg
        if kind == "flux":  # BFL's proportions of width 16 are odd (2, 7, 7): any other valid split
            shapes_only = replace(shapes_only, axes_dim=(8, 4, 4))
        other = build_meta(type(m), shapes_only)
        other.load_state_dict(m.state_dict(), assign=True)
        assert rel_err(other(x, sigma, context, pooled, guidance=g), want) > 1e-2
    if kind == "flux":  # a single file of it: the rotary axes can't be inferred, and it says so
        save_atomic(TL.from_diffusers(dict(ref.state_dict()), m.cfg), tmp_path / "flux.safetensors")
        with pytest.raises(CheckpointError, match="odd axes"):
            TL.load_teacher(tmp_path / "flux.safetensors")
    file = tmp_path / "transformer" / "config.json"
    config = json.loads(file.read_text())
    changes = [({"num_layers": 3}, "num_layers 3 (the weights: 2)" if kind != "flux" else "num_layers 3"),
               ({"num_attention_heads": 3}, "num_attention_heads" if kind == "flux" else "heads x")]
    changes += [({"axes_dims_rope": [4, 4, 4]}, "axes_dims_rope")] if kind == "flux" else []
    for change, says in changes:
        file.write_text(json.dumps(config | change))
        with pytest.raises(CheckpointError, match=re.escape(says)):
            TL.load_teacher(tmp_path / "transformer")
