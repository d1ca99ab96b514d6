"""Everything done with a teacher network of teacher_mmdit.py, apart from its forward: load it from any layout
(`load_teacher`: detection by key shapes, the flat diffusers name map), find its VAE, give it the fake score's LoRA
(`add_lora`, `lora_enabled`), and sample it with Euler flow matching as the diffusers pipelines do (`sample_flow`).

Layouts: Stability single files (`model.diffusion_model.*`), BFL files (no prefix, or a repacked
`model.diffusion_model.` prefix), diffusers `transformer/` folders (sharded or not) and pipeline roots. Diffusers names
go through `teacher_key_map` (original key -> diffusers key(s)).

References: diffusers 0.42 transformer_sd3.py / transformer_flux.py / single_file_utils.py (names),
schedulers/scheduling_flow_match_euler_discrete.py and the SD3 / FLUX pipelines (sampling); Hu et al. 2021 (LoRA).
"""
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from teacher_mmdit import PRESETS, Flux, FluxConfig, MMDiT, MMDiTConfig
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

# ----------------------------------------------------------------------------- LoRA
LORA_TARGETS = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2",  # SD3
                "img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj",  # FLUX double
                "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")  # FLUX mlp, single
LORA_MODULATION = ("adaLN_modulation.1", "img_mod.lin", "txt_mod.lin", "modulation.lin")  # optional extra targets


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update: y = W x + b + (alpha / rank) up(down(x)).
    The base Parameters are the wrapped nn.Linear's own (no copy) and stay at `.weight` / `.bias`, so the base
    state_dict keys are unchanged; LoRA adds `.lora_down.weight` / `.lora_up.weight`. `up` starts at zero, so a
    fresh LoRA changes nothing. The low-rank path runs in the LoRA dtype (fp32 by default) for stable training."""

    def __init__(self, base: nn.Linear, rank, alpha, dtype):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_down = nn.Linear(base.in_features, rank, **kw)  # default (kaiming) init
        self.lora_up = nn.Linear(rank, base.out_features, **kw)
        nn.init.zeros_(self.lora_up.weight)
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + (self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * self.scale).to(y.dtype)


def add_lora(model, rank, alpha=None, targets=LORA_TARGETS, dtype=torch.float32) -> list:
    """Wrap every nn.Linear in a block whose name ends with one of `targets` (add LORA_MODULATION for the adaLN
    linears) in a LoRALinear; freeze everything else. Returns the LoRA parameters (the only ones needing grad)."""
    model.requires_grad_(False)
    hits = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and "blocks." in name
            and any(name.endswith("." + t) for t in targets)]
    params = []
    for name, base in hits:
        parent, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        lora = LoRALinear(base, rank, rank if alpha is None else alpha, dtype)
        parent.add_module(attr, lora)  # replaces the child; Sequential indices (img_mlp.0) work too
        params += [lora.lora_down.weight, lora.lora_up.weight]
    return params


class lora_enabled:
    """`lora_enabled(model, flag)` switches every LoRALinear on or off right away; used as `with lora_enabled(m,
    False): ...` it restores the previous state on exit. LoRA off = the frozen teacher (real score), on = fake.
    Don't flip it between a checkpointed forward and its backward: the recompute would run the other branch
    (torch's checkpoint then raises "a different number of tensors was saved")."""

    def __init__(self, model, flag):
        self.layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        self.before = [m.enabled for m in self.layers]
        for m in self.layers:
            m.enabled = flag

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for m, b in zip(self.layers, self.before, strict=True):
            m.enabled = b


def shard(teacher) -> None:
    """FSDP2: shard every block, then the root (moving each to the device); each rank holds 1/world of it. Call it
    after `add_lora` and after loading any LoRA weights (their parameters become DTensors)."""
    from torch.distributed.fsdp import fully_shard
    for blocks in ("joint_blocks", "double_blocks", "single_blocks"):
        for block in getattr(teacher, blocks, []):
            fully_shard(block)
    fully_shard(teacher)


def compile_blocks(teacher) -> None:
    """torch.compile block by block ("regional compilation"): the blocks share their code, so a few compiled graphs
    serve all of them, and activation checkpointing wraps compiled blocks. Their variants (batch, grad mode, LoRA on /
    off, MMDiT-X blocks with and without attn2) exceed dynamo's default recompile limit of 8, hence 64."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for name in ("joint_blocks", "double_blocks", "single_blocks"):
        for block in getattr(teacher, name, []):
            block.compile()


# ----------------------------------------------------------------------------- diffusers names
# Diffusers names of the original modules. Joint/double-block streams map to (image-stream, text-stream) names.
_DIFFUSERS_TOP = {
    "x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",  # SD3
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "img_in": "x_embedder", "txt_in": "context_embedder",  # FLUX
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",  # both
}
_QKV, _ADD_QKV = ("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_DIFFUSERS_STREAM = {  # SD3 x_block / context_block sub-modules, FLUX img_* / txt_* sub-modules
    "adaLN_modulation.1": ("norm1.linear", "norm1_context.linear"), "mod.lin": ("norm1.linear", "norm1_context.linear"),
    "attn.qkv": (_QKV, _ADD_QKV), "attn.proj": ("attn.to_out.0", "attn.to_add_out"),
    "attn.ln_q": ("attn.norm_q", "attn.norm_added_q"), "attn.norm.query_norm": ("attn.norm_q", "attn.norm_added_q"),
    "attn.ln_k": ("attn.norm_k", "attn.norm_added_k"), "attn.norm.key_norm": ("attn.norm_k", "attn.norm_added_k"),
    "mlp.fc1": ("ff.net.0.proj", "ff_context.net.0.proj"), "mlp.0": ("ff.net.0.proj", "ff_context.net.0.proj"),
    "mlp.fc2": ("ff.net.2", "ff_context.net.2"), "mlp.2": ("ff.net.2", "ff_context.net.2"),
    "attn2.qkv": (("attn2.to_q", "attn2.to_k", "attn2.to_v"), None), "attn2.proj": ("attn2.to_out.0", None),
    "attn2.ln_q": ("attn2.norm_q", None), "attn2.ln_k": ("attn2.norm_k", None),
}
_DIFFUSERS_SINGLE = {"linear1": _QKV + ("proj_mlp",), "linear2": "proj_out", "modulation.lin": "norm.linear",
                     "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
_BLOCK = re.compile(r"(joint_blocks|double_blocks|single_blocks)\.(\d+)\.(context_block\.|x_block\.|img_|txt_)?(.*)")


def teacher_key_map(cfg) -> dict:
    """Flat map original key -> diffusers key, or a tuple of diffusers keys whose tensors concatenated along dim 0
    give the original (fused qkv; FLUX linear1 = to_q, to_k, to_v, proj_mlp). Keys in `swapped_keys(cfg)` also
    have their (shift, scale) halves stored as (scale, shift) by diffusers."""
    m = {}
    for key in build_meta(MMDiT if isinstance(cfg, MMDiTConfig) else Flux, cfg).state_dict():
        if key == "pos_embed":
            m[key] = "pos_embed.pos_embed"
            continue
        module, param = key.rsplit(".", 1)
        param = "weight" if param == "scale" else param  # BFL's RMSNorm `scale` is diffusers' `weight`
        b = _BLOCK.fullmatch(module)
        if b is None:
            base, new = "", _DIFFUSERS_TOP[module]
        elif b[1] == "single_blocks":
            base, new = f"single_transformer_blocks.{b[2]}.", _DIFFUSERS_SINGLE[b[4]]
        else:
            base, new = f"transformer_blocks.{b[2]}.", _DIFFUSERS_STREAM[b[4]][b[3] in ("context_block.", "txt_")]
        m[key] = f"{base}{new}.{param}" if isinstance(new, str) else tuple(f"{base}{n}.{param}" for n in new)
    return m


def swapped_keys(cfg) -> set:
    """Original keys whose (shift, scale) halves diffusers stores as (scale, shift): its AdaLayerNormContinuous,
    used for the final layer (both families) and SD3's last, pre-only context block."""
    names = ["final_layer.adaLN_modulation.1"]
    if isinstance(cfg, MMDiTConfig):
        names.append(f"joint_blocks.{cfg.depth - 1}.context_block.adaLN_modulation.1")
    return {n + s for n in names for s in (".weight", ".bias")}


def _swap_halves(t):
    return torch.cat(t.chunk(2)[::-1])


def from_diffusers(tensors: dict, cfg) -> dict:
    """Diffusers-named tensors -> original names, popping as it goes (one fused copy at a time). Parts that are
    missing are skipped and leftovers kept, so `load_state` reports both by name."""
    out, swap = {}, swapped_keys(cfg)
    for k, parts in teacher_key_map(cfg).items():
        parts = (parts,) if isinstance(parts, str) else parts
        if all(p in tensors for p in parts):
            t = torch.cat([tensors.pop(p) for p in parts]) if len(parts) > 1 else tensors.pop(parts[0])
            out[k] = _swap_halves(t) if k in swap else t
    return {**out, **tensors}


def to_diffusers(state: dict, cfg) -> dict:
    """Original-named tensors -> diffusers names (the export direction; works on meta tensors for shape checks).
    Fused tensors split into `hidden`-row parts, the last part taking the rest (FLUX proj_mlp)."""
    out, swap = {}, swapped_keys(cfg)
    for k, parts in teacher_key_map(cfg).items():
        t = _swap_halves(state[k]) if k in swap else state[k]
        if isinstance(parts, str):
            out[parts] = t
        else:
            sizes = [cfg.hidden] * (len(parts) - 1) + [t.shape[0] - cfg.hidden * (len(parts) - 1)]
            out.update(zip(parts, t.split(sizes), strict=True))
    return out


# ----------------------------------------------------------------------------- detection and loading
@dataclass
class Detected:
    cfg: MMDiTConfig | FluxConfig     # cfg.variant names a preset when the shapes match one, else "*_custom"
    diffusers: bool                   # diffusers names (else original: Stability / BFL)
    prefix: str                       # "model.diffusion_model." in single files and repacked FLUX files


def _count(shapes, prefix):
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})


