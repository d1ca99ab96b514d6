"""A toy captioned-image world and its exact judge: the project's stand-in for real prompts and for HPS.

No real checkpoints exist in this repository's tests, so the distillation setting is reproduced in miniature: a tiny
teacher and a tiny student are trained on this world, and the judge measures how well their images obey the prompt.

The world. One shape on a plain background, five attributes, all named in the caption:
  shape      circle, square, triangle, cross, ring                    (5)
  color      red, green, blue, yellow, white, black                   (6)
  background the same palette, never the shape's colour               (5 per shape colour)
  position   top left, top right, bottom left, bottom right, center   (5)
  size       small, large                                             (2)
= 5 * 6 * 5 * 5 * 2 = 1500 prompts. Sharing one palette between shape and background makes the text encoder bind
each colour word to its noun ("a red circle on a blue background" != "a blue circle on a red background").
Captions come from 5 templates with synonyms (big/little, upper/lower, middle), so a model has to read words, not
token positions. Renders are anti-aliased (4x4 supersampled with numpy, box-downsampled) and every scene carries a
`jitter` seed for small perturbations of position (+-0.03), size (+-8%), rotation (+-12 deg) and colours (+-0.04),
so the world is not a finite lookup table. Everything is deterministic from the seeds.

The judge ("exact" because the world is known): background colour = the median of the border pixels, shape colour =
the palette colour that best explains the pixels farthest from that background as a mix with it, position = the
centroid of the foreground; shape kind and size from a small CNN (68k parameters, 139 KB in fp16) trained on renders
degraded like generated images (blur, noise, low resolution, colour shifts). Images of any size are resized to 48
px. `score` gives per-attribute accuracy, `all_correct` (the share of prompts fully satisfied: this world's HPS) and
`fd`, a Frechet distance in the CNN's 32-d feature space between the images and fresh renders of the same prompts.
FD needs >= 2 images and is biased at small n: compare FDs only at equal n (>= 64 advised).

Usage: python -m toy.world --show 16 --out grid.png | --train-judge | --eval-judge
"""
import argparse
import re
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weights import Checkpoint, CheckpointError, build_meta, load_state, save_atomic

# -------------------------------------------------------------------------------------------------- the world
SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLORS = {"red": (0.90, 0.12, 0.10), "green": (0.10, 0.72, 0.20), "blue": (0.12, 0.28, 0.95),  # RGB in [0, 1];
          "yellow": (0.96, 0.86, 0.10), "white": (0.96, 0.96, 0.96), "black": (0.05, 0.05, 0.05)}  # >= 0.7 apart
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
             "bottom right": (0.72, 0.72), "center": (0.5, 0.5)}  # centre (x, y) as image fractions, y down
SIZES = {"small": 0.12, "large": 0.20}  # shape "radius" as a fraction of the image side
ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "background": tuple(COLORS), "position": tuple(POSITIONS),
              "size": tuple(SIZES)}
SYNONYMS = {"small": ("small", "little"), "large": ("large", "big"), "center": ("center", "middle"),
            "top left": ("top left", "upper left"), "top right": ("top right", "upper right"),
            "bottom left": ("bottom left", "lower left"), "bottom right": ("bottom right", "lower right")}
TEMPLATES = (
    "a {size} {color} {shape} on a {background} background, {position}",
    "{position}: a {size} {color} {shape}, {background} background",
    "a {background} background with a {size} {color} {shape} in the {position}",
    "a {size} {color} {shape} in the {position} of a {background} background",
    "{background} background, {size} {color} {shape}, {position}",
)


def words(text: str) -> list[str]:
    """The word-level split used by the grammar (and by a `tokenizers` WordLevel model built from VOCAB)."""
    return re.findall(r"[a-z]+|[,:]", text.lower())


