"""Cross-Space Distillation: train the Bridge (stage 1), then distill a flow-matching teacher into a one-step SD 1.5
student with DMD2 in the TEACHER's latent space (stage 2). One flat script, nanoGPT style.

    python distill.py                 # = --preset toy: the committed toy models (assets/toy), CPU, < 10 minutes
    python distill.py --preset tiny   # random tiny models (the tests'), CPU, a minute: out/tiny/
    torchrun --nproc_per_node 8 distill.py --student v1-5-pruned-emaonly.safetensors \
        --teacher sd3.5_medium.safetensors --text-encoders text_encoders/ --prompts prompts.txt --out runs/sd35m

Stage 1: student latents z_S (encoded --images, or the base student's own few-step DDIM + CFG samples), their exact
teacher latents z_T* = bridge_target(z_S), cached; the projector learns reconstruction + attention fidelity.
Stage 2: generator = the SD 1.5 UNet, one step from pure noise; z_T = Bridge(z_S); real score = the frozen teacher;
fake score = teacher + LoRA, trained by flow matching on the detached z_T, `--fake-steps-per-gen` fake updates per
generator update (DMD2's two time scales). DMD2's GAN term: variants/gan.py. GPU time and memory: bench/README.md.
"""
import argparse
import copy
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from torch.profiler import record_function as phase  # names the loop's parts for bench/profile.py
from tqdm import tqdm

import bridge as BR
import evaluate as EV
import teachers as TL
import text.conditioning as C
import train_state as TS
import unet as U
import vae as V
from export import export_distilled
from teacher_mmdit import FluxConfig
from toy import presets
from variants import gan as GAN
from weights import ArgumentParser, Checkpoint, CheckpointError, load_state, save_atomic


class UsageError(ValueError):
    """Bad input or a stopped run: printed as one `error: ...` line, like the errors of the files it reads."""


TS.one_line_errors(UsageError, CheckpointError, GAN.InputError, EV.UsageError,
                   checkpoint=lambda: globals().get("ckpt_path"))


# ----------------------------------------------------------------------------- arguments (None: from DEFAULTS below)
p = ArgumentParser(description=__doc__.split("\n")[0])
g = p.add_argument_group("models (give none for a preset)")
g.add_argument("--preset", choices=["toy", "tiny"], help="toy (the default without models): the committed toy models "
               "and toy-world prompts, judged before and after; tiny: random tiny models (fast, for tests)")
g.add_argument("--student", help="SD 1.5 single file or diffusers pipeline folder (UNet, VAE, CLIP-L)")
g.add_argument("--teacher", help="SD3 / SD3.5 / FLUX.1 transformer: single file or diffusers folder")
g.add_argument("--teacher-vae", help="default: inside the teacher (file or pipeline), else ae.safetensors beside it")
g.add_argument("--prompts", help="training prompts, one per line")
g.add_argument("--text-cache", help="from `python -m text.conditioning` (default OUT/text_cache.safetensors)")
g.add_argument("--text-encoders", help="build a missing cache here: folder of clip_l/clip_g/t5xxl or pipeline root")
g.add_argument("--t5-tokenizer", help="T5 tokenizer.json / spiece.model (default: found beside the encoders)")
g.add_argument("--t5-length", type=int, help="T5 tokens when building the cache (default: the teacher's)")
g.add_argument("--no-t5", action="store_true", help="SD3: zeros instead of T5 (as diffusers without text_encoder_3)")
g.add_argument("--negative-prompt", default="", help="the unconditional prompt (CFG)")
g = p.add_argument_group("stage 1: the Bridge")
g.add_argument("--bridge", help="a trained projector (OUT/bridge.safetensors of an earlier run): skip stage 1")
g.add_argument("--bridge-kind", choices=["bridge", "naive", "exact", "identity"], default="bridge",
               help="the map into teacher space in stage 2 (ablations): bridge (the method), naive (resize + 1x1, "
               "trained in stage 1 beside it), exact (differentiable decode-resize-encode), identity (a teacher in "
               "the student's own latent space)")
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
g.add_argument("--bridge-tap", choices=["features", "pixels"], help="the projector reads the frozen decoder's "
               "features at the teacher latent's size, or the decoded image (toy preset: pixels; full size: features)")
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
g.add_argument("--warmdown", type=float, help="the student lr falls linearly to 0 over this last fraction of the "
               "iterations (0: constant, as DMD2; toy: 0.5)")
