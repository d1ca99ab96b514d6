"""One-step inference end to end, ours against diffusers (a script, not a test): prompt strings -> uint8 pixels on
the device (tokenise, CLIP-L, one UNet step from t = 999, VAE decode, to uint8), with the SAME random full-size SD 1.5
weights (diffusers builds them, ours holds the same tensors through the key maps) and diffusers' StableDiffusionPipeline
at num_inference_steps=1, guidance_scale=0 (the same work), eager and compiled, batch 1 and batch 16; median of --runs
synchronised runs after --warmup. Also the GPU's bf16 matmul peak (8192^3, the denominator of bench/cycle.py's MFU).
Writes --out (JSON, what it measured, with the GPU's name, torch version, commit and date).

    python -m bench.onestep --device cuda --dtype fp16                    # on an H100 / H200
    python -m bench.onestep --device cpu --dtype fp32 --tiny --runs 2     # smoke test of this script
"""
import argparse
import json
import subprocess
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.modules import DTYPES, made_on, median_time, ours_from, sd15_unet, sd15_vae
from text.encoders import PRESETS as CLIP_PRESETS
from text.encoders import CLIPTextModel
from text.tokenizer import CLIP_FOLDER, CLIPTokenizer
from unet import PRESETS as UNET_PRESETS
from unet import UNet, one_step_x0, unet_key_map
from vae import PRESETS as VAE_PRESETS
from vae import VAE, vae_key_map

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 35mm"


def models(tiny: bool):
    """(ours: unet, vae, clip; diffusers' pipeline) on the same random weights, in the current default device/dtype."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel
    from transformers import CLIPTokenizer as HFCLIPTokenizer
    if tiny:  # SD 1.5's structure, few channels (CPU smoke test)
        ref_unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=2, block_out_channels=(32, 64, 64, 64), cross_attention_dim=128,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), attention_head_dim=8,
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        ucfg = replace(UNET_PRESETS["tiny"], model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=128)
        unet = ours_from(UNet, ucfg, ref_unet.state_dict(), unet_key_map(ucfg))
        ref_vae = AutoencoderKL(latent_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        vcfg = replace(VAE_PRESETS["sd15"], ch=32, ch_mult=(1, 2, 2, 2))
        vae = ours_from(VAE, vcfg, ref_vae.state_dict(), vae_key_map(vcfg))
        ccfg = replace(CLIP_PRESETS["clip_l"], width=128, layers=2, heads=2, mlp=256)
    else:
        (unet, ref_unet), (vae, ref_vae), ccfg = sd15_unet(), sd15_vae(), CLIP_PRESETS["clip_l"]
    ref_clip = HFCLIPTextModel(CLIPTextConfig(hidden_size=ccfg.width, intermediate_size=ccfg.mlp,
                                              num_hidden_layers=ccfg.layers, num_attention_heads=ccfg.heads,
                                              hidden_act="quick_gelu", projection_dim=ccfg.width))
    clip = CLIPTextModel(ccfg)
    clip.load_state_dict({k if k.startswith("text_model.") else "text_model." + k: v
                          for k, v in ref_clip.state_dict().items()}, strict=True)
    tok = HFCLIPTokenizer(str(CLIP_FOLDER / "vocab.json"), str(CLIP_FOLDER / "merges.txt"), model_max_length=77)
    pipe = StableDiffusionPipeline(vae=ref_vae, text_encoder=ref_clip, tokenizer=tok, unet=ref_unet,
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012, set_alpha_to_one=False, steps_offset=1,
                                                           clip_sample=False, timestep_spacing="trailing"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return unet.eval(), vae.eval(), clip.eval(), pipe


def to_uint8(images: torch.Tensor) -> torch.Tensor:  # on the device, as vae.to_uint8 but without leaving it
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def bf16_peak_tflops(device) -> float:
    """The GPU's dense bf16 matmul rate, measured: 8192^3 matmuls, median of 20."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192 ** 3 / median_time(lambda: a @ b, 20, 5, device) / 1e12


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke test)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    p.add_argument("--out", default="bench/results/onestep.json")
    args = p.parse_args()
    from diffusers.utils import logging
    logging.set_verbosity_error()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    with made_on(device, dtype):
        unet, vae, clip, pipe = models(args.tiny)
    tok, res = CLIPTokenizer(), 64 if args.tiny else 512

    def ours(n):  # prompt strings -> uint8 pixels on the device
        ctx = clip(tok.encode([PROMPT] * n).to(device)).last_hidden_state
        noise = torch.randn((n, 4, res // 8, res // 8), device=device, dtype=dtype)
        return to_uint8(vae.decode(one_step_x0(unet, noise, 999, ctx).to(dtype)))

    def theirs(n):
        return to_uint8(pipe([PROMPT] * n, num_inference_steps=1, guidance_scale=0.0, height=res, width=res,
                             output_type="pt").images * 2 - 1)

    rows = []
    for compiled in (False, True) if args.compile else (False,):
        if compiled:  # max-autotune: CUDA graphs where the shapes are static
            mode = "max-autotune" if device.type == "cuda" else None
            unet.forward, vae.decode = torch.compile(unet.forward, mode=mode), torch.compile(vae.decode, mode=mode)
            pipe.unet.forward = torch.compile(pipe.unet.forward, mode=mode)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode)
        for n in map(int, args.batches.split(",")):
            t0 = time.perf_counter()
            row = {"compiled": compiled, "batch": n}
            for name, fn in (("ours", ours), ("diffusers", theirs)):
                row[f"{name}_ms"] = 1000 * median_time(lambda fn=fn, n=n: fn(n), args.runs, args.warmup, device)
            row["first_call_s"] = time.perf_counter() - t0  # compilation included
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = lambda name, n: min(r[f"{name}_ms"] for r in rows if r["batch"] == n)
    batches = sorted({r["batch"] for r in rows})
    result = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dtype": args.dtype, "tiny": args.tiny,
        "resolution": res, "runs": args.runs, "rows": rows,
        "onestep_batch1_ms": best("ours", batches[0]),
        "onestep_batch16_images_per_s": 16 / best("ours", 16) * 1000 if 16 in batches else None,
        "onestep_vs_diffusers": best("diffusers", batches[0]) / best("ours", batches[0]),
        "bf16_peak_tflops": bf16_peak_tflops(device) if device.type == "cuda" else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}: batch {batches[0]} {result['onestep_batch1_ms']:.2f} ms (diffusers' best over ours: "
          f"{result['onestep_vs_diffusers']:.2f}x)")


if __name__ == "__main__":
    main()
