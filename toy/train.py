"""Train the toy world's tiny teacher and student with the project's own modules; evaluate them with the judge.

The paper's setting in miniature (see toy/world.py for the world and its judge):
  teacher  SD3.5-structured MMDiT-X (attn2 + qk norm) in a 16-channel latent space at 128 px (16x16x16 latents),
           conditioned on CLIP-L + CLIP-G penultimate states + T5, flow matching, Euler + CFG.
  student  SD 1.5-structured UNet in a 4-channel latent space at 64 px (4x8x8 latents), eps prediction on SD 1.5's
           DDPM schedule, DDIM + CFG: smaller and trained for less time, as SD 1.5 is weaker than SD 3.5.
Each has its own KL autoencoder (vae.py, tiny presets with one ResNet block per level), trained on crops around the
shape (32 px of the 64 px renders, 64 px of the 128 px ones; the shape's pixels weigh 5-10x: L1 + L2 reconstruction
and a small KL, no GAN), then its decoder alone on whole images (GroupNorm statistics differ between crops and whole
images; the frozen encoder keeps the latents unchanged).
The latent scale is BAKED INTO THE WEIGHTS (at 70% of the VAE steps): the encoder's last 1x1 / 3x3 conv and the
decoder's first conv are re-parameterised so that the raw latents z satisfy (z - shift) * scale ~ N(0, 1) per
channel with the family's own constants (SD 1.5 0.18215; SD3 1.5305, 0.0609), which `load_vae(family=...)` applies.
The files then look like real ones and every loader reads them unchanged.
The text encoders (tiny CLIP / T5 structures over the toy vocabulary, 77 CLIP positions) are pretrained on text alone
to tell the caption's attributes (`pretrain_text`: a stand-in for CLIP's and T5's pretraining), then frozen while
their diffusion model trains, as SD 1.5's and SD3's are; read through text/conditioning.py's `sd15_context` /
`sd3_conditioning`.

Output, in the real layouts (fp16 storage):
  assets/toy/student/toy_sd15.safetensors   model.diffusion_model.* + first_stage_model.* +
                                            cond_stage_model.transformer.text_model.*   (+ tokenizer.json beside it)
  assets/toy/teacher/toy_sd35.safetensors   model.diffusion_model.* + first_stage_model.*
  assets/toy/teacher/text_encoders/         clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors,
                                            tokenizer.json (CLIP and T5 specials; fixes the T5 length to 32)
  assets/toy/same_space/                    toy_sd35_4ch.safetensors (the teacher's structure in the student's
                                            latent space, no VAE: it is the student's) + text_encoders/ of its own
  assets/toy/scores.json                    the judge's verdict on 200 prompts

Teacher training time: SD3's logit-normal(0, 1) sigma (Esser et al. 2024, sec. 3.1), then time-shifted
(sigma' = k sigma / (1 + (k - 1) sigma)): k = 12 for the 16-channel teacher (TEACHER_SHIFT says why), 3.0 (SD3's)
for the same-space one. The shift is saved as a scheduler_config.json beside each, and sample.py / distill.py sample
and distill with it, so inference puts its steps where training put its weight. CFG dropout: 10% empty prompts for
both models.

    python -m toy.train                          # everything (~50 min on 2 CPU cores: two chains in parallel)
    python -m toy.train --what vae_s,student     # parts: tokenizer, vae_s, vae_t, dec_s, dec_t, teacher, student,
                                                 # teacher_ss, eval
    python -m toy.train --what vae_t --more      # more VAE steps from the saved weights
The teacher and student stop at their step count or their minutes, whichever comes first (the cosine learning rate
follows that progress), so a slow shared machine still ends on time with an annealed model.
"""
import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

import text.conditioning as C
import toy.models as M
import toy.world as toy
import vae as V
from teacher_mmdit import MMDiT
from teachers import load_teacher
from text.encoders import CLIPTextModel, T5Encoder, load_clip
from text.tokenizer import CLIPTokenizer, T5Tokenizer
from unet import UNet, load_unet
from weights import Checkpoint, save_atomic

