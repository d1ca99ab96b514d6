"""The toy models of toy/train.py: their configs, where they live (assets/toy), how they load through the project's
own loaders, and how they sample and score (the judge of toy/world.py on fixed prompts: `evaluate`).

    python -m toy.train --what eval     # re-scores them into assets/toy/scores.json
"""
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import text.conditioning as C
import vae as V
from teacher_mmdit import PRESETS as TEACHER_PRESETS
from teachers import load_teacher, sample_flow, sd3_shift, sd3_sigmas
from text.encoders import PRESETS as CLIP_PRESETS
from text.encoders import T5_PRESETS, load_clip
from text.tokenizer import BOS, EOS, CLIPTokenizer
from toy import world
from unet import PRESETS as UNET_PRESETS
from unet import ddim_sample, load_unet, one_step_x0

ROOT = Path(__file__).resolve().parents[1] / "assets" / "toy"
STUDENT = ROOT / "student" / "toy_sd15.safetensors"
TEACHER = ROOT / "teacher" / "toy_sd35.safetensors"
TEXT_ENCODERS = ROOT / "teacher" / "text_encoders"
SAME_SPACE = ROOT / "same_space" / "toy_sd35_4ch.safetensors"  # the toy table's same-space reference teacher
SAME_SPACE_TEXT = ROOT / "same_space" / "text_encoders"
SCORES = ROOT / "scores.json"
SPECIALS = ("<pad>", "</s>", "<unk>", BOS, EOS)  # <pad> = id 0 (T5's pad, and CLIP-G's pad id 0)
T5_LENGTH = 32  # every toy caption fits (<= 20 words); stored as the tokenizer.json's fixed padding length

# ------------------------------------------------------------------------------------------------------ the models
# 4 levels (8x) of 64 channels, one ResNet block each (the decoder two), 4 latent channels. Not 32 channels at level 0
# as the tiny preset: single files fix 32 GroupNorm groups, and 32 channels in 32 groups is an instance norm right
# before the output conv, which erases the absolute colour of flat regions (this world is flat colours); with two
# channels per group the decoder can keep it, and learns several times faster.
# The student VAE (4 latent channels) is wider at 16x16 and 8x8 (128 channels: 4 per GroupNorm group): with 2 per group
# its encoder's last norm nearly erased the flat background's colour (blue decoded as dark green).
VAE_S = replace(V.PRESETS["tiny_sd15"], ch_mult=(2, 2, 4, 4), num_res_blocks=1)
VAE_T = replace(V.PRESETS["tiny_sd3"], ch_mult=(2, 2, 2, 2), num_res_blocks=1)  # same, 16 latent channels
VOCAB_SIZE = len(SPECIALS) + len(world.VOCAB)
# Head size 64 and quick GELU: what load_clip infers from a single file of width 64 (heads = width // 64).
_CLIP = replace(CLIP_PRESETS["tiny_l"], vocab_size=VOCAB_SIZE, width=64, layers=2, heads=1, mlp=128)
STUDENT_CLIP = _CLIP
# The pooled output is read at the toy vocabulary's EOS (id 4), as load_teacher_text sets it from the tokenizer.
TEACHER_CLIP_L = replace(_CLIP, projection=64, eos_id=SPECIALS.index(EOS))  # SD3's clip_l carries a text_projection
TEACHER_CLIP_G = replace(TEACHER_CLIP_L)  # act stays quick GELU: the loader decides by width, not name
# sd3_conditioning pads CLIP-L ++ CLIP-G (64 + 64) to the T5 width: d_model 128 = the teacher's context_dim.
TEACHER_T5 = replace(T5_PRESETS["tiny"], vocab_size=VOCAB_SIZE, d_model=128, layers=2, heads=2, d_kv=64, d_ff=256)
# MMDiT rule: heads = depth, hidden = depth * head_dim = 128; MMDiT-X attn2 in blocks 0, 1; 8x8 patch grid.
TEACHER_CFG = replace(TEACHER_PRESETS["tiny_sd35"], depth=4, head_dim=32, pos_embed_max_size=8, context_dim=128,
                      pooled_dim=128, attn2_blocks=(0, 1), variant="toy_sd35")
# The same-space reference: the teacher's structure in the STUDENT's latent space (4 channels, 8x8: a 4x4 patch grid),
# with text encoders of its own, trained alike.
SAME_SPACE_CFG = replace(TEACHER_CFG, in_channels=4, pos_embed_max_size=4, variant="toy_sd35_4ch")
# SD 1.5 structure (4 levels, attention in the first three, 8 heads, 32 groups), narrow and one ResBlock per level.
# 64 channels at every level, not 32 at the first: the UNet's last GroupNorm (norm_out) sits on the first level's
# channels, and 32 channels in 32 groups is an instance norm that removes each channel's spatial mean right before
# conv_out, so eps (and x0) could not carry a prompt-dependent flat colour: with 32 the student drew every background
# the same (judge: background 0.19 after 25 DDIM steps, chance 0.17; the VAE comment above is the same finding).
STUDENT_CFG = replace(UNET_PRESETS["tiny"], model_channels=64, channel_mult=(1, 1, 1, 1), num_res_blocks=1,
                      context_dim=64)
STUDENT_RES, TEACHER_RES = 64, 128

