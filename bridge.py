"""The Bridge: student latents -> teacher latents, and the losses of Cross-Space Distillation.

Cross-Space Distillation (arXiv 2606.32020; only the abstract is public) distills a flow-matching teacher
(SD 3.5 / FLUX, 16-channel latents, 128x128 at 1024 px) into a one-step SD 1.5 student (4 channels, 64x64 at 512 px).
The two latent spaces differ in channels, resolution and statistics, so the student's output z_s is mapped into the
teacher's space by a Bridge: the FROZEN student VAE decoder (a spatial prior: it already knows how to turn z_s into
image structure), then a small learned projector to 16 channels, reading either the decoder's feature map at the
teacher latent's resolution (tap "features": the decoder runs only that far) or the decoded image (tap "pixels").
The Bridge is trained to reproduce the teacher latent of the same image (reconstruction) and so that the frozen
teacher attends to text alike for the bridged and the true latent (attention fidelity). Distribution matching
(DMD2) then runs in teacher space and its gradient flows back through Bridge and decoder into the student.

Where the abstract is silent, the choices here are ours; each is marked "CHOICE" and is configurable.
Time convention: sigma in [0, 1], 1 = pure noise; x_sigma = (1 - sigma) x0 + sigma noise; v = noise - x0.
References: Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2,
arXiv 2405.14867, its `loss = 0.5 * mse(x, sg(x - grad))` form); Esser et al. 2024 (SD3 time shift).
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae import GroupNorm


def scale_for(student_latent_hw, teacher_latent_hw) -> int:
    """Upsampling factor teacher / student latent size (512 -> 1024 px: 2; 512 -> 512: 1); a power of two."""
    (hs, ws), (ht, wt) = student_latent_hw, teacher_latent_hw
    s = ht // hs
    if ht != s * hs or wt != s * ws or s < 1 or s & (s - 1):
        raise ValueError(f"teacher latent {ht}x{wt} is not a power-of-two multiple of student latent {hs}x{ws}")
    return s


def feature_channels(cfg, scale) -> int:
    """Channels of vae.decode_features(., scale): the mid block (scale 1) has the deepest width, the upsampling
    into 2^k x has the width of decoder level n - k."""
    n = len(cfg.ch_mult)
    if scale not in [2 ** i for i in range(n)]:
        raise ValueError(f"Bridge: scale {scale} not in {[2 ** i for i in range(n)]}")
    return cfg.ch * cfg.ch_mult[-1 if scale == 1 else n - int(math.log2(scale))]


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.conv = GroupNorm(math.gcd(32, c), c, eps=1e-6), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(F.silu(self.norm(x)))


class Bridge(nn.Module):
    """z_s (B, 4, h, w) -> z_t_hat (B, 16, scale*h, scale*w): frozen decoder (features or image) + learned projector.

    The student VAE is held in a plain tuple, NOT as a submodule: state_dict(), parameters(), optimizers, DDP and
    .to() see only the projector (the decoder is frozen, shared with the rest of the pipeline, and saving or
    all-reducing its tens of millions of constant weights would be waste). The constructor sets the VAE to
    requires_grad False and eval: its weights never change, but autograd still runs through it, so d loss / d z_s
    reaches the student. Place the VAE on the device yourself (.to() skips it; copy.deepcopy does copy it); set
    `vae.decoder.gradient_checkpointing = True` to trade its activations for recompute at 1024 px.
    """

    def __init__(self, student_vae, teacher_channels=16, scale=2, width=128, depth=2, tap="features"):
        super().__init__()
        self._vae = (student_vae.requires_grad_(False).eval(),)
        self.scale, self.tap = scale, tap
        # CHOICE (tap): where the projector reads the frozen decoder. "features": its feature map at the teacher
        # latent's resolution (the decoder runs only that far), a 1x1 conv in (channel reduction only; 512 -> 128 at
        # 3x3 would alone be 2x the rest). "pixels": the whole decoder, the image clamped to [-1, 1] as the exact
        # path does, then strided 3x3 convs down to the teacher latent's resolution. On the toy, the pixel tap's
        # vector-Jacobian products (what carries the DMD gradient into the student) match the exact path's far
        # better than the feature tap's, however long that trains (toy/LOG.md#bridge-gap).
        # Then `depth` pre-norm residual 3x3 blocks for local mixing, GroupNorm-SiLU-3x3 conv out (as the VAE's heads).
        if tap == "features":
            self.proj_in, self.down = nn.Conv2d(feature_channels(student_vae.cfg, scale), width, 1), nn.ModuleList()
        elif tap == "pixels":
            down = 2 ** (len(student_vae.cfg.ch_mult) - 1) // scale  # student pixels per teacher latent
            if down < 1 or down & (down - 1):
                raise ValueError(f"Bridge: tap 'pixels' needs scale <= {2 ** (len(student_vae.cfg.ch_mult) - 1)}")
            self.proj_in = nn.Conv2d(3, width, 3, padding=1)
            self.down = nn.ModuleList(nn.Conv2d(width, width, 3, stride=2, padding=1)
                                      for _ in range(int(math.log2(down))))
        else:
            raise ValueError(f"Bridge: tap {tap!r} not in ('features', 'pixels')")
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.norm_out = GroupNorm(math.gcd(32, width), width, eps=1e-6)
        self.proj_out = nn.Conv2d(width, teacher_channels, 3, padding=1)

    @property
    def vae(self):
        return self._vae[0]

    def forward(self, z_s: Tensor) -> Tensor:
        return self.project(self.decode(z_s))

    def decode(self, z_s: Tensor) -> Tensor:
        """The frozen part: the decoder's features at the teacher latent's size (B, C_feat, scale*h, scale*w), or the
        decoded image (B, 3, 8h, 8w), clamped to [-1, 1] so that saturated pixels pass no gradient."""
        z_s = z_s.to(self.vae.decoder.conv_in.weight.dtype)  # a differentiable cast: e.g. fp32 student, bf16 VAE
        if self.tap == "features":
            return self.vae.decode_features(z_s, self.scale)
        return self.vae.decode(z_s).clamp(-1, 1)

    def project(self, tap: Tensor) -> Tensor:
        """The learned part: decode(z_s) -> z_t_hat (B, 16, scale*h, scale*w)."""
        h = self.proj_in(tap.to(self.proj_in.weight.dtype))
        for conv in self.down:  # pixel tap
            h = conv(F.silu(h))  # halves the resolution, down to (B, width, scale*h, scale*w)
        for block in self.blocks:
            h = block(h)
        return self.proj_out(F.silu(self.norm_out(h)))  # (B, 16, scale*h, scale*w)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def decoder_part(self) -> list:
        """The decoder modules that forward runs: post_quant_conv, conv_in, mid, then the levels up to the tap."""
        vae, n = self.vae, len(self.vae.cfg.ch_mult)
        mods = [vae.post_quant_conv] if vae.cfg.use_quant_conv else []
        if self.tap == "pixels":
            return mods + [vae.decoder]
        mods += [vae.decoder.conv_in, vae.decoder.mid]
        return mods + [vae.decoder.up[n - 1 - j] for j in range(int(math.log2(self.scale)))]

    def describe(self) -> str:
        dec = sum(p.numel() for m in self.decoder_part() for p in m.parameters())
        return (f"Bridge x{self.scale} ({self.tap} tap): projector {self.num_params() / 1e6:.2f}M trainable params on "
                f"{dec / 1e6:.2f}M frozen decoder params ({100 * self.num_params() / dec:.1f}%)")


class NaiveBridge(nn.Module):
    """Baseline: bilinear resize of z_s to the teacher latent size, then a learned 1x1 conv 4 -> 16."""

    def __init__(self, student_channels=4, teacher_channels=16, scale=2):
        super().__init__()
        self.scale = scale
        self.proj = nn.Conv2d(student_channels, teacher_channels, 1)

    def forward(self, z_s: Tensor) -> Tensor:
        z = F.interpolate(z_s, scale_factor=self.scale, mode="bilinear", align_corners=False) if self.scale > 1 else z_s
        return self.proj(z.to(self.proj.weight.dtype))


class ExactPath(nn.Module):
    """The exact cross-space map as a differentiable module: student decode -> resize -> teacher encode (posterior
    mean). Both VAEs are held outside the module tree (as in Bridge) and used as given (distill.py loads them frozen;
    gradients still reach z_s). What the Bridge approximates: the
    reference it is trained against (through `bridge_target`), and the `--bridge-kind exact` ablation of distill.py,
    which back-propagates through a full-resolution decode AND encode every step."""

    def __init__(self, student_vae, teacher_vae, teacher_hw):
        super().__init__()
        self._vaes = (student_vae, teacher_vae)
        self.teacher_hw = tuple(teacher_hw)

    def forward(self, z_s: Tensor) -> Tensor:
        svae, tvae = self._vaes
        img = svae.decode(z_s.to(svae.decoder.conv_in.weight.dtype)).clamp(-1, 1)  # (B, 3, 8h, 8w)
        f = 2 ** (len(tvae.cfg.ch_mult) - 1)
        size = (f * self.teacher_hw[0], f * self.teacher_hw[1])  # the teacher's pixel size
        if tuple(img.shape[-2:]) != size:  # antialias only when shrinking (bilinear upsampling needs none)
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=size[0] < img.shape[-2])
        return tvae.encode(img.to(tvae.encoder.conv_in.weight.dtype))  # (B, 16, H, W), scaled & shifted


@torch.no_grad()
def bridge_target(student_vae, teacher_vae, z_s, teacher_hw):
    """z_t_star: the teacher latent of the image the student latent decodes to (teacher_hw: the teacher LATENT
    size). Costs a full student decode and teacher encode at full resolution (the Bridge avoids both)."""
    return ExactPath(student_vae, teacher_vae, teacher_hw)(z_s)


@torch.no_grad()
def held_out_report(bridge, naive, exact, zs, zt, batch: int, autocast, sync) -> dict:
    """Stage 1's report on held-out latents zs -> zt: reconstruction MSE of the Bridge, of the naive baseline and of
    predicting zero; milliseconds per sample of the Bridge and of the exact decode-resize-encode path (`exact`), each
    timed after one warm-up batch. `autocast()`: the run's autocast context; `sync()`: waits for the device."""
    with autocast():
        mse = {name: reconstruction_loss(f(zs), zt).item() for name, f in (("bridge", bridge), ("naive", naive))}
        mse["zero"] = zt.float().pow(2).mean().item()
        cost = {}
        for name, f in (("bridge", bridge), ("exact", exact)):
            f(zs[:batch])  # warm-up
            sync()
            t0 = time.perf_counter()
            for i in range(0, len(zs), batch):
                f(zs[i:i + batch])
            sync()
            cost[name] = 1000 * (time.perf_counter() - t0) / len(zs)
    return dict(mse_bridge=mse["bridge"], mse_naive=mse["naive"], mse_zero=mse["zero"], ms_bridge=cost["bridge"],
                ms_exact=cost["exact"], held_out=len(zs))


