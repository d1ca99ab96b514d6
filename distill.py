"""Cross-Space Distillation: train the Bridge (stage 1), then distill a flow-matching teacher into a one-step SD 1.5
student with DMD2 in the TEACHER's latent space (stage 2). One flat script, nanoGPT style.

    python distill.py                 # = --preset toy: the committed toy models (assets/toy), CPU, < 10 minutes,
    python sample.py --prompt "a large red circle on a blue background, center"   # one step, from out/toy/
    python distill.py --preset tiny   # random tiny models (the tests'), CPU, a minute: out/tiny/

SD 1.5 + SD3.5-Medium (8 GPUs; the text cache is built here from --text-encoders if missing, then T5 is freed):
    torchrun --nproc_per_node 8 distill.py --student v1-5-pruned-emaonly.safetensors \
        --teacher sd3.5_medium.safetensors --text-encoders text_encoders/ --prompts prompts.txt \
        --text-cache cache_sd35m.safetensors --out runs/sd35m
SD 1.5 + FLUX.1-dev (no CFG pass: embedded guidance 3.5; 12B bf16 teacher, so batch 1 per GPU, or --fsdp):
    torchrun --nproc_per_node 8 distill.py --student v1-5-pruned-emaonly.safetensors --teacher flux1-dev.safetensors \
        --teacher-vae ae.safetensors --text-encoders text_encoders/ --prompts prompts.txt --batch-size 1 --out runs/flux

Stage 1: student latents z_S (encoded --images, or the base student's own 4-step DDIM + CFG samples: cheap, and the
kind of latent the generator makes), targets z_T* = bridge_target(z_S) computed once and cached in the out dir; the
projector learns reconstruction + attention fidelity; the report gives held-out MSE vs a NaiveBridge and ms/sample vs
the exact decode-resize-encode path. Stage 2: generator = the SD 1.5 UNet, one step from pure noise at t = 999;
z_T = Bridge(z_S); real score = frozen teacher (LoRA off, CFG / embedded guidance), fake score = teacher + LoRA
trained by flow matching on detached z_T, `--fake-steps-per-gen` fake updates per generator update (DMD2); optionally
DMD2's GAN term (--gan-weight, real images from --real-images; off by default) and DMD1's regression onto the
teacher's own samples (--reg-weight; off by default).

Memory, SD 1.5 + SD3.5-Medium at 1024 px on one 80 GB GPU (defaults: batch 2, bf16 autocast, grad checkpointing):
teacher 2.47B params in bf16 = 4.9 GB; LoRA rank 64 = 82M fp32 params + grads + AdamW = 1.3 GB; student UNet 0.86B
fp32 weights + grads + AdamW moments + EMA = 5 x 3.4 = 17 GB; VAEs 0.2 GB; no text encoder (the cache). Activations:
the fake-score backward through 24 checkpointed blocks of 4096 image + 333 text tokens x 1536 is ~2 GB per sample;
the real / fake DMD passes keep none (no grad). Stage 2 total ~25-30 GB. Stage 1 (before the optimizers exist) keeps
fp32 attention maps (24 heads x 4096 x 4429 = 1.7 GB per block and sample) for 3 blocks: ~5 GB per sample, so its
batch is 2: ~20 GB in all. FLUX.1-dev: 23.8 GB bf16 + 3.6 GB LoRA state + 17 GB student, batch 1 (or --fsdp).
Measured on one H100 with random weights (bench_distill.py; README "Performance"): peaks of 16.7 GiB (stage 1) and
25.3 GiB (stage 2) with SD3.5-Medium, 36.0 and 44.4 GiB with FLUX.1-dev at batch 1. Multi-GPU NCCL runs are untested
(CPU gloo DDP and FSDP are tested).
"""
import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

import bridge as BR
import conditioning as C
import teacher_mmdit as TM
import text_encoders as TE
import train_state as TS
import unet as U
import vae as V
from export import export_sd15_single_file
from sample import ddim_sample, one_step_x0, sample_flow, sd3_shift, sd3_sigmas, to_uint8
from tokenizer import find_clip_tokenizer
from weights import Checkpoint, CheckpointError, find_component, load_state, save_atomic

TOY = Path(__file__).resolve().parent / "assets" / "toy"  # the committed toy models (toy_train.py, toy.py)
# `python distill.py` without models runs DEFAULT_PRESET: the toy world (the README's table; "tiny" for the tests).
DEFAULT_PRESET = "toy"


class UsageError(ValueError):
    """Bad input or a stopped run: printed as one `error: ...` line."""


