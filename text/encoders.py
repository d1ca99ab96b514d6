"""Text encoders: CLIP text transformers (OpenAI ViT-L/14, OpenCLIP ViT-bigG/14) and the T5 v1.1 encoder.

CLIP-L conditions SD 1.5 (last hidden state), SD3 (penultimate + pooled) and FLUX (pooled); CLIP-G conditions SD3;
T5 v1.1 XXL conditions SD3 and FLUX. Module paths mirror the public files (`text_model.*`, `text_projection`,
`encoder.block.N.layer.*`), so those load with a strict `load_state_dict` and no name map.
References: Radford et al. 2021 (CLIP), OpenAI `clip/model.py`; Raffel et al. 2020 (T5) and the T5 v1.1 release
notes (gated GELU, no bias, untied head); transformers `modeling_clip.py` / `modeling_t5.py` for key names.
"""
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from weights import BENIGN, Checkpoint, CheckpointError, build_meta, describe, load_state


def check_ids(input_ids: torch.Tensor, vocab_size: int, encoder: str) -> None:
    """A tokenizer that is not the encoder's own gives ids past its embedding table: say so in one line, not an
    IndexError (e.g. a toy model whose tokenizer.json went missing falls back to CLIP's 49408-token BPE)."""
    top = int(input_ids.max())
    if top >= vocab_size:
        raise CheckpointError(f"{encoder}: token id {top} is past its vocabulary of {vocab_size}: the tokenizer is not "
                              "this encoder's (a toy model's tokenizer.json must lie beside its checkpoint)")


# ---------------------------------------------------------------------------------------------------------------- CLIP


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    act: str = "quick_gelu"  # OpenAI CLIP: x * sigmoid(1.702 x); OpenCLIP bigG: exact (erf) GELU
    eps: float = 1e-5
    projection: int | None = None  # output size of `text_projection` (a bias-free linear); None: no projection
    eos_id: int = 49407  # <|endoftext|>: the pooled output is read at its first occurrence


_CLIP_L = CLIPTextConfig()
_CLIP_G = replace(_CLIP_L, width=1280, layers=32, heads=20, mlp=5120, act="gelu", projection=1280)
PRESETS = {  # CLIP text towers
    "clip_l": _CLIP_L,  # OpenAI CLIP ViT-L/14 text tower (SD 1.5 `text_encoder/`, `clip_l.safetensors`)
    "clip_g": _CLIP_G,  # OpenCLIP ViT-bigG/14 text tower (SD3 `text_encoder_2/`, `clip_g.safetensors`)
    # Same structure and vocabulary (so the real tokenizer drives them), few channels; head size kept at 64 as in
    # the real models, because single files carry no head count and the loader infers it as width // 64. (Read from
    # a single file, tiny_g gets quick GELU: the activation rule goes by width, so tests load it with a config.json.)
    "tiny_l": replace(_CLIP_L, width=128, layers=3, heads=2, mlp=256),
    "tiny_g": replace(_CLIP_G, width=128, layers=3, heads=2, mlp=256, projection=128),
}


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (bf16 statistics over 768-1280 channels lose precision), returned in x's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.heads, self.causal = cfg.heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, heads, T, head_dim)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # the text tower is causal, vision not
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = cfg.act
        self.fc1, self.fc2 = nn.Linear(cfg.width, cfg.mlp), nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)  # 1.702: OpenAI clip/model.py
        return self.fc2(h)