# Every word a caption can contain, punctuation included: 32 entries.
VOCAB = sorted({w for t in TEMPLATES for w in words(re.sub(r"\{\w+\}", " ", t))}
               | {w for v in ATTRIBUTES.values() for name in v for p in SYNONYMS.get(name, (name,)) for w in words(p)})


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    position: str
    size: str
    jitter: int = field(default=0, compare=False)  # seeds the render's perturbations; not part of the prompt


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """n uniformly drawn scenes (background != colour), each with its own jitter seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        color = ATTRIBUTES["color"][rng.integers(6)]
        background = [c for c in COLORS if c != color][rng.integers(5)]
        out.append(Scene(SHAPES[rng.integers(5)], color, background, ATTRIBUTES["position"][rng.integers(5)],
                         ATTRIBUTES["size"][rng.integers(2)], int(rng.integers(2**31))))
    return out


def caption(scene: Scene, rng: np.random.Generator | int | None = None) -> str:
    """A caption from the grammar: random template and synonyms, or the canonical one (template 0) for rng=None."""
    if rng is None:
        return TEMPLATES[0].format(**{k: getattr(scene, k) for k in ATTRIBUTES})
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    slots = {}
    for k in ATTRIBUTES:
        options = SYNONYMS.get(getattr(scene, k), (getattr(scene, k),))
        slots[k] = options[rng.integers(len(options))]
    return template.format(**slots)


def _normalize(text: str) -> str:
    text = re.sub(r"\s*([,:])\s*", r"\1 ", text.lower().strip().rstrip("."))
    return re.sub(r"\s+", " ", text).strip()


_PHRASE = {p: name for v in ATTRIBUTES.values() for name in v for p in SYNONYMS.get(name, (name,))}  # -> canonical
_SLOT = {k: f"(?P<{k}>{'|'.join(p for p, name in _PHRASE.items() if name in v)})" for k, v in ATTRIBUTES.items()}
_PARSERS = [re.compile(re.escape(_normalize(t)).replace(r"\{", "{").replace(r"\}", "}").format(**_SLOT))
            for t in TEMPLATES]


def parse_prompt(text: str) -> Scene:
    """Inverse of `caption`: the scene a prompt asks for. ValueError for anything outside the grammar."""
    norm = _normalize(text)
    for parser in _PARSERS:
        m = parser.fullmatch(norm)
        if m:
            scene = Scene(**{k: _PHRASE[m.group(k)] for k in ATTRIBUTES})
            if scene.color == scene.background:
                raise ValueError(f"toy prompt {text!r}: shape and background colours must differ")
            return scene
    unknown = sorted(set(words(norm)) - set(VOCAB))
    raise ValueError(f"toy prompt {text!r} is outside the toy grammar"
                     + (f" (unknown words {unknown})" if unknown else f" (templates: {TEMPLATES})"))


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Inside-test on coordinates (u, v) relative to the shape's centre (already rotated), radius r."""
    if shape == "circle":
        return np.hypot(u, v) <= r
    if shape == "ring":  # hole of 0.55 r: still visible at 6 px radius
        d = np.hypot(u, v)
        return (d <= r) & (d >= 0.55 * r)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82 * r  # about the circle's area
    if shape == "cross":
        w = 0.3 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if shape == "triangle":  # equilateral, apex up, centroid at the centre, circumradius 1.1 r (inradius 0.55 r)
        return (v <= 0.55 * r) & (0.866 * u - 0.5 * v <= 0.55 * r) & (-0.866 * u - 0.5 * v <= 0.55 * r)
    raise ValueError(f"unknown shape {shape!r}")


