"""Benchmark: our models vs diffusers' on the SAME random full-size weights (a script, not a test).

    python -m bench.modules                         # SD 1.5 UNet forward + VAE decode, CPU fp32, 64x64 latents
    python -m bench.modules --device cuda --dtype bf16 --what unet,vae,sd35m,sd35,flux [--compile] [--no-ref]
    python -m bench.modules --what sd35m,sd35,flux --layers 1 --res 256 --runs 1   # CPU smoke test of the teachers

Each model is built by diffusers at the released config with random init, then converted to ours through our key
maps (the same tensors, nothing re-drawn), so both compute the same function on the same inputs. Timed after
warm-up (which also compiles with --compile), median of --runs. Prints seconds, our/diffusers ratio, the max
relative difference of the two outputs and, on CUDA, the peak memory one forward adds on top of what is resident.
Teachers: sd35m = SD3.5 Medium (24 MMDiT-X blocks, 2.5B), sd35 = SD3.5 Large (38 joint blocks, 8.1B), flux =
FLUX.1-dev (19 + 38 blocks, 11.9B), one image at --res px (1024) with the pipelines' default text lengths (SD3:
77 + 256 tokens, FLUX-dev: 512).
"""
import argparse
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

import teacher_mmdit as tm
import teachers as TL
from unet import PRESETS as UNET_PRESETS
from unet import UNet, unet_key_map
from vae import PRESETS as VAE_PRESETS
from vae import VAE, vae_key_map
from weights import build_meta, load_state

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ours_from(cls, cfg, ref_state, key_map):
    """Our model holding the reference's tensors: key_map is original -> diffusers; shapes follow ours
    (diffusers' [C, C] attention linears become our [C, C, 1, 1] convs by a view, no copy)."""
    model = build_meta(cls, cfg)
    want = model.state_dict()
    state = {o: ref_state[d].view(want[o].shape) for o, d in key_map.items()}
    return load_state(model, state, "diffusers reference").eval()


def sd15_unet():
    from diffusers import UNet2DConditionModel
    # SD 1.5 `unet/config.json` (stable-diffusion-v1-5); every other argument is the diffusers default = SD 1.5.
    ref = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
    cfg = UNET_PRESETS["sd15"]
    return ours_from(UNet, cfg, ref.state_dict(), unet_key_map(cfg)), ref.eval()


def sd15_vae():
    from diffusers import AutoencoderKL
    # SD 1.5 `vae/config.json`.
    ref = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
        scaling_factor=0.18215)
    cfg = VAE_PRESETS["sd15"]
    return ours_from(VAE, cfg, ref.state_dict(), vae_key_map(cfg)), ref.eval()


