"""CLIP as a judge of images: the vision tower (a ViT) beside our CLIP text tower, CLIP's image preprocessing, and
the two public layouts of a whole CLIP: transformers' `CLIPModel` (OpenAI CLIP ViT-L/14, PickScore v1: keys
`text_model.*`, `vision_model.*`, `visual_projection`, `text_projection`, `logit_scale`) and OpenCLIP's (HPSv2.1,
ViT-g/14: `visual.*`, `transformer.*`, fused attention in-projections, projections stored transposed), mapped onto
one set of modules by a flat name map.

    clip = load_clip_model(path)                       # -> CLIPModel: .text, .vision, .logit_scale, .tokenizer
    img, txt = clip.embed_images(pil_images), clip.embed_texts(prompts)   # unit vectors (B, projection)

Vision tower (transformers CLIPVisionTransformer, OpenAI clip/model.py VisionTransformer): patch conv (no bias) ->
[class token; patches] + positions -> LayerNorm (`pre_layrnorm`, sic) -> pre-LN blocks (no causal mask) -> LayerNorm
of the class token (`post_layernorm`) -> a bias-free projection. Preprocessing (CLIPImageProcessor): the shortest
side to 224 with PIL bicubic, centre crop 224, [0, 1], normalised by OpenAI's mean and std below.
References: Radford et al. 2021 (CLIP); transformers models/clip/modeling_clip.py and image_processing_clip.py;
open_clip src/open_clip/transformer.py (layout).
"""
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from text.encoders import CLIPLayer, CLIPTextModel, LayerNorm, clip_config
from text.tokenizer import CLIPTokenizer
from weights import Checkpoint, CheckpointError, build_meta, component_config, describe, load_state

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing (transformers OPENAI_CLIP_MEAN / STD)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Defaults: OpenAI CLIP ViT-L/14 at 224 px (openai/clip-vit-large-patch14)."""
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp: int = 4096
    act: str = "quick_gelu"  # OpenAI; OpenCLIP's LAION models (ViT-H/14, ViT-g/14) use exact GELU
    eps: float = 1e-5
    projection: int = 768


PRESETS = {
    "vit_l14": CLIPVisionConfig(),
    "vit_h14": CLIPVisionConfig(width=1280, layers=32, heads=16, mlp=5120, act="gelu", projection=1024),  # PickScore,
    "vit_g14": CLIPVisionConfig(width=1408, layers=40, heads=16, mlp=6144, act="gelu", projection=1024),  # HPSv2.1
    "tiny": CLIPVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp=128, projection=32),
}


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, C)
        return x + self.position_embedding.weight[:x.shape[1]]


class CLIPVisionModel(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = nn.ModuleDict(dict(  # attribute paths = transformers' key names
            embeddings=VisionEmbeddings(cfg), pre_layrnorm=LayerNorm(cfg.width, eps=cfg.eps),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(CLIPLayer(cfg, causal=False) for _ in range(cfg.layers)))),
            post_layernorm=LayerNorm(cfg.width, eps=cfg.eps)))
        self.visual_projection = nn.Linear(cfg.width, cfg.projection, bias=False)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, S, S), preprocessed -> image embeddings (B, projection), not normalised."""
        m = self.vision_model
        x = m.pre_layrnorm(m.embeddings(pixels))
        for layer in m.encoder.layers:
            x = layer(x)
        return self.visual_projection(m.post_layernorm(x[:, 0]))  # the class token


def preprocess(images: list, size: int = 224) -> Tensor:
    """PIL images -> (B, 3, size, size) as CLIPImageProcessor: shortest side to `size` (PIL bicubic; the longer side
    int(size * long / short)), centre crop (offsets rounded down), [0, 1], normalised."""
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        short, long = min(w, h), max(w, h)
        new = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
        im = im.resize(new, Image.BICUBIC)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        x = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out.append((torch.from_numpy(x).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None])
                   / torch.tensor(STD)[:, None, None])
    return torch.stack(out)


@dataclass
class CLIPModel:
    text: CLIPTextModel
    vision: CLIPVisionModel
    logit_scale: Tensor  # () the log of the softmax temperature's inverse: PickScore's score is its exp times cos
    tokenizer: CLIPTokenizer

    @torch.no_grad()
    def embed_images(self, images: list) -> Tensor:
        """PIL images -> unit image embeddings (B, projection), fp32."""
        pixels = preprocess(images, self.vision.cfg.image_size).to(self.vision.visual_projection.weight.device)
        return F.normalize(self.vision(pixels).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> Tensor:
        """Prompts (cut to 77 tokens) -> unit text embeddings (B, projection), fp32."""
        ids = self.tokenizer.encode(prompts).to(self.vision.visual_projection.weight.device)
        return F.normalize(self.text(ids).pooled_projected.float(), dim=-1)


# ----------------------------------------------------------------------------- the OpenCLIP layout
def open_clip_names(text_layers: int, vision_layers: int) -> dict:
    """Flat map OpenCLIP key -> our key(s). A tuple of three: the fused in_proj split into q, k, v (dim 0); keys in
    TRANSPOSED (`visual.proj`, `text_projection`: (width, projection)) are stored as x @ P, ours as linears."""
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    names = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
             "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight",
             "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight", "logit_scale": "logit_scale"}
    for src, dst in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                     ("ln_final", "text_model.final_layer_norm")):
        names |= {f"{src}.{p}": f"{dst}.{p}" for p in ("weight", "bias")}
    for src, dst, n in (("visual.transformer", "vision_model", vision_layers),
                        ("transformer", "text_model", text_layers)):
        for i in range(n):
            a, b = f"{src}.resblocks.{i}.", f"{dst}.encoder.layers.{i}."
            names |= {a + s + "." + p: b + d + "." + p for s, d in block.items() for p in ("weight", "bias")}
            names |= {a + "attn.in_proj_" + p: tuple(b + f"self_attn.{q}_proj.{p}" for q in "qkv")
                      for p in ("weight", "bias")}
    return names