def _name(cfg):
    for name, p in PRESETS.items():
        if type(p) is type(cfg) and replace(cfg, variant=p.variant) == p:
            return replace(cfg, variant=name)
    return replace(cfg, variant=("sd3" if isinstance(cfg, MMDiTConfig) else "flux") + "_custom")


# The keys each config field is read from: (original name, diffusers name).
_PROBES = {
    "sd3": dict(patch=("x_embedder.proj.weight", "pos_embed.proj.weight"), pos=("pos_embed", "pos_embed.pos_embed"),
                pooled=("y_embedder.mlp.0.weight", "time_text_embed.text_embedder.linear_1.weight"),
                context=("context_embedder.weight",) * 2,
                fc1=("joint_blocks.0.x_block.mlp.fc1.weight", "transformer_blocks.0.ff.net.0.proj.weight"),
                qk=("joint_blocks.0.x_block.attn.ln_q.weight", "transformer_blocks.0.attn.norm_q.weight"),
                blocks=("joint_blocks.", "transformer_blocks."),
                attn2=("joint_blocks.{}.x_block.attn2.qkv.weight", "transformer_blocks.{}.attn2.to_q.weight")),
    "flux": dict(img_in=("img_in.weight", "x_embedder.weight"), context=("txt_in.weight", "context_embedder.weight"),
                 pooled=("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight"),
                 fc1=("double_blocks.0.img_mlp.0.weight", "transformer_blocks.0.ff.net.0.proj.weight"),
                 qk=("double_blocks.0.img_attn.norm.query_norm.scale", "transformer_blocks.0.attn.norm_q.weight"),
                 guidance=("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight"),
                 blocks=("double_blocks.", "transformer_blocks."),
                 single=("single_blocks.", "single_transformer_blocks.")),
}


