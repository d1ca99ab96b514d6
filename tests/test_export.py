"""export.py: the SD 1.5 single file loads in diffusers (from_single_file) and in our loaders, the diffusers unet/
folder loads with from_pretrained, and all give the student's eps; the CLI on a distill.py-style checkpoint."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import export
from text.encoders import PRESETS as CLIP_PRESETS
from text.encoders import CLIPTextModel, load_clip
from unet import PRESETS as UNET_PRESETS
from unet import UNet, load_unet
from vae import PRESETS as VAE_PRESETS
from vae import VAE, load_vae
from weights import save_atomic

TINY = UNET_PRESETS["tiny"]


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def perturbed(model, seed):
    """Random weights away from the default init (zero-ish biases, unit norms would hide layout swaps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    torch.manual_seed(0)
    unet, vae = perturbed(UNet(TINY), 1), perturbed(VAE(VAE_PRESETS["tiny_sd15"]), 2)
    clip = perturbed(CLIPTextModel(CLIP_PRESETS["tiny_l"]), 3)
    d = tmp_path_factory.mktemp("export")
    export.export_sd15_single_file(unet, vae, clip, d / "student.safetensors", {"distilled": "1", "steps": "1"})
    export.export_diffusers_unet(unet, d / "unet")
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 77, TINY.context_dim, generator=g)
    t = torch.tensor([999, 321])
    with torch.no_grad():
        eps = unet(x, t, ctx)
    return dict(dir=d, unet=unet, vae=vae, clip=clip, x=x, t=t, ctx=ctx, eps=eps)


def reference_config_folder(path):
    """A diffusers config for the tiny SD 1.5-structured UNet, written by diffusers itself (not by export.py)."""
    from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=TINY.num_res_blocks,
        block_out_channels=tuple(TINY.model_channels * m for m in TINY.channel_mult),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=TINY.num_heads, cross_attention_dim=TINY.context_dim, norm_num_groups=TINY.norm_groups)
    model.save_config(path)
    return path


def diffusers_eps(model, s):
    with torch.no_grad():
        return model(s["x"], s["t"], encoder_hidden_states=s["ctx"]).sample


def test_single_file_keys_and_metadata(student):
    path = student["dir"] / "student.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta == {"distilled": "1", "steps": "1"}
    expected = {"model.diffusion_model." + k for k in student["unet"].state_dict()}
    expected |= {"first_stage_model." + k for k in student["vae"].state_dict()}
    expected |= {"cond_stage_model.transformer." + k for k in student["clip"].state_dict()}
    assert keys == expected
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in keys if k.startswith("cond_stage"))
    assert not [p for p in student["dir"].rglob("*.tmp")]  # atomic writes leave no temp files


def test_single_file_loads_in_diffusers(student, tmp_path):
    from diffusers import UNet2DConditionModel
    cfg = reference_config_folder(tmp_path / "config")
    model = UNet2DConditionModel.from_single_file(str(student["dir"] / "student.safetensors"), config=str(cfg),
                                                  local_files_only=True).eval()
    # diffusers leaves unloaded weights at their init without error: compare every tensor, then the output
    sd = model.state_dict()
    for o, d in export.unet_key_map(TINY).items():
        assert torch.equal(sd[d], student["unet"].state_dict()[o]), d
    assert rel(diffusers_eps(model, student), student["eps"]) <= 1e-4


def test_single_file_loads_with_our_loaders(student):
    path = student["dir"] / "student.safetensors"
    unet = load_unet(path)
    with torch.no_grad():
        assert rel(unet(student["x"], student["t"], student["ctx"]), student["eps"]) <= 1e-4
    for ours, theirs in ((load_vae(path, family="sd15"), student["vae"]), (load_clip(path), student["clip"])):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_folder_loads_with_from_pretrained(student):
    from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel.from_pretrained(str(student["dir"] / "unet"), local_files_only=True).eval()
    assert model.config.cross_attention_dim == TINY.context_dim
    sd = model.state_dict()
    assert len(sd) == len(student["unet"].state_dict())
    assert rel(diffusers_eps(model, student), student["eps"]) <= 1e-4
    assert rel(load_unet(student["dir"] / "unet")(student["x"], student["t"], student["ctx"]).detach(),
               student["eps"]) <= 1e-4


def test_cli_from_a_distill_checkpoint(student, tmp_path):
    """A distill.py checkpoint holds student.* / ema.* (UNet only) and names the base student in its config."""
    base = student["dir"] / "student.safetensors"
    trained = perturbed(UNet(TINY), 7)
    ema = perturbed(UNet(TINY), 8)
    tensors = {f"student.{k}": v for k, v in trained.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    save_atomic(tensors, tmp_path / "checkpoint.safetensors", {"config": json.dumps({"student": str(base)}),
                                                               "step": "12"})
    for flag, ref in (([], trained), (["--ema"], ema)):
        out = tmp_path / ("ema" if flag else "live")
        assert export.main(["--student", str(tmp_path / "checkpoint.safetensors"), "--out", str(out)] + flag) == 0
        single = load_file(out / "student.safetensors")
        for k, v in ref.state_dict().items():
            assert torch.equal(single["model.diffusion_model." + k], v), k
        for k, v in student["vae"].state_dict().items():  # VAE and CLIP come from the base student
            assert torch.equal(single["first_stage_model." + k], v), k
        with safe_open(str(out / "student.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["distilled"] == "1" and meta["steps"] == "1" and meta["step"] == "12"
        got = load_unet(out / "unet")
        assert all(torch.equal(got.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_cli_bad_input(student, tmp_path, capsys):
    save_atomic({f"student.{k}": v for k, v in UNet(TINY).state_dict().items()}, tmp_path / "ck.safetensors")
    assert export.main(["--student", str(tmp_path / "ck.safetensors"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--base" in err and "\n" not in err
    assert export.main(["--student", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o").exists()
