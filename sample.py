"""Sample images from a checkpoint: SD 1.5 with DDIM, or a flow-matching teacher (SD3 / SD3.5, FLUX.1) with Euler.

    python sample.py --prompt "a large red circle on a blue background, center"   # the distilled toy student, one step
    python sample.py --ckpt v1-5-pruned-emaonly.safetensors --prompt "a watercolor fox in the snow" --seed 1
    python sample.py --ckpt sd3.5_large.safetensors --text-encoders text_encoders/ --prompt "..."
    python sample.py --ckpt flux1-dev.safetensors --text-encoders text_encoders/ --vae ae.safetensors --prompt "..."

Without --ckpt: the student `python distill.py` wrote (out/toy/ or out/tiny/student.safetensors), else the committed
distilled toy student (assets/toy/distilled/). The model is told by the checkpoint's keys. SD 1.5's CLIP tokenizer: a
pipeline's tokenizer/, else a tokenizer.json beside the single file (the toy models' own vocabulary), else CLIP's
BPE. Each sampler runs as the diffusers pipeline with its released scheduler config does, and draws the initial
noise as diffusers does (CPU generator, model dtype), so the same seed, steps, guidance and size give the same image
as diffusers:
  SD 1.5  StableDiffusionPipeline + DDIMScheduler: DDIM, eta 0, classifier-free guidance (default 25 steps, cfg 7.5,
          512 px). SD 1.5 scheduler_config.json: scaled-linear betas 0.00085..0.012, "leading" spacing,
          steps_offset 1, set_alpha_to_one False.
  SD3     StableDiffusion3Pipeline: Euler on flow time, shift 3.0 (or the scheduler config's: the toy teacher's
          is 12), classifier-free guidance (28 steps, cfg 7.0).
  FLUX.1  FluxPipeline: Euler, resolution-dependent exponential shift; dev embeds --cfg as its guidance (28 steps,
          3.5, no negative prompt), schnell takes none (4 steps, no shift). Teachers default to 1024 px (at most
          what an SD3 model's position table covers: 128 px for the toy teacher).
Teachers' text encoders: --text-encoders (a folder of clip_l / clip_g / t5xxl safetensors and a T5 tokenizer, or a
pipeline root), else the checkpoint's own pipeline folder. Their VAE: --vae, else the checkpoint itself (a pipeline
root's vae/, or first_stage_model.* in an SD3.5 single file), else ae.safetensors beside the checkpoint or in the
--text-encoders folder.

--batch N: N images of one prompt from one noise draw (diffusers' num_images_per_prompt), written as `--out cat.png
--batch 2` -> cat-0.png, cat-1.png. Each PNG carries its parameters as JSON in a text chunk ("parameters").

References: Song et al. 2020 (DDIM); Esser et al. 2024 (rectified flow, SD3); diffusers 0.42
`schedulers/scheduling_ddim.py`, `schedulers/scheduling_flow_match_euler_discrete.py`, the three pipelines, and
`image_processor.py` (uint8 conversion).
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import teachers as TL
import vae as V
from text.conditioning import load_teacher_text
from text.encoders import load_clip
from text.tokenizer import find_clip_tokenizer
from unet import load_unet, sample_one_step, sample_sd15
from vae import load_vae, to_uint8
from weights import ArgumentParser, Checkpoint, CheckpointError, find_component, write_atomic

# --ckpt by default: what `python distill.py [--preset toy]` wrote, else the committed distilled toy student
DISTILLED = ("out/toy/student.safetensors", "out/tiny/student.safetensors",
             str(Path(__file__).resolve().parent / "assets" / "toy" / "distilled" / "student.safetensors"))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (steps, guidance, size in px): the diffusers pipelines' defaults (SD 1.5 7.5; SD3 28 steps, 7.0; FLUX.1-dev 28
# steps, 3.5) except SD 1.5's steps (25: DDIM is converged there; the pipeline says 50) and schnell's 4 (model card).
DEFAULTS = {"sd15": (25, 7.5, 512), "sd3": (28, 7.0, 1024), "flux_dev": (28, 3.5, 1024),
            "flux_schnell": (4, None, 1024)}


class UsageError(ValueError):
    """A bad flag value: printed as one line, like CheckpointError."""


# ----------------------------------------------------------------------------- checkpoints, images

def check_writable(path: Path) -> None:
    """Fail before minutes of loading and sampling if the PNG could not be written."""
    if path.is_dir():
        raise UsageError(f"--out {path}: a directory; name the PNG file to write")
    try:  # a probe written like the PNG will be; orphans of an earlier, killed write of it are removed
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        for orphan in path.parent.glob(path.name + ".*.tmp"):  # the probe among them
            orphan.unlink()
    except OSError as e:
        raise UsageError(f"--out {path}: cannot write there ({e.strerror or e})") from None


def save_png(pixels: np.ndarray, path: Path, params: dict) -> None:
    """Atomic write (weights.write_atomic), parameters as JSON in a PNG text chunk."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(params))
    write_atomic(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info))