# The 16-channel teacher's time shift, in training and at inference (its scheduler_config.json). SD3 trains and samples
# 1024 px at shift 3.0 and prescribes larger shifts for larger latents (more numbers carry the same image, so the
# image shows through more noise: SD3 paper, section 5.3.2, shift sqrt(m / n)). The toy teacher's latents hold 16x the
# numbers of the same-space teacher's (16x16x16 vs 4x8x8), whose shift is 3: sqrt(16) * 3 = 12. Measured at shift 3: the
# 16-channel teacher read the shape's position from x_t down to sigma 0.98 and had learned to ignore the position
# words (their swap changed its loss by < 0.1% at every sigma), so it drew the shape wherever the noise put it.
TEACHER_SHIFT = 12.0
EVAL_SEED, EVAL_N = 777, 200


# ------------------------------------------------------------------------------------------------------ evaluation
def eval_prompts(n: int = EVAL_N, seed: int = EVAL_SEED) -> list[str]:
    rng = np.random.default_rng(seed)
    return [world.caption(s, rng) for s in world.sample_scenes(n, seed)]


def load_toy_teacher():
    """(teacher, text, vae) through the project's loaders, fp32 CPU."""
    text = C.load_teacher_text(TEACHER, TEXT_ENCODERS)
    return load_teacher(TEACHER), text, V.load_vae(TEACHER, family="sd3")


def load_toy_student():
    """(unet, clip, tokenizer, vae) through the project's loaders, fp32 CPU."""
    tok = CLIPTokenizer.from_file(STUDENT.parent / "tokenizer.json")
    return load_unet(STUDENT), load_clip(STUDENT), tok, V.load_vae(STUDENT, family="sd15")


def load_same_space_teacher():
    """(teacher, text, vae) of the same-space reference: its VAE is the student's."""
    text = C.load_teacher_text(SAME_SPACE, SAME_SPACE_TEXT)
    return load_teacher(SAME_SPACE), text, V.load_vae(STUDENT, family="sd15")


@torch.no_grad()
def teacher_images(prompts, steps: int = 28, cfg: float = 5.0, seed: int = 0, batch: int = 100, parts=None):
    teacher, text, vae = parts or load_toy_teacher()
    out = []
    for i in range(0, len(prompts), batch):
        p = prompts[i:i + batch]
        g = torch.Generator().manual_seed(seed + i)
        res, path = (TEACHER_RES, TEACHER) if teacher.cfg.in_channels == 16 else (STUDENT_RES, SAME_SPACE)
        noise = torch.randn(len(p), teacher.cfg.in_channels, res // 8, res // 8, generator=g)
        context, pooled = text([""] * len(p) + p)
        x = sample_flow(teacher, context, pooled, noise, sd3_sigmas(steps, sd3_shift(path)), cfg=cfg, progress=False)
        out.append(vae.decode(x).clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def student_images(prompts, steps: int = 25, cfg: float = 7.5, seed: int = 0, batch: int = 100, parts=None):
    """DDIM with CFG (unet.ddim_sample); steps=1: the one-step x0 prediction from t=999 with CFG (unet.one_step_x0)."""
    unet, clip, tok, vae = parts or load_toy_student()
    out = []
    for i in range(0, len(prompts), batch):
        p = prompts[i:i + batch]
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(len(p), 4, STUDENT_RES // 8, STUDENT_RES // 8, generator=g)
        context = clip(tok.encode([""] * len(p) + p)).last_hidden_state  # [uncond; cond]
        x = one_step_x0(unet, noise, 999, context, cfg) if steps == 1 else ddim_sample(unet, context, noise, steps, cfg)
        out.append(vae.decode(x).clamp(-1, 1))
    return torch.cat(out)


def evaluate(which=("teacher", "student"), n: int = EVAL_N, log=print) -> dict:
    """The judge on n fixed prompts (random templates and synonyms), one fixed noise per prompt; merged into
    scores.json. Also the renders themselves and their VAE round trips (the ceiling each latent space allows)."""
    judge, prompts = world.load_judge(), eval_prompts(n)
    res = {"n": n, "prompt_seed": EVAL_SEED}
    real = {r: world.render(world.sample_scenes(n, EVAL_SEED), r) for r in (STUDENT_RES, TEACHER_RES)}
    t0 = time.time()
    if "teacher" in which:
        res["teacher_euler28_cfg5"] = judge.score(prompts, teacher_images(prompts))
        log(f"teacher: {res['teacher_euler28_cfg5']} ({time.time() - t0:.0f}s)")
        with torch.no_grad():
            vae = V.load_vae(TEACHER, family="sd3")
            res["teacher_vae_round_trip"] = judge.score(prompts, vae.decode(vae.encode(real[TEACHER_RES])).clamp(-1, 1))
    if "same_space" in which:
        res["same_space_teacher_euler28_cfg5"] = judge.score(prompts, teacher_images(prompts,
                                                             parts=load_same_space_teacher()))
        log(f"same-space teacher: {res['same_space_teacher_euler28_cfg5']} ({time.time() - t0:.0f}s)")
    if "student" in which:
        parts = load_toy_student()
        res["student_ddim25_cfg7.5"] = judge.score(prompts, student_images(prompts, parts=parts))
        res["student_1step_cfg7.5"] = judge.score(prompts, student_images(prompts, steps=1, parts=parts))
        log(f"student: 25 {res['student_ddim25_cfg7.5']}  1 {res['student_1step_cfg7.5']} ({time.time() - t0:.0f}s)")
        with torch.no_grad():
            vae = parts[3]
            res["student_vae_round_trip"] = judge.score(prompts, vae.decode(vae.encode(real[STUDENT_RES])).clamp(-1, 1))
    res["renders_64px"] = judge.score(prompts, real[STUDENT_RES])
    return res
