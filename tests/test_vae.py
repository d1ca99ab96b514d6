"""VAE tests: parity with diffusers AutoencoderKL (SD 1.5 and SD3/FLUX styles, diffusers folder and original LDM
layouts), decoder features for the Bridge, posterior sampling, full-size layouts on meta, family/scale logic."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from vae import PRESETS, VAE, load_vae, vae_key_map
from weights import CheckpointError, build_meta, save_atomic

LAYOUTS = Path(__file__).parent / "layouts"
STYLES = {"sd15": (0.18215, 0.0), "sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def perturb(model, seed):
    """Random weights everywhere (norm scales != 1, biases != 0) so that zero or unit inits hide no bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else 0.02))
    return model


@pytest.fixture(scope="module", params=list(STYLES))
def ref(request):
    """(style, diffusers reference) of the real structure at 32/64 channels."""
    style = request.param
    sf, shift = STYLES[style]
    torch.manual_seed(0)
    quant = style == "sd15"
    model = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
        latent_channels=4 if quant else 16, norm_num_groups=32, use_quant_conv=quant, use_post_quant_conv=quant,
        scaling_factor=sf, shift_factor=None if style == "sd15" else shift)
    return style, perturb(model, 1).eval()


def write_original(style, model, folder: Path) -> Path:
    """The ref's weights in the original LDM layout, written with our key map inverted (1x1 conv attention)."""
    cfg = PRESETS["tiny_" + style]
    inverse = {d: o for o, d in vae_key_map(cfg).items()}
    state = model.state_dict()
    assert set(inverse) == set(state), "vae_key_map does not cover the diffusers keys exactly"
    prefix = "" if style == "flux" else "first_stage_model."
    out = {prefix + inverse[k]: (v[:, :, None, None] if v.ndim == 2 else v) for k, v in state.items()}
    if style == "sd15":  # neighbours of a real single file: a UNet tensor and a DDPM buffer
        out["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
        out["betas"] = torch.zeros(10)
    if style == "sd3":  # the MMDiT beside it is what tells an SD3 file from a bare 16-channel VAE
        out["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"] = torch.zeros(6, 2)
    path = folder / ("ae.safetensors" if style == "flux" else f"{style}.safetensors")
    save_atomic(out, path)
    return path


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_parity_with_diffusers(ref, layout, tmp_path):
    style, model = ref
    sf, shift = STYLES[style]
    if layout == "diffusers":
        model.save_pretrained(tmp_path / "vae")  # a pipeline root: load_vae steps into vae/
        ours = load_vae(tmp_path)
    else:
        ours = load_vae(write_original(style, model, tmp_path), family="flux" if style == "flux" else None)
    assert (ours.cfg.scale_factor, ours.cfg.shift_factor) == (sf, shift)
    assert ours.cfg.ch_mult == (1, 2, 2, 2) and ours.cfg.num_res_blocks == 2

    torch.manual_seed(2)
    x = torch.rand(1, 3, 40, 56) * 2 - 1  # non-square, latent 5 x 7
    with torch.no_grad():
        z_ref = (model.encode(x).latent_dist.mean - shift) * sf  # what the pipelines feed the diffusion model
        lat = ours.encode(x)
        assert rel_err(lat, z_ref) <= 1e-4, rel_err(lat, z_ref)
        img_ref = model.decode(z_ref / sf + shift).sample
        img = ours.decode(z_ref)
        assert img.shape == (1, 3, 40, 56)
        assert rel_err(img, img_ref) <= 1e-4, rel_err(img, img_ref)
        if layout == "diffusers":  # posterior sample: same draw as diffusers from the same CPU generator
            s_ref = (model.encode(x).latent_dist.sample(torch.Generator().manual_seed(5)) - shift) * sf
            s = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
            assert rel_err(s, s_ref) <= 1e-4, rel_err(s, s_ref)


def test_sample_reproducible_and_differs_from_mean():
    vae = perturb(VAE(PRESETS["tiny_sd15"]), 3).eval()
    x = torch.rand(2, 3, 24, 32) * 2 - 1
    with torch.no_grad():
        a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        c = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
        mean = vae.encode(x)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4 and (a - mean).abs().max() > 1e-4


def test_decode_features_and_gradients():
    cfg = PRESETS["tiny_sd3"]
    vae = perturb(VAE(cfg), 4).eval().requires_grad_(False)
    z = torch.randn(1, 16, 3, 5)
    with torch.no_grad():
        img, feats = vae.decode(z, return_features=True)
        assert torch.equal(img, vae.decode(z))
    assert sorted(feats) == [1, 2, 4, 8]
    channels = {1: 64, 2: 64, 4: 64, 8: 64}  # tiny: ch 32, ch_mult (1,2,2,2) -> up.3/2/1 have 64 channels
    for s, f in feats.items():
        assert f.shape == (1, channels[s], 3 * s, 5 * s)
        with torch.no_grad():
            assert torch.equal(vae.decode_features(z, s), f)
    full = build_meta(VAE, PRESETS["sd15"])  # the documented real channel counts
    assert [full.decoder.mid.block_2.conv2.out_channels] + [full.decoder.up[i].upsample.conv.out_channels
                                                           for i in (3, 2, 1)] == [512, 512, 512, 256]

    grads = []
    for ckpt in (False, True):  # the Bridge: gradients reach the latents through the frozen decoder
        vae.decoder.gradient_checkpointing = ckpt
        zz = z.clone().requires_grad_(True)
        vae.decode_features(zz, 4).square().mean().backward()
        grads.append(zz.grad)
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        vae.decode_features(z, 16)


def layout(name, prefix=""):
    shapes = json.loads((LAYOUTS / f"{name}.json").read_text())
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


@pytest.mark.parametrize("style,original,diffusers", [
    ("sd15", ("sd15_single_file", "first_stage_model."), "sd15_diffusers_vae"),
    ("sd3", ("sd35_medium_single_file", "first_stage_model."), "sd3_diffusers_vae"),
    ("flux", ("flux_ae", ""), "flux_diffusers_vae"),
])
def test_full_size_layouts(style, original, diffusers):
    cfg = PRESETS[style]
    ours = {k: tuple(v.shape) for k, v in build_meta(VAE, cfg).state_dict().items()}
    assert ours == layout(*original)
    mapping = vae_key_map(cfg)
    assert set(mapping) == set(ours)
    mapped = {mapping[k]: (s[:2] if ".attn_1." in k and len(s) == 4 and "norm" not in k else s)
              for k, s in ours.items()}
    assert mapped == layout(diffusers)


def test_family_logic(tmp_path):
    torch.manual_seed(0)
    state = VAE(PRESETS["tiny_flux"]).state_dict()
    ae = tmp_path / "ae.safetensors"
    save_atomic(state, ae)
    with pytest.raises(CheckpointError, match="family"):
        load_vae(ae)
    for fam, (sf, shift) in [("sd3", STYLES["sd3"]), ("flux", STYLES["flux"])]:
        vae = load_vae(ae, family=fam)
        assert (vae.cfg.scale_factor, vae.cfg.shift_factor, vae.cfg.latent_channels) == (sf, shift, 16)
        assert torch.equal(vae.decoder.up[1].upsample.conv.weight, state["decoder.up.1.upsample.conv.weight"])
    with pytest.raises(CheckpointError, match="contradicts"):
        load_vae(ae, family="sd15")
    with pytest.raises(CheckpointError, match="unknown VAE family"):
        load_vae(ae, family="sdxl")

    sd3 = tmp_path / "sd3.safetensors"  # an SD3 single file tells its family itself
    save_atomic({"first_stage_model." + k: v for k, v in state.items()}
                | {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2)}, sd3)
    assert (load_vae(sd3).cfg.scale_factor, load_vae(sd3).cfg.shift_factor) == STYLES["sd3"]
    with pytest.raises(CheckpointError, match="contradicts"):
        load_vae(sd3, family="flux")

    sd15 = tmp_path / "sd15.safetensors"  # 4 channels: SD 1.5 without asking
    save_atomic(VAE(replace(PRESETS["tiny_sd15"])).state_dict(), sd15)
    assert load_vae(sd15).cfg.scale_factor == 0.18215 and load_vae(sd15).cfg.use_quant_conv
    with pytest.raises(CheckpointError, match="contradicts"):
        load_vae(sd15, family="flux")