class CLIPLayer(nn.Module):
    """Pre-LN transformer block (also the vision tower's, metrics/clip.py, there not causal)."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = LayerNorm(cfg.width, eps=cfg.eps), LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn, self.mlp = CLIPAttention(cfg, causal), CLIPMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


@dataclass
class CLIPOutput:
    last_hidden_state: torch.Tensor  # (B, T, width) after the final LayerNorm (SD 1.5 context)
    penultimate_hidden_state: torch.Tensor  # (B, T, width) output of the second-to-last layer, no LayerNorm (SD3)
    pooled: torch.Tensor  # (B, width) last_hidden_state at the first <|endoftext|> (FLUX pooled vector)
    pooled_projected: torch.Tensor  # (B, projection) text_projection(pooled); = pooled without a projection (SD3)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        # Plain containers so that parameter names are the public ones: text_model.embeddings.token_embedding, ...
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
                                          position_embedding=nn.Embedding(cfg.max_positions, cfg.width))),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers)))),
            final_layer_norm=LayerNorm(cfg.width, eps=cfg.eps)))
        self.text_projection = nn.Linear(cfg.width, cfg.projection, bias=False) if cfg.projection else None

    def forward(self, input_ids: Tensor) -> CLIPOutput:
        B, T = input_ids.shape
        check_ids(input_ids, self.cfg.vocab_size, "CLIP text encoder")
        emb, layers = self.text_model.embeddings, self.text_model.encoder.layers
        x = emb.token_embedding(input_ids) + emb.position_embedding(torch.arange(T, device=input_ids.device))
        penultimate = x
        for i, layer in enumerate(layers):
            if i == len(layers) - 1:
                penultimate = x
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        last = self.text_model.final_layer_norm(x)
        eos = (input_ids == self.cfg.eos_id).int().argmax(dim=-1)  # first <|endoftext|> (pads may repeat it)
        pooled = last[torch.arange(B, device=last.device), eos]
        projected = pooled if self.text_projection is None else self.text_projection(pooled)
        return CLIPOutput(last, penultimate, pooled, projected)


def clip_config(shapes: dict, hf_config: dict | None = None, source="checkpoint") -> CLIPTextConfig:
    """Config read off the native key -> shape dict (`text_model.*`, optional `text_projection.weight`).
    Activation: OpenCLIP towers (width 1024 ViT-H, 1280 ViT-bigG) use exact GELU, OpenAI ones (512, 768) quick GELU;
    a diffusers/transformers `config.json` (hf_config), when there is one, has the last word."""
    try:
        vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
        positions = shapes["text_model.embeddings.position_embedding.weight"][0]
        mlp = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"{source}: CLIP text encoder without key {e.args[0]}") from None
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("text_model.encoder.layers."))
    proj = shapes.get("text_projection.weight", (None,))[0]
    cfg = CLIPTextConfig(vocab_size=vocab, max_positions=positions, width=width, layers=layers, heads=width // 64,
                         mlp=mlp, act="gelu" if width in (1024, 1280) else "quick_gelu", projection=proj)
    hf = hf_config or {}
    cfg = replace(cfg, act=hf.get("hidden_act", cfg.act), heads=hf.get("num_attention_heads", cfg.heads),
                  eps=hf.get("layer_norm_eps", cfg.eps))
    if cfg.heads < 1 or cfg.width % cfg.heads:  # head size 64 in every released CLIP; a file can't say otherwise
        raise CheckpointError(f"{source}: CLIP width {width} does not split into heads of 64; put a config.json "
                              "(num_attention_heads) beside the weights")
    if cfg.act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{source}: unsupported CLIP activation {cfg.act!r}")
    return cfg


def _hf_config(path: Path, model_type: str) -> dict | None:
    """The transformers `config.json` beside the weights (diffusers component folders have one), if it matches."""
    file = (path if path.is_dir() else path.parent) / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return cfg if model_type in str(cfg.get("model_type", "")) else None


def load_clip(path, dtype=None, device=None) -> CLIPTextModel:
    """A CLIP text encoder from: an SD 1.5 single file (`cond_stage_model.transformer.text_model.*`),
    `text_encoders/clip_l.safetensors` / `clip_g.safetensors` (`text_model.*`, `text_projection.weight`),
    a diffusers `text_encoder/` or `text_encoder_2/` folder (sharded or not, prefixed or the unprefixed layout of
    transformers 5 `save_pretrained`). CLIP-L vs CLIP-G and all sizes are read off the shapes."""
    ckpt = Checkpoint(path)
    anchor = "embeddings.token_embedding.weight"
    found = [k[:-len(anchor)] for k in ckpt.keys() if k.endswith(anchor) and "vision_model" not in k]
    if len(found) != 1:
        what = f"several CLIP text encoders {found}" if found else describe(ckpt.keys())
        raise CheckpointError(f"{path}: expected one CLIP text encoder, found {what}")
    prefix = found[0]  # e.g. "cond_stage_model.transformer.text_model.", "text_model.", or "" (transformers 5)
    base = prefix[:-len("text_model.")] if prefix.endswith("text_model.") else prefix
    inner = ("embeddings.", "encoder.", "final_layer_norm.")

    def rename(k):  # k without `base`; native names are `text_model.*` and `text_projection.weight`
        return "text_model." + k if k.startswith(inner) else k

    shapes = {rename(k): s for k, s in ckpt.shapes(base).items() if not BENIGN.search(k)}
    cfg = clip_config(shapes, _hf_config(Path(path), "clip"), ckpt.path)
    model = build_meta(CLIPTextModel, cfg)
    return load_state(model, ckpt.tensors(base, rename, dtype or torch.float32, device or "cpu"), ckpt.path).eval()


# ------------------------------------------------------------------------------------------------------------------ T5


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    layers: int = 24
    heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    buckets: int = 32  # relative attention buckets (half for each direction)
    max_distance: int = 128  # relative distances >= this share the last bucket
    eps: float = 1e-6


_T5XXL = T5Config()  # google/t5-v1_1-xxl config.json
T5_PRESETS = {"t5xxl": _T5XXL, "tiny": replace(_T5XXL, d_model=64, layers=3, heads=4, d_kv=16, d_ff=128)}


class RMSNorm(nn.Module):
    """T5's LayerNorm: scale only, no mean, no bias. Computed in fp32, returned in the weight's (compute) dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(self.weight.dtype)