def format_report(r: dict) -> str:
    """held_out_report's numbers, as distill.py prints them."""
    return (f"bridge: held-out ({r['held_out']} latents) reconstruction MSE {r['mse_bridge']:.4f} | naive "
            f"{r['mse_naive']:.4f} | predicting zero {r['mse_zero']:.4f}\nbridge: cost {r['ms_bridge']:.2f} "
            f"ms/sample vs exact decode-resize-encode {r['ms_exact']:.2f} ms/sample "
            f"({r['ms_exact'] / r['ms_bridge']:.1f}x faster)")


# ----------------------------------------------------------------------------- Bridge losses
@dataclass
class BridgeLossConfig:
    rec_weight: float = 1.0  # CHOICE: equal weights (the paper gives none); both are per-element / per-query
    attn_weight: float = 1.0  # means (MSE of ~unit-variance latents, KL in nats): tune from their logged sizes
    # CHOICE: floats = fractions of teacher depth (joint / double blocks), ints = block indices. Spread over depth
    # (which blocks carry the text-image layout differs between teachers; the paper doesn't say). Each map costs
    # an fp32 (B, N_img, N_txt + N_img) softmax per head, kept for backward, so only a few blocks.
    blocks: tuple = (0.25, 0.5, 0.75)
    # CHOICE: sigma ~ U(lo, hi) then the teacher's shift. Near sigma = 1 both inputs are the same noise and the maps
    # agree trivially (no signal); near 0 the teacher barely needs the text and attends mostly locally/image-to-
    # image, so the maps say little. The range is in the unshifted variable and the shift (3.0: SD3 / SD3.5;
    # FLUX: exp(mu), 3.16 at 1024 px) moves it where the teacher at that resolution is in its informative range.
    sigma_lo: float = 0.2
    sigma_hi: float = 0.8
    shift: float = 3.0
    divergence: str = "kl"