def test_diffusers_config_and_bf16(tmp_path):
    """norm_num_groups comes from config.json; bf16 weights (fp32 GroupNorm) stay close to fp32."""
    torch.manual_seed(0)
    ref = perturb(AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159), 6).eval()
    ref.save_pretrained(tmp_path)
    vae = load_vae(tmp_path)
    assert (vae.cfg.norm_groups, vae.cfg.num_res_blocks, vae.cfg.ch) == (8, 1, 16)
    z = torch.randn(1, 16, 4, 3)
    with torch.no_grad():
        img_ref = ref.decode(z / 0.3611 + 0.1159).sample
        assert rel_err(vae.decode(z), img_ref) <= 1e-4
        img16 = load_vae(tmp_path, dtype=torch.bfloat16).decode(z.bfloat16())
    assert img16.dtype == torch.bfloat16 and rel_err(img16.float(), img_ref) <= 5e-2, rel_err(img16.float(), img_ref)


@pytest.mark.parametrize("keys,what", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "SD 1.5 UNet"),
    ({"double_blocks.0.img_attn.qkv.weight": (18, 6)}, "FLUX transformer"),
])
def test_not_a_vae(tmp_path, keys, what):
    path = tmp_path / "model.safetensors"
    save_atomic({k: torch.zeros(s) for k, s in keys.items()}, path)
    with pytest.raises(CheckpointError, match=f"model.safetensors: not a VAE.*{what}"):
        load_vae(path)


def test_tiny_decoder_matches_autoencoder_tiny(tmp_path):
    """TAESD's decoder from a diffusers AutoencoderTiny folder and from the original `taesd_decoder.safetensors`
    layout (index i + 1 of diffusers' decoder.layers.i; written here by that rule): diffusers' decode, exactly."""
    from diffusers import AutoencoderTiny

    from vae import load_tiny_decoder
    from weights import save_atomic
    torch.manual_seed(0)
    ref = AutoencoderTiny().eval()
    with torch.no_grad():  # away from the init, so that every layer matters
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "taesd")
    original = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v for k, v in ref.state_dict().items()
                if k.startswith("decoder.layers.")}
    save_atomic(original, tmp_path / "taesd_decoder.safetensors")
    z = torch.randn(2, 4, 9, 6, generator=torch.Generator().manual_seed(1)) * 3  # odd sizes; beyond the clamp
    with torch.no_grad():
        want = ref.decode(z).sample
        for path in (tmp_path / "taesd", tmp_path / "taesd_decoder.safetensors"):
            got = load_tiny_decoder(path).decode(z)
            assert got.shape == want.shape == (2, 3, 72, 48)
            assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5, path
    save_atomic({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not TAESD"):
        load_tiny_decoder(tmp_path / "other.safetensors")
