"""DMD2's GAN term (Yin et al. 2024, arXiv 2405.14867, section 4.3), off by default: a classifier on the FAKE score's
image tokens tells real teacher-space latents from the bridged samples, both noised alike (DMD2's "diffusion GAN").
The generator's loss adds `weight` x its non-saturating GAN loss; the classifier (and the fake score it reads, as in
DMD2) learn from `critic_weight` x the logistic loss. Real data is what lets DMD2's student beat its teacher; without
it, DMD can only match the teacher's distribution.

distill.py calls it in two places, and `NoGAN` stands in when it is off:
    loss, logs = gan.generator_loss(z_t, context, pooled)                  # the generator's update
    v, loss, logs = gan.fake_score(teacher, x0, x, sigma, context, pooled)  # the fake score's update (one forward)

CHOICE: the GAN's noise levels are U(lo, hi) of --sigma-range shifted by `shift` (1: uniform, as DMD2's uniform
timesteps), not by the teacher's shift (toy/LOG.md#the-gan-term).
"""
import argparse

import torch
import torch.distributed as dist

import bridge as BR
from vae import image_files, load_image


class InputError(ValueError):
    """A bad --real-images folder: printed as one `error: ...` line."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DMD2's GAN term (off by default)")
    g.add_argument("--gan-weight", type=float, default=0.0,
                   help="the generator's GAN loss weight (DMD2: 1e-3 for SD 1.5, 5e-3 for SDXL); 0 = off")
    g.add_argument("--gan-critic-weight", type=float, default=1e-2, help="the classifier's loss weight (DMD2: 1e-2)")
    g.add_argument("--gan-block", type=float, default=0.5, help="the teacher block (fraction of depth) it reads")
    g.add_argument("--gan-shift", type=float, default=1.0, help="time shift of the GAN's noise levels (1 = none)")
    g.add_argument("--real-images", help="--gan-weight > 0: folder of images, each with a NAME.txt caption that is one "
                   "line of --prompts (the toy preset renders its prompts instead)")


def real_images(folder, prompts: list[str] | None, res: int) -> tuple[torch.Tensor, list]:
    """(prompt index of each image, one loader per image) of a folder of NAME.png + NAME.txt whose captions are lines
    of the prompts (prompts None: the files and captions are checked only). Raises InputError naming the files."""
    files = image_files(folder)
    if not files:
        raise InputError(f"--real-images {folder}: no png/jpg/webp images")
    if no_caption := [f.name for f in files if not f.with_suffix(".txt").is_file()]:
        raise InputError(f"--real-images {folder}: no caption NAME.txt for {no_caption[:3]}")
    index = {q: i for i, q in enumerate(prompts or [])}
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    if prompts is not None and (unknown := [f.name for f, c in zip(files, captions, strict=True) if c not in index]):
        raise InputError(f"--real-images {folder}: the captions of {unknown[:3]} are not lines of --prompts (the text "
                         "cache has only those)")
    return torch.tensor([index.get(c, -1) for c in captions]), [lambda f=f: load_image(f, res) for f in files]


def _mean_over_ranks(q: torch.Tensor) -> None:
    dist.all_reduce(q.grad)
    q.grad /= dist.get_world_size()


def check_args(args, renders: bool) -> None:
    """The GAN's flags, before anything is loaded (InputError). `renders`: the run renders its own real images."""
    if not 0 <= args.gan_block <= 1:
        raise InputError(f"--gan-block is a fraction of the teacher's depth, in [0, 1]; got {args.gan_block}")
    if args.gan_weight > 0 and not renders:
        if not args.real_images:
            raise InputError("--gan-weight > 0 needs real images: --real-images DIR (the toy preset renders its own)")
        real_images(args.real_images, None, args.teacher_res)  # images and captions there; their prompts: later


def make(args, teacher, tvae, prompts, ctx_of, guidance, draw, autocast, dtype, ddp: bool, device, renders=None):
    """DiffusionGAN if --gan-weight > 0, else NoGAN. Its real latents: `renders(prompts, res)` -> (prompt indices,
    loaders) when given (the toy preset), else --real-images; encoded by the teacher VAE 8 at a time (never all
    images in memory), kept on the CPU."""
    if args.gan_weight <= 0:
        return NoGAN(guidance)
    real_pidx, loads = (renders or (lambda q, r: real_images(args.real_images, q, r)))(prompts, args.teacher_res)
    with torch.no_grad(), autocast():
        real_z = torch.cat([tvae.encode(torch.stack([f() for f in loads[i:i + 8]]).to(device, dtype)).float().cpu()
                            for i in range(0, len(loads), 8)])
    return DiffusionGAN(args, teacher, real_z, real_pidx, ctx_of, guidance, draw, ddp, device)