g.add_argument("--fake-steps-per-gen", type=int, help="fake-score updates per student update (DMD2: 5)")
g.add_argument("--lora-rank", type=int)
# The generator's input is pure noise; its timestep is its conditioning (DMD2: 999). x0 divides the eps error by
# sqrt(abar(t)): a briefly trained student is too rough at 999 for that, so the toy tells it 600 (toy/LOG.md#gen-t).
g.add_argument("--gen-timestep", type=int, help="the one-step generator's timestep (999; toy: 600)")
# 4.5: SD3.5-Medium's recommended sampling guidance (model card); below SD3's 7.0 because DMD's reverse KL is already
# mode-seeking and a high real-score CFG over-saturates one-step samples (DMD2 notes the same trade-off).
g.add_argument("--cfg", type=float, help="SD3: CFG of the real score (uncond = the cached negative; 4.5)")
g.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev: embedded guidance (pipeline default)")
g.add_argument("--sigma-range", nargs=2, type=float, help="unshifted sigma range of DMD (0.02 0.98; toy: 0.4 0.85)")
g.add_argument("--shift", type=float, help="the teacher's time shift (default: SD3 its scheduler config's or 3.0, "
               "FLUX exp(mu) at --teacher-res)")
# CHOICE: DMD's noise levels (real and fake score, fake-score training) are --sigma-range shifted by --dmd-shift,
# by default the teacher's own shift, as DMD2 draws them from the teacher's schedule; stage 1 always uses the
# teacher's. The toy preset's: toy/LOG.md#dmd-noise-levels.
g.add_argument("--dmd-shift", type=float, help="time shift of DMD's noise levels (default: --shift; toy: 1)")
g.add_argument("--ema", type=float, help="EMA decay of the student (0.999); 0 = off")
g.add_argument("--grad-clip", type=float, default=1.0)
g.add_argument("--weight-decay", type=float, default=0.01)
g.add_argument("--student-res", type=int, help="pixels")
g.add_argument("--teacher-res", type=int, help="pixels")
GAN.add_arguments(p)
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
g.add_argument("--eval", type=int, help="score the one-step student on N fixed prompts before, during and after")
g.add_argument("--eval-metric", help="evaluate.py's: toy (the toy preset's), clip, pickscore, hpsv2 (default clip)")
g.add_argument("--eval-weights", help="the metric's model (evaluate.py --weights)")
g.add_argument("--eval-every", type=int, help="iterations between scores (default: --sample-every)")
args = p.parse_args()
if args.preset and (args.student or (args.teacher and args.preset != "toy")):
    raise UsageError(f"--preset {args.preset} brings its own models: drop --student / --teacher")
if not args.preset and bool(args.student) != bool(args.teacher):
    raise UsageError("give both --student and --teacher (or neither, for a preset)")
args.preset = args.preset or (None if args.student else "toy")
# CHOICE (bridge_tap): full size keeps the feature tap until a GPU measures the pixel tap (bench/README.md)
DEFAULTS = {"real": dict(  # None above means "from here"; the toy and tiny presets' in toy/presets.py
    student_res=512, teacher_res=1024, latents=512, held_out=64, bridge_steps=2000, bridge_batch=2, bridge_width=128,
    bridge_depth=2, bridge_tap="features", steps=20000, batch_size=2, lr=1e-5, fake_lr=1e-4, lora_rank=64,
    fake_steps_per_gen=5, cfg=4.5, sigma_range=[0.02, 0.98], ema=0.999, sample_every=500, ckpt_every=500,
    t5_length=None, eval=0, eval_metric="clip", gen_timestep=999, warmdown=0.0)}
