"""The Stable Diffusion 1.5 UNet (the one-step student), hand-written.

Predicts the noise eps from a noisy latent x_t (B, 4, h, w), a DDPM timestep t in 0..999 and CLIP-L text states
(B, 77, 768). Module paths mirror the original CompVis LDM keys (`model.diffusion_model.*` of
`v1-5-pruned-emaonly.safetensors`), so that file loads with `load_state_dict(strict=True)`; the diffusers `unet/`
layout goes through `unet_key_map`, one flat original -> diffusers name map built from the config.

References: CompVis latent-diffusion / stablediffusion `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel,
ResBlock, Downsample, Upsample) and `ldm/modules/attention.py` (SpatialTransformer, BasicTransformerBlock, GEGLU);
SD 1.5 `v1-inference.yaml` (unet_config); diffusers `UNet2DConditionModel` for the diffusers names.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from weights import (
    Checkpoint,
    CheckpointError,
    build_meta,
    check_agrees,
    component_config,
    describe,
    find_component,
    load_state,
)


@dataclass(frozen=True)
class UNetConfig:
    # Defaults: SD 1.5 v1-inference.yaml unet_config.
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels with a SpatialTransformer (attention_resolutions 4,2,1 = ds 1,2,4)
    num_heads: int = 8  # SD 1.x fixes the head COUNT (num_heads: 8); head_dim = channels // 8
    context_dim: int = 768  # CLIP ViT-L/14 hidden size
    transformer_depth: int = 1
    norm_groups: int = 32


PRESETS = {
    "sd15": UNetConfig(),
    "tiny": replace(UNetConfig(), model_channels=32, context_dim=32),
}


class GroupNorm(nn.GroupNorm):
    # Statistics in fp32 (as LDM's GroupNorm32): the mean/variance of a group sums up to C/32 * h * w values, more
    # than bf16's 8-bit mantissa can accumulate; the result goes back to the input dtype.
    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    # fp32 for the same reason as GroupNorm: the norm is cheap and bf16 statistics are coarse.
    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding in fp32, [cos, sin] order (LDM; diffusers flip_sin_to_cos=True, freq_shift=0).
    fp32 because t reaches 999: bf16 would round t * freq to ~4 units and scramble the phases."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-conv, plus a (1x1 conv) skip."""

    def __init__(self, ch, out_ch, emb_dim, groups):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        # index 2 is the original's Dropout (0 in SD 1.5): an Identity keeps the key out_layers.3.
        self.out_layers = nn.Sequential(GroupNorm(groups, out_ch), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Conv2d(ch, out_ch, 1) if ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C, 1, 1) broadcast over the pixels
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention; self-attention when context is None, else cross-attention to the text states."""

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # original: [Linear, Dropout]; key to_out.0

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        B, T, C = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (z.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, d)
        o = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as LDM
        return self.to_out[0](o.transpose(1, 2).reshape(B, T, C))


class GEGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)  # exact (erf) GELU, as LDM and diffusers


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # original: [GEGLU, Dropout, Linear]; an Identity keeps the key net.2
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads)
        self.attn2 = Attention(dim, context_dim, heads)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer blocks over the h*w pixel tokens, 1x1 conv out, residual."""

    def __init__(self, ch, cfg):
        super().__init__()
        self.norm = GroupNorm(cfg.norm_groups, ch, eps=1e-6)  # 1e-6: LDM attention.py Normalize
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(ch, cfg.context_dim, cfg.num_heads) for _ in range(cfg.transformer_depth)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        # nearest 2x in LDM; to the skip's size when the map is odd-sized (diffusers' upsample_size), which is the
        # same as 2x whenever the latent side is a multiple of 8
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Block(nn.ModuleList):
    """One `input_blocks.N` / `middle_block` / `output_blocks.N`: layers fed what each needs (LDM's
    TimestepEmbedSequential)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        mc, emb_dim, groups = cfg.model_channels, 4 * cfg.model_channels, cfg.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        last = len(cfg.channel_mult) - 1
        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skips, ch = [mc], mc  # channels of every input block's output, consumed in reverse by the output blocks
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * mc, emb_dim, groups)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg))
                self.input_blocks.append(Block(layers))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(Block([Downsample(ch)]))
                skips.append(ch)

        self.middle_block = Block([ResBlock(ch, ch, emb_dim, groups), SpatialTransformer(ch, cfg),
                                   ResBlock(ch, ch, emb_dim, groups)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):  # one more than going down: also eats the downsample's skip
                layers = [ResBlock(ch + skips.pop(), mult * mc, emb_dim, groups)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))

        self.out = nn.Sequential(GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def _run(self, block, x, emb, context, size=None):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, emb, context, size, use_reentrant=False)
        return block(x, emb, context, size)

    def forward(self, x: Tensor, t: Tensor | int | float, context: Tensor) -> Tensor:
        """x (B, in_channels, h, w) noisy latent, t (B,) or scalar DDPM timestep 0..999 (int or float),
        context (B, 77, context_dim) text states -> eps (B, out_channels, h, w)."""
        B = x.shape[0]
        dtype = self.out[2].weight.dtype  # run in the weights' dtype (bf16 weights -> bf16 compute)
        x, context = x.to(dtype), context.to(dtype)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))  # (B, 4 * mc)

        hs = []
        for block in self.input_blocks:
            x = self._run(block, x, emb, context)
            hs.append(x)
        x = self._run(self.middle_block, x, emb, context)
        for block in self.output_blocks:
            x = torch.cat([x, hs.pop()], dim=1)
            x = self._run(block, x, emb, context, hs[-1].shape[-2:] if hs else None)  # upsample to the next skip
        return self.out(x)


def unet_key_map(cfg: UNetConfig) -> dict:
    """Flat map original key (without `model.diffusion_model.`) -> diffusers `unet/` key, for every tensor."""
    blocks = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
              "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
              "middle_block.2": "mid_block.resnets.1"}
    n, last = 1, len(cfg.channel_mult) - 1
    for level in range(len(cfg.channel_mult)):
        for j in range(cfg.num_res_blocks):
            blocks[f"input_blocks.{n}.0"] = f"down_blocks.{level}.resnets.{j}"
            if level in cfg.attention_levels:
                blocks[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{j}"
            n += 1
        if level != last:
            blocks[f"input_blocks.{n}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            n += 1
    n = 0
    for up, level in enumerate(reversed(range(len(cfg.channel_mult)))):
        for j in range(cfg.num_res_blocks + 1):
            blocks[f"output_blocks.{n}.0"] = f"up_blocks.{up}.resnets.{j}"
            if level in cfg.attention_levels:
                blocks[f"output_blocks.{n}.1"] = f"up_blocks.{up}.attentions.{j}"
            if level != 0 and j == cfg.num_res_blocks:  # the upsampler follows the attention, if there is one
                upsample = 2 if level in cfg.attention_levels else 1
                blocks[f"output_blocks.{n}.{upsample}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            n += 1
    # ResBlock sub-layers are renamed; attention sub-layers keep their names in both layouts.
    resnet = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

    out = {}
    for key in build_meta(UNet, cfg).state_dict():
        prefix = next(p for p in blocks if key.startswith(p + "."))  # block prefixes never nest in one another
        rest = key[len(prefix) + 1:]
        layer, _, leaf = rest.rpartition(".")
        if ".resnets." in blocks[prefix] and layer in resnet:
            rest = f"{resnet[layer]}.{leaf}"
        out[key] = f"{blocks[prefix]}.{rest}"
    return out


def _count(shapes: dict, prefix: str) -> int:
    """How many numbered children `prefix.N` the keys hold."""
    return len({k[len(prefix) + 1:].split(".")[0] for k in shapes if k.startswith(prefix + ".")})


def _config_original(s: dict) -> UNetConfig:
    """UNetConfig read off original-layout shapes (keys without prefix)."""
    mc = s["input_blocks.0.0.weight"][0]
    levels = 1 + sum(k.endswith(".0.op.weight") for k in s)  # a downsample after every level but the last
    n_out = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("output_blocks."))
    nrb = n_out // levels - 1
    first = [1 + level * (nrb + 1) for level in range(levels)]  # input block of each level's first ResBlock
    attn = [level for level, n in enumerate(first) if f"input_blocks.{n}.1.norm.weight" in s]
    a = f"input_blocks.{first[attn[0]]}.1.transformer_blocks" if attn else "middle_block.1.transformer_blocks"
    return UNetConfig(
        in_channels=s["input_blocks.0.0.weight"][1], out_channels=s["out.2.weight"][0], model_channels=mc,
        channel_mult=tuple(s[f"input_blocks.{n}.0.out_layers.3.weight"][0] // mc for n in first),
        num_res_blocks=nrb, attention_levels=tuple(attn), context_dim=s[f"{a}.0.attn2.to_k.weight"][1],
        transformer_depth=_count(s, a))


def _config_diffusers(s: dict) -> UNetConfig:
    """UNetConfig read off diffusers-layout shapes."""
    mc = s["conv_in.weight"][0]
    levels = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("down_blocks."))
    attn = [level for level in range(levels) if f"down_blocks.{level}.attentions.0.norm.weight" in s]
    a = (f"down_blocks.{attn[0]}.attentions.0" if attn else "mid_block.attentions.0") + ".transformer_blocks"
    return UNetConfig(
        in_channels=s["conv_in.weight"][1], out_channels=s["conv_out.weight"][0], model_channels=mc,
        channel_mult=tuple(s[f"down_blocks.{level}.resnets.0.conv1.weight"][0] // mc for level in range(levels)),
        num_res_blocks=_count(s, "down_blocks.0.resnets"),
        attention_levels=tuple(attn), context_dim=s[f"{a}.0.attn2.to_k.weight"][1],
        transformer_depth=_count(s, a))


def _config_json(cfg: UNetConfig, meta: dict, source) -> UNetConfig:
    """A diffusers folder's config.json gives what shapes cannot show, the head count and the norm groups; what the
    shapes show must agree with it, and settings SD 1.5's structure doesn't have are refused (CheckpointError).
    diffusers' UNet2DConditionModel reads `attention_head_dim` as the head COUNT when `num_attention_heads` is unset
    (its SD 1.x naming)."""
    if not meta:
        return cfg
    per_block = ("transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim")
    meta = meta | {k: meta[k][0] for k in per_block  # per-block lists whose values are all equal: one value
                   if isinstance(meta.get(k), (list, tuple)) and len(set(meta[k])) == 1}
    levels = range(len(cfg.channel_mult))
    check_agrees(source, meta, {
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "layers_per_block": cfg.num_res_blocks,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "cross_attention_dim": cfg.context_dim, "transformer_layers_per_block": cfg.transformer_depth,
        "down_block_types": ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]})
    unsupported = {k: meta[k] for k, want in (("use_linear_projection", False), ("act_fn", "silu"),
                                              ("norm_eps", 1e-5), ("class_embed_type", None),
                                              ("addition_embed_type", None), ("time_cond_proj_dim", None),
                                              ("only_cross_attention", False), ("flip_sin_to_cos", True),
                                              ("freq_shift", 0), ("resnet_time_scale_shift", "default"),
                                              ("dual_cross_attention", False)) if k in meta and meta[k] != want}
    heads = meta.get("num_attention_heads") or meta.get("attention_head_dim") or cfg.num_heads
    groups = meta.get("norm_num_groups") or cfg.norm_groups
    if unsupported or not isinstance(heads, int) or not isinstance(groups, int):
        raise CheckpointError(f"{source}: config.json sets what SD 1.5's UNet does not have: "
                              f"{unsupported or {'heads': heads, 'norm_num_groups': groups}}")
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    if any(c % groups for c in channels) or any(channels[i] % heads for i in cfg.attention_levels):
        raise CheckpointError(f"{source}: config.json: {heads} heads / {groups} norm groups do not divide the "
                              f"channels {channels}")
    return replace(cfg, num_heads=heads, norm_groups=groups)


def load_unet(path, dtype=None, device=None) -> UNet:
    """An SD 1.5 UNet from a single file (`model.diffusion_model.*`; VAE/CLIP keys and DDPM buffers ignored), a
    bare original-layout file, a diffusers `unet/` folder or a diffusers pipeline root. dtype None = float32."""
    path = find_component(path, "unet")
    ckpt = Checkpoint(path)
    if "model.diffusion_model.input_blocks.0.0.weight" in ckpt:
        prefix, diffusers = "model.diffusion_model.", False
    elif "input_blocks.0.0.weight" in ckpt:  # a bare original-layout UNet
        prefix, diffusers = "", False
    elif "down_blocks.0.resnets.0.time_emb_proj.weight" in ckpt:
        prefix, diffusers = "", True
    else:
        raise CheckpointError(f"{path}: not an SD 1.5 UNet, this looks like {describe(ckpt.keys())}")
    shapes = ckpt.shapes(prefix)
    if any("label_emb" in k or "add_embedding" in k for k in shapes):
        raise CheckpointError(f"{path}: this looks like an SDXL UNet (class/size embeddings); only SD 1.5 is supported")
    if any(k.endswith("proj_in.weight") and len(v) == 2 for k, v in shapes.items()):
        raise CheckpointError(f"{path}: this looks like an SD 2.x UNet (linear proj_in); only SD 1.5 is supported")
    try:
        cfg = _config_diffusers(shapes) if diffusers else _config_original(shapes)
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:  # a key the config is read from is absent
        raise CheckpointError(f"{path}: cannot read the UNet config off the shapes ({type(e).__name__}: {e})") from None
    rename = None
    if diffusers:
        cfg = _config_json(cfg, component_config(path), path)
        inverse = {d: o for o, d in unet_key_map(cfg).items()}
        rename = lambda k: inverse.get(k, k)  # unknown keys kept, so load_state lists them as unexpected
    model = build_meta(UNet, cfg)
    state = ckpt.tensors(prefix, rename=rename, dtype=dtype or torch.float32, device=device or "cpu")
    return load_state(model, state, path).eval()


# ----------------------------------------------------------------------------- sampling: DDIM and one step

def sd15_alphas_cumprod() -> torch.Tensor:
    """(1000,) fp32 alpha-bar of SD 1.5's DDPM schedule: betas linear in sqrt space from 0.00085 to 0.012
    (v1-inference.yaml linear_start / linear_end, "scaled_linear" in diffusers), computed in fp32 as diffusers does."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_schedule(steps: int):
    """DDIM timesteps (steps,) int64, high to low, with alpha-bar at each and at the step it jumps to.
    "leading" spacing: t = k * (1000 // steps) + 1 (steps_offset 1); the last step jumps to alpha-bar[0], not 1
    (set_alpha_to_one False), so the final latent keeps a trace of noise, as SD 1.5 was released."""
    ac = sd15_alphas_cumprod()
    ratio = 1000 // steps
    t = torch.arange(steps - 1, -1, -1, dtype=torch.int64) * ratio + 1
    prev = t - ratio
    return t, ac[t], torch.where(prev >= 0, ac[prev.clamp(min=0)], ac[0])