def relative_buckets(T: int, buckets: int, max_distance: int, device) -> torch.Tensor:
    """(T, T) bucket of key position - query position: half the buckets per direction, the first half of those
    exact distances, the rest log-spaced up to max_distance (T5 / Mesh TensorFlow `_relative_position_bucket`)."""
    pos = torch.arange(T, device=device)
    rel = pos[None, :] - pos[:, None]  # (query, key)
    half = buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    log = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return out + torch.where(rel < exact, rel, log.clamp(max=half - 1))


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        # Only the first block owns the table; its bias is shared by every block (T5 computes it once).
        self.relative_attention_bias = nn.Embedding(cfg.buckets, cfg.heads) if has_bias else None

    def position_bias(self, T: int, device) -> torch.Tensor:
        idx = relative_buckets(T, self.cfg.buckets, self.cfg.max_distance, device)
        return self.relative_attention_bias.weight.float()[idx].permute(2, 0, 1)[None]  # (1, heads, T, T) fp32

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.cfg.heads, self.cfg.d_kv).transpose(1, 2)  # (B, heads, T, d_kv)
                   for p in (self.q, self.k, self.v))
        # Scores, bias and softmax in fp32: the bias is large next to bf16 resolution. scale=1: T5 has no
        # 1/sqrt(d_kv) (folded into its init), so the default SDPA scale would be wrong.
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias, scale=1.0)
        return self.o(y.to(x.dtype).transpose(1, 2).reshape(B, T, -1))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention, self.layer_norm = T5Attention(cfg, has_bias), RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.SelfAttention(self.layer_norm(x), bias)