def render(scenes: list[Scene], size: int, supersample: int = 4) -> torch.Tensor:
    """Anti-aliased renders (B, 3, size, size) float32 in [-1, 1]; perturbations drawn from each scene's jitter."""
    out = np.empty((len(scenes), 3, size, size), np.float32)
    grid = (np.arange(size * supersample) + 0.5) / (size * supersample)  # sub-pixel centres in [0, 1]
    y, x = np.meshgrid(grid, grid, indexing="ij")
    for i, s in enumerate(scenes):
        rng = np.random.default_rng(s.jitter)
        cx, cy = np.array(POSITIONS[s.position]) + rng.uniform(-0.03, 0.03, 2)
        r = SIZES[s.size] * rng.uniform(0.92, 1.08)
        a = np.deg2rad(rng.uniform(-12, 12))
        fg = np.clip(np.array(COLORS[s.color]) + rng.uniform(-0.04, 0.04, 3), 0, 1)
        bg = np.clip(np.array(COLORS[s.background]) + rng.uniform(-0.04, 0.04, 3), 0, 1)
        dx, dy = x - cx, y - cy
        m = _shape_mask(s.shape, np.cos(a) * dx + np.sin(a) * dy, -np.sin(a) * dx + np.cos(a) * dy, r)
        m = m.reshape(size, supersample, size, supersample).mean((1, 3))  # box filter = coverage per pixel
        out[i] = bg[:, None, None] * (1 - m) + fg[:, None, None] * m
    return torch.from_numpy(out * 2 - 1)


