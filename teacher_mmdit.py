"""The flow-matching teachers: SD3 / SD3.5 (MMDiT, MMDiT-X) and FLUX.1 (dev, schnell), hand-written, one file.

One call convention for every teacher:  v = teacher(x, sigma, context, pooled, guidance=None)
  x        (B, 16, H, W) teacher latent as the VAE's `encode` gives it (scaled and shifted)
  sigma    (B,) flow time in [0, 1], 1 = pure noise; x_t = (1 - sigma) x0 + sigma noise
  context  (B, L, 4096) text tokens; pooled (B, 2048) for SD3, (B, 768) for FLUX
  guidance (B,) FLUX.1-dev's embedded guidance scale (e.g. 3.5): required for dev, refused by schnell / SD3
  returns  v = noise - x0, (B, 16, H, W)
Inside, SD3 embeds t = 1000 sigma (sd3_impls ModelSamplingDiscreteFlow, diffusers pipelines pass 1000 sigma);
FLUX embeds 1000 sigma and 1000 guidance (BFL timestep_embedding time_factor=1000, diffusers multiplies by 1000).

For the distillation:
  - `teacher(..., attn_blocks=(i, ...))` returns TeacherOutput(v, attn) with attn[i] (B, N_img, N_txt): image-query ->
    text-key probabilities of joint/double block i, averaged over heads, taken from the softmax over ALL keys (rows
    sum to 1 over text + image keys). Computed in fp32 for the chosen blocks only; v still comes from SDPA.
  - `teacher.gradient_checkpointing = True`: every block runs under torch.utils.checkpoint while grad is enabled
    (train/eval mode does not matter: the teachers have no dropout, and a frozen teacher is usually in eval mode).
  - `add_lora(teacher, rank)` wraps attention/MLP linears in LoRALinear (frozen base weight kept at `.weight`/`.bias`,
    so base state_dict names are unchanged); `lora_enabled(teacher, False)` turns LoRA off (real score) / on (fake).

Weights load from raw safetensors (`load_teacher`): Stability single files (`model.diffusion_model.*`), BFL files
(no prefix, or a repacked `model.diffusion_model.` prefix), diffusers `transformer/` folders (sharded or not) and
pipeline roots. Diffusers names go through `teacher_key_map` (original key -> diffusers key(s)).

References: Esser et al. 2024, "Scaling Rectified Flow Transformers" (arXiv 2403.03206); Stability's sd3.5 reference
(github.com/Stability-AI/sd3.5, mmditx.py); BFL flux (github.com/black-forest-labs/flux, model.py, modules/layers.py);
diffusers 0.42 transformer_sd3.py / transformer_flux.py / single_file_utils.py for the diffusers layout.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class MMDiTConfig:
    """SD3 family. Defaults: SD3.5-Medium (sd3.5_medium.safetensors, MMDiT-X)."""
    depth: int = 24                  # joint blocks; heads = depth and hidden = 64 * depth (the MMDiT rule)
    head_dim: int = 64
    n_heads: int | None = None       # None: = depth (every released model); a diffusers config.json may say other
    in_channels: int = 16
    patch_size: int = 2
    context_dim: int = 4096          # CLIP-L+G (2048, zero-padded) and T5-XXL tokens
    pooled_dim: int = 2048           # CLIP-L pooled (768) + CLIP-G pooled projected (1280)
    mlp_ratio: float = 4.0
    pos_embed_max_size: int = 384    # stored table is [1, S*S, hidden]; 192 for SD3-Medium and SD3.5-Large
    qk_norm: bool = True             # RMSNorm ln_q / ln_k (SD3.5)
    attn2_blocks: tuple = tuple(range(13))  # MMDiT-X: x_block.attn2 in these blocks (SD3.5-Medium)
    variant: str = "sd35_medium"

    @property
    def heads(self) -> int:
        return self.n_heads or self.depth

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class FluxConfig:
    """FLUX.1 family. Defaults: FLUX.1-dev (flux1-dev.safetensors, BFL names)."""
    hidden: int = 3072
    heads: int = 24
    depth: int = 19                  # double-stream blocks
    depth_single: int = 38           # single-stream blocks
    mlp_ratio: float = 4.0
    in_channels: int = 64            # 16 latent channels packed 2x2
    context_dim: int = 4096          # T5-XXL
    pooled_dim: int = 768            # CLIP-L pooled
    axes_dim: tuple = (16, 56, 56)   # rotary dims per id axis (0, row, col); sums to head_dim
    theta: int = 10000
    guidance_embed: bool = True      # guidance_in (dev); schnell has none
    variant: str = "flux_dev"


PRESETS = {
    "sd35_medium": MMDiTConfig(),
    "sd3_medium": MMDiTConfig(pos_embed_max_size=192, qk_norm=False, attn2_blocks=(), variant="sd3_medium"),
    "sd35_large": MMDiTConfig(depth=38, pos_embed_max_size=192, attn2_blocks=(), variant="sd35_large"),
    "flux_dev": FluxConfig(),
    "flux_schnell": FluxConfig(guidance_embed=False, variant="flux_schnell"),
}
PRESETS["tiny_sd3"] = replace(PRESETS["sd3_medium"], depth=2, head_dim=16, pos_embed_max_size=16, variant="tiny_sd3")
PRESETS["tiny_sd35"] = replace(PRESETS["sd35_medium"], depth=3, head_dim=16, pos_embed_max_size=16,
                               attn2_blocks=(0, 1), variant="tiny_sd35")
PRESETS["tiny_flux_dev"] = replace(PRESETS["flux_dev"], hidden=64, heads=2, depth=2, depth_single=2,
                                   axes_dim=(4, 14, 14), variant="tiny_flux_dev")
PRESETS["tiny_flux_schnell"] = replace(PRESETS["tiny_flux_dev"], guidance_embed=False, variant="tiny_flux_schnell")


# ----------------------------------------------------------------------------- shared primitives
def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding [cos, sin] of t (B,) -> (B, dim), in fp32: bf16 can't resolve t * freq at t ~ 1000.
    Same formula in SD3's t_embedder and BFL's timestep_embedding (diffusers: flip_sin_to_cos, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)  # no affine: adaLN supplies scale and shift


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm over the last dim, statistics in fp32 (bf16 squares lose precision), then the learned scale."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class RMSNorm(nn.Module):  # SD3.5 ln_q / ln_k: parameter `weight`
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight)


class ScaleRMSNorm(nn.Module):  # BFL query_norm / key_norm: parameter `scale`
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale)


@dataclass
class Mod:
    """One adaLN modulation set, each (B, 1, C); gate is None for the final layer / pre-only block."""
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None = None

    def __call__(self, x):
        return x * (1 + self.scale) + self.shift


def mods(out, dim) -> list[Mod]:
    """Split an adaLN linear output (B, k*dim) into Mods: (shift, scale, gate) triples, or one (shift, scale) pair
    when k = 2 (final layer, pre-only block). Original order everywhere; diffusers' swaps live in its key map."""
    chunks = out[:, None, :].split(dim, dim=-1)  # k tensors (B, 1, dim)
    if len(chunks) == 2:
        return [Mod(*chunks)]
    return [Mod(*chunks[i:i + 3]) for i in range(0, len(chunks), 3)]


