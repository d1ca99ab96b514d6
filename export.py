"""Export a (distilled) SD 1.5 student: a standard SD 1.5 single file, and a diffusers `unet/` folder.

    python export.py --student out/checkpoint.safetensors --out release/          # from a distill.py checkpoint
    python export.py --student out/checkpoint.safetensors --ema --out release/    # its EMA weights
    python export.py --student out/student.safetensors --out release/             # re-export a single file

The single file is what the original CompVis / Stability tools and every UI read: `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE), `cond_stage_model.transformer.text_model.*` (CLIP-L). Our module paths ARE the original
names (unet.py, vae.py, text/encoders.py), so no renaming happens; safetensors metadata marks a distilled student
({"distilled": "1", "steps": "1", "timestep": "999"}: one step from pure noise at t = 999) for samplers to read.
The diffusers folder is `config.json` (UNet2DConditionModel) + `diffusion_pytorch_model.safetensors`, named through
unet.unet_key_map. Every file is written atomically (temp file + rename). Reference for the diffusers config fields:
diffusers 0.42 UNet2DConditionModel.__init__ and the SD 1.5 `unet/config.json`.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from text.encoders import load_clip
from unet import UNet, _config_original, load_unet, unet_key_map
from vae import load_vae
from weights import Checkpoint, CheckpointError, build_meta, find_component, load_state, save_atomic, write_atomic

UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


def _cast(state: dict, dtype) -> dict:
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}


def export_sd15_single_file(unet, vae, clip, path, metadata=None, dtype=None) -> None:
    """UNet + the student's VAE and CLIP-L -> one SD 1.5 single file (original key names), atomically.
    metadata: str -> str (safetensors); dtype: e.g. torch.float16 for a release file (None keeps the weights')."""
    tensors = {}
    for prefix, model in ((UNET, unet), (VAE, vae), (CLIP, clip)):
        tensors.update({prefix + k: v for k, v in _cast(model.state_dict(), dtype).items()})
    save_atomic(tensors, path, metadata={str(k): str(v) for k, v in (metadata or {}).items()})


def vocabulary(base) -> Path | None:
    """The tokenizer.json beside a single-file student (a vocabulary of its own, the toy's), else None."""
    tok = Path(base).parent / "tokenizer.json"
    return tok if Path(base).is_file() and tok.is_file() else None


def export_distilled(unet, base, out: Path, metadata: dict, ema=None, ema_decay: float = 0.0) -> None:
    """distill.py's exports: out/student.safetensors (and student_ema.safetensors) with the base student's own VAE
    and CLIP-L, as released (fp32), and the base's tokenizer.json when it has a vocabulary of its own (the toy's)."""
    vae, clip = load_vae(base, family="sd15"), load_clip(find_component(base, "text_encoder"))
    export_sd15_single_file(unet, vae, clip, out / "student.safetensors", metadata)
    if ema is not None:
        export_sd15_single_file(ema, vae, clip, out / "student_ema.safetensors", metadata | {"ema": str(ema_decay)})
    if (tok := vocabulary(base)) is not None:
        shutil.copyfile(tok, out / "tokenizer.json")


def diffusers_unet_config(cfg, resolution: int = 512) -> dict:
    """config.json of UNet2DConditionModel for an SD 1.5-structured UNetConfig (sample_size: the latent size)."""
    levels, attn = range(len(cfg.channel_mult)), cfg.attention_levels
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": resolution // 8,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(levels)],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": cfg.num_heads,  # diffusers reads SD 1.x's attention_head_dim as the head COUNT
        "transformer_layers_per_block": cfg.transformer_depth, "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
        "center_input_sample": False, "use_linear_projection": False, "upcast_attention": False,
    }


def export_diffusers_unet(unet, folder, dtype=None, metadata: dict | None = None) -> None:
    """UNet -> a diffusers `unet/` folder (config.json + diffusion_pytorch_model.safetensors); a distilled student's
    metadata (timestep, resolution) rides in the safetensors file, its resolution in config.json's sample_size."""
    folder, metadata = Path(folder), {str(k): str(v) for k, v in (metadata or {}).items()}
    folder.mkdir(parents=True, exist_ok=True)
    names = unet_key_map(unet.cfg)  # original -> diffusers
    state = _cast(unet.state_dict(), dtype)
    save_atomic({names[k]: v for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors",
                metadata={"format": "pt"} | metadata)
    config = diffusers_unet_config(unet.cfg, int(metadata.get("resolution", 512)))
    write_atomic(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def load_student(path, base=None, ema=False):
    """(unet, vae, clip, metadata, base) from a distill.py checkpoint (UNet under `student.` / `ema.`, VAE and CLIP from
    the base student named in its config or by `base`) or from an SD 1.5 single file / diffusers folder."""
    path = Path(path)
    ckpt = Checkpoint(path)
    if "student.input_blocks.0.0.weight" not in ckpt:  # a plain SD 1.5 checkpoint
        with safe_open(str(ckpt.path), "pt") as f:
            meta = f.metadata() or {}
        base = base or path
        return (load_unet(path), load_vae(base, family="sd15"), load_clip(find_component(base, "text_encoder")),
                meta, base)
    with safe_open(str(ckpt.path), "pt") as f:
        meta = f.metadata() or {}
    config = json.loads(meta.get("config", "{}"))
    base = base or meta.get("student") or config.get("student")  # as the run named it (older runs: its config)
    if base is None:
        raise CheckpointError(f"{path}: checkpoint names no base student; pass --base (the SD 1.5 it started from)")
    prefix = "ema." if ema else "student."
    if ema and "ema.input_blocks.0.0.weight" not in ckpt:
        raise CheckpointError(f"{path}: no EMA weights in this checkpoint (trained with --ema 0)")
    cfg = _config_original(ckpt.shapes(prefix))  # the UNet config read off the shapes, as load_unet does
    unet = load_state(build_meta(UNet, cfg), ckpt.tensors(prefix), path)
    # The metadata of distill.py's own export: the run's timestep and resolution, and the same header length, so that
    # the tensors lie at the same memory alignment (CPU kernels round the last bit by it): the same pixels
    out = {"distilled": "1", "steps": "1", "timestep": str(config.get("gen_timestep", 999)),
           "resolution": str(config.get("student_res", 512)), "teacher": meta.get("teacher", ""),
           "step": meta.get("step", "?")} | ({"ema": str(config.get("ema"))} if ema else {})
    return unet.eval(), load_vae(base, family="sd15"), load_clip(find_component(base, "text_encoder")), out, base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Export an SD 1.5 student: single file + diffusers unet/ folder.")
    p.add_argument("--student", required=True, help="distill.py checkpoint, SD 1.5 single file or diffusers folder")
    p.add_argument("--out", required=True, help="output folder: student.safetensors and unet/")
    p.add_argument("--base", help="SD 1.5 giving VAE and CLIP-L (default: the checkpoint's config 'student')")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--fp16", action="store_true", help="write fp16 weights (release size); default fp32")
    args = p.parse_args(argv)
    dtype = torch.float16 if args.fp16 else None
    try:
        unet, vae, clip, meta, base = load_student(args.student, args.base, args.ema)
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
        export_sd15_single_file(unet, vae, clip, out / "student.safetensors", meta, dtype)
        export_diffusers_unet(unet, out / "unet", dtype, meta)
        if (tok := vocabulary(base)) is not None:  # a student with a vocabulary of its own (the toy's)
            shutil.copyfile(tok, out / "tokenizer.json")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'student.safetensors'} and {out / 'unet'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