PLAN = dict(  # steps, batch, lr, data: sized for ~35-40 minutes on two shared CPU cores
    # 32 px crops (the VAEs are fully convolutional; attention only in the mid block, at 4x4 here)
    # whole 64 px images; 64 px crops around the shape at 128 px; the shape's pixels weigh 10x (see `foreground`)
    vae_s=dict(steps=1200, batch=8, lr=1e-3, n=1500, crop=32, fg_weight=5.0),  # 4 channels: the harder squeeze
    vae_t=dict(steps=700, batch=8, lr=1e-3, n=1500, crop=64, fg_weight=10.0),
    dec_s=dict(steps=200, batch=8, lr=5e-4, n=1000, fg_weight=5.0),  # then the decoders alone, on whole images
    dec_t=dict(steps=100, batch=4, lr=5e-4, n=600, fg_weight=5.0),
    # whichever ends first: steps or minutes. shift: of the logit-normal training times (see M.TEACHER_SHIFT)
    teacher=dict(steps=3000, batch=24, lr=8e-4, n=1500, minutes=25, shift=M.TEACHER_SHIFT, text_steps=600,
                 text_lr=1e-3),
    student=dict(steps=1500, batch=48, lr=6e-4, n=2000, minutes=10, text_steps=600, text_lr=1e-3),  # + its CLIP
    # the same-space reference
    teacher_ss=dict(steps=3000, batch=24, lr=8e-4, n=2000, minutes=18, shift=3.0, text_steps=600, text_lr=1e-3),
)
# `--what all`: two chains in parallel, one per core (~45 and ~40 minutes): the teacher's, and the student's followed
# by the same-space reference teacher's (which needs only the student's VAE).
CHAINS = ("vae_t,dec_t,teacher", "vae_s,dec_s,student,teacher_ss")
DATA_SEED = 1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def half(state: dict, prefix: str = "") -> dict:
    return {prefix + k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def merge_save(path: Path, tensors: dict, drop_prefixes: tuple) -> None:
    """Write `tensors` into the single file at `path`, keeping its other parts (parts are trained separately)."""
    old = {} if not path.exists() else {k: v for k, v in Checkpoint(path).tensors(dtype=torch.float16).items()
                                        if not k.startswith(drop_prefixes)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({**old, **tensors}, path)


def cosine(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


class Budget:
    """Training progress in [0, 1]: steps done or wall-clock minutes spent, whichever is further along, so that the
    cosine schedule still anneals to zero when a shared machine is slower than planned."""

    def __init__(self, plan: dict):
        self.steps, self.seconds, self.t0 = plan["steps"], 60 * plan.get("minutes", 1e9), time.time()

    def progress(self, step: int) -> float:
        return max(step / self.steps, (time.time() - self.t0) / self.seconds)

    def lr(self, step: int, lr: float, warmup: int = 50) -> float:
        return cosine(int(self.progress(step) * 10**6), 10**6, lr, warmup * 10**6 // self.steps)


# --------------------------------------------------------------------------------------------------- the tokenizer
def build_tokenizer(path: Path) -> Tokenizer:
    """WordLevel over SPECIALS + toy.VOCAB (every word its own id), lower-cased, split on whitespace and
    punctuation (= toy.words). Fixed padding to T5_LENGTH: the T5 length the toy teacher is trained with."""
    vocab = {w: i for i, w in enumerate(M.SPECIALS + tuple(toy.VOCAB))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(list(M.SPECIALS))
    tok.enable_padding(length=M.T5_LENGTH, pad_id=0, pad_token="<pad>")
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def tokenizers(folder: Path) -> tuple[CLIPTokenizer, CLIPTokenizer, T5Tokenizer]:
    """(CLIP padding with EOS, CLIP padding with <pad> = 0, T5) from the folder's tokenizer.json."""
    path = folder / "tokenizer.json"
    return CLIPTokenizer.from_file(path), CLIPTokenizer.from_file(path, 0), T5Tokenizer.from_file(path)


# ----------------------------------------------------------------------------------------------------------- data
def renders(n: int, size: int) -> tuple[torch.Tensor, list]:
    """n renders (fixed seed) at `size` px and their scenes; 128 px with 2x2 supersampling (as the judge's pool)."""
    scenes = toy.sample_scenes(n, DATA_SEED)
    images = torch.cat([toy.render(scenes[i:i + 500], size, 4 if size <= 64 else 2) for i in range(0, n, 500)])
    return images, scenes


def captions(scenes: list, rng: np.random.Generator, p_empty: float = 0.1) -> list[str]:
    """A fresh random caption per scene (template and synonyms), the empty prompt with probability p_empty."""
    return ["" if rng.random() < p_empty else toy.caption(s, rng) for s in scenes]


# ------------------------------------------------------------------------------------------------------------ VAEs
def vae_moments(vae: V.VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = vae.encoder(x)
    m = vae.quant_conv(m) if vae.cfg.use_quant_conv else m
    return m.chunk(2, dim=1)


def bake_latent_scale(vae: V.VAE, images: torch.Tensor) -> dict:
    """Re-parameterise encoder output and decoder input so that the raw posterior means z' of `images` give
    (z' - shift) * scale ~ zero mean (per channel), unit std (over all channels), with the family's constants
    (cfg.scale_factor / shift_factor): z' = a (z - mu) + shift, a = 1 / (scale * std). Exact through the 1x1
    quant convs (SD 1.5); through SD3's 3x3 decoder.conv_in exact up to zero padding at the border, which the
    training that follows absorbs."""
    with torch.no_grad():
        z = torch.cat([vae_moments(vae, images[i:i + 64])[0] for i in range(0, len(images), 64)])
        mu, std = z.mean((0, 2, 3)), (z - z.mean((0, 2, 3), keepdim=True)).std()
        c = vae.cfg.latent_channels
        a, b0 = float(1 / (vae.cfg.scale_factor * std)), vae.cfg.shift_factor
        enc = vae.quant_conv if vae.cfg.use_quant_conv else vae.encoder.conv_out
        dec = vae.post_quant_conv if vae.cfg.use_quant_conv else vae.decoder.conv_in
        enc.weight[:c] *= a
        enc.bias[:c] = a * (enc.bias[:c] - mu) + b0
        enc.bias[c:] += 2 * math.log(a)  # log-variance of a z
        # decoder sees z = (z' - b0) / a + mu: W z + c = (W / a) z' + c + W (mu - b0 / a)
        dec.bias += torch.einsum("oikl,i->o", dec.weight, mu - b0 / a)
        dec.weight /= a
    return {"std_before": float(std), "a": a}


def latent_stats(vae: V.VAE, images: torch.Tensor) -> dict:
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 64]) for i in range(0, len(images), 64)])  # scaled and shifted
    return {"mean": float(z.mean()), "std": float(z.std()), "channel_mean_absmax": float(z.mean((0, 2, 3)).abs().max())}


def foreground(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in {0, 1}: pixels away from the background colour (read at the corner, which no shape reaches).
    The shape covers 2-13% of an image; without extra weight on it the reconstruction loss is nearly all background
    and a small VAE learns flat colours long before shapes."""
    return ((images - images[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.1).float()


def shape_crops(x: torch.Tensor, m: torch.Tensor, crop: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """8-px-aligned crops of side `crop` around each image's shape (the centroid of its foreground mask m, +-8 px),
    so that every crop holds the shape; crop = the image side gives the whole images."""
    res = x.shape[-1]
    if crop >= res:
        return x, m
    coords = torch.arange(res, dtype=torch.float32)
    area = m.sum((1, 2, 3)).clamp(min=1)
    cy, cx = (m.sum(3)[:, 0] * coords).sum(1) / area, (m.sum(2)[:, 0] * coords).sum(1) / area
    jitter = torch.randint(-1, 2, (len(x), 2), generator=g) * 8
    oy = (((cy - crop / 2) / 8).round().long() * 8 + jitter[:, 0]).clamp(0, res - crop).tolist()
    ox = (((cx - crop / 2) / 8).round().long() * 8 + jitter[:, 1]).clamp(0, res - crop).tolist()
    return (torch.stack([t[i, :, a:a + crop, b:b + crop] for i, (a, b) in enumerate(zip(oy, ox, strict=True))])
            for t in (x, m))


def train_vae(cfg: V.VAEConfig, res: int, plan: dict, seed: int, init=None) -> tuple[V.VAE, dict]:
    """L1 + L2 reconstruction of sampled latents (so the decoder tolerates latent noise) + 1e-6 KL, on random
    8-px-aligned crops; the latent scale is baked in at 70% of the steps, the rest of training settles it."""
    torch.manual_seed(seed)
    t0 = time.time()
    images, _ = renders(plan["n"], res)
    log(f"vae {res}px: {len(images)} renders in {time.time() - t0:.0f}s")
    if init is not None:  # more steps on a saved VAE (--more)
        vae = V.load_vae(init, family="sd15" if cfg.latent_channels == 4 else "sd3").train().requires_grad_(True)
    else:
        vae = V.VAE(cfg)
        with torch.no_grad():  # start with a small posterior std (e^-3): the means carry the signal from the outset
            (vae.quant_conv if cfg.use_quant_conv else vae.encoder.conv_out).bias[cfg.latent_channels:] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=plan["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    crop, steps = plan.get("crop") or res, plan["steps"]
    masks = foreground(images)  # (N, 1, res, res)
    for step in range(steps):
        if step == int(0.7 * steps):
            baked = bake_latent_scale(vae, images[:512])
            opt = torch.optim.AdamW(vae.parameters(), betas=(0.9, 0.99), weight_decay=0.0)  # moments: reset
            log(f"vae {res}px: latent scale baked in {baked}")
        for group in opt.param_groups:
            group["lr"] = cosine(step, steps, plan["lr"], warmup=20)
        idx = torch.randint(0, len(images), (plan["batch"],), generator=g)
        x, m = shape_crops(images[idx], masks[idx], crop, g)
        w = 1 + plan.get("fg_weight", 0.0) * m
        mean, logvar = vae_moments(vae, x)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        y = vae.decoder(vae.post_quant_conv(z) if cfg.use_quant_conv else z)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        loss = (w * ((y - x).abs() + (y - x).square())).sum() / (3 * w.sum()) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {res}px step {step:4d} loss {loss.item():.4f} kl {kl.item():.1f}")
    vae.eval().requires_grad_(False)
    held = toy.render(toy.sample_scenes(64, 99), res)
    with torch.no_grad():
        rec = vae.decode(vae.encode(held))
    info = {"seconds": round(time.time() - t0), "l1_held_out": float((rec - held).abs().mean()),
            "latent": latent_stats(vae, images[:512]), "params": sum(p.numel() for p in vae.parameters())}
    log(f"vae {res}px done: {info}")
    return vae, info


def run_vae(which: str, more: bool = False) -> dict:
    cfg, res, path = (M.VAE_S, M.STUDENT_RES, M.STUDENT) if which == "vae_s" else (M.VAE_T, M.TEACHER_RES, M.TEACHER)
    vae, info = train_vae(cfg, res, PLAN[which], seed=(1 if which == "vae_s" else 2) + 10 * more,
                          init=path if more else None)
    merge_save(path, half(vae.state_dict(), "first_stage_model."), ("first_stage_model.",))
    return info


def finetune_decoder(which: str, plan: dict, seed: int = 5) -> dict:
    """Decoder-only training on FULL images: GroupNorm statistics and the mid-block attention differ between crops
    and whole images, so a decoder trained on crops decodes whole latents badly. The encoder stays frozen, so the
    latents (and a diffusion model trained on them) are unchanged."""
    cfg, res, path, family = (M.VAE_S, M.STUDENT_RES, M.STUDENT, "sd15") if which == "dec_s" else \
        (M.VAE_T, M.TEACHER_RES, M.TEACHER, "sd3")
    torch.manual_seed(seed)
    t0 = time.time()
    vae = V.load_vae(path, family=family)
    images, _ = renders(plan["n"], res)
    masks = foreground(images)
    with torch.no_grad():
        moments = [vae_moments(vae, images[i:i + 50]) for i in range(0, len(images), 50)]
        mean, logvar = torch.cat([m for m, _ in moments]), torch.cat([v for _, v in moments])
    dec = [vae.decoder] + ([vae.post_quant_conv] if cfg.use_quant_conv else [])
    params = [p for m in dec for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=plan["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(plan["steps"]):
        for group in opt.param_groups:
            group["lr"] = cosine(step, plan["steps"], plan["lr"], warmup=10)
        idx = torch.randint(0, len(images), (plan["batch"],), generator=g)
        z = mean[idx] + torch.exp(0.5 * logvar[idx].clamp(-30, 20)) * torch.randn(mean[idx].shape, generator=g)
        x, w = images[idx], 1 + plan.get("fg_weight", 0.0) * masks[idx]
        y = vae.decoder(vae.post_quant_conv(z) if cfg.use_quant_conv else z)
        loss = (w * ((y - x).abs() + (y - x).square())).sum() / (3 * w.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == plan["steps"] - 1:
            log(f"{which} step {step:4d} loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    vae.eval().requires_grad_(False)
    held = toy.render(toy.sample_scenes(64, 99), res)
    with torch.no_grad():
        rec = vae.decode(vae.encode(held))
    merge_save(path, half(vae.state_dict(), "first_stage_model."), ("first_stage_model.",))
    info = {"seconds": round(time.time() - t0), "l1_held_out": float((rec - held).abs().mean()), **plan}
    log(f"{which} done: {info}")
    return info


# -------------------------------------------------------------------------------------------------------- training
def encode_dataset(vae: V.VAE, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vae.encode(images[i:i + 100]) for i in range(0, len(images), 100)])


def sd3_text(clip_l, clip_g, t5, toks, prompts):
    """conditioning.sd3_conditioning with gradients (its undecorated function): the exact conditioning used at
    inference, so the encoders are pretrained and read in training as in sample.py / distill.py."""
    return C.sd3_conditioning.__wrapped__(clip_l, clip_g, t5, prompts, M.T5_LENGTH, toks[2], toks[0], toks[1])


def cached_latents(which: str, n: int, res: int, path: Path) -> tuple[torch.Tensor, list]:
    """Latents of `n` renders, cached under /tmp by encoder weights and size (encoding 128 px images is slow)."""
    scenes = toy.sample_scenes(n, DATA_SEED)
    key = float(Checkpoint(path).tensors("first_stage_model.encoder.conv_out.", dtype=torch.float64)["weight"].sum())
    cache = Path(f"/tmp/toy_latents_{which}_{n}_{key:.12e}.safetensors")  # safetensors: nothing is unpickled
    if cache.exists():
        return Checkpoint(cache).tensors()["x0"], scenes
    images, _ = renders(n, res)
    x0 = encode_dataset(V.load_vae(path, family="sd15" if which == "student" else "sd3"), images)
    save_atomic({"x0": x0}, cache)
    return x0, scenes


def train_teacher(plan: dict, seed: int = 3, more: bool = False, same_space: bool = False) -> tuple[dict, dict]:
    """Flow matching with CFG dropout; more=True continues from the saved teacher and text encoders (warm restart
    of the cosine schedule). same_space=True: the reference teacher in the student's latent space, with text
    encoders of its own (trained alike, beside the teacher: assets/toy/same_space/)."""
    torch.manual_seed(seed + 10 * more)
    t0 = time.time()
    x0_all, scenes = cached_latents("student", plan["n"], M.STUDENT_RES, M.STUDENT) if same_space else \
        cached_latents("teacher", plan["n"], M.TEACHER_RES, M.TEACHER)
    log(f"teacher: {len(x0_all)} latents {tuple(x0_all.shape[1:])} std {x0_all.std():.3f} in {time.time() - t0:.0f}s")
    toks = tokenizers(M.TEXT_ENCODERS)
    if more:
        text = C.load_teacher_text(M.TEACHER, M.TEXT_ENCODERS)  # CLIPs told the toy EOS id, as at inference
        model, clip_l, clip_g, t5 = load_teacher(M.TEACHER), text.clip_l, text.clip_g, text.t5
        model.train().requires_grad_(True)
        for m in (clip_l, clip_g, t5):
            m.eval().requires_grad_(False)  # frozen, as SD3's (pretrain_text freezes fresh ones)
    else:
        model, clip_l, clip_g, t5 = MMDiT(M.SAME_SPACE_CFG if same_space else M.TEACHER_CFG), \
            CLIPTextModel(M.TEACHER_CLIP_L), CLIPTextModel(M.TEACHER_CLIP_G), T5Encoder(M.TEACHER_T5)
        init_weights(model, clip_l, clip_g, t5)

        def readout(prompts):  # the pooled vector (adaLN) and the mean context token (what joint attention reads)
            context, pooled = sd3_text(clip_l, clip_g, t5, toks, prompts)  # (B, 77 + T5_LENGTH, 128), (B, 128)
            h = torch.stack([pooled, context.mean(1)], 1)  # (B, 2, 128)
            return h, torch.ones(h.shape[:2])
        pretrain_text([clip_l, clip_g, t5], readout, M.TEACHER_CFG.context_dim, plan, seed, "teacher")
    mods = [model, clip_l, clip_g, t5]
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=plan["lr"], weight_decay=0.01)
    rng, g = np.random.default_rng(seed + 10 * more), torch.Generator().manual_seed(seed + 10 * more)
    budget, step = Budget(plan), 0
    while budget.progress(step) < 1:
        for group in opt.param_groups:
            group["lr"] = budget.lr(step, plan["lr"])
        idx = torch.randint(0, len(x0_all), (plan["batch"],), generator=g)
        x0 = x0_all[idx]
        with torch.no_grad():  # the text encoders are frozen
            context, pooled = sd3_text(clip_l, clip_g, t5, toks, captions([scenes[i] for i in idx], rng))
        sigma = torch.sigmoid(torch.randn(len(idx), generator=g))  # logit-normal(0, 1) (SD3)
        sigma = plan["shift"] * sigma / (1 + (plan["shift"] - 1) * sigma)  # time shift, as teachers.sd3_sigmas
        noise = torch.randn(x0.shape, generator=g)
        s = sigma[:, None, None, None]
        v = model((1 - s) * x0 + s * noise, sigma, context, pooled)
        loss = F.mse_loss(v, noise - x0)
        update(opt, params, loss, step, "teacher", t0)
        step += 1
    plan = {**plan, "steps_done": step}
    folder = M.SAME_SPACE_TEXT if same_space else M.TEXT_ENCODERS
    folder.mkdir(parents=True, exist_ok=True)
    if same_space:
        shutil.copyfile(M.TEXT_ENCODERS / "tokenizer.json", folder / "tokenizer.json")
    save_atomic(half(clip_l.state_dict()), folder / "clip_l.safetensors")
    save_atomic(half(clip_g.state_dict()), folder / "clip_g.safetensors")
    save_atomic(half(t5.state_dict()), folder / "t5xxl_fp16.safetensors")
    if same_space:  # a bare transformer file: its VAE is the student's
        save_atomic(half(model.state_dict(), "model.diffusion_model."), M.SAME_SPACE)
    else:
        merge_save(M.TEACHER, half(model.state_dict(), "model.diffusion_model."), ("model.diffusion_model.",))
    # Its time shift, where teachers.sd3_shift (sample.py, distill.py) finds it: as a diffusers scheduler config.
    (M.SAME_SPACE if same_space else M.TEACHER).with_name("scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": plan["shift"]}, indent=1) + "\n")
    info = {"seconds": round(time.time() - t0), "params": sum(p.numel() for p in model.parameters()),
            "text_params": sum(p.numel() for m in mods[1:] for p in m.parameters()), **plan}
    log(f"teacher done: {info}")
    return info


def update(opt, params, loss, step: int, name: str, t0: float) -> None:
    """One optimizer step with gradient clipping at 1.0; a log line every 50 steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if step % 50 == 0:
        log(f"{name} step {step:5d} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s")


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side * side, dim) fixed 2D sine-cosine position table (DiT / SD3 initialisation): half the dims encode the row,
    half the column, each as [sin, cos] at geometric frequencies 1 / 10000^(k / (dim / 4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(side, dtype=torch.float64)[:, None] * omega  # (side, dim / 4)
    emb = torch.cat([pos.sin(), pos.cos()], dim=1)  # (side, dim / 2)
    rows, cols = emb[:, None, :].expand(side, side, -1), emb[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, dim).float()


def init_weights(*mods) -> None:
    """The modules define no init of their own. Xavier for linear / conv weights, N(0, 0.02) for token and position
    tables and the timestep / pooled embedders (DiT), zero biases, unit norms. MMDiT: the position table starts as
    the fixed 2D sine-cosine table (as DiT and SD3 initialise it; from a random 0.02 table a 25-minute teacher never
    learned where to put the one shape and drew coloured blobs all over), and adaLN modulation and the final layer
    start at zero (each block starts as the identity)."""
    for m in mods:
        for name, p in m.named_parameters():
            if p.ndim >= 2:
                small = any(k in name for k in ("token_embedding", "position_embedding", "shared", "embed_tokens",
                                                 "relative_attention_bias", "t_embedder", "y_embedder"))
                torch.nn.init.normal_(p, std=0.02) if small else torch.nn.init.xavier_uniform_(p.view(p.shape[0], -1))
            elif "norm" in name or "ln_" in name or name.endswith("layer_norm.weight") or "final_layer_norm" in name:
                torch.nn.init.ones_(p) if name.endswith("weight") else torch.nn.init.zeros_(p)
            else:
                torch.nn.init.zeros_(p)
        if isinstance(m, MMDiT):
            with torch.no_grad():
                m.pos_embed.copy_(sincos_2d(m.cfg.pos_embed_max_size, m.cfg.hidden)[None])
            for name, p in m.named_parameters():
                if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                    torch.nn.init.zeros_(p)


def ddpm_alphas_cumprod() -> torch.Tensor:
    """SD 1.5's schedule: scaled-linear betas 0.00085..0.012 over 1000 steps (v1-inference.yaml linear_start/end)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def pretrain_text(encoders: list, readout, width: int, plan: dict, seed: int, name: str) -> None:
    """Text encoders pretrained on text alone, then frozen: SD 1.5 and SD3 train their diffusion models under frozen
    CLIP / T5 encoders that pretraining had taught what captions say. The stand-in for that pretraining here: linear
    heads (then discarded) read the five scene attributes from `readout(prompts)` -> (states (B, N, width), mask
    (B, N)): the states the diffusion model will read. Trained jointly with their diffusion models instead (as
    before), the student's 2-layer causal CLIP never bound a colour to the word "background" (a linear probe read it
    from its EOS state 34% of the time, chance 17%) nor the position (42%); pretrained, 100% each (600 steps)."""
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in toy.ATTRIBUTES.items()})
    params = [p for m in encoders for p in m.parameters()] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=plan["text_lr"], weight_decay=0.01)
    rng, t0 = np.random.default_rng(seed), time.time()
    for step in range(plan["text_steps"]):
        scenes = toy.sample_scenes(plan["batch"], seed * 100_000 + step)
        h, mask = readout([toy.caption(sc, rng) for sc in scenes])  # never empty: each caption has its labels
        loss = 0.0
        for k, v in toy.ATTRIBUTES.items():
            y = torch.tensor([v.index(getattr(sc, k)) for sc in scenes])[:, None].expand(mask.shape)
            loss = loss + (F.cross_entropy(heads[k](h).transpose(1, 2), y, reduction="none") * mask).sum() / mask.sum()
        update(opt, params, loss, step, f"{name} text", t0)
    for m in encoders:
        m.eval().requires_grad_(False)


def train_student(plan: dict, seed: int = 4, more: bool = False) -> dict:
    """eps prediction on SD 1.5's schedule with CFG dropout, under a frozen pretrained CLIP (pretrain_text);
    more=True continues from the saved UNet."""
    seed += 10 * more
    torch.manual_seed(seed)
    t0 = time.time()
    x0_all, scenes = cached_latents("student", plan["n"], M.STUDENT_RES, M.STUDENT)
    log(f"student: {len(x0_all)} latents {tuple(x0_all.shape[1:])} std {x0_all.std():.3f} in {time.time() - t0:.0f}s")
    tok = CLIPTokenizer.from_file(M.STUDENT.parent / "tokenizer.json")
    if more:
        unet = load_unet(M.STUDENT).train().requires_grad_(True)
        clip = load_clip(M.STUDENT).eval().requires_grad_(False)
    else:
        torch.manual_seed(seed)
        clip = CLIPTextModel(M.STUDENT_CLIP)
        init_weights(clip)
        torch.nn.init.normal_(clip.text_model.embeddings.position_embedding.weight, std=0.01)

        def readout(prompts):  # SD 1.5 cross-attends to the last hidden states: the EOS and its padding must tell all
            ids = tok.encode(prompts)
            return clip(ids).last_hidden_state, ((ids == tok.eos_id).cumsum(1) > 0).float()  # (B, 77, w), (B, 77)
        pretrain_text([clip], readout, M.STUDENT_CLIP.width, plan, seed, "student")
        unet = UNet(M.STUDENT_CFG)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=plan["lr"], weight_decay=0.01)
    ac = ddpm_alphas_cumprod()
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    budget, step = Budget(plan), 0
    while budget.progress(step) < 1:
        for group in opt.param_groups:
            group["lr"] = budget.lr(step, plan["lr"])
        idx = torch.randint(0, len(x0_all), (plan["batch"],), generator=g)
        x0 = x0_all[idx]
        with torch.no_grad():  # the CLIP is frozen
            context = C.sd15_context.__wrapped__(clip, tok, captions([scenes[i] for i in idx], rng))
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        # a quarter of the batch at t >= 900: one-step sampling (and the distilled generator) starts at t = 999,
        # where x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies eps errors by 1 / sqrt(a) = 14.6, and uniform t
        # leaves the small model's eps there too rough (one-step x0 std 2.4 for latents of std 0.9)
        t[: len(idx) // 4] = torch.randint(900, 1000, (len(idx) // 4,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t][:, None, None, None]
        loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, context), eps)
        update(opt, params, loss, step, "student", t0)
        step += 1
    plan = {**plan, "steps_done": step}
    tensors = {**half(unet.state_dict(), "model.diffusion_model."),
               **half(clip.state_dict(), "cond_stage_model.transformer.")}
    merge_save(M.STUDENT, tensors, ("model.diffusion_model.", "cond_stage_model."))
    info = {"seconds": round(time.time() - t0), "params": sum(p.numel() for p in unet.parameters()),
            "text_params": sum(p.numel() for p in clip.parameters()), **plan}
    log(f"student done: {info}")
    return info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the toy models (2 CPU cores, under an hour) and score them.")
    p.add_argument("--what", default="all", help="all: the tokenizer, then the chains " + " and ".join(CHAINS) +
                   " in parallel (a core each), then eval. Or comma-separated parts, run in this order: tokenizer, "
                   "vae_s, vae_t, dec_s, dec_t, teacher, student, teacher_ss (the same-space reference), eval (or "
                   "eval_teacher, eval_student, eval_same_space)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every part's steps (quick trials)")
    p.add_argument("--more", action="store_true", help="VAEs: continue from the saved weights")
    p.add_argument("--minutes", type=float, help="teacher / student: override the planned minutes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "all":
        for folder in (M.STUDENT.parent, M.TEXT_ENCODERS):
            build_tokenizer(folder / "tokenizer.json")
        cmd = [sys.executable, "-m", "toy.train", "--scale", str(args.scale), "--threads", str(args.threads), "--what"]
        chains = [subprocess.Popen(cmd + [chain]) for chain in CHAINS]
        if any(c.wait() for c in chains):
            raise SystemExit("toy.train: a training chain failed (see above)")
        args.what = "eval,eval_same_space"
    what = args.what.split(",")
    for plan in PLAN.values():
        plan["steps"] = max(1, int(plan["steps"] * args.scale))
        if args.minutes and "minutes" in plan:
            plan.update(minutes=args.minutes, steps=10**6)  # the clock decides
    if args.more:
        PLAN["teacher"]["lr"] /= 2  # a warm restart: half the peak learning rate
    info_path, info = M.ROOT / "train_info.json", {}
    t0 = time.time()
    if "tokenizer" in what:
        for folder in (M.STUDENT.parent, M.TEXT_ENCODERS):
            build_tokenizer(folder / "tokenizer.json")
    for part in ("vae_s", "vae_t"):
        if part in what:
            info[part + "_more" * args.more] = run_vae(part, args.more)
    for part in ("dec_s", "dec_t"):
        if part in what:
            info[part] = finetune_decoder(part, PLAN[part])
    if "teacher" in what:
        info["teacher" + "_more" * args.more] = train_teacher(PLAN["teacher"], more=args.more)
    if "student" in what:
        info["student" + "_more" * args.more] = train_student(PLAN["student"], more=args.more)
    if "teacher_ss" in what:
        info["teacher_ss"] = train_teacher(PLAN["teacher_ss"], same_space=True)
    info["configs"] = {k: str(v) for k, v in dict(vae_s=M.VAE_S, vae_t=M.VAE_T, teacher=M.TEACHER_CFG,
                                                   student=M.STUDENT_CFG, student_clip=M.STUDENT_CLIP,
                                                   teacher_t5=M.TEACHER_T5).items()}
    if set(what) & {"vae_s", "vae_t", "dec_s", "dec_t", "teacher", "student", "teacher_ss"}:  # parallel runs: merge
        info = {**(json.loads(info_path.read_text()) if info_path.exists() else {}), **info}
        info_path.write_text(json.dumps(info, indent=1) + "\n")
    which = [w for w in ("teacher", "student", "same_space") if "eval" in what or f"eval_{w}" in what]
    if which:
        new = M.evaluate(which, log=log)  # then merge: parts may be evaluated in parallel
        scores = {**(json.loads(M.SCORES.read_text()) if M.SCORES.exists() else {}), **new}
        M.SCORES.write_text(json.dumps(scores, indent=1) + "\n")
        print(json.dumps(scores, indent=1))
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