def attention(q, k, v):
    """q, k, v (B, heads, L, head_dim) -> (B, L, heads * head_dim) via SDPA."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def text_attention(q, k, n_txt):
    """Image-query -> text-key probabilities (B, N_img, N_txt), mean over heads, from the softmax over ALL keys
    (tokens ordered [text, image]). fp32, one head at a time: all heads' (N, N) maps at once would not fit."""
    scale = q.shape[-1] ** -0.5
    total = 0
    for h in range(q.shape[1]):
        logits = q[:, h, n_txt:].float() @ k[:, h].float().transpose(1, 2) * scale  # (B, N_img, N_txt + N_img)
        total = total + logits.softmax(-1)[..., :n_txt]
    return total / q.shape[1]


def rope(ids, axes_dim, theta):
    """Rotary angles for ids (L, n_axes) -> (cos, sin), each (L, head_dim / 2), fp32; computed on the fly
    (float64 angles as BFL does; MPS has no float64)."""
    f64 = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=f64, device=ids.device) / d)
        angles.append(ids[:, i, None].to(f64) * omega[None])
    angles = torch.cat(angles, dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, pe):
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, heads, L, head_dim) by pe's angles, in fp32."""
    cos, sin = pe
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, heads, L, head_dim / 2)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def split_heads(qkv, heads):
    """(B, L, 3 * heads * head_dim), laid out (3, heads, head_dim) -> q, k, v each (B, heads, L, head_dim)."""
    return qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