def dataset(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """n (image, caption, scene) triples; captions use a random template/synonyms drawn from the same seed."""
    scenes = sample_scenes(n, seed)
    rng = np.random.default_rng([seed, 1])
    return render(scenes, size), [caption(s, rng) for s in scenes], scenes


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) with a per-sample sigma (B,) in pixels (separable, 9 taps, reflect-padded)."""
    B, C, H, W = x.shape
    t = torch.arange(-4, 5, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma.to(x.dtype).clamp(min=0.05)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, 9)
    x = F.pad(x.reshape(1, B * C, H, W), (4, 4, 4, 4), mode="reflect")
    x = F.conv2d(x, k[:, None, None, :], groups=B * C)
    x = F.conv2d(x, k[:, None, :, None], groups=B * C)
    return x.reshape(B, C, H, W)


def degrade(images: torch.Tensor, sigma: float = 1.0, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    """The fixed 'degraded render' of the judge's tests: blur (pixels of the input) then Gaussian noise (std in
    [-1, 1] units), clamped."""
    g = torch.Generator().manual_seed(seed)
    x = blur(images, torch.full((images.shape[0],), sigma, device=images.device))
    return (x + noise * torch.randn(x.shape, generator=g).to(x.device)).clamp(-1, 1)


# -------------------------------------------------------------------------------------------------- the judge
JUDGE_PATH = Path(__file__).resolve().parents[1] / "assets" / "toy" / "judge.safetensors"


@dataclass
class JudgeConfig:
    resolution: int = 48  # every image is resized to this before judging
    widths: tuple = (16, 32, 48, 64)  # 3x3 conv widths
    strides: tuple = (2, 1, 2, 2)  # 48 -> 24 -> 24 -> 12 -> 6 px, then pooled to 3x3
    features: int = 32  # penultimate width = the Frechet distance's feature dimension


def _block(ci: int, co: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, 1), nn.GroupNorm(8, co), nn.GELU())


class Judge(nn.Module):
    """Recovers a scene from an image. Colours and position by pixel statistics, shape and size by the CNN (which
    predicts all five attributes, so its features see everything the FD should compare)."""

    def __init__(self, cfg: JudgeConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or JudgeConfig()
        w = (3,) + tuple(cfg.widths)
        self.trunk = nn.Sequential(*[_block(w[i], w[i + 1], s) for i, s in enumerate(cfg.strides)])
        self.proj = nn.Linear(w[-1] * 10, cfg.features)
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.features, len(v)) for k, v in ATTRIBUTES.items()})

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Any (B, 3, H, W) in [-1, 1] -> (B, 3, R, R) fp32 (antialiased bilinear resize)."""
        x = images.to(self.proj.weight.device, torch.float32).clamp(-1, 1)
        R = self.cfg.resolution
        return x if x.shape[-2:] == (R, R) else F.interpolate(x, (R, R), mode="bilinear", antialias=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)  # (B, width, 6, 6)
        # a 3x3 average keeps coarse position; the global max is translation invariant (shape kind, size)
        h = torch.cat([F.adaptive_avg_pool2d(h, 3).flatten(1), h.amax((2, 3))], 1)  # (B, 10 * width)
        return F.gelu(self.proj(h))  # (B, features)

    def forward(self, x: torch.Tensor) -> dict:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def pixel_attributes(self, x: torch.Tensor) -> dict:
        """Background colour, shape colour and position indices (B,) from pixel statistics of prepared images."""
        x = F.avg_pool2d((x + 1) / 2, 3, 1, 1, count_include_pad=False)  # light denoise
        B, _, R, _ = x.shape
        palette = torch.tensor(list(COLORS.values()), device=x.device)  # (6, 3)
        edge = torch.ones(R, R, dtype=torch.bool, device=x.device)
        edge[2:-2, 2:-2] = False
        bg = x[:, :, edge].median(2).values  # (B, 3): the border is mostly background
        dist = (x - bg[:, :, None, None]).norm(dim=1)  # (B, R, R)
        peak = dist.flatten(1).amax(1)[:, None, None]
        bg_idx = torch.cdist(bg, palette).argmin(1)
        # Shape colour: the palette colour c whose segment bg -> c best explains the pixels farthest from the
        # background. A blurred thin stroke is a mix a c + (1 - a) bg (black on white turns grey): a nearest-colour
        # rule would call that grey "green"; the segment fit calls it black or white.
        d = (x - bg[:, :, None, None]).flatten(2).transpose(1, 2)  # (B, R*R, 3)
        span = palette[None] - bg[:, None]  # (B, 6, 3): background -> each colour
        a = (d @ span.transpose(1, 2) / span.square().sum(2)[:, None].clamp(min=1e-6)).clamp(0, 1)  # (B, R*R, 6)
        resid = (d[:, :, None] - a[..., None] * span[:, None]).norm(dim=3)  # (B, R*R, 6)
        core = (dist >= 0.75 * peak).flatten(1)[..., None].expand_as(resid)  # the pixels farthest from background
        fit = torch.where(core, resid, torch.nan).nanmedian(1).values  # (B, 6)
        color = fit.scatter(1, bg_idx[:, None], torch.inf).argmin(1)  # never the background's colour
        weight = dist * (dist >= 0.5 * peak)
        grid = (torch.arange(R, device=x.device) + 0.5) / R
        mass = weight.sum((1, 2)).clamp(min=1e-8)
        cx, cy = (weight.sum(1) * grid).sum(1) / mass, (weight.sum(2) * grid).sum(1) / mass
        quadrant = (cy > 0.5).long() * 2 + (cx > 0.5).long()  # 0 top left, 1 top right, 2 bottom left, 3 bottom right
        centred = torch.maximum((cx - 0.5).abs(), (cy - 0.5).abs()) < 0.11  # corners sit 0.22 +- 0.03 away
        return {"background": bg_idx, "color": color,
                "position": torch.where(centred, torch.full_like(quadrant, 4), quadrant)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> dict:
        """Attribute indices (B,) per attribute: CNN for shape and size, pixel statistics for the rest."""
        out = {k: [] for k in ATTRIBUTES}
        for i in range(0, images.shape[0], batch):
            x = self.prepare(images[i:i + batch])
            logits, pix = self(x), self.pixel_attributes(x)
            for k in ATTRIBUTES:
                out[k].append((pix[k] if k in pix else logits[k].argmax(1)).cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    def attributes(self, images: torch.Tensor) -> list[Scene]:
        p = self.predict(images)
        return [Scene(**{k: ATTRIBUTES[k][int(p[k][i])] for k in ATTRIBUTES}) for i in range(images.shape[0])]

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        return torch.cat([self.features(self.prepare(images[i:i + batch])).cpu() for i in range(0, len(images), batch)])

    def score(self, prompts: list[str], images: torch.Tensor, seed: int = 0) -> dict:
        """Prompt adherence of (prompt, image) pairs: accuracy per attribute, `all_correct` and `fd` against fresh
        renders (jitters from `seed`) of the same prompts at the images' size. FD needs >= 2 images; its small-n
        bias is large, so compare FDs only at equal n (>= 64 recommended)."""
        want, got = [parse_prompt(p) for p in prompts], self.attributes(images)
        hits = {k: np.array([getattr(a, k) == getattr(b, k) for a, b in zip(want, got, strict=True)])
                for k in ATTRIBUTES}
        out = {k: float(v.mean()) for k, v in hits.items()}
        out["all_correct"] = float(np.logical_and.reduce(list(hits.values())).mean())
        jitters = np.random.default_rng(seed).integers(2**31, size=len(want))
        real = render([replace(s, jitter=int(j)) for s, j in zip(want, jitters, strict=True)], images.shape[-1])
        out["fd"] = frechet_distance(self.embed(images), self.embed(real)) if len(want) >= 2 else float("nan")
        out["n"] = len(want)
        return out


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) for features (n, d), n >= 2. The trace of the square root is
    taken as sum sqrt(eig(S_a^1/2 S_b S_a^1/2)) (a symmetric PSD matrix, so eigh suffices; fp64)."""
    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    ev, vec = torch.linalg.eigh(sa)
    root = vec @ torch.diag(ev.clamp(min=0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root @ sb @ root).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + sa.trace() + sb.trace() - 2 * cross)


# position index -> index of its left-right mirror image (top left <-> top right, center stays)
_mirror = {p: p.replace("left", "?").replace("right", "left").replace("?", "right") for p in POSITIONS}
MIRROR = torch.tensor([ATTRIBUTES["position"].index(_mirror[p]) for p in ATTRIBUTES["position"]])


def _labels(scenes: list[Scene]) -> dict:
    return {k: torch.tensor([ATTRIBUTES[k].index(getattr(s, k)) for s in scenes]) for k in ATTRIBUTES}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Make clean renders look generated: lower resolution, blur, colour shifts, desaturation, noise."""
    B, R = x.shape[0], x.shape[-1]
    u = lambda *shape: torch.rand(*shape, generator=g)
    lo = int(R * (0.4 + 0.6 * float(u(1))))  # one low resolution per batch, applied to a random half
    small = F.interpolate(F.interpolate(x, (lo, lo), mode="bilinear", antialias=True), (R, R), mode="bilinear")
    x = torch.where(u(B, 1, 1, 1) < 0.5, small, x)
    x = blur(x, 1.5 * u(B) * (u(B) < 0.6))
    gray = x.mean(1, keepdim=True)
    x = gray + (x - gray) * (1 - 0.3 * u(B, 1, 1, 1))  # desaturate
    x = x * (0.85 + 0.3 * u(B, 1, 1, 1)) + 0.12 * (u(B, 3, 1, 1) - 0.5)  # gain and per-channel offset
    x = x + 0.12 * u(B, 1, 1, 1) * (u(B, 1, 1, 1) < 0.6) * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def _pool(n: int, seed: int, judge: Judge) -> tuple[torch.Tensor, list[Scene]]:
    """n renders at mixed sizes (32, 64, 128 px, as students and teachers make), resized to the judge's resolution."""
    scenes = sample_scenes(n, seed)
    parts = [judge.prepare(render(scenes[i::3], size, ss)) for i, (size, ss) in enumerate(((32, 4), (64, 4), (128, 2)))]
    return torch.cat(parts), [s for i in range(3) for s in scenes[i::3]]


def evaluate(judge: Judge, n: int = 1000, seed: int = 12345, size: int = 64) -> dict:
    """Held-out per-attribute accuracy on clean renders and on degraded ones (blur 1 px + noise 0.1 at `size`)."""
    scenes = sample_scenes(n, seed)
    images = render(scenes, size)
    want = _labels(scenes)
    out = {}
    for name, x in (("clean", images), ("degraded", degrade(images, seed=seed))):
        got = judge.predict(x)
        out[name] = {k: float((got[k] == want[k]).float().mean()) for k in ATTRIBUTES}
        out[name]["all_correct"] = float(torch.stack([got[k] == want[k] for k in ATTRIBUTES]).all(0).float().mean())
    return out


def train_judge(out=JUDGE_PATH, seed: int = 0, steps: int = 1500, batch: int = 64, n: int = 8000) -> dict:
    """Train the judge's CNN on degraded renders (one CPU thread, 2-3 minutes), evaluate, save atomically."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    t0 = time.time()
    judge = Judge()
    x, scenes = _pool(n, seed, judge)
    y = _labels(scenes)
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        xb = x[idx] if step % 4 == 0 else _augment(x[idx], g)  # a quarter of the batches stay clean
        yb = {k: v[idx] for k, v in y.items()}
        flip = torch.rand(batch, generator=g) < 0.5  # mirror left-right (a mirrored scene is a scene): 2x the data
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        yb["position"] = torch.where(flip, MIRROR[yb["position"]], yb["position"])
        logits = judge(xb)
        loss = sum(F.cross_entropy(logits[k], yb[k]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    seconds = time.time() - t0
    meta = {"train_seconds": f"{seconds:.0f}", "seed": str(seed), "steps": str(steps)}
    save_atomic({k: v.half() for k, v in judge.state_dict().items()}, out, metadata=meta)  # fp16: half the size
    return {"seconds": seconds, **evaluate(load_judge(out))}  # evaluate what was saved


def load_judge(path=JUDGE_PATH) -> Judge:
    if not Path(path).exists():
        raise CheckpointError(f"{path}: no judge weights; train them with `python -m toy.world --train-judge`")
    judge = build_meta(Judge, JudgeConfig())
    return load_state(judge, Checkpoint(path).tensors(dtype=torch.float32), path).eval()  # fp16 on disk


def show(n: int, out: str, size: int = 64, seed: int = 0, cell: int = 192) -> None:
    """A captioned grid of n samples (upscaled to `cell` px), with the judge's verdict when it is available."""
    from PIL import Image, ImageDraw

    images, captions, scenes = dataset(n, size, seed)
    got = load_judge().attributes(images) if JUDGE_PATH.exists() else scenes
    cols = min(n, 4)
    rows = -(-n // cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 44)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        pixels = ((images[i].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        x0, y0 = (i % cols) * cell, (i // cols) * (cell + 44)
        sheet.paste(Image.fromarray(pixels).resize((cell, cell), Image.NEAREST), (x0, y0))
        lines = textwrap.wrap(captions[i], 34)[:2] + ["judge: ok" if got[i] == scenes[i] else "judge: WRONG"]
        for j, line in enumerate(lines):
            draw.text((x0 + 3, y0 + cell + 2 + 13 * j), line, fill=(0, 0, 0))
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="The toy captioned-image world and its judge.")
    p.add_argument("--show", type=int, metavar="N", help="render a captioned grid of N samples")
    p.add_argument("--out", help="output (grid PNG for --show, judge weights for --train-judge)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-judge", action="store_true")
    p.add_argument("--eval-judge", action="store_true")
    args = p.parse_args()
    if args.show:
        show(args.show, args.out or "grid.png", args.size, args.seed)
    if args.train_judge:
        print(train_judge(args.out or JUDGE_PATH, args.seed))
    if args.eval_judge:
        for name, acc in evaluate(load_judge()).items():
            print(name, " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
