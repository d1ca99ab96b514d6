"""AutoencoderKL: the image <-> latent VAE of SD 1.5 (4 latent channels) and of SD3 / FLUX (16 channels).

One implementation for all three: the same LDM encoder/decoder (ResNet blocks, one single-head attention in the
middle block, 8x down/upsampling); SD 1.5 adds the 1x1 `quant_conv` / `post_quant_conv`, SD3 and FLUX don't and
shift their latents. Module paths are the ORIGINAL LDM names (`encoder.down.0.block.0.conv1`, `decoder.up.3.upsample`,
`encoder.mid.attn_1.q`, ...), so `first_stage_model.*` of SD 1.5 / SD 3.5 single files and FLUX `ae.safetensors`
load strictly; diffusers `vae/` folders go through `vae_key_map`.

The decoder's intermediate maps (mid block, then each 2x upsampling) are exposed by `decode_features` for the
method's "Bridge" (a spatial prior whose gradients flow through the frozen decoder back to the latents).

References: CompVis latent-diffusion `ldm/modules/diffusionmodules/model.py` (Encoder, Decoder, AttnBlock),
BFL flux `src/flux/modules/autoencoder.py`, diffusers `models/autoencoders/vae.py` (layout only).
"""
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from weights import (
    Checkpoint,
    CheckpointError,
    build_meta,
    component_config,
    describe,
    find_component,
    load_state,
    write_atomic,
)


@dataclass
class VAEConfig:
    ch: int = 128  # channels of level 0; level i has ch * ch_mult[i]
    ch_mult: tuple = (1, 2, 4, 4)  # 4 levels = 3 down/upsamplings = 8x
    num_res_blocks: int = 2  # per encoder level (the decoder has one more per level)
    latent_channels: int = 4
    norm_groups: int = 32  # every released VAE uses 32 groups; shapes can't tell, config.json can
    use_quant_conv: bool = True  # SD 1.5 only
    scale_factor: float = 0.18215  # SD 1.5 v1-inference.yaml `scale_factor`
    shift_factor: float = 0.0


PRESETS = {"sd15": VAEConfig()}
# 1.5305 / 0.0609: Stability sd3.5 reference `sd3_impls.py` SD3LatentFormat (scale_factor, shift_factor).
PRESETS["sd3"] = replace(PRESETS["sd15"], latent_channels=16, use_quant_conv=False, scale_factor=1.5305,
                         shift_factor=0.0609)
# 0.3611 / 0.1159: BFL flux `src/flux/util.py` AutoEncoderParams(scale_factor, shift_factor) of flux-dev/schnell.
PRESETS["flux"] = replace(PRESETS["sd3"], scale_factor=0.3611, shift_factor=0.1159)
# Tiny: same 4 levels, 2 blocks, mid attention and key names; 32/64 channels (32 groups still divide them).
for _name in ("sd15", "sd3", "flux"):
    PRESETS["tiny_" + _name] = replace(PRESETS[_name], ch=32, ch_mult=(1, 2, 2, 2))
