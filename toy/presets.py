"""distill.py's two presets, kept out of the method's script: `toy` (the committed toy models of toy/train.py, the toy
world's prompts; its judge runs through evaluate.RunEvaluator) and `tiny` (random tiny models in the real single-file
layouts, for the tests).

    defaults(preset, real)       the preset's settings
    prepare(args, out)           the preset's model paths into `args`
    build(args, out)             rank 0 writes what the preset lacks (the tiny models, the prompts)
    real_renders(prompts, res)   DMD2's GAN term on the toy preset: a fresh render of every training prompt
"""
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import teacher_mmdit as TM
import text.encoders as TE
import unet as U
import vae as V
from export import export_sd15_single_file
from toy import world
from weights import CheckpointError, save_atomic

TOY = Path(__file__).resolve().parents[1] / "assets" / "toy"  # the committed toy models (toy/train.py, toy/world.py)
TINY_PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner", "a yellow triangle",
                "a large white cross on black", "a blue ring in the center", "a black square on a yellow background",
                "a green triangle at the bottom right", "a photo of a cat"]


def defaults(preset: str | None, real: dict) -> dict:
    """distill.py's settings for a preset, on top of its full-size ones `real`."""
    if preset is None:
        return real
    tiny = real | dict(
        student_res=64, teacher_res=128, latents=32, held_out=8, bridge_steps=150, bridge_batch=4, bridge_width=32,
        bridge_depth=1, steps=60, batch_size=2, lr=1e-4, fake_lr=1e-3, lora_rank=4, sample_every=20, ckpt_every=20,
        t5_length=8)
    if preset == "tiny":
        return tiny
    # sized for < 10 minutes on 2 CPU cores. The Bridge on the decoded image with 400 stage-1 steps
    # (toy/LOG.md#pixel-tap); DMD's noise levels U(0.4, 0.85) unshifted (toy/LOG.md#dmd-noise-levels); the generator
    # told t = 600 (toy/LOG.md#gen-t). Within the 10 minutes: batch 4, a student update every iteration, its lr 1e-4
    # falling to 0 over the second half, 1100 iterations, the judge once on the way (toy/LOG.md#ten-minutes).
    return tiny | dict(
        latents=96, held_out=16, bridge_steps=400, bridge_batch=8, bridge_width=64, bridge_depth=2, bridge_tap="pixels",
        steps=1100, batch_size=4, lr=1e-4, warmdown=0.5, fake_lr=1e-3, lora_rank=8, fake_steps_per_gen=1, cfg=4.5,
        ema=0.99, sample_every=100, ckpt_every=100, t5_length=None, eval=200, eval_metric="toy", eval_every=550,
        gen_timestep=600, sigma_range=[0.4, 0.85], dmd_shift=1.0)


def prepare(args, out: Path) -> None:
    """Point `args` at the preset's models and prompts (written by `build`). tiny: random models (fixed seeds, SD 1.5
    / SD3.5-Medium structure) saved as real single files, loaded back by distill.py as real checkpoints would be.
    toy: the committed models; `--teacher` may replace the toy teacher (the same-space reference of the toy table)
    if it shares its text encoders. Each tokenizer.json beside the models is found by find_clip_tokenizer."""
    if args.preset == "tiny":
        tiny = out / "tiny"
        args.student, args.teacher = str(tiny / "student.safetensors"), str(tiny / "teacher.safetensors")
        args.text_encoders, args.no_t5 = args.text_encoders or str(tiny), True
        args.prompts = args.prompts or str(tiny / "prompts.txt")
    elif args.preset == "toy":
        args.student = str(TOY / "student" / "toy_sd15.safetensors")
        args.teacher = args.teacher or str(TOY / "teacher" / "toy_sd35.safetensors")
        args.text_encoders = args.text_encoders or str(TOY / "teacher" / "text_encoders")
        args.prompts = args.prompts or str(out / "prompts.txt")
        if not Path(args.student).is_file():
            raise CheckpointError(f"--preset toy: no toy models in {TOY}; train them first with `python -m toy.train`")


def build(args, out: Path) -> None:
    """Write the preset's files that are missing (rank 0): the tiny models and prompts; the toy's training prompts,
    captions of random toy scenes (seed 0; the judge's are drawn with seed 777)."""
    if args.preset == "tiny" and not (out / "tiny" / "prompts.txt").exists():
        _build_tiny(out / "tiny")
    elif args.preset == "toy" and not Path(args.prompts).exists():
        rng = np.random.default_rng(0)
        Path(args.prompts).write_text("\n".join(world.caption(s, rng) for s in world.sample_scenes(1000, 0)) + "\n")


def _build_tiny(folder: Path) -> None:
    torch.manual_seed(1234)
    clip_l = TE.CLIPTextModel(TE.PRESETS["tiny_l"])  # vocab 49408: the real CLIP tokenizer drives it
    export_sd15_single_file(U.UNet(replace(U.PRESETS["tiny"], context_dim=clip_l.cfg.width)),
                            V.VAE(V.PRESETS["tiny_sd15"]), clip_l, folder / "student.safetensors")
    # quick GELU for CLIP-G: a single file carries no config and the loader picks the activation by width
    clip_g = TE.CLIPTextModel(replace(TE.PRESETS["tiny_g"], act="quick_gelu"))
    pooled_dim = clip_l.cfg.width + clip_g.cfg.projection  # CLIP-L pooled ++ CLIP-G projected, as SD3
    teacher = TM.MMDiT(replace(TM.PRESETS["tiny_sd35"], pooled_dim=pooled_dim))
    save_atomic({f"model.diffusion_model.{k}": v for k, v in teacher.state_dict().items()} |  # as sd3.5_medium:
                {f"first_stage_model.{k}": v for k, v in V.VAE(V.PRESETS["tiny_sd3"]).state_dict().items()},
                folder / "teacher.safetensors")  # transformer + VAE in one file
    save_atomic(clip_l.state_dict(), folder / "clip_l.safetensors")  # keys text_model.*, as clip_l.safetensors
    save_atomic(clip_g.state_dict(), folder / "clip_g.safetensors")
    (folder / "prompts.txt").write_text("\n".join(TINY_PROMPTS) + "\n")


def real_renders(prompts: list[str], res: int) -> tuple[torch.Tensor, list]:
    """(prompt indices, one loader per image) of real images for DMD2's GAN term: the toy world's render of every
    training prompt (jittered by its index)."""
    return torch.arange(len(prompts)), [
        lambda i=i: world.render([replace(world.parse_prompt(prompts[i]), jitter=i)], res)[0]
        for i in range(len(prompts))]