def ddim_step(x, eps, alpha, alpha_prev):
    """One deterministic DDIM step (eta 0) from alpha-bar `alpha` to `alpha_prev`, eps-prediction, no clipping
    (SD 1.5's clip_sample False). In fp32: x0 divides by sqrt(alpha-bar) (0.076 at t=981), which would amplify
    fp16/bf16 rounding of eps ~13x, and x accumulates over all steps; the tensors are small, fp32 costs nothing."""
    x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha ** 0.5
    return alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


@torch.no_grad()
def sample_sd15(unet, clip, tokenizer, prompt, negative, noise, steps, cfg, progress=True) -> torch.Tensor:
    """noise (B, 4, h, w) on the models' device -> final latent (B, 4, h, w) fp32."""
    B, dev = noise.shape[0], noise.device
    texts = ([negative] * B if cfg > 1.0 else []) + [prompt] * B  # as diffusers: cfg <= 1 means no uncond pass
    return ddim_sample(unet, clip(tokenizer.encode(texts).to(dev)).last_hidden_state, noise, steps, cfg, progress)


@torch.no_grad()
def ddim_sample(unet, context, noise, steps, cfg, progress=False) -> torch.Tensor:
    """DDIM from noise (B, 4, h, w) -> final latent fp32. context: (B, 77, D), or with classifier-free guidance
    (cfg > 1) (2B, 77, D) = [uncond; cond], run as one batch: eps = eps_u + cfg * (eps_c - eps_u)."""
    dev, dtype, guided = noise.device, next(unet.parameters()).dtype, cfg > 1.0
    timesteps, alphas, alphas_prev = ddim_schedule(steps)
    x = noise.float()
    for i in tqdm(range(steps), disable=not progress, desc="ddim"):
        xin = torch.cat([x, x]) if guided else x
        eps = unet(xin.to(dtype), timesteps[i].to(dev).expand(xin.shape[0]), context).float()
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + cfg * (eps_c - eps_u)
        x = ddim_step(x, eps, alphas[i], alphas_prev[i])
    return x


