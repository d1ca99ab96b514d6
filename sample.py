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

--batch N makes N images of one prompt from one (N, C, h, w) noise draw (= diffusers' num_images_per_prompt=N with
one generator) and writes numbered files: `--out cat.png --batch 2` -> cat-0.png, cat-1.png. Each PNG carries its
parameters as JSON in a text chunk ("parameters").

References: Song et al. 2020 (DDIM); Esser et al. 2024 (rectified flow, SD3); diffusers 0.42
`schedulers/scheduling_ddim.py`, `schedulers/scheduling_flow_match_euler_discrete.py`, the three pipelines, and
`image_processor.py` (uint8 conversion).
"""
import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from conditioning import load_teacher_text
from teacher_mmdit import FluxConfig, detect_teacher, load_teacher
from text_encoders import load_clip
from tokenizer import find_clip_tokenizer
from unet import load_unet
from vae import load_vae
from weights import Checkpoint, CheckpointError, describe, find_component

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


# ----------------------------------------------------------------------------- SD 1.5: DDIM

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


def one_step_x0(unet, x, t: int, context) -> torch.Tensor:
    """An eps-prediction UNet's x0 estimate at timestep t: (x - sqrt(1 - abar) eps) / sqrt(abar), in fp32 (abar(999)
    = 0.0047, so eps errors are amplified ~15x). From pure noise at t = 999: a distilled student's sample."""
    a = sd15_alphas_cumprod()[t].item()
    eps = unet(x.to(next(unet.parameters()).dtype), torch.full((x.shape[0],), t, device=x.device), context).float()
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


# ----------------------------------------------------------------------------- teachers: Euler flow matching

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


# ----------------------------------------------------------------------------- checkpoints, images

def detect(path):
    """("sd15", None) or ("sd3" | "flux", teacher config) for a checkpoint, by its keys and shapes."""
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


def find_vae(args) -> Path:
    """The teacher's VAE, by the rule in the module docstring."""
    if args.vae:
        return Path(args.vae)
    ckpt = Path(args.ckpt)
    if (ckpt / "vae").is_dir() or (ckpt.is_file() and "first_stage_model.decoder.conv_in.weight" in Checkpoint(ckpt)):
        return ckpt
    for folder in [ckpt.parent] + ([Path(args.text_encoders)] if args.text_encoders else []):
        if (folder / "ae.safetensors").is_file():
            return folder / "ae.safetensors"
    raise UsageError(f"{ckpt}: holds no VAE and no ae.safetensors lies beside it or in --text-encoders; pass --vae")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as diffusers' VaeImageProcessor.postprocess(output_type="pil"):
    clamp(x / 2 + 0.5, 0, 1) * 255, rounded half to even (numpy .round())."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (x * 255).round().astype("uint8")


def check_writable(path: Path) -> None:
    """Fail before minutes of loading and sampling if the PNG could not be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot write there ({e.strerror or e})") from None


def save_png(pixels: np.ndarray, path: Path, params: dict) -> None:
    """Atomic write (temp file in the same folder, then rename), parameters as JSON in a PNG text chunk."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(params))
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input (argparse prints usage + message)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
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
    family, tcfg = detect(args.ckpt)
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

    # As diffusers' randn_tensor: drawn on a CPU generator in the model dtype, then moved. DDIM's initial sigma is
    # 1; FluxPipeline draws (B, 16, h, w) too and only then packs 2x2, which our FLUX does inside.
    gen = torch.Generator("cpu").manual_seed(args.seed)
    shape = (args.batch, 4 if family == "sd15" else 16, height // 8, width // 8)
    noise = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    params = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, model=str(args.ckpt), family=family,
                  seed=args.seed, steps=steps, width=width, height=height)
    progress = not args.quiet
    if family == "sd15":
        unet = load_unet(args.ckpt, dtype=dtype, device=device)
        # A pipeline's `tokenizer/`, a tokenizer.json beside a single file (the toy models'), else CLIP's BPE
        clip = load_clip(find_component(args.ckpt, "text_encoder"), dtype=dtype, device=device)
        tok = find_clip_tokenizer(args.ckpt)
        if distilled:
            latents = sample_one_step(unet, clip, tok, args.prompt, noise, steps, int(meta.get("timestep", 999)), gen)
            params.update(sampler="distilled", distilled_steps=steps)
        else:
            latents = sample_sd15(unet, clip, tok, args.prompt, args.negative_prompt, noise, steps, cfg, progress)
            params.update(sampler="ddim", cfg=cfg)
        del unet, clip
        vae = load_vae(args.ckpt, family="sd15", dtype=dtype, device=device)
    else:
        vae_path = find_vae(args)
        # Text first, then the encoders are dropped: T5-XXL and a 12B transformer need not share the GPU.
        text = load_teacher_text(args.ckpt, args.text_encoders, args.t5_tokenizer, dtype=dtype, device=device)
        guided = family == "sd3" and cfg > 1.0  # as diffusers: guidance_scale <= 1 means no unconditional pass
        context, pooled = text(([args.negative_prompt] * args.batch if guided else []) + [args.prompt] * args.batch)
        t5_length = text.t5_length
        del text
        teacher = load_teacher(args.ckpt, dtype=dtype, device=device)
        if family == "sd3":
            sigmas = sd3_sigmas(steps, sd3_shift(args.ckpt))
            latents = sample_flow(teacher, context, pooled, noise, sigmas, cfg=cfg if guided else None,
                                  progress=progress)
            params.update(sampler="euler", cfg=cfg)
        else:
            sigmas = flux_sigmas(steps, flux_mu((height // 16) * (width // 16)) if flux_dev else None)
            latents = sample_flow(teacher, context, pooled, noise, sigmas, guidance=cfg, progress=progress)
            params.update(sampler="euler", guidance=cfg)
        params.update(variant=teacher.variant, t5_length=t5_length)
        del teacher
        vae = load_vae(vae_path, family=family, dtype=dtype, device=device)
    with torch.no_grad():
        images = vae.decode(latents.to(dtype))
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
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