def resolve_blocks(blocks, depth) -> tuple:
    """Fractions of depth (floats) or indices (ints) -> sorted unique block indices."""
    return tuple(sorted({b if isinstance(b, int) else min(depth - 1, round(b * (depth - 1))) for b in blocks}))


def sample_sigmas(n, lo=0.2, hi=0.8, shift=1.0, generator=None, device=None):
    """sigma = shift(u), u ~ U(lo, hi); shift(s) = k s / (1 + (k - 1) s) (SD3; FLUX's exp(mu) shift is the same
    map with k = exp(mu)). Drawn on the generator's device, returned on `device`."""
    u = torch.rand(n, generator=generator, device=generator.device if generator is not None else device)
    u = lo + (hi - lo) * u.to(device or u.device)
    return shift * u / (1 + (shift - 1) * u)


def add_noise(x0, noise, sigma):
    s = sigma.float().view(-1, *[1] * (x0.ndim - 1))
    return (1 - s) * x0.float() + s * noise.float()


def reconstruction_loss(z_hat, z_star):
    """MSE: the teacher was trained with an L2 flow-matching loss in this very latent space (scaled to ~unit
    variance), and the DMD gradient is an L2 quantity there too, so L2 is the metric the teacher 'sees' errors in."""
    return F.mse_loss(z_hat.float(), z_star.float())