TRANSPOSED = ("visual.proj", "text_projection")


def from_open_clip(tensors: dict) -> dict:
    """OpenCLIP-named tensors -> ours (unknown names kept, so that load_state reports them)."""
    layers = lambda p: 1 + max((int(k[len(p):].split(".")[0]) for k in tensors if k.startswith(p)), default=-1)
    out = {}
    for src, dst in open_clip_names(layers("transformer.resblocks."), layers("visual.transformer.resblocks.")).items():
        if src not in tensors:
            continue
        t = tensors.pop(src)
        t = t.t().contiguous() if src in TRANSPOSED else t
        out |= dict(zip(dst, t.chunk(3), strict=True)) if isinstance(dst, tuple) else {dst: t}
    return out | tensors


# ----------------------------------------------------------------------------- loading
def vision_config(shapes: dict, hf: dict | None, source) -> CLIPVisionConfig:
    """Read off the shapes (our names); heads and activation by the released models' conventions (head width 64 up to
    width 1024, else 16 heads; exact GELU for OpenCLIP's LAION widths 1280 / 1408 / 1664), unless a transformers
    config.json's vision_config says."""
    try:
        width, _, patch, _ = shapes["vision_model.embeddings.patch_embedding.weight"]
        positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
        mlp = shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0]
        projection = shapes["visual_projection.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"{source}: CLIP vision tower without key {e.args[0]}") from None
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("vision_model.encoder.layers."))
    side = math.isqrt(positions - 1)
    cfg = CLIPVisionConfig(image_size=side * patch, patch_size=patch, width=width, layers=layers,
                           heads=width // 64 if width <= 1024 else 16, mlp=mlp,
                           act="gelu" if width in (1280, 1408, 1664) else "quick_gelu", projection=projection)
    hf = hf or {}
    cfg = replace(cfg, heads=hf.get("num_attention_heads", cfg.heads), act=hf.get("hidden_act", cfg.act),
                  eps=hf.get("layer_norm_eps", cfg.eps))
    if side * side != positions - 1 or cfg.width % cfg.heads or cfg.act not in ("gelu", "quick_gelu"):
        raise CheckpointError(f"{source}: unsupported CLIP vision tower ({positions} positions, {cfg.heads} heads, "
                              f"{cfg.act})")
    return cfg


def load_clip_model(path, dtype=None, device=None) -> CLIPModel:
    """A whole CLIP from a transformers CLIPModel file or folder (model.safetensors + config.json) or an OpenCLIP
    state dict converted to safetensors (metrics/convert_pickle.py). The tokenizer: OpenAI's BPE, padded with
    <|endoftext|> (OpenCLIP pads with 0: under the causal mask no pad changes the state pooled at the first one)."""
    ckpt = Checkpoint(path)
    keys = set(ckpt.keys())
    open_clip = "visual.conv1.weight" in keys
    if not open_clip and "vision_model.embeddings.patch_embedding.weight" not in keys:
        raise CheckpointError(f"{ckpt.path}: not a CLIP with a vision tower; it looks like {describe(keys)}")
    shapes = {k: torch.empty(ckpt.shape(k), device="meta") for k in keys}  # renamed as the tensors will be
    shapes = {k: tuple(v.shape) for k, v in (from_open_clip(shapes) if open_clip else shapes).items()}
    hf = {} if open_clip else component_config(ckpt.path)
    text_cfg = clip_config({k: v for k, v in shapes.items() if k.startswith(("text_model.", "text_projection"))},
                           hf.get("text_config"), ckpt.path)
    text = build_meta(CLIPTextModel, text_cfg)
    vision = build_meta(CLIPVisionModel, vision_config(shapes, hf.get("vision_config"), ckpt.path))
    state = ckpt.tensors(dtype=dtype or torch.float32, device=device or "cpu")
    state = from_open_clip(state) if open_clip else state
    if "logit_scale" not in state:
        raise CheckpointError(f"{ckpt.path}: CLIP without logit_scale")
    logit_scale = state.pop("logit_scale").float()
    load_state(text, {k: v for k, v in state.items() if k.startswith(("text_model.", "text_projection"))}, ckpt.path)
    load_state(vision, {k: v for k, v in state.items() if not k.startswith(("text_model.", "text_projection"))},
               ckpt.path)
    return CLIPModel(text.eval(), vision.eval(), logit_scale, CLIPTokenizer())
