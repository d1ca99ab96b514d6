"""Benchmark of distill.py at full size with random weights (a script, not a test).

    python -m bench.cycle --teacher sd35m --compile     # SD 1.5 + SD3.5-Medium at 1024 px, the defaults (batch 2)
    python -m bench.cycle --teacher flux --batch-size 1 # does a FLUX.1-dev teacher fit on one 80 GB GPU?
    python -m bench.cycle --teacher sd35m --tiny --device cpu   # smoke test of this script (tiny models)
    python -m bench.cycle --teacher sd35m --bridge-tap pixels   # the Bridge on the decoded image (toy's default)

Writes random models at the released configs, in the released single-file layouts (v1-5-pruned-emaonly;
sd3.5_medium with its VAE, or flux1-dev + ae beside it), and a random text cache into --work, then runs distill.py on
them as a user would (a short stage 1, then --steps iterations of stage 2) and reads its log.jsonl (disk: the
models, and the run's checkpoint and exports until they are deleted at the end: ~35 GB for SD3.5-Medium, ~60 GB FLUX):
- seconds per iteration, split into generator iterations (student + fake score) and fake-score-only ones, median
  after the first --skip iterations (compilation), and the two-time-scale cycle (1 generator + n - 1 fake-only);
- peak GPU memory of each stage (torch.cuda.max_memory_allocated, reset at the stage's start);
- achieved FLOP/s: the MODEL FLOPs of an iteration (counted by torch's FlopCounterMode on the meta device, shapes
  only; activation checkpointing's recomputation not counted, as in MFU) over its measured time, against --peak.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import bridge as BR
import teacher_mmdit as TM
import teachers as TL
import text.encoders as TE
import train_state as TS
import unet as U
import vae as V
from bench.modules import made_on
from export import export_sd15_single_file
from text.conditioning import TENSORS
from weights import save_atomic

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--teacher", choices=["sd35m", "flux"], default="sd35m")
p.add_argument("--tiny", action="store_true", help="tiny models (a CPU smoke test of this script)")
p.add_argument("--work", default="out/bench_cycle", help="models, text cache and the run go here")
p.add_argument("--device", default="cuda")
p.add_argument("--steps", type=int, default=20, help="stage-2 iterations")
p.add_argument("--skip", type=int, default=10, help="iterations left out of the medians (compilation, warm-up)")
p.add_argument("--bridge-steps", type=int, default=6)
p.add_argument("--batch-size", type=int, default=2, help="per GPU (distill.py's default: 2)")
p.add_argument("--peak", type=float, default=989.0, help="the GPU's dense bf16 TFLOP/s (H100 SXM: 989; "
               "bench/onestep.py measures it)")
p.add_argument("--json", help="write the measurements here (bench/results/)")
args, extra = p.parse_known_args()  # anything else goes to distill.py (e.g. --compile, --lora-rank 16)
flux = args.teacher == "flux"
work = Path(args.work) / (args.teacher + ("_tiny" if args.tiny else ""))
clip_cfg = TE.PRESETS["tiny_l" if args.tiny else "clip_l"]
unet_cfg = replace(U.PRESETS["tiny"], context_dim=clip_cfg.width) if args.tiny else U.PRESETS["sd15"]
svae_cfg = V.PRESETS["tiny_sd15" if args.tiny else "sd15"]
tcfg = TM.PRESETS[("tiny_" if args.tiny else "") + ("flux_dev" if flux else "sd35" if args.tiny else "sd35_medium")]
tvae_cfg = V.PRESETS[("tiny_" if args.tiny else "") + ("flux" if flux else "sd3")]
student_res, teacher_res = (64, 128) if args.tiny else (512, 1024)
text_len = 512 if flux else 77 + (8 if args.tiny else 256)  # the pipelines' defaults: FLUX-dev T5 512; SD3 77 + 256


def build(cls, cfg, dtype, device):
    with made_on(device, dtype):
        return cls(cfg)


# ----------------------------------------------------------------------------- random models and text, on disk
student, teacher = work / "v1-5-random.safetensors", work / ("flux1-dev-random.safetensors" if flux else
                                                                    "sd3.5_medium-random.safetensors")
cache = work / "text_cache.safetensors"
if not cache.is_file():  # written last: its presence means the models are there
    torch.manual_seed(0)
    dev = args.device
    # the student as v1-5-pruned-emaonly: fp32 UNet, VAE and CLIP-L in one file
    export_sd15_single_file(build(U.UNet, unet_cfg, torch.float32, dev), build(V.VAE, svae_cfg, torch.float32, dev),
                            build(TE.CLIPTextModel, clip_cfg, torch.float32, dev), student)
    model, tvae = build(TM.Flux if flux else TM.MMDiT, tcfg, torch.bfloat16, dev), build(V.VAE, tvae_cfg,
                                                                                          torch.bfloat16, dev)
    if flux:  # flux1-dev.safetensors: BFL names, no prefix; the VAE is ae.safetensors beside it
        save_atomic(model.state_dict(), teacher)
        save_atomic(tvae.state_dict(), work / "ae.safetensors")
    else:  # sd3.5_medium.safetensors: transformer and VAE in one file
        save_atomic({f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()} |
                    {f"first_stage_model.{k}": v for k, v in tvae.state_dict().items()}, teacher)
    del model, tvae
    n = 16  # prompts; row 0 of each tensor is the negative prompt (conditioning.build_text_cache's layout)
    shapes = dict(zip(TENSORS, [(n + 1, 77, unet_cfg.context_dim), (n + 1, text_len, 4096),  # student_context,
                                (n + 1, tcfg.pooled_dim)], strict=True))  # teacher_context, teacher_pooled
    tensors = {}
    for name, shape in shapes.items():
        full = torch.randn(shape).to(torch.bfloat16)
        tensors[name], tensors["negative_" + name] = full[1:].contiguous(), full[:1].contiguous()
    save_atomic(tensors, cache, {"prompts": json.dumps([f"random prompt {i}" for i in range(n)]),
                                 "negative_prompt": "", "family": "flux" if flux else "sd3", "t5_length": "0"})

# ----------------------------------------------------------------------------- the run
run = work / "run"
log = run / "log.jsonl"
log.unlink(missing_ok=True)
(run / "checkpoint.safetensors").unlink(missing_ok=True)
cmd = [sys.executable, "distill.py", "--student", str(student), "--teacher", str(teacher), "--text-cache", str(cache),
       "--out", str(run), "--device", args.device, "--student-res", str(student_res), "--teacher-res",
       str(teacher_res), "--latents", "12", "--held-out", "4", "--bridge-steps", str(args.bridge_steps), "--steps",
       str(args.steps), "--batch-size", str(args.batch_size), "--sample-every", str(10 ** 9), *extra]
print(" ".join(cmd), flush=True)
done = subprocess.run(cmd)
records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
ckpt = run / "checkpoint.safetensors"
used = TS.read_config(ckpt) if ckpt.is_file() else {}  # the settings distill.py ran with (its defaults + ours + extra)
for f in run.glob("*.safetensors"):  # random weights: the run's checkpoint and exports (~25 GB) only fill the disk
    f.unlink()
if done.returncode:
    last = records[-1] if records else "no log line"
    sys.exit(f"distill.py stopped with exit code {done.returncode}; last log line: {last}")


# ----------------------------------------------------------------------------- FLOPs of an iteration (meta device)
def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def fwd_bwd(call):
    def f():
        call().float().square().mean().backward()
    return f


B, hs, ht, fsg = used["batch_size"], student_res // 8, teacher_res // 8, used["fake_steps_per_gen"]
with torch.device("meta"):
    unet, svae = U.UNet(unet_cfg), V.VAE(svae_cfg).requires_grad_(False)
    tm = TM.Flux(tcfg) if flux else TM.MMDiT(tcfg)
    TL.add_lora(tm, used["lora_rank"])
    bridge = BR.Bridge(svae, tvae_cfg.latent_channels, teacher_res // student_res, used["bridge_width"],
                       used["bridge_depth"], used["bridge_tap"])  # the tap the run used (e.g. --bridge-tap pixels)
    zs = torch.randn(B, 4, hs, hs, requires_grad=True)
    t, sctx = torch.full((B,), 999), torch.randn(B, 77, unet_cfg.context_dim)
    x, sigma = torch.randn(B, tvae_cfg.latent_channels, ht, ht), torch.rand(B)
    tctx, pooled, guid = torch.randn(B, text_len, 4096), torch.randn(B, tcfg.pooled_dim), torch.full((B,), 3.5)
    call_t = lambda: tm(x, sigma, tctx, pooled, guid if flux else None)  # noqa: E731
    f_unet, fb_unet = flops(lambda: unet(zs, t, sctx)), flops(fwd_bwd(lambda: unet(zs, t, sctx)))
    f_bridge, fb_bridge = flops(lambda: bridge(zs)), flops(fwd_bwd(lambda: bridge(zs)))
    f_t, fb_t = flops(call_t), flops(fwd_bwd(call_t))  # fb_t: backward reaches the input; weight grads: LoRA only
# A generator iteration: student + Bridge forward and backward; the real score (x2 for CFG), the fake score, the
# fake score's flow-matching update. A fake-only iteration: student + Bridge forward (no grad), the update.
cfg_passes = 2 if not flux and used["cfg"] > 1 else 1  # distill.py: SD3's real score with CFG doubles the batch
gen_flops = fb_unet + fb_bridge + cfg_passes * f_t + f_t + fb_t
fake_flops = f_unet + f_bridge + fb_t

# ----------------------------------------------------------------------------- report
s2 = [r for r in records if r.get("stage") == "distill"]
s1 = [r for r in records if r.get("stage") == "bridge"]
gen_sec = statistics.median([r["sec"] for r in s2[args.skip:] if "loss_gen" in r] or [math.nan])
fake_sec = statistics.median([r["sec"] for r in s2[args.skip:] if "loss_gen" not in r] or [math.nan])
cycle_sec, cycle_flops = gen_sec + (fsg - 1) * fake_sec, gen_flops + (fsg - 1) * fake_flops
peak = lambda rs: f"{max(r['peak_gib'] for r in rs):.1f} GiB" if rs and "peak_gib" in rs[0] else "n/a (CPU)"  # noqa
name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
print(f"\n{name}, torch {torch.__version__}, teacher {tcfg.variant}, student {student_res} px -> teacher "
      f"{teacher_res} px, batch {B} per GPU, distill.py {' '.join(extra)}")
print(f"stage 1 (Bridge, attention fidelity): {statistics.median([r['sec'] for r in s1[1:]] or [math.nan]):.3f} "
      f"s/step, peak {peak(s1)}")
print(f"stage 2, median of iterations {args.skip + 1}..{len(s2)}: generator iteration {gen_sec:.3f} s "
      f"({gen_flops / 1e12:.1f} TFLOP), fake-only iteration {fake_sec:.3f} s ({fake_flops / 1e12:.1f} TFLOP), peak "
      f"{peak(s2)}")
tflops = cycle_flops / cycle_sec / 1e12
print(f"cycle (1 generator + {fsg - 1} fake-only): {cycle_sec:.3f} s = {B / cycle_sec:.2f} student samples/s; "
      f"{tflops:.0f} TFLOP/s achieved = {100 * tflops / args.peak:.0f}% of {args.peak:.0f} (model FLOPs)")
if args.json:  # what was measured, for bench/results/
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(
        gpu=name, torch=torch.__version__, commit=commit, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        teacher=tcfg.variant, batch=B, extra=extra, gen_sec=gen_sec, fake_sec=fake_sec, cycle_sec=cycle_sec,
        cycle_tflop=cycle_flops / 1e12, achieved_tflops=tflops, peak_tflops=args.peak,
        distill_cycle_mfu=tflops / args.peak, peak_gib_stage2=max((r.get("peak_gib", 0) for r in s2), default=None)),
        indent=1) + "\n")