class NoGAN:
    """The GAN term switched off: nothing added, the fake score's plain forward."""
    optimizers: dict = {}

    def __init__(self, guidance):
        self.guidance = guidance

    def state_dicts(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def generator_loss(self, z_t, context, pooled):
        return 0.0, {}

    def fake_score(self, teacher, x0, x, sigma, context, pooled):
        return teacher(x, sigma, context, pooled, self.guidance(len(x))), 0.0, {}


class DiffusionGAN:
    """The classifier (bridge.RealismHead) reads the image tokens that come out of one joint / double block of the
    fake score (teacher + LoRA), through a forward hook. `real_z` (N, C, H, W) on the CPU: real teacher-space latents,
    `real_pidx` (N,) their prompts (indices into the text cache). `draw` holds the loop's random source and its
    per-rank slicing, so that every draw comes from the checkpointed generator."""

    def __init__(self, args, teacher, real_z, real_pidx, ctx_of, guidance, draw, ddp: bool, device):
        self.weight, self.critic_weight, self.shift = args.gan_weight, args.gan_critic_weight, args.gan_shift
        self.lo, self.hi = args.sigma_range
        self.teacher, self.real_z, self.real_pidx = teacher, real_z, real_pidx
        self.ctx_of, self.guidance, self.draw = ctx_of, guidance, draw
        self.head = BR.RealismHead(teacher.cfg.hidden).to(device)
        taps = getattr(teacher, "joint_blocks", None) or teacher.double_blocks
        self.features = {}
        taps[BR.resolve_blocks((args.gan_block,), len(taps))[0]].register_forward_hook(
            lambda m, inputs, out: self.features.__setitem__("img", out[1]))
        if ddp:  # the head is used twice a step, so it is not DDP-wrapped: its grads are averaged here
            for q in self.head.parameters():
                q.register_post_accumulate_grad_hook(_mean_over_ranks)
        # its own optimizer (and clipping): under --fsdp the LoRA weights are DTensors, the head's are not
        self.optimizers = {"critic": torch.optim.AdamW(self.head.parameters(), lr=args.fake_lr,
                                                       weight_decay=args.weight_decay)}

    def state_dicts(self) -> dict:
        return {"critic": self.head.state_dict()}

    def load_state(self, state: dict) -> None:
        self.head.load_state_dict(state)

    def _noised(self, x0):
        sigma = self.draw.sigmas(self.lo, self.hi, self.shift)
        return BR.add_noise(x0, self.draw.noise(x0.shape[1:]), sigma), sigma

    def generator_loss(self, z_t, context, pooled):
        """The generator's GAN loss: the classifier on its own noised samples, grads to z_t. Through the raw teacher
        (no DDP sync): the LoRA and head grads of this pass are dropped by the loop before the fake score's update."""
        x, sigma = self._noised(z_t)
        self.teacher(x, sigma, context, pooled, self.guidance(len(x)))
        loss = BR.gan_generator_loss(self.head(self.features.pop("img")))
        return self.weight * loss, {"loss_gan": loss}

    def fake_score(self, teacher, x0, x, sigma, context, pooled):
        """The fake score's forward on its B inputs plus the classifier's 2B (generated, then real; noised alike), one
        forward of 3B. Returns the fake score's v on its own B, the weighted critic loss, and its log."""
        B = len(x)
        ridx = torch.randint(len(self.real_z), (self.draw.global_batch,), generator=self.draw.gen)
        r_ctx, r_pooled = self.ctx_of(self.draw.mine(self.real_pidx[ridx]).cpu())
        c_sigma = torch.cat([self.draw.sigmas(self.lo, self.hi, self.shift) for _ in "gr"])
        c_noise = torch.cat([self.draw.noise(x0.shape[1:]) for _ in "gr"])
        x_c = BR.add_noise(torch.cat([x0, self.draw.mine(self.real_z[ridx])]), c_noise, c_sigma)
        v = teacher(torch.cat([x, x_c]), torch.cat([sigma, c_sigma]), torch.cat([context, context, r_ctx]),
                    torch.cat([pooled, pooled, r_pooled]), self.guidance(3 * B))
        loss = BR.gan_critic_loss(*self.head(self.features.pop("img")[B:]).split(B)[::-1])
        return v[:B], self.critic_weight * loss, {"loss_critic": loss}