# ----------------------------------------------------------------------------- command line

def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("what")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="", help="the unconditional branch of CFG (default: empty)")
    g.add_argument("--ckpt", help="single .safetensors file or diffusers pipeline folder (default: the first distilled "
                   f"student of {', '.join(DISTILLED[:2])}, assets/toy/distilled/student.safetensors)")
    g.add_argument("--text-encoders", help="teachers: folder of clip_l/clip_g/t5xxl safetensors, or a pipeline root")
    g.add_argument("--t5-tokenizer", help="teachers: T5 tokenizer.json or spiece.model (default: found beside T5)")
    g.add_argument("--vae", help="teachers: VAE file or folder (FLUX: ae.safetensors)")
    g = p.add_argument_group("sampling (defaults depend on the model, see above)")
    g.add_argument("--steps", type=positive_int)
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale; FLUX.1-dev: its embedded guidance")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--width", type=positive_int, help="pixels")
    g.add_argument("--height", type=positive_int, help="pixels")
    g.add_argument("--batch", type=positive_int, default=1, help="images; > 1 writes OUT-0.png, OUT-1.png, ...")
    g = p.add_argument_group("output and hardware")
    g.add_argument("--out", default="sample.png", help="PNG path")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=list(DTYPES), help="default: CPU fp32; CUDA fp16 (SD 1.5), bf16 (teachers)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--compile", action="store_true", help="SD 1.5: torch.compile the UNet and the decoder")
    g.add_argument("--tiny-decoder", help="SD 1.5: TAESD's decoder (taesd_decoder.safetensors) for fast previews")
    return p.parse_args(argv)