def detect_teacher(shapes: dict) -> Detected | None:
    """Family, layout and config of a teacher from its key -> shape dict alone (no tensor read); None if the keys
    are not an SD3/SD3.5/FLUX.1 transformer. SD3: depth = number of joint blocks (= hidden / 64 in real models),
    qk-norm from ln_q keys and head_dim from their size, else heads = depth (the MMDiT rule); MMDiT-X blocks from
    attn2 keys. FLUX: head_dim from the qk-norm scale, rotary axes in BFL's proportions (1/8, 7/16, 7/16) of head_dim.
    A diffusers folder's config.json then has the last word (`with_config_json`)."""
    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in shapes) else ""
    s = {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    for family, probes in _PROBES.items():
        for dif in (0, 1):
            if probes["fc1"][dif] in s and (probes["patch" if family == "sd3" else "img_in"][dif] in s):
                break
        else:
            continue
        key = {name: names[dif] for name, names in probes.items()}
        if family == "sd3":
            depth, (hidden, cin) = _count(s, key["blocks"]), s[key["patch"]][:2]
            head_dim = s[key["qk"]][0] if key["qk"] in s else hidden // depth  # qk-norm weights are per head
            cfg = MMDiTConfig(
                depth=depth, head_dim=head_dim, n_heads=None if hidden == depth * head_dim else hidden // head_dim,
                in_channels=cin, context_dim=s[key["context"]][1],
                pooled_dim=s[key["pooled"]][1], mlp_ratio=s[key["fc1"]][0] / hidden,
                pos_embed_max_size=math.isqrt(s[key["pos"]][1]), qk_norm=key["qk"] in s,
                attn2_blocks=tuple(i for i in range(depth) if key["attn2"].format(i) in s))
        else:
            (hidden, cin), head_dim = s[key["img_in"]], s[key["qk"]][0]
            cfg = FluxConfig(
                hidden=hidden, heads=hidden // head_dim, depth=_count(s, key["blocks"]),
                depth_single=_count(s, key["single"]), mlp_ratio=s[key["fc1"]][0] / hidden, in_channels=cin,
                context_dim=s[key["context"]][1], pooled_dim=s[key["pooled"]][1],
                axes_dim=(head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16), guidance_embed=key["guidance"] in s)
        return Detected(_name(cfg), bool(dif), prefix)
    return None


def with_config_json(cfg, meta: dict, source):
    """A diffusers folder's config.json (SD3Transformer2DModel / FluxTransformer2DModel) gives what shapes cannot
    show: SD3's head count and width without qk-norm, FLUX's rotary axes. What the shapes show must agree with it;
    CheckpointError (one line) otherwise."""
    if not meta:
        return cfg
    heads, head_dim = meta.get("num_attention_heads"), meta.get("attention_head_dim")
    if isinstance(cfg, MMDiTConfig):
        check_agrees(source, meta, {
            "num_layers": cfg.depth, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "patch_size": cfg.patch_size, "joint_attention_dim": cfg.context_dim, "pooled_projection_dim":
            cfg.pooled_dim, "caption_projection_dim": cfg.hidden, "pos_embed_max_size": cfg.pos_embed_max_size,
            "dual_attention_layers": list(cfg.attn2_blocks), "qk_norm": "rms_norm" if cfg.qk_norm else None}
            | ({"attention_head_dim": cfg.head_dim} if cfg.qk_norm else {}))
        heads, head_dim = heads or cfg.heads, head_dim or cfg.head_dim
        if heads * head_dim != cfg.hidden:
            raise CheckpointError(f"{source}: config.json: {heads} heads x {head_dim} != the weights' width "
                                  f"{cfg.hidden}")
        return _name(replace(cfg, head_dim=head_dim, n_heads=None if heads == cfg.depth else heads))
    check_agrees(source, meta, {
        "num_layers": cfg.depth, "num_single_layers": cfg.depth_single, "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels, "patch_size": 1, "joint_attention_dim": cfg.context_dim,
        "pooled_projection_dim": cfg.pooled_dim, "guidance_embeds": cfg.guidance_embed,
        "num_attention_heads": cfg.heads, "attention_head_dim": cfg.hidden // cfg.heads})
    axes = tuple(meta.get("axes_dims_rope") or cfg.axes_dim)
    if sum(axes) != cfg.hidden // cfg.heads or any(a % 2 for a in axes):
        raise CheckpointError(f"{source}: config.json: axes_dims_rope {list(axes)} must be even and sum to the head "
                              f"width {cfg.hidden // cfg.heads}")
    return _name(replace(cfg, axes_dim=axes))


def detect_model(path) -> tuple:
    """("sd15", None) or ("sd3" | "flux", teacher config) for any checkpoint (sample.py), by its keys and shapes."""
    for sub in ("unet", "transformer"):  # a diffusers pipeline root: look at its denoiser
        path = find_component(path, sub)
    ckpt = Checkpoint(path)
    keys = ckpt.keys()
    if any("input_blocks.0.0." in k or "down_blocks.0.resnets.0.time_emb_proj" in k for k in keys):
        return "sd15", None
    found = detect_teacher({k: ckpt.shape(k) for k in keys})
    if found is None:
        raise CheckpointError(f"{path}: not an SD 1.5, SD3 or FLUX.1 checkpoint; it looks like {describe(keys)}")
    return ("flux" if isinstance(found.cfg, FluxConfig) else "sd3"), found.cfg


def load_teacher(path, dtype=None, device=None) -> MMDiT | Flux:
    """Load any SD3 / SD3.5 / FLUX.1 transformer checkpoint (see the module docstring), frozen and in eval mode;
    `teacher.variant` names the detected preset. Tensors are converted to `dtype` (default fp32) one at a time."""
    ckpt = Checkpoint(find_component(path, "transformer"))
    found = detect_teacher({k: ckpt.shape(k) for k in ckpt.keys()})
    if found is None:
        raise CheckpointError(f"{ckpt.path}: not an SD3/FLUX.1 transformer; it looks like {describe(ckpt.keys())}")
    if found.diffusers:
        found = replace(found, cfg=with_config_json(found.cfg, component_config(ckpt.path), ckpt.path))
    if isinstance(found.cfg, FluxConfig) and any(a % 2 for a in found.cfg.axes_dim):
        raise CheckpointError(f"{ckpt.path}: FLUX head width {found.cfg.hidden // found.cfg.heads}: BFL's rotary "
                              f"proportions give odd axes {found.cfg.axes_dim}; load it as a diffusers folder whose "
                              "config.json gives axes_dims_rope")
    model = build_meta(MMDiT if isinstance(found.cfg, MMDiTConfig) else Flux, found.cfg)
    dtype = dtype or torch.float32
    if found.diffusers:
        state = from_diffusers(ckpt.tensors(dtype=dtype, device=device or "cpu"), found.cfg)
    else:
        state = ckpt.tensors(found.prefix, dtype=dtype, device=device or "cpu")
    load_state(model, state, ckpt.path)
    return model.eval().requires_grad_(False)

def find_teacher_vae(ckpt, vae=None, text_encoders=None) -> Path:
    """The teacher's VAE: `vae` if given, else the checkpoint itself (a pipeline root's vae/, or first_stage_model.*
    in an SD3.5 single file), else ae.safetensors beside the checkpoint or in the `text_encoders` folder (FLUX)."""
    if vae:
        return Path(vae)
    ckpt = Path(ckpt)
    if (ckpt / "vae").is_dir() or (ckpt.is_file() and "first_stage_model.decoder.conv_in.weight" in Checkpoint(ckpt)):
        return ckpt
    for folder in [ckpt.parent] + ([Path(text_encoders)] if text_encoders else []):
        if (folder / "ae.safetensors").is_file():
            return folder / "ae.safetensors"
    raise CheckpointError(f"{ckpt}: holds no VAE and no ae.safetensors lies beside it or in the text-encoder folder; "
                          "name the VAE (sample.py --vae, distill.py --teacher-vae)")


# ----------------------------------------------------------------------------- Euler flow matching (sampling)

def sd3_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """(steps + 1,) fp32 flow times, 1 -> 0, as FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(steps) for
    SD3 / SD3.5 (scheduler_config.json: shift 3.0, no dynamic shifting): evenly spaced from 1 down to the scheduler's
    smallest training sigma, which is itself already shifted (shift(1/1000), computed in fp32 as diffusers does),
    then shifted: sigma' = shift sigma / (1 + (shift - 1) sigma); a final 0 appended."""
    lo = torch.tensor(1 / 1000, dtype=torch.float32)
    lo = (shift * lo / (1 + (shift - 1) * lo)).item()
    s = np.linspace(1.0, lo, steps)  # float64, as diffusers
    s = torch.from_numpy(shift * s / (1 + (shift - 1) * s)).float()
    return torch.cat([s, torch.zeros(1)])


def sd3_shift(ckpt) -> float:
    """An SD3 model's time shift: `shift` of its scheduler config (a pipeline's scheduler/scheduler_config.json, or a
    scheduler_config.json beside a single file: the toy teacher's), else 3.0 (SD3 / SD3.5 release theirs with 3.0)."""
    path = Path(ckpt)
    config = path / "scheduler" / "scheduler_config.json" if path.is_dir() else path.with_name("scheduler_config.json")
    if not config.is_file():
        return 3.0
    try:
        shift = float(json.loads(config.read_text()).get("shift", 3.0))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{config}: not a scheduler config with a numeric 'shift' ({e})") from None
    if shift <= 0:
        raise CheckpointError(f"{config}: shift must be > 0, found {shift}")
    return shift


def flux_mu(image_tokens: int) -> float:
    """FLUX.1-dev's resolution-dependent shift: mu linear in the packed image token count, 0.5 at 256 tokens and
    1.15 at 4096 (FluxPipeline calculate_shift with the scheduler's base/max_image_seq_len and base/max_shift)."""
    m = (1.15 - 0.5) / (4096 - 256)
    return image_tokens * m + (0.5 - m * 256)


def flux_sigmas(steps: int, mu: float | None) -> torch.Tensor:
    """(steps + 1,) fp32 flow times as FluxPipeline sets them: linspace(1, 1/steps) in fp32, then (dev, mu given)
    the exponential time shift e^mu / (e^mu + 1/sigma - 1); schnell (mu None) is unshifted. A final 0 appended."""
    s = np.linspace(1.0, 1 / steps, steps).astype(np.float32)  # float32 from here on, as diffusers
    if mu is not None:
        s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return torch.cat([torch.from_numpy(s), torch.zeros(1)])


@torch.no_grad()
def sample_flow(teacher, context, pooled, noise, sigmas, cfg=None, guidance=None, progress=True) -> torch.Tensor:
    """Euler from sigma 1 to 0: x += (sigma_next - sigma) v, v = teacher(x, sigma, ...) = noise - x0.
    noise (B, 16, h, w) -> final latent fp32. cfg (SD3): context/pooled hold [negative; prompt] (2B rows) and
    v = v_u + cfg (v_c - v_u); guidance (FLUX.1-dev): the embedded scale. Updates in fp32 (x accumulates)."""
    B, dtype = noise.shape[0], next(teacher.parameters()).dtype
    g = None if guidance is None else torch.full((B,), float(guidance), device=noise.device)
    x = noise.float()
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="euler"):
        sigma = sigmas[i].to(noise.device)
        if cfg is not None:
            v_u, v_c = teacher(torch.cat([x, x]).to(dtype), sigma.expand(2 * B), context, pooled).float().chunk(2)
            v = v_u + cfg * (v_c - v_u)
        else:
            v = teacher(x.to(dtype), sigma.expand(B), context, pooled, guidance=g).float()
        x = x + (sigmas[i + 1] - sigmas[i]).item() * v
    return x