class T5GatedFF(nn.Module):
    """T5 v1.1 gated GELU: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # gate
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # "gelu_new" in the T5 v1.1 config
        if h.dtype == torch.float16:  # T5 v1.1's FF outputs exceed fp16's range: that product in fp32 (bf16 is fine)
            return F.linear(h.float(), self.wo.weight.float())
        return self.wo(h)


class T5FFLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense, self.layer_norm = T5GatedFF(cfg), RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(cfg, has_bias), T5FFLayer(cfg)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        # x is the fp32 residual stream: T5 v1.1 XXL activations grow to ~1e4 and beyond, where bf16 keeps only
        # 2-3 significant digits and small updates would vanish; each sublayer computes in the weights' dtype.
        x = x + self.layer[0](x, bias).float()
        return x + self.layer[1](x).float()


class T5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)  # files may also hold encoder.embed_tokens (tied)
        self.encoder = nn.ModuleDict(dict(block=nn.ModuleList(T5Block(cfg, i == 0) for i in range(cfg.layers)),
                                          final_layer_norm=RMSNorm(cfg.d_model, cfg.eps)))

    def forward(self, input_ids: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, d_model) last hidden state, in the weights' dtype. No padding mask: the SD3 and FLUX
        pipelines attend to the pad tokens too."""
        blocks = self.encoder.block
        check_ids(input_ids, self.cfg.vocab_size, "T5 encoder")
        x = self.shared(input_ids).float()
        bias = blocks[0].layer[0].SelfAttention.position_bias(input_ids.shape[1], input_ids.device)
        for block in blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def t5_config(shapes: dict, hf_config: dict | None = None, source="checkpoint") -> T5Config:
    """Config read off the native key -> shape dict (`shared.weight`, `encoder.block.*`); a transformers
    `config.json` (hf_config), when there is one, supplies what shapes can't (max distance, eps)."""
    attn = "encoder.block.0.layer.0.SelfAttention."
    try:
        vocab, d_model = shapes["shared.weight"]
        buckets, heads = shapes[attn + "relative_attention_bias.weight"]
        inner = shapes[attn + "q.weight"][0]
        d_ff = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"{source}: T5 v1.1 encoder without key {e.args[0]} (only gated-GELU T5 v1.1 "
                              f"encoders are supported)") from None
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block."))
    hf = hf_config or {}
    return T5Config(vocab_size=vocab, d_model=d_model, layers=layers, heads=heads, d_kv=inner // heads, d_ff=d_ff,
                    buckets=buckets, max_distance=hf.get("relative_attention_max_distance", 128),
                    eps=hf.get("layer_norm_epsilon", 1e-6))


def load_t5(path, dtype=None, device=None) -> T5Encoder:
    """A T5 v1.1 encoder from `text_encoders/t5xxl_fp16.safetensors`, a diffusers `text_encoder_3/` (or FLUX
    `text_encoder_2/`) folder, sharded or not, or any file holding one under a prefix. `encoder.embed_tokens.weight`
    (tied to `shared.weight`) may be present or not; decoder weights, if any, are ignored."""
    ckpt = Checkpoint(path)
    anchor = "encoder.block.0.layer.0.SelfAttention.q.weight"
    found = [k[:-len(anchor)] for k in ckpt.keys() if k.endswith(anchor)]
    if len(found) != 1:
        what = f"several T5 encoders {found}" if found else describe(ckpt.keys())
        raise CheckpointError(f"{path}: expected one T5 encoder, found {what}")
    prefix = found[0]
    has_shared = prefix + "shared.weight" in ckpt

    def rename(k):  # k without prefix
        if k.startswith(("decoder.", "lm_head.")):
            return None
        if k == "encoder.embed_tokens.weight":  # the tied copy: use it only if `shared` is absent
            return None if has_shared else "shared.weight"
        return k

    shapes = {n: s for k, s in ckpt.shapes(prefix).items() if (n := rename(k)) is not None}
    cfg = t5_config(shapes, _hf_config(Path(path), "t5"), ckpt.path)
    model = build_meta(T5Encoder, cfg)
    return load_state(model, ckpt.tensors(prefix, rename, dtype or torch.float32, device or "cpu"), ckpt.path).eval()