def excepthook(kind, e, tb):
    if issubclass(kind, (UsageError, CheckpointError, TS.StateError)):
        print(f"error: {e}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, e, tb)


sys.excepthook = excepthook


class Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- arguments
p = Parser(description=__doc__.split("\n")[0])
g = p.add_argument_group("models (give none for a preset)")
g.add_argument("--preset", choices=["toy", "tiny"], help="toy: the committed toy models and toy-world prompts, "
               f"judged before and after; tiny: random tiny models (fast, for tests). Default without models: "
               f"{DEFAULT_PRESET}")
g.add_argument("--student", help="SD 1.5 single file or diffusers pipeline folder (UNet, VAE, CLIP-L)")
g.add_argument("--teacher", help="SD3 / SD3.5 / FLUX.1 transformer: single file or diffusers folder")
g.add_argument("--teacher-vae", help="default: inside the teacher (file or pipeline), else ae.safetensors beside it")
g.add_argument("--prompts", help="training prompts, one per line")
g.add_argument("--text-cache", help="text-embedding cache from conditioning.py (default OUT/text_cache.safetensors)")
g.add_argument("--text-encoders", help="build a missing cache here: folder of clip_l/clip_g/t5xxl or pipeline root")
g.add_argument("--t5-tokenizer", help="T5 tokenizer.json / spiece.model (default: found beside the encoders)")
g.add_argument("--t5-length", type=int, help="T5 tokens when building the cache (default: the teacher's)")
g.add_argument("--no-t5", action="store_true", help="SD3: zeros instead of T5 (as diffusers without text_encoder_3)")
g.add_argument("--negative-prompt", default="", help="the unconditional prompt (CFG)")
g = p.add_argument_group("stage 1: the Bridge")
g.add_argument("--bridge", help="a trained projector (OUT/bridge.safetensors of an earlier run): skip stage 1")
g.add_argument("--bridge-kind", choices=["bridge", "naive", "exact", "identity"], default="bridge",
               help="the map into teacher space in stage 2 (ablations): bridge (the method), naive (resize + 1x1, "
               "trained in stage 1 beside it), exact (differentiable decode-resize-encode, no stage 1), identity "
               "(a teacher in the student's own latent space, no stage 1)")
g.add_argument("--images", help="folder of images -> student latents (default: the student's own samples)")
g.add_argument("--latents", type=int, help="student latents, train + held-out")
g.add_argument("--held-out", type=int, help="latents kept out of training for the report")
g.add_argument("--sample-steps", type=int, default=4, help="DDIM steps of the student's own samples")
g.add_argument("--sample-cfg", type=float, default=7.5, help="CFG of the student's own samples")
g.add_argument("--bridge-steps", type=int, help="projector (and baseline) training steps")
g.add_argument("--bridge-batch", type=int, help="per process")
g.add_argument("--bridge-train-lr", type=float, default=1e-3)
g.add_argument("--bridge-width", type=int)
g.add_argument("--bridge-depth", type=int)
g.add_argument("--bridge-tap", choices=["features", "pixels"],
               help="where the projector reads the frozen student decoder: its feature map at the teacher latent's "
               "resolution, or the decoded image (the whole decoder; its gradient matches the exact path's far better)."
               " Default: pixels for the toy preset, features at full size (see DEFAULTS)")
d = BR.BridgeLossConfig()
g.add_argument("--rec-weight", type=float, default=d.rec_weight)
g.add_argument("--attn-weight", type=float, default=d.attn_weight)
g.add_argument("--attn-blocks", nargs="+", type=lambda s: float(s) if "." in s else int(s), default=list(d.blocks),
               help="teacher blocks for attention fidelity: fractions of depth (0.5) or indices (3)")
g.add_argument("--attn-sigma", nargs=2, type=float, default=[d.sigma_lo, d.sigma_hi], help="unshifted sigma range")
g = p.add_argument_group("stage 2: distillation (DMD2 in teacher space)")
g.add_argument("--steps", type=int, help="iterations; each trains the fake score, every n-th also the student")
g.add_argument("--batch-size", type=int, help="per process")
g.add_argument("--lr", type=float, help="student")
g.add_argument("--fake-lr", type=float, help="fake score (LoRA)")
g.add_argument("--fake-steps-per-gen", type=int, help="fake-score updates per student update (DMD2: 5)")
g.add_argument("--lora-rank", type=int)
# The generator's input is always pure noise; the timestep it is told is its conditioning (DMD2: 999 for SD 1.5).
# x0 = (noise - sqrt(1 - a_t) eps) / sqrt(a_t) multiplies the eps error by 1 / sqrt(a_t): 14.6 at 999, 5.0 at 800.
# A small, briefly trained student (the toy's) is too rough at 999 for that gain (its one-step x0 has 2.5x the data's
# std, and 500 DMD steps don't repair it), so the toy preset tells it 800.
g.add_argument("--gen-timestep", type=int, help="the one-step generator's timestep (999; toy: 800)")
# 4.5: SD3.5-Medium's recommended sampling guidance (model card); below SD3's 7.0 because DMD's reverse KL is already
# mode-seeking and a high real-score CFG over-saturates one-step samples (DMD2 notes the same trade-off).
g.add_argument("--cfg", type=float, help="SD3: CFG of the real score (uncond = the cached negative; 4.5)")
g.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev: embedded guidance (pipeline default)")
g.add_argument("--sigma-range", nargs=2, type=float, help="unshifted sigma range of DMD (0.02 0.98; toy: 0.4 0.85)")
g.add_argument("--shift", type=float, help="the teacher's time shift (default: SD3 its scheduler config's or 3.0, "
               "FLUX exp(mu) at --teacher-res)")
# CHOICE: DMD's noise levels (real and fake score, fake-score training) are --sigma-range shifted by --dmd-shift,
# by default the teacher's own shift, as DMD2 draws them from the teacher's schedule. Stage 1's attention fidelity and
# the regression pairs' teacher sampling always use the teacher's shift. The toy preset sets --sigma-range and
# --dmd-shift (see DEFAULTS).
g.add_argument("--dmd-shift", type=float, help="time shift of DMD's noise levels (default: --shift; toy: 1)")
g.add_argument("--bridge-lr", type=float, default=0.0,
               help="> 0: fine-tune the projector, on its reconstruction of the current samples only")
# DMD2's GAN term: a classifier on the fake score's image tokens tells real teacher-space latents (--real-images, or
# the toy world's renders of the training prompts) from the bridged samples, both noised alike (DMD2's "diffusion
# GAN"); the generator's loss adds --gan-weight x its non-saturating GAN loss. Real data is what lets DMD2's student
# beat its teacher; without it, DMD can only match the teacher's distribution. CHOICE: the GAN's noise levels are
# U(lo, hi) of --sigma-range shifted by --gan-shift (1: uniform, as DMD2's uniform timesteps), not by the teacher's
# shift: the toy teacher's 12 puts most levels above sigma 0.85, where a classifier trained offline on the toy's
# real and distilled latents stayed at chance (loss 1.32 after 300 steps, against 0.51 with sigma in 0.1-0.9).
g.add_argument("--gan-weight", type=float, default=0.0,
               help="the generator's GAN loss weight (DMD2: 1e-3 for SD 1.5, 5e-3 for SDXL); 0 = off")
g.add_argument("--gan-critic-weight", type=float, default=1e-2, help="the classifier's loss weight (DMD2: 1e-2)")
g.add_argument("--gan-block", type=float, default=0.5, help="the teacher block (fraction of depth) it reads")
g.add_argument("--gan-shift", type=float, default=1.0, help="time shift of the GAN's noise levels (1 = none)")
g.add_argument("--real-images", help="--gan-weight > 0: folder of images, each with a NAME.txt caption that is one "
               "line of --prompts (the toy preset renders its prompts instead)")
# DMD1's regression loss (Yin et al., arXiv 2311.18828; DMD2 drops it: pairs cost teacher sampling at scale). Pairs =
# the teacher's own Euler samples (28 steps, --cfg / --guidance) of --reg-pairs random training prompts; the student's
# bridged one-step sample of the same prompt is pulled onto its pair (MSE in teacher space, where DMD runs; DMD1 uses
# LPIPS on pixels). CHOICE: the student's noise is drawn independently of the pair's: a 4-channel student noise can't
# be the teacher's 16-channel one, and the toy teacher's shape agreed 86% between two independent noises (83% with
# the coarse part shared), so the noise carries little that the prompt does not fix. The optimum is the teacher's mean
# image of the prompt, which DMD's gradient sharpens. Toy: --reg-weight 20, 0.080 -> 0.103 (README).
g.add_argument("--reg-weight", type=float, default=0.0, help="DMD1's regression loss weight (toy: 20); 0 = off")
g.add_argument("--reg-pairs", type=int, help="teacher samples for it (1000; toy: 256)")
g.add_argument("--ema", type=float, help="EMA decay of the student (0.999); 0 = off")
g.add_argument("--grad-clip", type=float, default=1.0)
g.add_argument("--weight-decay", type=float, default=0.01)
g.add_argument("--student-res", type=int, help="pixels")
g.add_argument("--teacher-res", type=int, help="pixels")
g = p.add_argument_group("engineering")
g.add_argument("--out", help="default: out/PRESET, or out")
g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
g.add_argument("--seed", type=int, default=0)
g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
g.add_argument("--compile", action="store_true")
g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, help="default: on with CUDA")
g.add_argument("--fsdp", action="store_true", help="shard the teacher over the processes (torchrun)")
g.add_argument("--sample-every", type=int)
g.add_argument("--ckpt-every", type=int)
g.add_argument("--eval", type=int, help="toy preset: judge the one-step student on N fixed prompts before and after")
args = p.parse_args()
if args.preset and (args.student or (args.teacher and args.preset != "toy")):
    raise UsageError(f"--preset {args.preset} brings its own models: drop --student / --teacher")