def teacher(family, layers):
    """(ours, diffusers) teacher; `layers` (None = all) cuts the depth: SD3 keeps the MMDiT rule heads = depth,
    hidden = 64 depth, so a cut SD3 is also narrower; FLUX keeps its width and runs layers + 2 * layers blocks."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    if family in ("sd35", "sd35m"):
        base = tm.PRESETS["sd35_large" if family == "sd35" else "sd35_medium"]
        cfg = base if layers is None else replace(base, depth=layers, attn2_blocks=base.attn2_blocks[:layers])
        # SD3.5 Large / Medium `transformer/config.json`, with our depth (Medium: MMDiT-X, attn2 in blocks 0-12)
        ref = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=cfg.depth, attention_head_dim=64,
            num_attention_heads=cfg.depth, joint_attention_dim=4096, caption_projection_dim=cfg.hidden,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=cfg.pos_embed_max_size,
            qk_norm="rms_norm", dual_attention_layers=cfg.attn2_blocks)
        ours = build_meta(tm.MMDiT, cfg)
    else:
        cfg = tm.PRESETS["flux_dev"] if layers is None else \
            replace(tm.PRESETS["flux_dev"], depth=layers, depth_single=2 * layers)
        # FLUX.1-dev `transformer/config.json`, with our depth.
        ref = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=cfg.depth, num_single_layers=cfg.depth_single,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        ours = build_meta(tm.Flux, cfg)
    state = TL.from_diffusers(dict(ref.state_dict()), cfg)  # fused qkv are new tensors; the rest is shared
    return load_state(ours, state, "diffusers reference").eval(), ref.eval()


@contextmanager
def made_on(device, dtype):
    """Modules constructed inside are made directly on `device` in `dtype`: no fp32 copy of 12B parameters."""
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(torch.float32)


def cases(what, args, device, dtype):
    """Yield (name, ours, diffusers, ours_call, ref_call): two models on `device` in `dtype`, and a call of each on
    the same inputs returning comparable outputs."""
    g = torch.Generator("cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(shape, generator=g).to(device, dtype)  # noqa: E731
    B, s = args.batch, args.size

    def build(fn, *a):
        with made_on(device, dtype):
            return [m.to(dtype) for m in fn(*a)]  # and buffers made in fp32 whatever the default (SD3 pos_embed)

    if "unet" in what:
        ours, ref = build(sd15_unet)
        x, t, ctx = rand(B, 4, s, s), torch.full((B,), 500, device=device), rand(B, 77, 768)
        yield ("SD 1.5 UNet", ours, ref, lambda m: m(x, t, ctx), lambda m: m(x, t, encoder_hidden_states=ctx).sample)
        del ours, ref
    if "vae" in what:
        ours, ref = build(sd15_vae)
        z = rand(B, 4, s, s)
        yield ("SD 1.5 VAE decode", ours, ref, lambda m: m.decode(z),
               lambda m: m.decode(z / m.config.scaling_factor).sample)
        del ours, ref
    h = w = args.res // 8  # latent size
    sigma = torch.full((B,), 0.7, device=device)
    for fam in [f for f in ("sd35m", "sd35") if f in what]:
        ours, ref = build(teacher, fam, args.layers)
        x, ctx, pooled = rand(B, 16, h, w), rand(B, 77 + 256, 4096), rand(B, 2048)
        yield (f"SD3.5 {'Medium' if fam == 'sd35m' else 'Large'} {args.res}px", ours, ref,
               lambda m, x=x, ctx=ctx, pooled=pooled: m(x, sigma, ctx, pooled),
               lambda m, x=x, ctx=ctx, pooled=pooled: m(hidden_states=x, encoder_hidden_states=ctx,
                                                         pooled_projections=pooled, timestep=1000 * sigma).sample)
        del ours, ref
    if "flux" in what:
        ours, ref = build(teacher, "flux", args.layers)
        x, ctx, pooled = rand(B, 16, h, w), rand(B, 512, 4096), rand(B, 768)
        guidance = torch.full((B,), 3.5, device=device)
        # diffusers takes the latent packed 2x2 into (B, h/2 * w/2, 64) with (0, row, col) ids; unpack its output
        packed = x.view(B, 16, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w // 4, 64)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=device)
        img_ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
        img_ids, txt_ids = img_ids.reshape(-1, 3), torch.zeros(512, 3, device=device)

        def ref_call(m):
            out = m(hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=sigma,
                    img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
            return out.view(B, h // 2, w // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, 16, h, w)
        yield (f"FLUX.1-dev {args.res}px", ours, ref, lambda m: m(x, sigma, ctx, pooled, guidance=guidance), ref_call)
        del ours, ref


def median_time(fn, runs, warmup, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure(model, call, args, device):
    """(median seconds, output, peak GiB one call adds, or None off CUDA) of call(model)."""
    run = torch.compile(model) if args.compile else model
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds = median_time(lambda: call(run), args.runs, args.warmup, device)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if cuda else None
    return seconds, call(run).float().cpu(), peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", default="unet,vae", help="comma list of: unet, vae, sd35m, sd35, flux")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=64, help="SD 1.5 latent size (64 = 512 px)")
    p.add_argument("--res", type=int, default=1024, help="teachers: image size in px (a multiple of 16)")
    p.add_argument("--layers", type=int, help="teachers: cut the depth (CPU smoke tests)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--json", help="write the measurements here (bench/results/)")
    p.add_argument("--ref", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-ref: time ours only (diffusers still builds the weights; saves its compile time)")
    args = p.parse_args()
    from diffusers.utils import logging
    logging.set_verbosity_error()  # diffusers' notes on random init / dtype casts are not results
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}, {args.dtype}, batch {args.batch}, median of {args.runs} after {args.warmup} warm-up, "
          f"compile {args.compile}, torch {torch.__version__}")
    rows = []
    for label, ours, ref, ours_call, ref_call in cases(set(args.what.split(",")), args, device, dtype):
        t_ours, out_ours, mem_ours = measure(ours, ours_call, args, device)
        rows.append({"module": label, "ours_s": t_ours, "compiled": args.compile})
        mem = f"  peak +{mem_ours:.2f} GiB" if mem_ours is not None else ""
        if args.ref:
            t_ref, out_ref, mem_ref = measure(ref, ref_call, args, device)
            err = ((out_ours - out_ref).abs().max() / out_ref.abs().max()).item()
            rows[-1] |= {"diffusers_s": t_ref, "diffusers_over_ours": t_ref / t_ours, "max_rel_diff": err}
            mem += f" / +{mem_ref:.2f} GiB" if mem_ref is not None else ""
            print(f"{label:22s} ours {t_ours:8.3f} s  diffusers {t_ref:8.3f} s  ratio {t_ours / t_ref:5.2f}"
                  f"  max rel diff {err:.1e}{mem}", flush=True)
        else:
            print(f"{label:22s} ours {t_ours:8.3f} s{mem}", flush=True)
        del ours, ref, ours_call, ref_call  # before the next pair is built: two 12B models need not coexist
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": name, "dtype": args.dtype, "torch": torch.__version__,
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