def one_step_x0(unet, x: Tensor, t: int, context: Tensor, cfg: float | None = None) -> Tensor:
    """An eps-prediction UNet's x0 estimate at timestep t: (x - sqrt(1 - abar) eps) / sqrt(abar), in fp32 (abar(999)
    = 0.0047, so eps errors are amplified ~15x). From pure noise at t = 999: a distilled student's sample. With `cfg`
    (a base model's one step), context is (2B, 77, D) = [uncond; cond] and eps = eps_u + cfg (eps_c - eps_u)."""
    a = sd15_alphas_cumprod()[t].item()
    xin = torch.cat([x, x]) if cfg else x
    eps = unet(xin.to(next(unet.parameters()).dtype), torch.full((xin.shape[0],), t, device=x.device), context).float()
    if cfg:
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u)
    return (x.float() - (1 - a) ** 0.5 * eps) / a ** 0.5


@torch.no_grad()
def sample_one_step(unet, clip, tokenizer, prompt, noise, steps=1, t_start=999, generator=None) -> torch.Tensor:
    """A distilled student (distill.py): its x0 estimate from pure noise at t = 999. No CFG: the teacher's guidance is
    distilled in. steps > 1 (DMD2's multi-step sampling): re-noise x0 with fresh noise to the next of `steps` evenly
    spaced timesteps (999, 749, 499, 249 for 4) and predict again."""
    B, dev = noise.shape[0], noise.device
    context = clip(tokenizer.encode([prompt] * B).to(dev)).last_hidden_state
    ac = sd15_alphas_cumprod()
    ts = [t_start - k * ((t_start + 1) // steps) for k in range(steps)]
    x = noise.float()
    for i, t in enumerate(ts):
        x0 = one_step_x0(unet, x, t, context)
        if i + 1 < len(ts):
            fresh = torch.randn(x.shape, generator=generator).to(dev)
            x = ac[ts[i + 1]] ** 0.5 * x0 + (1 - ac[ts[i + 1]]) ** 0.5 * fresh
    return x0