@dataclass
class TeacherOutput:
    v: torch.Tensor                   # (B, 16, H, W)
    attn: dict                        # block index -> (B, N_img, N_txt)


class Teacher(nn.Module):
    """What both families share: block calls (optionally checkpointed), input checks, the output."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False

    @property
    def variant(self) -> str:
        return self.cfg.variant

    @property
    def takes_guidance(self) -> bool:
        return getattr(self.cfg, "guidance_embed", False)

    def run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @property
    def latent_channels(self) -> int:  # 16 for every real teacher; FLUX's in_channels count the 2x2 packing
        return self.cfg.in_channels // (4 if isinstance(self.cfg, FluxConfig) else 1)

    def check(self, x, sigma, guidance, attn_blocks, n_blocks):
        c = self.latent_channels
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"{self.variant}: latent must be (B, {c}, H, W) with even H, W; got {tuple(x.shape)}")
        if guidance is None and self.takes_guidance:
            raise ValueError(f"{self.variant} embeds the guidance scale: pass guidance=(B,) (e.g. 3.5)")
        if guidance is not None and not self.takes_guidance:
            raise ValueError(f"{self.variant} has no guidance embedding: pass guidance=None")
        attn_blocks = tuple(attn_blocks or ())
        if any(not 0 <= i < n_blocks for i in attn_blocks):
            raise ValueError(f"{self.variant}: attn_blocks {tuple(attn_blocks)} outside 0..{n_blocks - 1}")
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(B)
        if guidance is not None:
            guidance = torch.as_tensor(guidance, dtype=torch.float32, device=x.device).expand(B)
        return sigma, guidance, attn_blocks

    @staticmethod
    def output(v, maps, attn_blocks):
        return TeacherOutput(v, maps) if attn_blocks else v


class FinalLayer(nn.Module):  # same keys in both families: final_layer.{adaLN_modulation.1, linear}
    def __init__(self, dim, out):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        (m,) = mods(self.adaLN_modulation(vec), x.shape[-1])
        return self.linear(m(layer_norm(x)))


# ----------------------------------------------------------------------------- SD3 / SD3.5 (MMDiT, MMDiT-X)
class SelfAttention(nn.Module):
    def __init__(self, dim, heads, qk_norm, pre_only=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q = RMSNorm(dim // heads) if qk_norm else None
        self.ln_k = RMSNorm(dim // heads) if qk_norm else None
        self.proj = None if pre_only else nn.Linear(dim, dim)  # the last context block only feeds keys/values

    def qkv_heads(self, x):
        q, k, v = split_heads(self.qkv(x), self.heads)  # each (B, heads, L, head_dim)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DismantledBlock(nn.Module):
    """One stream of a joint block (Stability's name). adaLN sets: pre-only (shift, scale); normal attn, mlp;
    MMDiT-X attn, mlp, attn2 (9 chunks: a second self-attention on the image stream)."""

    def __init__(self, cfg, pre_only=False, attn2=False):
        super().__init__()
        C = cfg.hidden
        n = 2 if pre_only else 9 if attn2 else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, n * C))
        self.attn = SelfAttention(C, cfg.heads, cfg.qk_norm, pre_only)
        self.attn2 = SelfAttention(C, cfg.heads, cfg.qk_norm) if attn2 else None
        self.mlp = None if pre_only else Mlp(C, int(C * cfg.mlp_ratio))


class JointBlock(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        self.context_block = DismantledBlock(cfg, pre_only=i == cfg.depth - 1)
        self.x_block = DismantledBlock(cfg, attn2=i in cfg.attn2_blocks)

    def forward(self, txt: Tensor, img: Tensor, vec: Tensor, want_map: bool
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        cb, xb = self.context_block, self.x_block
        cm, xm = mods(cb.adaLN_modulation(vec), vec.shape[-1]), mods(xb.adaLN_modulation(vec), vec.shape[-1])
        img_norm = layer_norm(img)
        qc, kc, vc = cb.attn.qkv_heads(cm[0](layer_norm(txt)))
        qx, kx, vx = xb.attn.qkv_heads(xm[0](img_norm))
        q, k, v = torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2)  # (B, heads, Lt+Li, hd)
        out = attention(q, k, v)
        amap = text_attention(q, k, txt.shape[1]) if want_map else None
        img = img + xm[0].gate * xb.attn.proj(out[:, txt.shape[1]:])
        if xb.attn2 is not None:  # MMDiT-X: attn2 reads the block's input, modulated by its own (shift, scale)
            img = img + xm[2].gate * xb.attn2.proj(attention(*xb.attn2.qkv_heads(xm[2](img_norm))))
        img = img + xm[1].gate * xb.mlp(xm[1](layer_norm(img)))
        if cb.mlp is not None:
            txt = txt + cm[0].gate * cb.attn.proj(out[:, :txt.shape[1]])
            txt = txt + cm[1].gate * cb.mlp(cm[1](layer_norm(txt)))
        return txt, img, amap


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


class Embedder(nn.Module):  # t_embedder / y_embedder: mlp.0, SiLU, mlp.2
    def __init__(self, dim_in, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim_in, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class MMDiT(Teacher):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__(cfg)
        C, S = cfg.hidden, cfg.pos_embed_max_size
        self.x_embedder = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, S * S, C))  # stored table, centre-cropped in forward
        self.t_embedder = Embedder(256, C)
        self.y_embedder = Embedder(cfg.pooled_dim, C)
        self.context_embedder = nn.Linear(cfg.context_dim, C)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(C, cfg.patch_size ** 2 * cfg.in_channels)

    def cropped_pos_embed(self, gh, gw):
        S = self.cfg.pos_embed_max_size
        if gh > S or gw > S:
            raise ValueError(f"{self.variant}: latent {2 * gh}x{2 * gw} is a {gh}x{gw} patch grid; the position "
                             f"table covers at most {S}x{S} patches (latent {2 * S}x{2 * S})")
        top, left = (S - gh) // 2, (S - gw) // 2
        return self.pos_embed.view(1, S, S, -1)[:, top:top + gh, left:left + gw].reshape(1, gh * gw, -1)

    def forward(self, x: Tensor, sigma: Tensor, context: Tensor, pooled: Tensor, guidance: Tensor | None = None,
                attn_blocks: tuple = ()) -> Tensor | TeacherOutput:
        sigma, _, attn_blocks = self.check(x, sigma, guidance, attn_blocks, self.cfg.depth)
        B, _, H, W = x.shape
        p, dtype = self.cfg.patch_size, self.pos_embed.dtype
        img = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(H // p, W // p)  # (B, N_img, C)
        vec = self.t_embedder(timestep_embedding(1000 * sigma).to(dtype)) + self.y_embedder(pooled.to(dtype))
        txt = self.context_embedder(context.to(dtype))  # (B, N_txt, C)
        maps = {}
        for i, block in enumerate(self.joint_blocks):
            txt, img, amap = self.run(block, txt, img, vec, i in attn_blocks)
            if amap is not None:
                maps[i] = amap
        out = self.final_layer(img, vec)  # (B, h*w, p*p*16) ordered (p, q, c)
        c = self.cfg.in_channels
        v = out.view(B, H // p, W // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, H, W)
        return self.output(v, maps, attn_blocks)


# ----------------------------------------------------------------------------- FLUX.1
class QKNorm(nn.Module):
    def __init__(self, head_dim):
        super().__init__()
        self.query_norm, self.key_norm = ScaleRMSNorm(head_dim), ScaleRMSNorm(head_dim)


class FluxAttention(nn.Module):  # img_attn / txt_attn: qkv, norm.{query,key}_norm.scale, proj
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        q, k, v = split_heads(self.qkv(x), self.heads)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class Modulation(nn.Module):  # BFL img_mod / txt_mod / modulation: .lin
    def __init__(self, dim, n):
        super().__init__()
        self.lin = nn.Linear(dim, n * dim)

    def forward(self, vec: Tensor) -> list[Mod]:
        return mods(self.lin(F.silu(vec)), vec.shape[-1])


class MLPEmbedder(nn.Module):  # time_in / vector_in / guidance_in
    def __init__(self, dim_in, dim):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(dim_in, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


def flux_mlp(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, M = cfg.hidden, int(cfg.hidden * cfg.mlp_ratio)
        self.img_mod, self.img_attn, self.img_mlp = Modulation(C, 6), FluxAttention(C, cfg.heads), flux_mlp(C, M)
        self.txt_mod, self.txt_attn, self.txt_mlp = Modulation(C, 6), FluxAttention(C, cfg.heads), flux_mlp(C, M)

    def forward(self, txt: Tensor, img: Tensor, vec: Tensor, pe: Tensor, want_map: bool
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        im, tm = self.img_mod(vec), self.txt_mod(vec)
        qi, ki, vi = self.img_attn.qkv_heads(im[0](layer_norm(img)))
        qt, kt, vt = self.txt_attn.qkv_heads(tm[0](layer_norm(txt)))
        q, k = apply_rope(torch.cat([qt, qi], 2), pe), apply_rope(torch.cat([kt, ki], 2), pe)
        out = attention(q, k, torch.cat([vt, vi], 2))  # (B, Lt+Li, C)
        amap = text_attention(q, k, txt.shape[1]) if want_map else None
        img = img + im[0].gate * self.img_attn.proj(out[:, txt.shape[1]:])
        img = img + im[1].gate * self.img_mlp(im[1](layer_norm(img)))
        txt = txt + tm[0].gate * self.txt_attn.proj(out[:, :txt.shape[1]])
        txt = txt + tm[1].gate * self.txt_mlp(tm[1](layer_norm(txt)))
        return txt, img, amap


class SingleBlock(nn.Module):
    """Parallel attention + MLP on the joint sequence: linear1 = [q, k, v, mlp_in], linear2 = [attn, mlp] -> out."""

    def __init__(self, cfg):
        super().__init__()
        C, self.mlp_hidden, self.heads = cfg.hidden, int(cfg.hidden * cfg.mlp_ratio), cfg.heads
        self.linear1 = nn.Linear(C, 3 * C + self.mlp_hidden)
        self.linear2 = nn.Linear(C + self.mlp_hidden, C)
        self.norm = QKNorm(C // cfg.heads)
        self.modulation = Modulation(C, 3)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        (m,) = self.modulation(vec)
        qkv, mlp = self.linear1(m(layer_norm(x))).split([x.shape[-1] * 3, self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.heads)
        q, k = apply_rope(self.norm.query_norm(q), pe), apply_rope(self.norm.key_norm(k), pe)
        out = attention(q, k, v)
        return x + m.gate * self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], dim=-1))


class Flux(Teacher):
    def __init__(self, cfg: FluxConfig):
        super().__init__(cfg)
        C = cfg.hidden
        self.img_in = nn.Linear(cfg.in_channels, C)
        self.time_in = MLPEmbedder(256, C)
        self.vector_in = MLPEmbedder(cfg.pooled_dim, C)
        self.guidance_in = MLPEmbedder(256, C) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.context_dim, C)
        self.double_blocks = nn.ModuleList(DoubleBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = FinalLayer(C, cfg.in_channels)

    def forward(self, x: Tensor, sigma: Tensor, context: Tensor, pooled: Tensor, guidance: Tensor | None = None,
                attn_blocks: tuple = ()) -> Tensor | TeacherOutput:
        sigma, guidance, attn_blocks = self.check(x, sigma, guidance, attn_blocks, self.cfg.depth)
        B, c, H, W = x.shape
        h, w, dtype = H // 2, W // 2, self.img_in.weight.dtype
        # 2x2 packing as the diffusers pipeline's _pack_latents: token (row, col), channels ordered (c, dy, dx)
        img = x.reshape(B, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, c * 4)
        img = self.img_in(img.to(dtype))
        vec = self.time_in(timestep_embedding(1000 * sigma).to(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(1000 * guidance).to(dtype))
        vec = vec + self.vector_in(pooled.to(dtype))
        txt = self.txt_in(context.to(dtype))
        n_txt = txt.shape[1]
        # ids: text (0, 0, 0); image (0, row, col) over the packed grid
        ids = torch.zeros(n_txt + h * w, 3, device=x.device)
        ids[n_txt:, 1] = torch.arange(h, device=x.device).repeat_interleave(w)
        ids[n_txt:, 2] = torch.arange(w, device=x.device).repeat(h)
        pe = rope(ids, self.cfg.axes_dim, self.cfg.theta)
        maps = {}
        for i, block in enumerate(self.double_blocks):
            txt, img, amap = self.run(block, txt, img, vec, pe, i in attn_blocks)
            if amap is not None:
                maps[i] = amap
        seq = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            seq = self.run(block, seq, vec, pe)
        out = self.final_layer(seq[:, n_txt:], vec)  # (B, h*w, 64)
        v = out.view(B, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, c, H, W)
        return self.output(v, maps, attn_blocks)