if not args.preset and bool(args.student) != bool(args.teacher):
    raise UsageError("give both --student and --teacher (or neither, for a preset)")
args.preset = args.preset or (None if args.student else DEFAULT_PRESET)
# CHOICE (bridge_tap): the toy preset reads the decoded image, where it is measured (README table: 0.122 +- 0.010 fully
# satisfied at 500 iterations against 0.097 +- 0.006 for the feature tap; 0.23 at 2000), with 400 stage-1 steps (its
# projector starts from raw pixels and needs more than the feature tap's 150). Full size keeps the feature tap until
# the pixel tap's time and memory are measured on a GPU: estimated on `meta`, +8% FLOPs per two-time-scale cycle
# (SD3.5-Medium) and 1.2 GiB of saved activations per sample at 512 px in bf16 with decoder checkpointing (0.33).
DEFAULTS = {"real": dict(  # None above means "from here"
    student_res=512, teacher_res=1024, latents=512, held_out=64, bridge_steps=2000, bridge_batch=2, bridge_width=128,
    bridge_depth=2, bridge_tap="features", steps=20000, batch_size=2, lr=1e-5, fake_lr=1e-4, lora_rank=64,
    fake_steps_per_gen=5, cfg=4.5, sigma_range=[0.02, 0.98], ema=0.999, sample_every=500, ckpt_every=500,
    t5_length=None, eval=0, gen_timestep=999, reg_pairs=1000)}
DEFAULTS["tiny"] = DEFAULTS["real"] | dict(
    student_res=64, teacher_res=128, latents=32, held_out=8, bridge_steps=150, bridge_batch=4, bridge_width=32,
    bridge_depth=1, steps=60, batch_size=2, lr=1e-4, fake_lr=1e-3, lora_rank=4, sample_every=20, ckpt_every=20,
    t5_length=8)
# The toy's DMD noise levels: U(0.4, 0.85), unshifted. On distilled samples the toy teacher's CFG x0 carries its shapes
# only at mid sigma (0.3-0.7); its shift 12 would put 69% of the levels above 0.85, where that x0 is distorted (README,
# "Where DMD loses the teacher's shapes"). With them and a 4x lower student lr (5e-5) the feature tap's distilled row
# reads 0.097 +- 0.006 fully satisfied over 3 seeds, against 0.080 +- 0.011 at shift 12 over U(0.02, 0.98), lr 2e-4.
DEFAULTS["toy"] = DEFAULTS["tiny"] | dict(  # tuned for < 10 minutes on 2 CPU cores (see the README)
    latents=96, held_out=16, bridge_steps=400, bridge_batch=8, bridge_width=64, bridge_depth=2, bridge_tap="pixels",
    steps=500, batch_size=8, lr=5e-5, fake_lr=1e-3, lora_rank=8, fake_steps_per_gen=2, cfg=4.5, ema=0.99,
    sample_every=100, ckpt_every=100, t5_length=None, eval=200, gen_timestep=800, reg_pairs=256,
    sigma_range=[0.4, 0.85], dmd_shift=1.0)
for k, v in DEFAULTS[args.preset or "real"].items():
    setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
if args.eval and args.preset != "toy":
    raise UsageError("--eval: the toy world's judge scores the toy preset only")
if args.grad_ckpt is None:
    args.grad_ckpt = args.device.startswith("cuda")
for k in ("latents", "held_out", "bridge_batch", "batch_size", "lora_rank", "fake_steps_per_gen", "sample_every",
          "ckpt_every", "bridge_width", "bridge_depth", "sample_steps", "reg_pairs"):
    if getattr(args, k) < 1:
        raise UsageError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
if args.student_res % 64 or args.teacher_res % 16 or not 0 < args.sigma_range[0] < args.sigma_range[1] < 1:
    raise UsageError("--student-res must be a multiple of 64, --teacher-res of 16, 0 < --sigma-range lo < hi < 1")
if not 0 <= args.gan_block <= 1:
    raise UsageError(f"--gan-block is a fraction of the teacher's depth, in [0, 1]; got {args.gan_block}")
if args.held_out >= args.latents:
    raise UsageError(f"--held-out {args.held_out} must be below --latents {args.latents}")
prompts = C.read_prompts(args.prompts) if args.prompts else None  # bad prompt files fail before anything is written
image_files = lambda d: sorted(f for f in Path(d).glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
if args.images:
    files = image_files(args.images)[:args.latents]
    if len(files) <= args.held_out:
        raise UsageError(f"--images {args.images}: {len(files)} images (png/jpg/webp), need more than --held-out "
                         f"{args.held_out}")
if args.gan_weight > 0 and args.preset != "toy":
    if not args.real_images:
        raise UsageError("--gan-weight > 0 needs real images: --real-images DIR (the toy preset renders its own)")
    real_files = image_files(args.real_images)
    no_caption = [f.name for f in real_files if not f.with_suffix(".txt").is_file()]
    if not real_files or no_caption:
        raise UsageError(f"--real-images {args.real_images}: " + (f"no caption NAME.txt for {no_caption[:3]}"
                         if real_files else "no png/jpg/webp images"))

# ----------------------------------------------------------------------------- processes, output folder, resume check
t_start, ddp = time.time(), int(os.environ.get("RANK", -1)) != -1
if ddp:
    cuda = args.device.startswith("cuda")
    # a long timeout: rank 0 alone builds the text cache and the stage-1 targets while the others wait
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
else:
    rank, world, device = 0, 1, torch.device(args.device)
    if args.fsdp:
        raise UsageError("--fsdp shards the teacher over processes: launch with torchrun")
master, cuda = rank == 0, device.type == "cuda"
barrier = dist.barrier if ddp else (lambda: None)
amp = lambda: torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()  # bf16 on CUDA, fp32 on CPU
dt = torch.bfloat16 if cuda else torch.float32  # frozen weights (teacher, VAEs)

out = Path(args.out or (f"out/{args.preset}" if args.preset else "out"))
try:
    out.mkdir(parents=True, exist_ok=True)
    (out / f".probe{rank}").write_text("")
    (out / f".probe{rank}").unlink()
except OSError as e:
    raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None
ckpt_path, log_path = out / "checkpoint.safetensors", out / "log.jsonl"
if args.preset == "tiny":  # the preset's model files, written below; loaded as real checkpoints would be
    args.student, args.teacher = str(out / "tiny" / "student.safetensors"), str(out / "tiny" / "teacher.safetensors")
    args.text_encoders, args.no_t5 = args.text_encoders or str(out / "tiny"), True
    args.prompts = args.prompts or str(out / "tiny" / "prompts.txt")
elif args.preset == "toy":  # toy_train.py's models; each tokenizer.json beside them is found by find_clip_tokenizer
    # --teacher may replace the toy teacher (the same-space reference of the README table) if it shares its text
    args.student = str(TOY / "student" / "toy_sd15.safetensors")  # encoders
    args.teacher = args.teacher or str(TOY / "teacher" / "toy_sd35.safetensors")
    args.text_encoders = args.text_encoders or str(TOY / "teacher" / "text_encoders")
    args.prompts = args.prompts or str(out / "prompts.txt")
    if not Path(args.student).is_file():
        raise UsageError(f"--preset toy: no toy models in {TOY}; train them first with `python toy_train.py`")
args.text_cache = args.text_cache or str(out / "text_cache.safetensors")
RUNTIME = {"steps", "out", "resume", "device", "compile", "grad_ckpt", "fsdp", "sample_every", "ckpt_every",
           "text_cache", "text_encoders", "t5_tokenizer", "bridge", "eval"}
config = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in RUNTIME} | {"world": world}))
if args.resume:
    TS.check_config(ckpt_path, config)
