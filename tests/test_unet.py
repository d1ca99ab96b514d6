"""SD 1.5 UNet: parity with diffusers UNet2DConditionModel (tiny, random weights) loaded from a diffusers folder, a
pipeline root and an original single file; full-size keys/shapes against the public layouts; config read off shapes;
bad input; gradient checkpointing; bf16."""
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import unet as unet_mod
from unet import PRESETS, UNet, UNetConfig, load_unet, unet_key_map
from weights import CheckpointError, build_meta

LAYOUTS = Path(__file__).parent / "layouts"
PREFIX = "model.diffusion_model."
TINY = PRESETS["tiny"]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def perturb(model, seed=1, scale=0.02):
    """Add noise to every parameter, so zero-initialised layers (output convs, biases) carry signal too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A tiny diffusers UNet with the SD 1.5 structure, saved as a diffusers folder, a pipeline root and a single
    file; plus inputs and its outputs for int and float timesteps."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(TINY.model_channels * m for m in TINY.channel_mult),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8,  # diffusers reads this as the head COUNT for SD 1.x
        cross_attention_dim=TINY.context_dim, norm_num_groups=TINY.norm_groups).eval()
    perturb(model)
    root = tmp_path_factory.mktemp("unet")
    model.save_pretrained(root / "pipe" / "unet", safe_serialization=True)
    sd = model.state_dict()

    # Original single-file layout written through our map inverted, with extras a real file carries.
    single = {PREFIX + o: sd[d].contiguous() for o, d in unet_key_map(TINY).items()}
    single.update({"betas": torch.linspace(1e-4, 0.02, 1000), "alphas_cumprod": torch.rand(1000),
                   "first_stage_model.x": torch.zeros(3)})
    save_file(single, root / "single.safetensors")

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 24, 16, generator=g)  # non-square latent
    ctx = torch.randn(2, 77, TINY.context_dim, generator=g)
    t_int = torch.tensor([999, 17])
    t_float = torch.tensor([500.5, 3.25])
    x_odd = torch.randn(2, 4, 10, 6, generator=g)  # 80x48 px: not a multiple of 8 latents, upsampled to skip sizes
    with torch.no_grad():
        out = {"int": model(x, t_int, encoder_hidden_states=ctx).sample,
               "float": model(x, t_float, encoder_hidden_states=ctx).sample,
               "odd": model(x_odd, t_int, encoder_hidden_states=ctx).sample}
    return dict(root=root, state=sd, x=x, x_odd=x_odd, ctx=ctx, t={"int": t_int, "float": t_float}, out=out)


@pytest.mark.parametrize("where", ["pipe/unet", "pipe", "single.safetensors"])
def test_parity_with_diffusers(ref, where):
    model = load_unet(ref["root"] / where)
    assert model.cfg == TINY
    with torch.no_grad():
        for kind in ("int", "float", "odd"):
            x = ref["x_odd"] if kind == "odd" else ref["x"]
            eps = model(x, ref["t"]["int" if kind == "odd" else kind], ref["ctx"])
            assert eps.shape == ref["out"][kind].shape
            err = rel_err(eps, ref["out"][kind])
            print(f"parity {where} {kind}: max rel err {err:.2e}")
            assert err <= 1e-4, (where, kind, err)
        # a scalar timestep is broadcast over the batch
        scalar = model(ref["x"], 999, ref["ctx"])
        full = model(ref["x"], torch.tensor([999, 999]), ref["ctx"])
        assert torch.equal(scalar, full)


def test_key_map_covers_diffusers(ref):
    km = unet_key_map(TINY)
    assert sorted(km.values()) == sorted(ref["state"])
    assert len(set(km.values())) == len(km)


def test_full_size_layouts():
    model = build_meta(UNet, UNetConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    single = json.loads((LAYOUTS / "sd15_single_file.json").read_text())
    original = {k[len(PREFIX):]: v for k, v in single.items() if k.startswith(PREFIX)}
    assert ours == original
    diffusers = json.loads((LAYOUTS / "sd15_diffusers_unet.json").read_text())
    km = unet_key_map(UNetConfig())
    assert {km[k]: v for k, v in ours.items()} == diffusers
    # the config reader agrees with the full-size shapes of both layouts
    assert unet_mod._config_original(original) == UNetConfig()
    assert unet_mod._config_diffusers(diffusers) == UNetConfig()


def test_config_read_off_shapes(ref, tmp_path):
    assert load_unet(ref["root"] / "single.safetensors").cfg == TINY
    # a different structure (one level without attention, depth 2, 3 res blocks) is read back too
    cfg = replace(TINY, channel_mult=(1, 2, 2), attention_levels=(1,), num_res_blocks=3, transformer_depth=2,
                  in_channels=9, context_dim=24)
    torch.manual_seed(0)
    model = UNet(cfg)
    save_file({PREFIX + k: v for k, v in model.state_dict().items()}, tmp_path / "odd.safetensors")
    loaded = load_unet(tmp_path / "odd.safetensors")
    assert loaded.cfg == cfg
    assert {p.dtype for p in load_unet(tmp_path / "odd.safetensors", dtype=torch.bfloat16).parameters()} == {
        torch.bfloat16}
    x, ctx = torch.randn(1, 9, 8, 12), torch.randn(1, 5, 24)
    with torch.no_grad():
        assert rel_err(loaded(x, 10, ctx), model(x, 10, ctx)) <= 1e-5


def test_not_a_unet(tmp_path):
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8), "img_in.weight": torch.zeros(8, 64),
            "single_blocks.0.linear1.weight": torch.zeros(40, 8)}
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(flux, path)
    with pytest.raises(CheckpointError, match="FLUX") as e:
        load_unet(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("keys, says", [
    (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight"], "SDXL"),
    (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.1.1.proj_in.weight"],
     "SD 2"),
    (["decoder.conv_in.weight", "encoder.conv_in.weight"], "a VAE"),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "SD3"),
])
def test_other_models(tmp_path, keys, says):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(4, 4) for k in keys}, path)
    with pytest.raises(CheckpointError, match=says) as e:
        load_unet(path)
    assert str(path) in str(e.value)


def test_wrong_shape_and_missing(ref, tmp_path):
    from safetensors.torch import load_file
    tensors = load_file(ref["root"] / "single.safetensors")
    key = "output_blocks.3.0.out_layers.3.bias"
    bad = dict(tensors, **{PREFIX + key: torch.zeros(7)})
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_unet(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "bad.safetensors" in msg and key in msg and "(128,)" in msg and "(7,)" in msg

    key = "middle_block.1.transformer_blocks.0.norm2.weight"
    missing = {k: v for k, v in tensors.items() if k != PREFIX + key}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="1 missing") as e:
        load_unet(tmp_path / "missing.safetensors")
    assert key in str(e.value) and "missing.safetensors" in str(e.value)


def test_gradient_checkpointing(monkeypatch):
    torch.manual_seed(0)
    model = perturb(UNet(TINY)).train()
    x, ctx, t = torch.randn(1, 4, 16, 8), torch.randn(1, 7, TINY.context_dim), torch.tensor([321])

    def grads():
        model.zero_grad()
        out = model(x, t, ctx)
        (out ** 2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out0, g0 = grads()
    calls = []
    real = unet_mod.checkpoint
    monkeypatch.setattr(unet_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.gradient_checkpointing = True
    out1, g1 = grads()
    assert len(calls) == len(model.input_blocks) + 1 + len(model.output_blocks)
    assert torch.allclose(out0, out1, rtol=0, atol=1e-6)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-7), n


def test_bf16():
    torch.manual_seed(0)
    model = perturb(UNet(TINY)).eval()
    x, ctx, t = torch.randn(2, 4, 16, 24), torch.randn(2, 77, TINY.context_dim), torch.tensor([999, 0])
    with torch.no_grad():
        ref32 = model(x, t, ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x, t, ctx)
        model.to(torch.bfloat16)
        bf16 = model(x.bfloat16(), t, ctx.bfloat16())
    assert bf16.dtype == torch.bfloat16
    for out in (auto, bf16):
        assert torch.isfinite(out).all()
        assert rel_err(out, ref32) < 5e-2, rel_err(out, ref32)


def test_diffusers_config_json(tmp_path):
    """A diffusers folder at a non-released config, 4 attention heads and 16 norm groups (nothing the shapes show),
    loads as diffusers computes it; the same weights read with SD 1.5's heads and groups compute something else.
    A config.json that contradicts the weights, or sets what SD 1.5's UNet lacks, is one error naming the field."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = perturb(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=4, cross_attention_dim=32, norm_num_groups=16)).eval()
    model.save_pretrained(tmp_path / "unet", safe_serialization=True)
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([999, 40])
    ours = load_unet(tmp_path / "unet")
    assert (ours.cfg.num_heads, ours.cfg.norm_groups) == (4, 16)
    with torch.no_grad():
        want = model(x, t, encoder_hidden_states=ctx).sample
        assert rel_err(ours(x, t, ctx), want) <= 1e-4
        released = replace(ours.cfg, num_heads=8, norm_groups=32)  # what the shapes alone would say
        other = build_meta(UNet, released)
        other.load_state_dict(ours.state_dict(), assign=True)
        assert rel_err(other(x, t, ctx), want) > 1e-2
    file = tmp_path / "unet" / "config.json"
    config = json.loads(file.read_text())
    for change, says in [({"layers_per_block": 2}, "layers_per_block 2 (the weights: 1)"),
                         ({"cross_attention_dim": 768}, "cross_attention_dim"),
                         ({"use_linear_projection": True}, "does not have"),
                         ({"attention_head_dim": 5}, "do not divide"),
                         ({"norm_num_groups": [16, 16]}, "does not have")]:
        file.write_text(json.dumps(config | change))
        with pytest.raises(CheckpointError, match=re.escape(says)):
            load_unet(tmp_path / "unet")