for k, v in presets.defaults(args.preset, DEFAULTS["real"]).items():
    setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
args.eval_every = args.eval_every or args.sample_every
if args.eval and args.eval_metric == "toy" and args.preset != "toy":
    raise UsageError("--eval-metric toy: the toy world's judge scores the toy preset only")
args.grad_ckpt = args.device.startswith("cuda") if args.grad_ckpt is None else args.grad_ckpt
for k in ("steps", "latents", "held_out", "bridge_batch", "batch_size", "lora_rank", "fake_steps_per_gen",
          "sample_every", "ckpt_every", "bridge_width", "bridge_depth", "sample_steps"):
    if getattr(args, k) < 1:
        raise UsageError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
if args.student_res % 64 or args.teacher_res % 16 or not 0 < args.sigma_range[0] < args.sigma_range[1] < 1:
    raise UsageError("--student-res must be a multiple of 64, --teacher-res of 16, 0 < --sigma-range lo < hi < 1")
if (r := args.teacher_res // args.student_res) < 1 or args.teacher_res % args.student_res or r & (r - 1):
    raise UsageError(f"--teacher-res {args.teacher_res} must be a power-of-two multiple of --student-res")
if args.held_out >= args.latents:
    raise UsageError(f"--held-out {args.held_out} must be below --latents {args.latents}")
prompts = C.read_prompts(args.prompts) if args.prompts else None  # bad prompt files fail before anything is written
if args.images and len(files := V.image_files(args.images)[:args.latents]) <= args.held_out:
    raise UsageError(f"--images {args.images}: {len(files)} images, need more than --held-out {args.held_out}")
GAN.check_args(args, renders=args.preset == "toy")  # the toy preset renders its real images

# ----------------------------------------------------------------------------- processes, output folder, resume check
t_start = time.time()
rank, world, device = TS.init_processes(args.device, args.fsdp)  # torchrun: DDP (or FSDP for the teacher)
ddp = dist.is_initialized()
master, cuda = rank == 0, device.type == "cuda"
barrier = dist.barrier if ddp else (lambda: None)
amp = lambda: torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()  # bf16 on CUDA, fp32 on CPU
dt = torch.bfloat16 if cuda else torch.float32  # frozen weights (teacher, VAEs)

out = Path(args.out or (f"out/{args.preset}" if args.preset else "out"))
TS.prepare_folder(out, rank)  # writable; temp files of an interrupted save removed
ckpt_path, log_path = out / "checkpoint.safetensors", out / "log.jsonl"
presets.prepare(args, out)  # a preset's models and prompts (toy/presets.py)
args.text_cache = args.text_cache or str(out / "text_cache.safetensors")
RUNTIME = {"steps", "out", "resume", "device", "compile", "grad_ckpt", "fsdp", "sample_every", "ckpt_every",
           "text_cache", "text_encoders", "t5_tokenizer", "bridge", "eval", "eval_metric", "eval_weights", "eval_every"}
config = json.loads(json.dumps({k: TS.portable(v, out) for k, v in vars(args).items() if k not in RUNTIME}
                              | {"world": world}))  # paths: relative to the folder, or by name and content
if args.resume:
    TS.check_config(ckpt_path, config)
elif ckpt_path.exists():  # a preset reruns over a FINISHED run of itself with the same settings (it writes the same)
    if not (args.preset and TS.finished(ckpt_path, out / "student.safetensors", config, args.steps)):
        raise UsageError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    barrier()  # every rank has looked before rank 0 clears the old run's checkpoint and log
    if master:
        print(f"{out}: a finished --preset {args.preset} run with these settings; running it again over it")
        ckpt_path.unlink(), log_path.unlink(missing_ok=True)
TS.seed_all(args.seed)
presets.build(args, out) if master else None  # rank 0 writes what a preset lacks (its models, prompts)
barrier()
prompts = prompts or (C.read_prompts(args.prompts) if args.prompts else None)

# ----------------------------------------------------------------------------- models and text
model = U.load_unet(args.student, device=device).train()  # the generator: fp32 master weights (autocast computes)
svae = V.load_vae(args.student, family="sd15", dtype=dt, device=device).to(memory_format=torch.channels_last)  # faster
teacher = TL.load_teacher(args.teacher, dtype=dt, device="cpu" if args.fsdp else device)  # --fsdp: sharded below
family = "flux" if isinstance(teacher.cfg, FluxConfig) else "sd3"
tvae = svae if args.bridge_kind == "identity" else V.load_vae(  # identity: the teacher shares the student's VAE
    TL.find_teacher_vae(args.teacher, args.teacher_vae), family=family, dtype=dt, device=device)
cache = C.text_cache(args.text_cache, prompts, args.teacher, args.text_encoders, args.student, family,
                     (teacher.cfg.context_dim, teacher.cfg.pooled_dim, model.cfg.context_dim), args.t5_tokenizer,
                     args.t5_length, not args.no_t5, args.negative_prompt, dt, device, build=master, wait=barrier)
hs, ht, scale = args.student_res // 8, args.teacher_res // 8, args.teacher_res // args.student_res  # checked above
exact = lambda z: BR.bridge_target(svae, tvae, z, (ht, ht))  # z_T*: student decode, resize, teacher encode
if args.bridge_kind == "identity" and (scale, getattr(teacher.cfg, "in_channels", 0)) != (1, 4):
    raise UsageError(f"--bridge-kind identity needs a teacher in the student's latent space (4 channels, --teacher-res "
                     f"= --student-res); {args.teacher} takes {teacher.cfg.in_channels} channels, scale {scale}")
# The teacher's time shift: SD3 its scheduler config's (3.0; the toy teacher's 12); FLUX exp(mu) at --teacher-res.
shift = args.shift or (TL.sd3_shift(args.teacher) if family == "sd3" else
                       math.exp(TL.flux_mu((args.teacher_res // 16) ** 2)))
dmd_shift = args.dmd_shift or shift
torch.manual_seed(args.seed)  # LoRA init: the same whether or not this run has just built the tiny models
TL.add_lora(teacher, args.lora_rank)
torch.manual_seed(args.seed)
ct = tvae.cfg.latent_channels  # teacher latent channels: 16 (4 for a same-space teacher)
bridge = BR.Bridge(svae, ct, scale, args.bridge_width, args.bridge_depth, args.bridge_tap).to(device)
naive = BR.NaiveBridge(4, ct, scale).to(device)  # stage 1's baseline (trained beside it: same data, reconstruction)
# The map into teacher space in stage 2: the Bridge, or an ablation (--bridge-kind); its weights: "projector"
to_teacher = {"bridge": bridge, "naive": naive, "exact": BR.ExactPath(svae, tvae, (ht, ht)),
              "identity": torch.nn.Identity()}[args.bridge_kind]
if args.grad_ckpt:
    model.gradient_checkpointing = teacher.gradient_checkpointing = svae.decoder.gradient_checkpointing = True
ema = copy.deepcopy(model).requires_grad_(False) if args.ema > 0 else None


@torch.no_grad()
def one_step_images(m, noise, ctx):  # a one-step student's samples, decoded by the student VAE
    with amp():
        return svae.decode(U.one_step_x0(m, noise, args.gen_timestep, ctx).to(dt)).float()


if args.eval:  # a metric (toy: the judge) on fixed prompts and seeds: the one-step student before, during and after
    judge = EV.RunEvaluator(args.eval_metric, args.eval_weights, args.eval, args.student, hs, dt, device)
    judge_scores = lambda m: judge(lambda noise, ctx: one_step_images(m, noise, ctx))
    scores = {"base": judge_scores(model)}
state = TS.read_state(ckpt_path) if args.resume else None
if args.resume:  # weights now (LoRA before sharding); optimizer and RNG states once those exist
    model.load_state_dict(state.part("student."))
    to_teacher.load_state_dict(state.part("projector."))
    ema.load_state_dict(state.part("ema.")) if ema is not None else None
    missing = teacher.load_state_dict(state.part("lora."), strict=False).missing_keys
    if any(".lora_" in k for k in missing):
        raise UsageError(f"--resume: {ckpt_path} lacks LoRA weights {missing[:2]}")
elif args.bridge:
    load_state(to_teacher, Checkpoint(args.bridge).tensors(device=device), args.bridge)  # one-line errors
TL.shard(teacher) if args.fsdp else None  # FSDP: each rank holds 1/world of every block
lora = [(n, p) for n, p in teacher.named_parameters() if p.requires_grad]  # after sharding: DTensors under FSDP
guided = teacher.takes_guidance  # FLUX.1-dev
real_cfg = family == "sd3" and args.cfg > 1  # the real score: CFG rows [negative; prompt]
guid = lambda n: torch.full((n,), args.guidance, device=device) if guided else None
ctx_of = lambda idx: (cache.teacher_context[idx].to(device), cache.teacher_pooled[idx].to(device))
timing = lambda t_it: TS.timing(t_it, device)  # an iteration's seconds (and peak GPU memory)
log = lambda record: TS.append_log(log_path, record) if master else None


# ----------------------------------------------------------------------------- stage 1: the Bridge
if not args.resume and not args.bridge and args.bridge_kind in ("bridge", "naive"):
    tfile = out / "bridge_targets.safetensors"
    key = json.dumps([args.student, args.teacher, args.images, args.latents, args.student_res, args.teacher_res,
                      args.sample_steps, args.sample_cfg, args.seed, cache.prompts])
    fresh = not tfile.is_file() or (safe_open(str(tfile), "pt").metadata() or {}).get("key") != key
    if master and fresh:  # the data: student latents z_s and their exact teacher latents z_t, computed once
        gen = torch.Generator().manual_seed(args.seed + 1)
        if args.images:
            pidx = torch.arange(len(files)) % len(cache.prompts)  # CHOICE: uncaptioned images probe with any prompt
            with torch.no_grad(), amp():
                z_s = V.encode_images(svae, files, args.student_res).float()
        else:  # the base student's own samples: DDIM, few steps, CFG (cheap; one batch of 8 at a time)
            pidx = torch.randint(len(cache.prompts), (args.latents,), generator=gen)
            noise, z_s = torch.randn((args.latents, 4, hs, hs), generator=gen), []
            for i in tqdm(range(0, args.latents, 8), desc="student samples", disable=not master):
                ctx = cache.student_context[pidx[i:i + 8]].to(device)
                with amp():
                    z_s.append(U.ddim_sample(model, torch.cat([cache.negative_student_context.to(device).expand_as(ctx),
                                           ctx]), noise[i:i + 8].to(device), args.sample_steps, args.sample_cfg))
            z_s = torch.cat(z_s)
        with torch.no_grad(), amp():
            z_t = torch.cat([exact(z_s[i:i + 8]).float() for i in range(0, len(z_s), 8)])
        save_atomic({"z_s": z_s, "z_t": z_t, "prompt_idx": pidx}, tfile, {"key": key})
    barrier()
    data = load_file(str(tfile))
    z_s, z_t, pidx = data["z_s"], data["z_t"], data["prompt_idx"]
    n_train = len(z_s) - args.held_out
    # the pixel tap's frozen part (the decoded images) once; the feature tap's (32x z_t at full size) at each step
    if args.bridge_tap == "pixels":
        with torch.no_grad(), amp():
            taps = torch.cat([bridge.decode(z_s[i:i + 8].to(device)).cpu() for i in range(0, n_train, 8)])
    opt_b = torch.optim.AdamW(list(bridge.parameters()) + list(naive.parameters()), lr=args.bridge_train_lr)
    draw = TS.Draw(args.seed + 2, args.bridge_batch, device)
    blocks = BR.resolve_blocks(tuple(args.attn_blocks), teacher.cfg.depth)
    torch.cuda.reset_peak_memory_stats(device) if cuda else None
    for it in (bar := tqdm(range(args.bridge_steps), desc="stage 1: bridge", disable=not master)):
        t_it = time.perf_counter()
        i = torch.randint(n_train, (draw.global_batch,), generator=draw.gen)
        sigma, noise = draw.sigmas(*args.attn_sigma, shift), draw.noise((ct, ht, ht))
        zs, zt, i = draw.mine(z_s[i]), draw.mine(z_t[i]), draw.mine(i).cpu()
        # LoRA stays off through the backward too: with --grad-ckpt the backward recomputes the teacher's blocks
        with TL.lora_enabled(teacher, False):
            with amp():
                zh = bridge.project(taps[i].to(device) if args.bridge_tap == "pixels" else bridge.decode(zs))
                rec = BR.reconstruction_loss(zh, zt)
                attn = BR.attention_fidelity_loss(teacher, zh, zt, *ctx_of(pidx[i]), sigma, noise, blocks,
                                                  guid(len(i))) if args.attn_weight else torch.zeros((), device=device)
                rec_naive = BR.reconstruction_loss(naive(zs), zt)  # the baseline: same data and steps, reconstruction
            (args.rec_weight * rec + args.attn_weight * attn + rec_naive).backward()
        TS.all_reduce_grads(opt_b.param_groups[0]["params"])
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
        bar.set_postfix(rec=f"{rec.item():.4f}", attn=f"{attn.item():.4f}", naive=f"{rec_naive.item():.4f}")
        log(dict(stage="bridge", step=it + 1, rec=rec.item(), attn=attn.item(), naive=rec_naive.item()) | timing(t_it))
    report = {"stage": "bridge_eval"} | BR.held_out_report(  # held-out reconstruction, cost per sample
        bridge, naive, exact, z_s[n_train:].to(device), z_t[n_train:].to(device), args.bridge_batch, amp,
        torch.cuda.synchronize if cuda else (lambda: None)) | {"steps": args.bridge_steps}
    log(report)
    if master:
        print(f"{bridge.describe()}\n{BR.format_report(report)}")
        save_atomic(bridge.state_dict(), out / "bridge.safetensors", {"report": json.dumps(report)})
        save_atomic(naive.state_dict(), out / "naive.safetensors", {"report": json.dumps(report)})
    del z_s, z_t, opt_b

# ----------------------------------------------------------------------------- stage 2: setup
raw_teacher, model_c = teacher, model
TL.compile_blocks(teacher) if args.compile else None  # compile, then wrap (nanoGPT order)
if ddp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    model_c = DDP(model_c, device_ids=[device.index] if cuda else None)
    teacher = teacher if args.fsdp else DDP(teacher, device_ids=[device.index] if cuda else None)
to_teacher.requires_grad_(False)
draw = TS.Draw(args.seed + 3, args.batch_size, device)  # every random draw of the loop
gan = GAN.make(args, raw_teacher, tvae, cache.prompts, ctx_of, guid, draw, amp, dt, ddp, device,  # or NoGAN
               presets.real_renders if args.preset == "toy" else None)
gan.load_state(state.part("critic.")) if args.resume else None
optimizers = {"student": torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True),
              "lora": torch.optim.AdamW([q for _, q in lora], lr=args.fake_lr, weight_decay=args.weight_decay),
              **gan.optimizers}
fake_side = [name for name in ("lora", "critic") if name in optimizers]  # trained by the fake score's update
unc_ctx, unc_pooled = cache.negative_teacher_context.to(device), cache.negative_teacher_pooled.to(device)


def real_score(x, sigma, ctx, pooled):  # the frozen teacher (LoRA off): SD3 with CFG, FLUX.1-dev its guidance
    with phase("real score"), TL.lora_enabled(raw_teacher, False):
        if not real_cfg:
            return teacher(x, sigma, ctx, pooled, guid(len(x)))
        v_u, v_c = teacher(torch.cat([x, x]), sigma.repeat(2), torch.cat([unc_ctx.expand_as(ctx), ctx]),
                           torch.cat([unc_pooled.expand_as(pooled), pooled])).float().chunk(2)
        return v_u + args.cfg * (v_c - v_u)


def save_checkpoint(step):  # a collective under FSDP (LoRA and optimizer states are gathered): every rank calls it
    parts = {"student": model.state_dict(), "projector": to_teacher.state_dict(), "lora": dict(lora),
             **gan.state_dicts()}
    TS.save_state(ckpt_path, step, config, parts | ({"ema": ema.state_dict()} if ema is not None else {}), optimizers,
                  {"data": draw.gen}, write=master, metadata={"student": args.student, "teacher": args.teacher})


start, state = (TS.restore(state, optimizers, {"data": draw.gen}) if args.resume else 0), None
TS.trim_log(log_path, start) if args.resume and master and log_path.exists() else None  # lines past the checkpoint


@torch.no_grad()
def save_grid(step):
    """One-step samples of fixed prompts and seeds (row 1: student, row 2: EMA), decoded with the student VAE."""
    n = min(4, len(cache.prompts))
    noise = torch.randn((n, 4, hs, hs), generator=torch.Generator().manual_seed(1234)).to(device)
    ctx = cache.student_context[:n].to(device)
    rows = [one_step_images(m, noise, ctx) for m in [model] + ([ema] if ema is not None else [])]
    V.save_grid(rows, out / f"grid_{step:06d}.png", cache.prompts[:n])  # each column captioned with its prompt


# ----------------------------------------------------------------------------- stage 2: the loop
B, (lo, hi), t0, shown = args.batch_size, args.sigma_range, time.time(), {}
torch.cuda.reset_peak_memory_stats(device) if cuda else None
for step in (bar := tqdm(range(start, args.steps), desc="stage 2: distill", disable=not master, initial=start,
                         total=args.steps)):
    gen_step, t_it = step % args.fake_steps_per_gen == 0, time.perf_counter()  # the two-time-scale rule (DMD2)
    idx = torch.randint(len(cache.prompts), (draw.global_batch,), generator=draw.gen)
    noise, idx = draw.noise((4, hs, hs)), draw.mine(idx).cpu()
    t_ctx, t_pooled = ctx_of(idx)
    with phase("student + bridge"), torch.set_grad_enabled(gen_step), amp():  # the generator: one step
        z_s = U.one_step_x0(model_c, noise, args.gen_timestep, cache.student_context[idx].to(device))  # fp32
        z_t = to_teacher(z_s)  # into teacher space (Bridge: frozen decoder + projector); grads flow back to z_s
    rec = {"step": step + 1, "stage": "distill"}
    if gen_step:  # the generator's update: DMD's gradient, real score minus fake score, at a noised z_t
        sigma = draw.sigmas(lo, hi, dmd_shift)
        x = BR.add_noise(z_t.detach(), draw.noise((ct, ht, ht)), sigma)
        with torch.no_grad(), amp():
            v_real = real_score(x, sigma, t_ctx, t_pooled)
            with phase("fake score"):
                v_fake = teacher(x, sigma, t_ctx, t_pooled, guid(B))  # teacher + LoRA
        loss_g = BR.dmd_generator_loss(z_t, BR.x0_from_v(x, sigma, v_real), BR.x0_from_v(x, sigma, v_fake))
        with amp():
            loss_gan, logs = gan.generator_loss(z_t, t_ctx, t_pooled)  # 0 unless --gan-weight
        rec |= TS.check_finite(step, ckpt_path, loss_gen=loss_g, **logs)
        with phase("generator backward"):
            (loss_g + loss_gan).backward()
        for name in fake_side:  # a GAN pass through the fake score leaves grads there: not theirs to learn from
            optimizers[name].zero_grad(set_to_none=True)
        with phase("student optimizer"):  # --warmdown: the lr falls linearly to 0 over the last iterations
            optimizers["student"].param_groups[0]["lr"] = args.lr * min(1.0, (args.steps - step) / (
                args.warmdown * args.steps + 1e-9))
            rec["grad_norm_gen"] = TS.clip_and_step(optimizers["student"], args.grad_clip)
            if ema is not None:
                torch._foreach_lerp_(list(ema.parameters()), [q.detach() for q in model.parameters()], 1 - args.ema)
    # the fake score's update: flow matching on the detached samples (LoRA on)
    x0 = z_t.detach().float()
    sigma, n = draw.sigmas(lo, hi, dmd_shift), draw.noise((ct, ht, ht))
    with phase("fake update forward"), amp():
        v, loss_critic, logs = gan.fake_score(teacher, x0, BR.add_noise(x0, n, sigma), sigma, t_ctx, t_pooled)
        loss_f = BR.flow_matching_loss(v, x0, n)
    rec |= TS.check_finite(step, ckpt_path, loss_fake=loss_f, **logs)
    with phase("fake update backward"):
        (loss_f + loss_critic).backward()
    for name in fake_side:
        with phase("fake optimizer"):
            rec["grad_norm_" + {"lora": "fake"}.get(name, name)] = TS.clip_and_step(optimizers[name], args.grad_clip)
    log(rec | timing(t_it))
    shown |= {k: f"{x:.4f}" for k, x in rec.items() if k.startswith("loss")}  # loss_gen: its last update's
    bar.set_postfix(shown)
    if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
        save_checkpoint(step + 1)
    if master and ((step + 1) % args.sample_every == 0 or step + 1 == args.steps):
        save_grid(step + 1)
    if master and args.eval and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:  # the final: below
        log({"stage": "judge_step", "step": step + 1, "student": judge_scores(model)})  # the score's curve
        bar.unpause()  # the judge's time is not the iterations': the bar's rate and ETA leave it out

# ----------------------------------------------------------------------------- export
if master:
    meta = {"distilled": "1", "steps": "1", "timestep": str(args.gen_timestep), "resolution": str(args.student_res),
            "teacher": args.teacher, "step": str(args.steps)}
    export_distilled(model, args.student, out, meta, ema, args.ema)  # student(_ema).safetensors, tokenizer
    name = {"bridge": "bridge", "naive": "naive"}.get(args.bridge_kind)  # exact / identity: nothing learned
    if name and not (out / f"{name}.safetensors").exists():  # no stage 1 in this run (--bridge or --resume)
        save_atomic(to_teacher.state_dict(), out / f"{name}.safetensors")
    wrote = [f for f in ("student.safetensors", "student_ema.safetensors", "tokenizer.json", f"{name}.safetensors",
                         "log.jsonl", f"grid_{args.steps:06d}.png", "checkpoint.safetensors") if (out / f).is_file()]
    print(f"stage 2: {args.steps - start} steps in {time.time() - t0:.1f}s; run {time.time() - t_start:.1f}s; "
          f"wrote {out}/: {', '.join(wrote)}; open {out / f'grid_{args.steps:06d}.png'} for its samples")
    if args.eval:
        scores |= {"student": judge_scores(model)} | ({"ema": judge_scores(ema)} if ema is not None else {})
        log({"stage": "judge", **scores})
        judge.report(scores, args.gen_timestep)
if ddp:
    dist.destroy_process_group()