elif ckpt_path.exists():  # a preset reruns over a FINISHED run of itself with the same settings (it writes the same)
    done = Checkpoint(out / "student.safetensors").metadata if (out / "student.safetensors").is_file() else {}
    if not (args.preset and TS.read_config(ckpt_path) == config and done.get("step") == str(args.steps)):
        raise UsageError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    barrier()  # every rank has looked before rank 0 clears the old run's checkpoint and log
    if master:
        print(f"{out}: a finished --preset {args.preset} run with these settings; running it again over it")
        ckpt_path.unlink(), log_path.unlink(missing_ok=True)
torch.manual_seed(args.seed)
random.seed(args.seed)
np.random.seed(args.seed)
if args.preset == "toy" and master and not Path(args.prompts).exists():
    import toy  # training prompts: captions of random toy scenes (seed 0; the judge's are drawn with seed 777)
    rng = np.random.default_rng(0)
    Path(args.prompts).write_text("\n".join(toy.caption(s, rng) for s in toy.sample_scenes(1000, 0)) + "\n")
if args.preset == "tiny" and master and not (out / "tiny" / "prompts.txt").exists():
    torch.manual_seed(1234)  # the tiny world: fixed seeds, SD 1.5 / SD3.5-Medium structure, real single-file layouts
    clip_l = TE.CLIPTextModel(TE.PRESETS["tiny_l"])  # vocab 49408: the real CLIP tokenizer drives it
    export_sd15_single_file(U.UNet(replace(U.PRESETS["tiny"], context_dim=clip_l.cfg.width)),
                            V.VAE(V.PRESETS["tiny_sd15"]), clip_l, out / "tiny" / "student.safetensors")
    # quick GELU for CLIP-G: a single file carries no config and the loader picks the activation by width
    clip_g = TE.CLIPTextModel(replace(TE.PRESETS["tiny_g"], act="quick_gelu"))
    pooled_dim = clip_l.cfg.width + clip_g.cfg.projection  # CLIP-L pooled ++ CLIP-G projected, as SD3
    teacher = TM.MMDiT(replace(TM.PRESETS["tiny_sd35"], pooled_dim=pooled_dim))
    save_atomic({f"model.diffusion_model.{k}": v for k, v in teacher.state_dict().items()} |  # as sd3.5_medium:
                {f"first_stage_model.{k}": v for k, v in V.VAE(V.PRESETS["tiny_sd3"]).state_dict().items()},
                args.teacher)  # transformer + VAE in one file
    save_atomic(clip_l.state_dict(), out / "tiny" / "clip_l.safetensors")  # keys text_model.*, as clip_l.safetensors
    save_atomic(clip_g.state_dict(), out / "tiny" / "clip_g.safetensors")
    (out / "tiny" / "prompts.txt").write_text("\n".join([  # a handful of built-in prompts
        "a red circle on a blue background", "a small green square in the top left corner", "a yellow triangle",
        "a large white cross on black", "a blue ring in the center", "a black square on a yellow background",
        "a green triangle at the bottom right", "a photo of a cat"]) + "\n")
barrier()
prompts = prompts or (C.read_prompts(args.prompts) if args.prompts else None)

# ----------------------------------------------------------------------------- models and text
model = U.load_unet(args.student, device=device).train()  # the generator: fp32 master weights (autocast computes)
svae = V.load_vae(args.student, family="sd15", dtype=dt, device=device)
# --fsdp: read into CPU memory, then sharded block by block onto the device (never a whole teacher on one GPU)
teacher = TM.load_teacher(args.teacher, dtype=dt, device="cpu" if args.fsdp else device)
family = "flux" if isinstance(teacher.cfg, TM.FluxConfig) else "sd3"
tvae_path = args.teacher_vae or (args.teacher if (Path(args.teacher) / "vae").is_dir() or (
    Path(args.teacher).is_file() and "first_stage_model.decoder.conv_in.weight" in Checkpoint(args.teacher))
    else Path(args.teacher).parent / "ae.safetensors")
# --bridge-kind identity: a teacher in the student's own latent space, so its VAE is the student's
tvae = svae if args.bridge_kind == "identity" else V.load_vae(tvae_path, family=family, dtype=dt, device=device)
if not Path(args.text_cache).is_file():
    if not (args.text_encoders and prompts):
        raise UsageError(f"--text-cache {args.text_cache}: no such file; build it with conditioning.py, or pass "
                         "--prompts and --text-encoders to build it here")
    if master:
        text = C.load_teacher_text(args.teacher, args.text_encoders, args.t5_tokenizer, args.t5_length,
                                   not args.no_t5, dtype=dt, device=device)
        clip = TE.load_clip(find_component(args.student, "text_encoder"), dtype=dt, device=device)
        C.build_text_cache(prompts, clip, text, args.text_cache, args.negative_prompt,
                           student_tok=find_clip_tokenizer(args.student))
        del text, clip  # T5 and the CLIPs leave memory for good: training reads the cache only
        torch.cuda.empty_cache() if cuda else None
    barrier()
cache = C.load_text_cache(args.text_cache)
if prompts is not None and cache.prompts != prompts:
    raise UsageError(f"--text-cache {args.text_cache} holds other prompts than --prompts {args.prompts}")
if (cache.family, cache.teacher_context.shape[-1], cache.teacher_pooled.shape[-1], cache.student_context.shape[-1]) \
        != (family, teacher.cfg.context_dim, teacher.cfg.pooled_dim, model.cfg.context_dim):
    raise UsageError(f"--text-cache {args.text_cache} was built for other models ({cache.family} teacher)")
hs, ht = args.student_res // 8, args.teacher_res // 8  # latent sizes (both VAEs are 8x)
try:
    scale = BR.scale_for((hs, hs), (ht, ht))
except ValueError as e:
    raise UsageError(f"--student-res / --teacher-res: {e}") from None
exact = lambda z: BR.bridge_target(svae, tvae, z, (ht, ht))  # z_T*: student decode, resize, teacher encode
if args.bridge_kind == "identity" and (scale, getattr(teacher.cfg, "in_channels", 0)) != (1, 4):
    raise UsageError(f"--bridge-kind identity needs a teacher in the student's latent space (4 channels, --teacher-res "
                     f"= --student-res); {args.teacher} takes {teacher.cfg.in_channels} channels, scale {scale}")
if args.bridge_lr > 0 and args.bridge_kind in ("exact", "identity"):
    raise UsageError(f"--bridge-lr: --bridge-kind {args.bridge_kind} has nothing to fine-tune")