def attention_fidelity_loss(teacher, z_hat, z_star, context, pooled, sigma, noise, blocks, guidance=None,
                            divergence="kl", eps=1e-8):
    """The frozen teacher should attend to the text alike on the noised bridged and the noised true latent.
    SAME noise and sigma for both, so the only difference between the inputs is the latent (independent noise
    would make the maps differ even for identical latents). Gradients reach z_hat only.

    CHOICE (divergence="kl"): each image query's text-key probabilities are renormalised to a distribution over the
    text tokens, then KL(target || bridged) averaged over queries, blocks and batch. Rows sum to 1 over ALL keys and
    text gets a small, varying share, so raw probabilities are tiny and an MSE on them vanishes; renormalised, the
    loss asks WHICH words each image region attends to (the layout that cross-attention maps carry), each query
    weighs the same, and the forward KL penalises the bridged latent for ignoring words the teacher attends to on
    the true one. Exactly zero for identical inputs. divergence="mse": MSE of the raw maps (also keeps the text share).
    """
    blocks = resolve_blocks(blocks, teacher.cfg.depth)
    x_hat, x_star = add_noise(z_hat, noise, sigma), add_noise(z_star, noise, sigma)
    with torch.no_grad():
        target = teacher(x_star, sigma, context, pooled, guidance, attn_blocks=blocks).attn
    maps = teacher(x_hat, sigma, context, pooled, guidance, attn_blocks=blocks).attn
    losses = []
    for i in blocks:
        p, q = target[i].float(), maps[i].float()  # (B, N_img, N_txt)
        if divergence == "kl":
            p, q = p / p.sum(-1, keepdim=True).clamp_min(eps), q / q.sum(-1, keepdim=True).clamp_min(eps)
            losses.append((p * (p.clamp_min(eps).log() - q.clamp_min(eps).log())).sum(-1).mean())
        elif divergence == "mse":
            losses.append(F.mse_loss(q, p))
        else:
            raise ValueError(f"attention_fidelity_loss: divergence {divergence!r} not in ('kl', 'mse')")
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- distribution matching (DMD2)
def x0_from_v(x_sigma, sigma, v):
    """x0 = x_sigma - sigma v (since v = noise - x0), fp32."""
    return x_sigma.float() - sigma.float().view(-1, *[1] * (x_sigma.ndim - 1)) * v.float()


def flow_matching_loss(v_pred, x0, noise):
    """The fake score's loss: MSE of its velocity against noise - x0 (x0 = detached generator samples)."""
    return F.mse_loss(v_pred.float(), (noise - x0).float())


def dmd_generator_loss(x, x0_real, x0_fake):
    """DMD2 generator loss for samples x (already in teacher space), given the real (teacher) and fake score's
    x0 predictions at the SAME noised x. d loss / d x = grad / x.numel(), grad = (x0_fake - x0_real) / w: the
    reverse-KL gradient s_fake - s_real up to a positive factor. A descent step moves x AGAINST grad, i.e. towards
    the real x0 and away from the fake one. w = mean |x - x0_real| per sample (detached) normalises the step size
    across noise levels and samples (DMD Eq. 8). fp32 throughout; nan_to_num guards w = 0."""
    x = x.float()
    w = (x - x0_real.float()).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True).detach()
    grad = torch.nan_to_num((x0_fake.float() - x0_real.float()) / w).detach()
    return 0.5 * F.mse_loss(x, (x - grad).detach())


# ----------------------------------------------------------------------------- DMD2's GAN term (optional)
class RealismHead(nn.Module):
    """DMD2's GAN classifier: one logit per sample, 'a real image of this prompt', read from the image tokens of the
    FAKE score network at one block. DMD2 puts a small conv head on the fake UNet's bottleneck; a transformer has
    tokens, so CHOICE: a per-token MLP whose logits are averaged over the tokens. The tokens have attended to the
    prompt in the joint blocks, so the classifier is conditional: a right image for the wrong prompt reads fake."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, 1)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, N_img, C) -> (B,); fp32 (a few thousand FLOPs per token)
        return self.fc2(F.silu(self.fc1(self.norm(tokens.float())))).mean((1, 2))


def gan_generator_loss(logit_fake):
    """Non-saturating GAN loss of the generator (DMD2): softplus(-logit) = -log sigmoid(logit)."""
    return F.softplus(-logit_fake.float()).mean()


def gan_critic_loss(logit_real, logit_fake):
    """The classifier's logistic loss (DMD2): real -> 1, generated -> 0."""
    return F.softplus(logit_fake.float()).mean() + F.softplus(-logit_real.float()).mean()