def run(args) -> list[Path]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this torch build sees no CUDA device")
    if args.ckpt is None:
        args.ckpt = next((p for p in DISTILLED if Path(p).is_file() and Checkpoint(p).metadata.get("distilled") == "1"),
                         None)
        if args.ckpt is None:
            raise UsageError(f"--ckpt: no {DISTILLED[1]} yet; run `python distill.py` first, or name a checkpoint")
    family, tcfg = TL.detect_model(args.ckpt)
    # distill.py marks its students: one step from t = 999 by default, at the resolution they were trained at
    meta = Checkpoint(args.ckpt).metadata if family == "sd15" and Path(args.ckpt).is_file() else {}
    distilled = meta.get("distilled") == "1"
    flux_dev = family == "flux" and tcfg.guidance_embed
    # fp16 overflows in T5 and the FLUX/SD3.5 activations; SD 1.5 is released and run in fp16.
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "fp16" if family == "sd15" else "bf16")]
    steps, cfg, size = DEFAULTS[family if family != "flux" else "flux_dev" if flux_dev else "flux_schnell"]
    if distilled:
        steps, cfg, size = int(meta.get("steps", 1)), None, int(meta.get("resolution", size))
        if args.cfg is not None:
            raise UsageError("--cfg: a distilled student runs without CFG (the teacher's guidance is distilled in)")
    if family == "sd3":  # a small position table (the toy teacher's) caps the default size
        size = min(size, 16 * tcfg.pos_embed_max_size)
    steps, cfg = args.steps or steps, cfg if args.cfg is None else args.cfg
    width, height = args.width or size, args.height or size
    multiple = 8 if family == "sd15" else 16  # the VAE's 8x; teachers also patchify 2x2
    if width % multiple or height % multiple:
        raise UsageError(f"--width {width} / --height {height}: {family} needs multiples of {multiple}")
    if family == "sd15" and steps > 999:  # "leading" spacing with steps_offset 1 would index timestep 1000
        raise UsageError(f"--steps {steps}: at most 999 for SD 1.5's DDIM schedule")
    if family == "sd3" and max(width, height) > 16 * tcfg.pos_embed_max_size:
        raise UsageError(f"--width {width} / --height {height}: this SD3 model's position table covers at most "
                         f"{16 * tcfg.pos_embed_max_size} px")
    if family == "flux" and args.negative_prompt:
        raise UsageError("--negative-prompt: FLUX.1 is guidance-distilled and runs no unconditional pass")
    if family == "flux" and not flux_dev and args.cfg is not None:
        raise UsageError("--cfg: FLUX.1-schnell takes no guidance")
    paths = [Path(args.out)] if args.batch == 1 else \
        [Path(args.out).with_name(f"{Path(args.out).stem}-{i}{Path(args.out).suffix}") for i in range(args.batch)]
    for p in paths:
        check_writable(p)
    if need := V.decode_too_big(args.batch, height, width, dtype, device):
        raise UsageError(f"--width {width} / --height {height} / --batch {args.batch}: {need}")

    # As diffusers' randn_tensor: drawn on a CPU generator in the model dtype, then moved. DDIM's initial sigma is
    # 1; FluxPipeline draws (B, 16, h, w) too and only then packs 2x2, which our FLUX does inside.
    gen = torch.Generator("cpu").manual_seed(args.seed)
    shape = (args.batch, 4 if family == "sd15" else 16, height // 8, width // 8)
    noise = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    params = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, model=str(args.ckpt), family=family,
                  seed=args.seed, steps=steps, width=width, height=height, decoder=args.tiny_decoder or "vae")
    progress = not args.quiet
    if family == "sd15":
        unet = load_unet(args.ckpt, dtype=dtype, device=device)
        unet = torch.compile(unet, mode="max-autotune" if device.type == "cuda" else None) if args.compile else unet
        # A pipeline's `tokenizer/`, a tokenizer.json beside a single file (the toy models'), else CLIP's BPE
        clip = load_clip(find_component(args.ckpt, "text_encoder"), dtype=dtype, device=device)
        tok = find_clip_tokenizer(args.ckpt)
        if distilled:
            t = int(meta.get("timestep", 999))
            latents = sample_one_step(unet, clip, tok, args.prompt, noise, steps, t, gen)
            params.update(sampler="distilled", distilled_steps=steps, timestep=t)
        else:
            latents = sample_sd15(unet, clip, tok, args.prompt, args.negative_prompt, noise, steps, cfg, progress)
            params.update(sampler="ddim", cfg=cfg)
        del unet, clip
        vae = V.load_tiny_decoder(args.tiny_decoder, dtype, device) if args.tiny_decoder else \
            load_vae(args.ckpt, family="sd15", dtype=dtype, device=device)
    else:
        vae_path = TL.find_teacher_vae(args.ckpt, args.vae, args.text_encoders)
        # Text first, then the encoders are dropped: T5-XXL and a 12B transformer need not share the GPU.
        text = load_teacher_text(args.ckpt, args.text_encoders, args.t5_tokenizer, dtype=dtype, device=device)
        guided = family == "sd3" and cfg > 1.0  # as diffusers: guidance_scale <= 1 means no unconditional pass
        context, pooled = text(([args.negative_prompt] * args.batch if guided else []) + [args.prompt] * args.batch)
        t5_length = text.t5_length
        del text
        teacher = TL.load_teacher(args.ckpt, dtype=dtype, device=device)
        if family == "sd3":
            sigmas = TL.sd3_sigmas(steps, TL.sd3_shift(args.ckpt))
            latents = TL.sample_flow(teacher, context, pooled, noise, sigmas, cfg=cfg if guided else None,
                                  progress=progress)
            params.update(sampler="euler", cfg=cfg)
        else:
            sigmas = TL.flux_sigmas(steps, TL.flux_mu((height // 16) * (width // 16)) if flux_dev else None)
            latents = TL.sample_flow(teacher, context, pooled, noise, sigmas, guidance=cfg, progress=progress)
            params.update(sampler="euler", guidance=cfg)
        params.update(variant=teacher.variant, t5_length=t5_length)
        del teacher
        vae = load_vae(vae_path, family=family, dtype=dtype, device=device)
    with torch.no_grad():
        images = (torch.compile(vae.decode) if args.compile else vae.decode)(latents.to(dtype))
    for i, (pixels, path) in enumerate(zip(to_uint8(images), paths, strict=True)):
        save_png(pixels, path, dict(params, index=i) if len(paths) > 1 else params)
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        paths = run(args)
    except (CheckpointError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f"error: out of memory at --batch {args.batch}: ask for fewer or smaller images", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