# The teacher's time shift: SD3 its scheduler config's (3.0; the toy teacher's 12); FLUX exp(mu), mu linear in the
# packed token count L (0.5 at 256, 1.15 at 4096: FluxPipeline calculate_shift).
shift = args.shift or (sd3_shift(args.teacher) if family == "sd3" else
                       math.exp(0.5 + 0.65 * ((args.teacher_res // 16) ** 2 - 256) / 3840))
dmd_shift = args.dmd_shift or shift
torch.manual_seed(args.seed)  # LoRA init: the same whether or not this run has just built the tiny models
TM.add_lora(teacher, args.lora_rank)
torch.manual_seed(args.seed)
ct = tvae.cfg.latent_channels  # teacher latent channels: 16 (4 for a same-space teacher)
bridge = BR.Bridge(svae, ct, scale, args.bridge_width, args.bridge_depth, args.bridge_tap).to(device)
naive = BR.NaiveBridge(4, ct, scale).to(device)  # stage 1's baseline (trained beside it: same data, reconstruction)
# The map into teacher space in stage 2: the Bridge, or an ablation (see --bridge-kind). Its parameters (if any) are
# the checkpoint's "projector".
to_teacher = {"bridge": bridge, "naive": naive, "exact": BR.ExactPath(svae, tvae, (ht, ht)),
              "identity": torch.nn.Identity()}[args.bridge_kind]
head = BR.RealismHead(teacher.cfg.hidden).to(device) if args.gan_weight > 0 else None  # DMD2's GAN classifier
if args.grad_ckpt:
    model.gradient_checkpointing = teacher.gradient_checkpointing = svae.decoder.gradient_checkpointing = True
ema = copy.deepcopy(model).requires_grad_(False) if args.ema > 0 else None


@torch.no_grad()
def one_step_images(m, noise, ctx):  # a one-step student's samples, decoded by the student VAE
    with amp():
        return svae.decode(one_step_x0(m, noise, args.gen_timestep, ctx).to(dt)).float()


if args.eval:  # the toy world's judge (its HPS) on fixed prompts and seeds: the one-step student before and after
    import toy
    judge, rng = toy.load_judge(), np.random.default_rng(777)  # seed 777: the prompts of assets/toy/scores.json
    eval_prompts = [toy.caption(s, rng) for s in toy.sample_scenes(args.eval, 777)]
    clip = TE.load_clip(find_component(args.student, "text_encoder"), dtype=dt, device=device)
    eval_ctx = C.sd15_context(clip, find_clip_tokenizer(args.student), eval_prompts)
    eval_noise = torch.randn((args.eval, 4, hs, hs), generator=torch.Generator().manual_seed(0)).to(device)

    judge_scores = lambda m: judge.score(eval_prompts, torch.cat([one_step_images(
        m, eval_noise[i:i + 50], eval_ctx[i:i + 50]).cpu() for i in range(0, args.eval, 50)]))
    scores = {"base": judge_scores(model)}
state = TS.read_state(ckpt_path) if args.resume else None
if args.resume:  # weights now (LoRA before sharding); optimizer and RNG states once those exist
    model.load_state_dict(state.part("student."))
    to_teacher.load_state_dict(state.part("projector."))
    head.load_state_dict(state.part("critic.")) if head is not None else None
    ema.load_state_dict(state.part("ema.")) if ema is not None else None
    missing = teacher.load_state_dict(state.part("lora."), strict=False).missing_keys
    if any(".lora_" in k for k in missing):
        raise UsageError(f"--resume: {ckpt_path} lacks LoRA weights {missing[:2]}")
elif args.bridge:
    load_state(to_teacher, Checkpoint(args.bridge).tensors(device=device), args.bridge)  # one-line errors
if args.fsdp:  # shard every block, then the root (moving each to the device): each rank holds 1/world of it
    from torch.distributed.fsdp import fully_shard
    for blocks in ("joint_blocks", "double_blocks", "single_blocks"):
        for block in getattr(teacher, blocks, []):
            fully_shard(block)
    fully_shard(teacher)
lora = [(n, p) for n, p in teacher.named_parameters() if p.requires_grad]  # after sharding: DTensors under FSDP
guided = teacher.takes_guidance  # FLUX.1-dev
real_cfg = family == "sd3" and args.cfg > 1  # the real score (and the regression pairs): CFG rows [negative; prompt]
guid = lambda n: torch.full((n,), args.guidance, device=device) if guided else None
ctx_of = lambda idx: (cache.teacher_context[idx].to(device), cache.teacher_pooled[idx].to(device))


def load_image(f, res):  # centre crop, resize, [-1, 1]
    im = Image.open(f).convert("RGB")
    s, (w, h) = min(im.size), im.size
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((res, res), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1


def mine(t):
    """This rank's slice of a tensor drawn for the GLOBAL batch: same data as one process with world x the batch."""
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n].to(device)


def all_reduce_grads(params):  # for the small projector (used twice a step, so not DDP-wrapped): mean over ranks
    for q in params:
        if ddp and q.grad is not None:
            dist.all_reduce(q.grad)
            q.grad /= world


def timing(t_it) -> dict:  # an iteration's seconds (the .item() of its losses synchronised) and peak GPU memory
    return {"sec": time.perf_counter() - t_it} | ({"peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}
                                                 if cuda else {})


def log(record):
    if master:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- stage 1: the Bridge
if not args.resume and not args.bridge and args.bridge_kind in ("bridge", "naive"):
    tfile = out / "bridge_targets.safetensors"
    key = json.dumps([args.student, args.teacher, args.images, args.latents, args.student_res, args.teacher_res,
                      args.sample_steps, args.sample_cfg, args.seed, cache.prompts])
    fresh = not tfile.is_file() or (safe_open(str(tfile), "pt").metadata() or {}).get("key") != key
    if master and fresh:
        gen = torch.Generator().manual_seed(args.seed + 1)
        if args.images:
            pidx = torch.arange(len(files)) % len(cache.prompts)  # CHOICE: uncaptioned images probe with any prompt
            with torch.no_grad(), amp():
                z_s = torch.cat([svae.encode(torch.stack([load_image(f, args.student_res) for f in files[i:i + 8]]
                                                         ).to(device, dt))
                                 for i in range(0, len(files), 8)]).float()
        else:  # the base student's own samples: DDIM, few steps, CFG (cheap; one batch of 8 at a time)
            pidx = torch.randint(len(cache.prompts), (args.latents,), generator=gen)
            noise, z_s = torch.randn((args.latents, 4, hs, hs), generator=gen), []
            for i in tqdm(range(0, args.latents, 8), desc="student samples", disable=not master):
                ctx = cache.student_context[pidx[i:i + 8]].to(device)
                with amp():
                    z_s.append(ddim_sample(model, torch.cat([cache.negative_student_context.to(device).expand_as(ctx),
                                           ctx]), noise[i:i + 8].to(device), args.sample_steps, args.sample_cfg))
            z_s = torch.cat(z_s)
        with torch.no_grad(), amp():
            z_t = torch.cat([exact(z_s[i:i + 8]).float() for i in range(0, len(z_s), 8)])
        save_atomic({"z_s": z_s, "z_t": z_t, "prompt_idx": pidx}, tfile, {"key": key})
    barrier()
    data = load_file(str(tfile))
    z_s, z_t, pidx = data["z_s"], data["z_t"], data["prompt_idx"]
    n_train = len(z_s) - args.held_out
    opt_b = torch.optim.AdamW(list(bridge.parameters()) + list(naive.parameters()), lr=args.bridge_train_lr)
    gen = torch.Generator().manual_seed(args.seed + 2)
    blocks = BR.resolve_blocks(tuple(args.attn_blocks), teacher.cfg.depth)
    G = args.bridge_batch * world
    torch.cuda.reset_peak_memory_stats(device) if cuda else None
    for it in (bar := tqdm(range(args.bridge_steps), desc="stage 1: bridge", disable=not master)):
        t_it = time.perf_counter()
        i = torch.randint(n_train, (G,), generator=gen)
        sigma = mine(BR.sample_sigmas(G, *args.attn_sigma, shift, generator=gen))
        noise = mine(torch.randn((G, ct, ht, ht), generator=gen))
        zs, zt, i = mine(z_s[i]), mine(z_t[i]), mine(i).cpu()
        # LoRA stays off through the backward too: with --grad-ckpt the backward recomputes the teacher's blocks
        with TM.lora_enabled(teacher, False):
            with amp():
                zh = bridge(zs)
                rec = BR.reconstruction_loss(zh, zt)
                attn = BR.attention_fidelity_loss(teacher, zh, zt, *ctx_of(pidx[i]), sigma, noise, blocks,
                                                  guid(len(i))) if args.attn_weight else torch.zeros((), device=device)
                rec_naive = BR.reconstruction_loss(naive(zs), zt)  # the baseline: same data and steps, reconstruction
            (args.rec_weight * rec + args.attn_weight * attn + rec_naive).backward()
        all_reduce_grads(opt_b.param_groups[0]["params"])
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
        bar.set_postfix(rec=f"{rec.item():.4f}", attn=f"{attn.item():.4f}", naive=f"{rec_naive.item():.4f}")
        log(dict(stage="bridge", step=it + 1, rec=rec.item(), attn=attn.item(), naive=rec_naive.item()) | timing(t_it))

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad(), amp():  # the report: held-out reconstruction and cost per sample
        zs, zt = z_s[n_train:].to(device), z_t[n_train:].to(device)
        mse = {name: BR.reconstruction_loss(f(zs), zt).item() for name, f in (("bridge", bridge), ("naive", naive))}
        mse["zero"] = zt.float().pow(2).mean().item()
        cost = {}
        for name, f in (("bridge", bridge), ("exact", exact)):
            f(zs[:args.bridge_batch])  # warm-up
            sync()
            t0 = time.perf_counter()
            for i in range(0, len(zs), args.bridge_batch):
                f(zs[i:i + args.bridge_batch])
            sync()
            cost[name] = 1000 * (time.perf_counter() - t0) / len(zs)
    report = dict(stage="bridge_eval", mse_bridge=mse["bridge"], mse_naive=mse["naive"], mse_zero=mse["zero"],
                  ms_bridge=cost["bridge"], ms_exact=cost["exact"], held_out=len(zs), steps=args.bridge_steps)
    log(report)
    if master:
        print(f"{bridge.describe()}\nbridge: held-out ({len(zs)} latents) reconstruction MSE {mse['bridge']:.4f} | "
              f"naive {mse['naive']:.4f} | predicting zero {mse['zero']:.4f}\nbridge: cost {cost['bridge']:.2f} "
              f"ms/sample vs exact decode-resize-encode {cost['exact']:.2f} ms/sample "
              f"({cost['exact'] / cost['bridge']:.1f}x faster)")
        save_atomic(bridge.state_dict(), out / "bridge.safetensors", {"report": json.dumps(report)})
        save_atomic(naive.state_dict(), out / "naive.safetensors", {"report": json.dumps(report)})
    del z_s, z_t, opt_b

# ----------------------------------------------------------------------------- stage 2: setup
raw_teacher, model_c = teacher, model
if args.compile:  # compile, then wrap (nanoGPT order)
    # The teacher block by block ("regional compilation"): its blocks share their code, so a few compiled graphs serve
    # all of them, and activation checkpointing wraps compiled blocks. Variants: batch (CFG doubles it), grad mode,
    # LoRA on / off, MMDiT-X blocks with and without attn2: more than dynamo's default recompile limit of 8.
    # Measured on an H100 (README, SD 1.5 + SD3.5-Medium at 1024 px): 52 s of compilation in the first iteration,
    # then the two-time-scale cycle takes 15% less time than eager. With the student UNet compiled too (whole, its
    # checkpointing inside the graph), the first iteration had not finished after 4.5 (teacher compiled whole) or 6
    # minutes (by block); so the student stays eager (3% of an iteration's FLOPs).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in [b for name in ("joint_blocks", "double_blocks", "single_blocks") for b in getattr(teacher, name, [])]:
        block.compile()
if ddp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    model_c = DDP(model_c, device_ids=[device.index] if cuda else None)
    teacher = teacher if args.fsdp else DDP(teacher, device_ids=[device.index] if cuda else None)
to_teacher.requires_grad_(args.bridge_lr > 0)
optimizers = {"student": torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay),
              "lora": torch.optim.AdamW([q for _, q in lora], lr=args.fake_lr, weight_decay=args.weight_decay)}
if head is not None:  # real teacher-space latents and their prompts (indices into the text cache), on the CPU
    if args.preset == "toy":  # the world itself: a fresh render of every training prompt
        import toy
        real_pidx = torch.arange(len(cache.prompts))
        loads = [lambda i=i: toy.render([replace(toy.parse_prompt(cache.prompts[i]), jitter=i)], args.teacher_res)[0]
                 for i in range(len(cache.prompts))]
    else:
        index = {q: i for i, q in enumerate(cache.prompts)}
        captions = [f.with_suffix(".txt").read_text().strip() for f in real_files]
        if unknown := [f.name for f, c in zip(real_files, captions, strict=True) if c not in index]:
            raise UsageError(f"--real-images {args.real_images}: the captions of {unknown[:3]} are not lines of "
                             f"--prompts {args.prompts} (the text cache has only those)")
        real_pidx = torch.tensor([index[c] for c in captions])
        loads = [lambda f=f: load_image(f, args.teacher_res) for f in real_files]
    with torch.no_grad(), amp():  # 8 at a time: never all images in memory
        real_z = torch.cat([tvae.encode(torch.stack([f() for f in loads[i:i + 8]]).to(device, dt)).float().cpu()
                            for i in range(0, len(loads), 8)])
    # The classifier reads the image tokens that come out of one block of the fake score (teacher + LoRA)
    taps = getattr(raw_teacher, "joint_blocks", None) or raw_teacher.double_blocks
    tap_block = BR.resolve_blocks((args.gan_block,), len(taps))[0]
    features = {}
    taps[tap_block].register_forward_hook(lambda m, inputs, out: features.__setitem__("img", out[1]))
    # its own optimizer (and clipping): under --fsdp the LoRA weights are DTensors, the head's are not
    optimizers["critic"] = torch.optim.AdamW(head.parameters(), lr=args.fake_lr, weight_decay=args.weight_decay)
if args.bridge_lr > 0:
    optimizers["projector"] = torch.optim.AdamW(to_teacher.parameters(), lr=args.bridge_lr, weight_decay=0.0)
unc_ctx, unc_pooled = cache.negative_teacher_context.to(device), cache.negative_teacher_pooled.to(device)
if args.reg_weight > 0:  # DMD1's regression pairs (see --reg-weight): rank 0 samples them once, cached like stage 1
    pfile = out / "reg_pairs.safetensors"
    key = json.dumps([args.teacher, args.reg_pairs, args.cfg, args.guidance, shift, args.seed, cache.prompts])
    fresh = not pfile.is_file() or (safe_open(str(pfile), "pt").metadata() or {}).get("key") != key
    barrier()  # every rank has looked before rank 0 writes
    if fresh and (master or args.fsdp):  # a sharded teacher needs every rank in its forwards: all sample the same
        gp = torch.Generator().manual_seed(args.seed + 4)
        reg_idx, reg_z = torch.randint(len(cache.prompts), (args.reg_pairs,), generator=gp), []
        for i in tqdm(range(0, args.reg_pairs, 8), desc="regression pairs: teacher samples", disable=not master):
            c, pl = ctx_of(reg_idx[i:i + 8])
            noise = torch.randn((len(c), ct, ht, ht), generator=gp).to(device)
            if real_cfg:
                c, pl = torch.cat([unc_ctx.expand_as(c), c]), torch.cat([unc_pooled.expand_as(pl), pl])
            with torch.no_grad(), amp(), TM.lora_enabled(raw_teacher, False):
                reg_z.append(sample_flow(raw_teacher, c, pl, noise, sd3_sigmas(28, shift), args.cfg if real_cfg else
                                         None, args.guidance if guided else None, progress=False).cpu())  # fp32
        if master:
            save_atomic({"prompt_idx": reg_idx, "z_t": torch.cat(reg_z)}, pfile, {"key": key})
    barrier()
    pairs = load_file(str(pfile))
    reg_idx, reg_z = pairs["prompt_idx"], pairs["z_t"]
gen = torch.Generator().manual_seed(args.seed + 3)  # every random draw of the loop: saved in the checkpoint


def save_checkpoint(step):  # a collective under FSDP (LoRA and optimizer states are gathered): every rank calls it
    parts = {"student": model.state_dict(), "projector": to_teacher.state_dict(), "lora": dict(lora)}
    parts |= {"critic": head.state_dict()} if head is not None else {}
    TS.save_state(ckpt_path, step, config, parts | ({"ema": ema.state_dict()} if ema is not None else {}), optimizers,
                  {"data": gen}, write=master, metadata={"student": args.student})


start = TS.restore(state, optimizers, {"data": gen}) if args.resume else 0
del state
if args.resume and master and log_path.exists():  # drop log lines past the checkpoint (a crash after logging)
    lines = [ln for ln in log_path.read_text().splitlines()
             if json.loads(ln).get("stage") != "distill" or json.loads(ln)["step"] <= start]
    (tmp := out / ".log.jsonl").write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, log_path)


@torch.no_grad()
def save_grid(step):
    """One-step samples of fixed prompts and seeds (row 1: student, row 2: EMA), decoded with the student VAE."""
    n = min(4, len(cache.prompts))
    noise = torch.randn((n, 4, hs, hs), generator=torch.Generator().manual_seed(1234)).to(device)
    ctx = cache.student_context[:n].to(device)
    rows = [one_step_images(m, noise, ctx) for m in [model] + ([ema] if ema is not None else [])]
    img = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # (3, rows * H, n * W)
    Image.fromarray(to_uint8(img[None])[0]).save(tmp := out / f".grid_{step:06d}.png")
    os.replace(tmp, out / f"grid_{step:06d}.png")


def check_finite(step, **losses) -> dict:
    """The NaN guard: every rank sees the same verdict, before any update. Returns the losses averaged over ranks
    (= the global batch's, for the log)."""
    v = torch.stack([x.detach().float().reshape(()) for x in losses.values()])
    dist.all_reduce(v) if ddp else None
    v = v / world
    if not torch.isfinite(v).all():
        values = ", ".join(f"{k}={x:.4g}" for k, x in zip(losses, v.tolist(), strict=True))
        raise UsageError(f"non-finite loss at step {step + 1} ({values}): stopped; {ckpt_path} keeps the last good "
                         "checkpoint" + ("" if ckpt_path.exists() else " (none written yet)"))
    return dict(zip(losses, v.tolist(), strict=True))


# ----------------------------------------------------------------------------- stage 2: the loop
B, G = args.batch_size, args.batch_size * world
lo, hi = args.sigma_range
t0 = time.time()
torch.cuda.reset_peak_memory_stats(device) if cuda else None
for step in (bar := tqdm(range(start, args.steps), desc="stage 2: distill", disable=not master, initial=start,
                         total=args.steps)):
    gen_step, t_it = step % args.fake_steps_per_gen == 0, time.perf_counter()  # the two-time-scale rule (DMD2)
    idx = torch.randint(len(cache.prompts), (G,), generator=gen)
    noise = mine(torch.randn((G, 4, hs, hs), generator=gen))
    idx = mine(idx).cpu()
    t_ctx, t_pooled = ctx_of(idx)
    with torch.set_grad_enabled(gen_step), amp():
        z_s = one_step_x0(model_c, noise, args.gen_timestep, cache.student_context[idx].to(device))  # fp32
        z_t = to_teacher(z_s)  # into teacher space (Bridge: frozen decoder + projector); grads flow back to z_s
    rec = {"step": step + 1, "stage": "distill"}
    if gen_step:
        sigma = mine(BR.sample_sigmas(G, lo, hi, dmd_shift, generator=gen))
        x = BR.add_noise(z_t.detach(), mine(torch.randn((G, ct, ht, ht), generator=gen)), sigma)
        with torch.no_grad(), amp():
            with TM.lora_enabled(raw_teacher, False):  # real score: the frozen teacher
                if real_cfg:
                    v_u, v_c = teacher(torch.cat([x, x]), sigma.repeat(2), torch.cat([unc_ctx.expand_as(t_ctx), t_ctx]),
                                       torch.cat([unc_pooled.expand_as(t_pooled), t_pooled])).float().chunk(2)
                    v_real = v_u + args.cfg * (v_c - v_u)
                else:
                    v_real = teacher(x, sigma, t_ctx, t_pooled, guid(B))
            v_fake = teacher(x, sigma, t_ctx, t_pooled, guid(B))  # fake score: teacher + LoRA
        loss_g = BR.dmd_generator_loss(z_t, BR.x0_from_v(x, sigma, v_real), BR.x0_from_v(x, sigma, v_fake))
        loss_gan = torch.zeros((), device=device)
        if head is not None:  # the generator's GAN loss: the classifier on its own noised samples, grads to z_t
            g_sigma = mine(BR.sample_sigmas(G, lo, hi, args.gan_shift, generator=gen))
            with amp():  # the raw teacher: this pass's LoRA / head gradients are dropped below (no DDP sync wanted)
                raw_teacher(BR.add_noise(z_t, mine(torch.randn((G, ct, ht, ht), generator=gen)), g_sigma), g_sigma,
                            t_ctx, t_pooled, guid(B))
                loss_gan = BR.gan_generator_loss(head(features.pop("img")))
        loss_reg = torch.zeros((), device=device)
        if args.reg_weight > 0:  # DMD1's regression: a second one-step sample, of a pair's prompt, onto the pair
            j = torch.randint(len(reg_idx), (G,), generator=gen)
            r_noise, j = mine(torch.randn((G, 4, hs, hs), generator=gen)), mine(j).cpu()
            with amp():
                z_r = to_teacher(one_step_x0(model_c, r_noise, args.gen_timestep,
                                             cache.student_context[reg_idx[j]].to(device)))
                loss_reg = BR.reconstruction_loss(z_r, reg_z[j].to(device))
        loss_b = torch.zeros((), device=device)
        if args.bridge_lr > 0:  # keep the fine-tuned projector faithful: its reconstruction on these samples
            with amp():
                loss_b = BR.reconstruction_loss(to_teacher(z_s.detach()), exact(z_s.detach()))
        rec |= check_finite(step, loss_gen=loss_g, **({"loss_rec": loss_b} if args.bridge_lr > 0 else {}),
                            **({"loss_gan": loss_gan} if head is not None else {}),
                            **({"loss_reg": loss_reg} if args.reg_weight > 0 else {}))
        (loss_g + args.gan_weight * loss_gan + args.reg_weight * loss_reg).backward()
        for name in ("lora", "critic") if head is not None else ():  # the GAN loss reached the classifier too:
            optimizers[name].zero_grad(set_to_none=True)  # not its to learn from
        if args.bridge_lr > 0:  # the projector learns from its reconstruction ONLY: the DMD gradient would teach it
            to_teacher.zero_grad(set_to_none=True)  # to flatter the student (to map its samples nearer the teacher's
            (args.rec_weight * loss_b).backward()  # data than they are) instead of the student to improve
            all_reduce_grads(to_teacher.parameters())
        rec["grad_norm_gen"] = TS.full(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)).item()
        for name in ("student", "projector"):
            if name in optimizers:
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
        if ema is not None:
            torch._foreach_lerp_(list(ema.parameters()), [q.detach() for q in model.parameters()], 1 - args.ema)
    # fake score: flow matching on the detached samples (LoRA on)
    x0 = z_t.detach().float()
    sigma = mine(BR.sample_sigmas(G, lo, hi, dmd_shift, generator=gen))
    n = mine(torch.randn((G, ct, ht, ht), generator=gen))
    x, ctx, pooled = BR.add_noise(x0, n, sigma), t_ctx, t_pooled
    if head is not None:  # + the classifier, on generated and real latents noised alike: one forward of 3B
        ridx = torch.randint(len(real_z), (G,), generator=gen)
        r_ctx, r_pooled = ctx_of(mine(real_pidx[ridx]).cpu())
        c_sigma = torch.cat([mine(BR.sample_sigmas(G, lo, hi, args.gan_shift, generator=gen)) for _ in "gr"])
        c_noise = torch.cat([mine(torch.randn((G, ct, ht, ht), generator=gen)) for _ in "gr"])
        x_c = BR.add_noise(torch.cat([x0, mine(real_z[ridx])]), c_noise, c_sigma)  # generated, then real
        x, sigma = torch.cat([x, x_c]), torch.cat([sigma, c_sigma])
        ctx, pooled = torch.cat([ctx, ctx, r_ctx]), torch.cat([pooled, pooled, r_pooled])
    with amp():
        loss_f = BR.flow_matching_loss(teacher(x, sigma, ctx, pooled, guid(len(x)))[:B], x0, n)
        loss_c = BR.gan_critic_loss(*head(features.pop("img")[B:]).split(B)[::-1]) if head is not None else None
    rec |= check_finite(step, loss_fake=loss_f, **({"loss_critic": loss_c} if head is not None else {}))
    (loss_f + (args.gan_critic_weight * loss_c if head is not None else 0)).backward()
    all_reduce_grads(head.parameters()) if head is not None else None
    rec["grad_norm_fake"] = TS.full(torch.nn.utils.clip_grad_norm_([q for _, q in lora], args.grad_clip)).item()
    if head is not None:
        rec["grad_norm_critic"] = torch.nn.utils.clip_grad_norm_(head.parameters(), args.grad_clip).item()
    for name in ("lora", "critic") if head is not None else ("lora",):
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
    log(rec | timing(t_it))
    bar.set_postfix({k: f"{v:.4f}" for k, v in rec.items() if k.startswith("loss")})
    if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
        save_checkpoint(step + 1)
    if master and ((step + 1) % args.sample_every == 0 or step + 1 == args.steps):
        save_grid(step + 1)
        if args.eval and step + 1 < args.steps:  # the judge's curve (toy preset); the final score is printed below
            log({"stage": "judge_step", "step": step + 1, "student": judge_scores(model)})

# ----------------------------------------------------------------------------- export
if master:
    meta = {"distilled": "1", "steps": "1", "timestep": str(args.gen_timestep), "resolution": str(args.student_res),
            "teacher": args.teacher, "step": str(args.steps)}
    svae_fp32 = V.load_vae(args.student, family="sd15")  # the student's own VAE and CLIP-L, as released (fp32)
    clip = TE.load_clip(find_component(args.student, "text_encoder"))
    export_sd15_single_file(model, svae_fp32, clip, out / "student.safetensors", meta)
    if ema is not None:
        export_sd15_single_file(ema, svae_fp32, clip, out / "student_ema.safetensors", meta | {"ema": str(args.ema)})
    if (tok := Path(args.student).parent / "tokenizer.json").is_file():  # a vocabulary of its own (the toy's)
        shutil.copyfile(tok, out / "tokenizer.json")
    name = {"bridge": "bridge", "naive": "naive"}.get(args.bridge_kind)  # exact / identity: nothing learned
    if name and (args.bridge_lr > 0 or not (out / f"{name}.safetensors").exists()):  # fine-tuned, or no stage 1
        save_atomic(to_teacher.state_dict(), out / f"{name}.safetensors")
    print(f"stage 2: {args.steps - start} steps in {time.time() - t0:.1f}s; run {time.time() - t_start:.1f}s; "
          f"wrote {out}/: student.safetensors{', student_ema.safetensors' if ema is not None else ''}, "
          "bridge.safetensors, log.jsonl, grid_*.png, checkpoint.safetensors")
    if args.eval:
        scores |= {"student": judge_scores(model)} | ({"ema": judge_scores(ema)} if ema is not None else {})
        log({"stage": "judge", **scores})
        ref = json.loads((TOY / "scores.json").read_text()) if (TOY / "scores.json").is_file() else {}
        scores |= {"teacher (28 steps)": ref["teacher_euler28_cfg5"]} if "teacher_euler28_cfg5" in ref else {}
        print(f"judge, one step (t = {args.gen_timestep}) on {args.eval} fixed prompts and seeds (all_correct = the "
              "toy HPS):")
        for name, r in scores.items():
            print(f"  {name:18s} all_correct {r['all_correct']:.3f} | " + " ".join(
                f"{k} {r[k]:.2f}" for k in toy.ATTRIBUTES) + f" | fd {r['fd']:.2f}")
if ddp:
    dist.destroy_process_group()