FAMILIES = {"sd15": PRESETS["sd15"], "sd3": PRESETS["sd3"], "flux": PRESETS["flux"]}


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 (input, statistics and affine), output cast back: the decoder's activations grow
    large, and a bf16 mean/variance and (x - mean) over 16 channels x 128x128 positions (1024 px) loses the digits
    that the normalised map needs; the norm is cheap next to the 3x3 convs, and fp32 parity is unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def norm(c, groups):
    return GroupNorm(groups, c, eps=1e-6)  # eps 1e-6: LDM Normalize()


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q/k/v/proj_out are 1x1 convs as in the LDM files."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = norm(c, groups)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).reshape(B, 1, C, H * W).transpose(-1, -2) for p in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # scale C^-0.5, as LDM
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # LDM pads right/bottom only (0, 1, 0, 1), then a stride-2 conv without padding (diffusers Downsample2D
        # with padding=0 does the same); symmetric padding=1 would shift the grid by half a pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.block_1, self.attn_1 = ResnetBlock(c, c, groups), AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block.{j}` ResNet blocks, then `downsample` (encoder) or `upsample` (decoder)."""

    def __init__(self, c_in, c_out, n_blocks, groups):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n_blocks)])


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, c in enumerate(chs):
            level = Level(chs[i - 1] if i else cfg.ch, c, cfg.num_res_blocks, cfg.norm_groups)
            if i != len(chs) - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = Mid(chs[-1], cfg.norm_groups)
        self.norm_out = norm(chs[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level is not self.down[-1]:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """`up.{i}` is indexed by level like the encoder (up.3 runs first, on the smallest map), as in LDM."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[-1], 3, padding=1)
        self.mid = Mid(chs[-1], cfg.norm_groups)
        self.up = nn.ModuleList()
        for i, c in enumerate(chs):
            level = Level(chs[i + 1] if i + 1 < len(chs) else c, c, cfg.num_res_blocks + 1, cfg.norm_groups)
            if i != 0:
                level.upsample = Upsample(c)
            self.up.append(level)
        self.norm_out = norm(chs[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(chs[0], 3, 3, padding=1)
        # Checkpoint each block whenever autograd records (not only in training mode): the decoder is frozen and
        # in eval mode, yet the Bridge backpropagates through it to the latents and would store every activation.
        self.gradient_checkpointing = False

    def forward(self, z: Tensor, features: dict | None = None, stop_at: int | None = None) -> Tensor | None:
        """Image from (unscaled) z. Fills `features` (if a dict) with {1: mid output, 2/4/8: upsample outputs};
        returns None right after the feature at scale `stop_at`."""
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        run = lambda f, h: checkpoint(f, h, use_reentrant=False) if ckpt else f(h)

        def tap(scale, h):  # record a feature map; True when the caller wants nothing beyond it
            if features is not None:
                features[scale] = h
            return scale == stop_at

        h = self.mid(self.conv_in(z))
        if tap(1, h):
            return None
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = run(block, h)
            if i != 0:
                h = run(self.up[i].upsample, h)
                if tap(2 ** (len(self.up) - i), h):
                    return None
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, images, sample=False, generator=None):
        """images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/8, W/8) as the diffusion model sees them:
        (z - shift) * scale, z the posterior mean or (sample=True) mean + std * randn(generator)."""
        moments = self.encoder(images)
        if self.cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # clamp range: LDM DiagonalGaussianDistribution
            # noise drawn on the generator's device (CPU generators stay usable for GPU latents), then moved
            dev = generator.device if generator is not None else mean.device
            z = mean + std * torch.randn(mean.shape, generator=generator, device=dev, dtype=mean.dtype).to(mean.device)
        return (z - self.cfg.shift_factor) * self.cfg.scale_factor

    def _unscale(self, latents):
        z = latents / self.cfg.scale_factor + self.cfg.shift_factor
        return self.post_quant_conv(z) if self.cfg.use_quant_conv else z

    def decode(self, latents, return_features=False):
        """latents (B, C, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (not clamped); with return_features also
        {scale: feature map} (see decode_features)."""
        features = {} if return_features else None
        images = self.decoder(self._unscale(latents), features)
        return (images, features) if return_features else images

    def decode_features(self, latents, scale):
        """The decoder's map at `scale` x the latent resolution, running the decoder only that far.
        Channels (SD 1.5 / SD3 / FLUX, ch 128, ch_mult (1,2,4,4)): scale 1 (mid block) 512, 2 (up.3.upsample) 512,
        4 (up.2.upsample) 512, 8 (up.1.upsample) 256; in general ch * ch_mult[n - log2(scale)] for scale > 1."""
        n = len(self.cfg.ch_mult)
        if scale not in [2 ** i for i in range(n)]:
            raise ValueError(f"decode_features: scale {scale} not in {[2 ** i for i in range(n)]}")
        features = {}
        self.decoder(self._unscale(latents), features, stop_at=scale)
        return features[scale]


def vae_key_map(cfg: VAEConfig) -> dict:
    """original LDM key (no `first_stage_model.` prefix) -> diffusers AutoencoderKL key. Attention q/k/v/proj_out
    are [C, C, 1, 1] convs in the original files and [C, C] linears in diffusers: reshape when converting."""
    m = {}

    def add(orig, diff):
        for p in ("weight", "bias"):
            m[f"{orig}.{p}"] = f"{diff}.{p}"

    def resnet(orig, diff, c_in, c_out):
        for name in ("norm1", "conv1", "norm2", "conv2"):
            add(f"{orig}.{name}", f"{diff}.{name}")
        if c_in != c_out:
            add(f"{orig}.nin_shortcut", f"{diff}.conv_shortcut")

    def mid(part, c):
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", c, c)
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", c, c)
        for o, d in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            add(f"{part}.mid.attn_1.{o}", f"{part}.mid_block.attentions.0.{d}")

    chs = [cfg.ch * k for k in cfg.ch_mult]
    n = len(chs)
    add("encoder.conv_in", "encoder.conv_in")
    for i, c in enumerate(chs):
        for j in range(cfg.num_res_blocks):
            c_in = (chs[i - 1] if i else cfg.ch) if j == 0 else c
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c_in, c)
        if i != n - 1:
            add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    mid("encoder", chs[-1])
    add("encoder.norm_out", "encoder.conv_norm_out")
    add("encoder.conv_out", "encoder.conv_out")
    add("decoder.conv_in", "decoder.conv_in")
    mid("decoder", chs[-1])
    for i, c in enumerate(chs):  # diffusers numbers up_blocks in execution order: up_blocks.k = LDM up.{n-1-k}
        for j in range(cfg.num_res_blocks + 1):
            c_in = (chs[i + 1] if i + 1 < n else c) if j == 0 else c
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{n - 1 - i}.resnets.{j}", c_in, c)
        if i != 0:
            add(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv")
    add("decoder.norm_out", "decoder.conv_norm_out")
    add("decoder.conv_out", "decoder.conv_out")
    if cfg.use_quant_conv:
        add("quant_conv", "quant_conv")
        add("post_quant_conv", "post_quant_conv")
    return m


def load_vae(path, family=None, dtype=None, device=None) -> VAE:
    """A VAE from `first_stage_model.*` of an SD 1.5 / SD 3.5 single file, FLUX `ae.safetensors` (no prefix), or a
    diffusers `vae/` folder / pipeline root. `family` ("sd15", "sd3", "flux") picks scale/shift where the file
    can't tell (a 16-channel ae.safetensors); it must agree with the file where it can."""
    if family is not None and family not in FAMILIES:
        raise CheckpointError(f"{path}: unknown VAE family {family!r}; expected one of {list(FAMILIES)}")
    path = find_component(path, "vae")
    ckpt = Checkpoint(path)
    keys = ckpt.keys()
    prefix = next((p for p in ("first_stage_model.", "") if p + "decoder.conv_in.weight" in ckpt), None)
    if prefix is None:
        raise CheckpointError(f"{ckpt.path}: not a VAE (no decoder.conv_in.weight); it looks like {describe(keys)}")
    diffusers = prefix + "encoder.down_blocks.0.resnets.0.conv1.weight" in ckpt
    s = ckpt.shapes(prefix)

    # Config off the shapes (ch, ch_mult, blocks, latent channels, quant convs), norm groups from config.json.
    ch = s["encoder.conv_in.weight"][0]
    down, block = ("down_blocks", "resnets") if diffusers else ("down", "block")
    n = len({k.split(".")[2] for k in s if k.startswith(f"encoder.{down}.")})
    ch_mult = tuple(s[f"encoder.{down}.{i}.{block}.0.conv1.weight"][0] // ch for i in range(n))
    blocks = len({k.split(".")[4] for k in s if k.startswith(f"encoder.{down}.0.{block}.")})
    latent = s["decoder.conv_in.weight"][1]
    meta = component_config(ckpt.path) if diffusers else {}
    cfg = VAEConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=blocks, latent_channels=latent,
                    norm_groups=meta.get("norm_num_groups", 32), use_quant_conv="quant_conv.weight" in s)

    # Scale and shift: what the file says (4 channels => SD 1.5, an SD3 single file, a diffusers config.json).
    told = None
    if latent == 4:
        told = "sd15"
    elif any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):
        told = "sd3"
    if meta.get("scaling_factor") is not None:
        scale, shift = meta["scaling_factor"], meta.get("shift_factor") or 0.0
        told = next((name for name, c in FAMILIES.items() if math.isclose(scale, c.scale_factor, rel_tol=1e-4)
                     and math.isclose(shift, c.shift_factor, abs_tol=1e-4)), "config.json")
        cfg = replace(cfg, scale_factor=scale, shift_factor=shift)
    if family is not None:
        want = FAMILIES[family]
        if latent != want.latent_channels or told not in (None, family):
            raise CheckpointError(f"{ckpt.path}: family={family!r} contradicts the file: {latent}-channel VAE"
                                  + (f" of {told}" if told else ""))
        cfg = replace(cfg, scale_factor=want.scale_factor, shift_factor=want.shift_factor)
    elif told is None:
        raise CheckpointError(f"{ckpt.path}: {latent}-channel VAE: pass family='sd3' or 'flux' (scale/shift differ)")
    elif told in FAMILIES:
        cfg = replace(cfg, scale_factor=FAMILIES[told].scale_factor, shift_factor=FAMILIES[told].shift_factor)

    inverse = {d: o for o, d in vae_key_map(cfg).items()}  # unknown names pass through to be reported
    state = ckpt.tensors(prefix, rename=(lambda k: inverse.get(k, k)) if diffusers else None,
                         dtype=dtype or torch.float32, device=device or "cpu")
    for k, v in state.items():  # diffusers linears [C, C] -> our 1x1 convs [C, C, 1, 1]
        if ".attn_1." in k and k.endswith("weight") and v.ndim == 2:
            state[k] = v[:, :, None, None]
    return load_state(build_meta(VAE, cfg), state, ckpt.path).eval().requires_grad_(False)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as diffusers' VaeImageProcessor.postprocess(output_type="pil"):
    clamp(x / 2 + 0.5, 0, 1) * 255, rounded half to even (numpy .round())."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (x * 255).round().astype("uint8")


# ----------------------------------------------------------------------------- TAESD: a tiny decoder for previews
class Clamp(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3  # TAESD's soft clamp of the latent to (-3, 3)


class TinyBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1))
        self.skip, self.fuse = nn.Identity(), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Sequential):
    """TAESD's decoder (Bohan Ollin Boer Bohan, github.com/madebyollin/taesd; diffusers AutoencoderTiny): the latent as
    VAE.decode takes it (scaled) -> image (B, 3, 8h, 8w) in [-1, 1], in ~1% of the SD decoder's FLOPs, for previews
    and latency-bound use. Indices mirror `taesd_decoder.safetensors` ("1.weight", "3.conv.0.weight", ...); diffusers'
    `decoder.layers.{i}` is index i + 1 (it applies the clamp outside its Sequential)."""

    def __init__(self, latent_channels: int = 4, width: int = 64, blocks: tuple = (3, 3, 3, 1)):
        layers = [Clamp(), nn.Conv2d(latent_channels, width, 3, padding=1), nn.ReLU()]
        for i, n in enumerate(blocks):
            layers += [TinyBlock(width) for _ in range(n)]
            last = i == len(blocks) - 1
            layers += [] if last else [nn.Upsample(scale_factor=2)]  # nearest
            layers.append(nn.Conv2d(width, 3 if last else width, 3, padding=1, bias=last))
        super().__init__(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(z.to(self[1].weight.dtype)) * 2 - 1  # TAESD decodes to [0, 1]

    decode = forward  # as VAE.decode


def load_tiny_decoder(path, dtype=None, device=None) -> TinyDecoder:
    """TAESD's decoder from `taesd_decoder.safetensors` or a diffusers AutoencoderTiny folder (its encoder skipped)."""
    ckpt = Checkpoint(find_component(path, "vae"))
    diffusers = "decoder.layers.0.weight" in ckpt
    if not diffusers and "1.weight" not in ckpt:
        raise CheckpointError(f"{ckpt.path}: not TAESD's decoder; it looks like {describe(ckpt.keys())}")
    shift = lambda k: f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}"  # diffusers' layers.i = our i + 1
    state = ckpt.tensors("decoder.layers." if diffusers else "", rename=shift if diffusers else None,
                         dtype=dtype or torch.float32, device=device or "cpu")
    if "1.weight" not in state:
        raise CheckpointError(f"{ckpt.path}: TAESD decoder without its first conv (1.weight)")
    with torch.device("meta"):
        model = TinyDecoder(state["1.weight"].shape[1], state["1.weight"].shape[0])
    return load_state(model, state, ckpt.path).eval()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def image_files(folder) -> list[Path]:
    """The images of a folder (png, jpg, webp), sorted by name."""
    return sorted(f for f in Path(folder).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path, res: int) -> Tensor:
    """An image file -> (3, res, res) in [-1, 1], the VAE's input: centre crop to a square, resize (PIL bicubic)."""
    im = Image.open(path).convert("RGB")
    s, (w, h) = min(im.size), im.size
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((res, res), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1


@torch.no_grad()
def encode_images(vae: VAE, files: list, res: int, batch: int = 8) -> Tensor:
    """Image files -> latents (N, C, res / 8, res / 8), `batch` at a time (never all images in memory)."""
    dtype, device = vae.encoder.conv_in.weight.dtype, vae.encoder.conv_in.weight.device
    return torch.cat([vae.encode(torch.stack([load_image(f, res) for f in files[i:i + batch]]).to(device, dtype))
                      for i in range(0, len(files), batch)])


def decode_too_big(batch: int, height: int, width: int, dtype, device) -> str | None:
    """Why decoding `batch` images of height x width px could not fit in this device's memory (None if it can):
    at full resolution the SD decoder holds a few (B, 128, H, W) activations, four counted here."""
    need = 4 * 128 * batch * height * width * torch.finfo(dtype).bits // 8
    device = torch.device(device)
    have = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"decoding needs ~{need / 2**30:.0f} GiB, this {device.type} has {have / 2**30:.0f} GiB" \
        if need > have else None


def save_grid(rows: list, path: Path, captions: list[str] | None = None, cell: int = 192) -> None:
    """Rows of images (each (n, 3, H, W) in [-1, 1]) -> one PNG, written atomically; images smaller than `cell`
    enlarged by nearest neighbour (so that 64 px toy images can be read), each column's caption written beneath."""
    img = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # (3, rows * H, n * W)
    grid = Image.fromarray(to_uint8(img[None])[0])
    k = max(1, cell // rows[0].shape[-1])
    grid = grid.resize((grid.width * k, grid.height * k), Image.NEAREST)
    if captions:
        w, text_h = rows[0].shape[-1] * k, 40
        sheet = Image.new("RGB", (grid.width, grid.height + text_h), "white")
        sheet.paste(grid, (0, 0))
        draw, chars = ImageDraw.Draw(sheet), max(8, w // 6)
        for i, c in enumerate(captions):
            draw.text((i * w + 2, grid.height + 2), "\n".join(c[j:j + chars] for j in range(0, 3 * chars, chars)),
                      fill="black")
        grid = sheet
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))
