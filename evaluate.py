"""Score images, or a model's samples, with the field's metrics: CLIP score, PickScore, HPSv2.1, HPSv3, the toy judge.

    python evaluate.py --images DIR --metric clip --weights clip-vit-large-patch14/      # NAME.png + NAME.txt pairs
    python evaluate.py --ckpt out/toy/student.safetensors --prompts toy --n 200 --metric toy
    python evaluate.py --ckpt v1-5-pruned-emaonly.safetensors --prompts parti --n 200 --metric clip,pickscore \
        --weights clip-vit-large-patch14/ --weights PickScore_v1/ --out-dir eval/sd15

Metrics (higher is better):
  clip       CLIP score as torchmetrics computes it: 100 * max(cos(image, text), 0); any CLIP in transformers' layout
             (the convention: OpenAI's ViT-L/14, `openai/clip-vit-large-patch14`).
  pickscore  PickScore v1 (`yuvalkirstain/PickScore_v1`, a CLIP ViT-H/14 in transformers' layout): exp(logit_scale) cos.
  hpsv2      HPSv2.1 (the `hpsv2` package's OpenCLIP ViT-H/14): cos of the unit embeddings. Its weights ship as a
             pickle: convert them once, `python -m metrics.convert_pickle HPS_v2.1_compressed.pt hps_v2.1.safetensors`.
  hpsv3      HPSv3 (Qwen2-VL-7B + a reward head): through the official `hpsv3` package, which pins its own
             transformers; run it in its own environment on this command's --images output.
  toy        the toy world's judge (toy/world.py): the share of prompts whose five attributes are all drawn right.
--ckpt samples with sample.py's code (one step for a distilled student, else the model's defaults; a teacher image by
image through sample.py) into --out-dir (PNG + caption each), then scores that folder. Prompts: a text file (one
per line), `parti` (PartiPrompts, shipped in metrics/prompts/, Apache-2.0) or `toy` (the judge's 200 fixed prompts).
--out FILE.json: {"metric", "mean", "per_image"} (a list of them for several metrics); a contact sheet PNG beside.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

import sample
import teachers as TL
import unet as U
import vae as V
from text.encoders import load_clip
from text.tokenizer import find_clip_tokenizer
from weights import Checkpoint, CheckpointError, find_component, write_atomic

PARTI = Path(__file__).resolve().parent / "metrics" / "prompts" / "PartiPrompts.tsv"
METRICS = ("clip", "pickscore", "hpsv2", "hpsv3", "toy")


class UsageError(ValueError):
    """A bad flag or input: printed as one `error:` line."""


# ----------------------------------------------------------------------------- metrics
def scorer(metric: str, weights):
    """metric -> score(images: list of PIL, prompts, files) -> list of floats (one per image; files: their paths)."""
    if metric == "toy":
        from toy import world
        judge = world.load_judge(weights) if weights else world.load_judge()

        def toy_score(images, prompts, files=None):
            x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
            got = judge.attributes(x.float() / 127.5 - 1)
            want = [world.parse_prompt(p) for p in prompts]
            return [float(a == b) for a, b in zip(want, got, strict=True)]  # all five attributes right
        return toy_score
    if metric == "hpsv3":  # the official package (not verified here: neither it nor its weights could be had)
        try:
            from hpsv3 import HPSv3RewardInferencer
        except ImportError:
            raise UsageError("--metric hpsv3: the `hpsv3` package is not installed; it pins transformers 4.45.2, so "
                             "install it in an environment of its own (pip install hpsv3) and run this command there "
                             "on the --images folder") from None
        inferencer = HPSv3RewardInferencer(checkpoint_path=weights, device="cuda" if torch.cuda.is_available() else
                                           "cpu")

        def hpsv3_score(images, prompts, files):  # its reward head gives (mu, sigma) per image: the score is mu
            with torch.no_grad():
                return [float(r[0]) for i in range(0, len(files), 8) for r in inferencer.reward(
                    prompts=prompts[i:i + 8], image_paths=[str(f) for f in files[i:i + 8]])]
        return hpsv3_score
    if not weights:
        raise UsageError(f"--metric {metric}: give its model with --weights (see --help)")
    from metrics.clip import load_clip_model
    open_clip = "visual.conv1.weight" in Checkpoint(weights)
    if (metric == "hpsv2") != open_clip:
        raise UsageError(f"--weights {weights}: --metric {metric} takes " + (
            "HPSv2.1's OpenCLIP weights (converted to safetensors)" if metric == "hpsv2" else
            "a CLIP in transformers' layout (CLIPModel), not an OpenCLIP state dict"))
    clip = load_clip_model(weights)
    factor = {"clip": 100.0, "pickscore": clip.logit_scale.exp().item(), "hpsv2": 1.0}[metric]

    def clip_score(images, prompts, files=None):
        cos = (clip.embed_images(images) * clip.embed_texts(prompts)).sum(-1)
        return (factor * (cos.clamp(min=0) if metric == "clip" else cos)).tolist()
    return clip_score


def read_folder(folder: Path) -> tuple[list[Path], list[str]]:
    """NAME.png (or .jpg / .webp) files and the caption in each NAME.txt."""
    if not folder.is_dir():
        raise UsageError(f"--images {folder}: not a folder")
    files = V.image_files(folder)
    if not files:
        raise UsageError(f"--images {folder}: no png/jpg/webp images")
    if missing := [f.name for f in files if not f.with_suffix(".txt").is_file()]:
        raise UsageError(f"--images {folder}: no caption NAME.txt for {missing[:3]}")
    return files, [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in files]


def open_images(files: list[Path]) -> list:
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"{f}: not an image that decodes ({e})") from None
    return images


def evaluate(folder: Path, metrics: list[str], weights: list) -> dict:
    """{metric: {"metric", "mean", "per_image"}} for the NAME.png / NAME.txt pairs of a folder."""
    files, prompts = read_folder(folder)
    images = open_images(files)
    results = {}
    for metric, w in zip(metrics, weights, strict=True):
        scores = scorer(metric, w)(images, prompts, files)
        results[metric] = {"metric": metric, "mean": float(np.mean(scores)),
                           "per_image": {f.name: s for f, s in zip(files, scores, strict=True)}}
    return results


# ----------------------------------------------------------------------------- sampling a model
def read_prompts(spec: str, n: int | None) -> list[str]:
    if spec == "toy":  # the judge's fixed prompts (distill.py --eval: seed 777)
        from toy import world
        rng = np.random.default_rng(777)
        prompts = [world.caption(s, rng) for s in world.sample_scenes(n or 200, 777)]
    elif spec == "parti":
        prompts = [line.split("\t")[0] for line in PARTI.read_text(encoding="utf-8").splitlines()[1:]]
    else:
        from text.conditioning import read_prompts as read
        prompts = read(spec)
    return prompts[:n] if n else prompts


@torch.no_grad()
def sample_folder(ckpt: str, prompts: list[str], folder: Path, seed: int, teacher_flags: list, batch: int = 16):
    """A model's images of the prompts into folder/NNNN.png + NNNN.txt. An SD 1.5 student: one step from the run's
    timestep if distilled (its metadata), else 25 DDIM steps with CFG 7.5 (sample.py's defaults), batched; the noise
    of all images one draw from `seed` (as distill.py --eval draws it: the toy judge's numbers are distill.py's).
    A teacher: sample.py itself, image by image (seed + i), its defaults, `teacher_flags` (--text-encoders, --vae).
    The folder's images are all scored, so one holding images this call does not write is refused."""
    stem = "{:04d}".format
    ours = {stem(i) for i in range(len(prompts))}
    if stale := [f.name for f in (V.image_files(folder) if folder.is_dir() else []) if f.stem not in ours]:
        raise UsageError(f"--out-dir {folder}: holds {len(stale)} images this run does not write (e.g. {stale[0]}), "
                         "which would be scored with its own: choose another or empty it")
    folder.mkdir(parents=True, exist_ok=True)
    if TL.detect_model(ckpt)[0] != "sd15":
        for i, p in enumerate(prompts):
            name = folder / stem(i)
            sample.run(sample.parse_args(["--ckpt", ckpt, "--prompt", p, "--seed", str(seed + i), "--quiet",
                                          "--out", str(name.with_suffix(".png")), *teacher_flags]))
            write_atomic(name.with_suffix(".txt"), lambda t, q=p: Path(t).write_text(q + "\n", encoding="utf-8"))
        return
    meta = Checkpoint(ckpt).metadata if Path(ckpt).is_file() else {}
    unet, vae = U.load_unet(ckpt), V.load_vae(ckpt, family="sd15")
    clip, tok = load_clip(find_component(ckpt, "text_encoder")), find_clip_tokenizer(ckpt)
    res = int(meta.get("resolution", 512)) // 8
    noise = torch.randn((len(prompts), 4, res, res), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(prompts), batch):
        p, x = prompts[i:i + batch], noise[i:i + batch]
        if meta.get("distilled") == "1":
            z = U.one_step_x0(unet, x, int(meta.get("timestep", 999)), clip(tok.encode(p)).last_hidden_state)
        else:
            z = U.ddim_sample(unet, clip(tok.encode([""] * len(p) + p)).last_hidden_state, x, 25, 7.5)
        for j, pixels in enumerate(V.to_uint8(vae.decode(z))):
            name = folder / stem(i + j)
            write_atomic(name.with_suffix(".png"), lambda t, px=pixels: Image.fromarray(px).save(t, format="PNG"))
            write_atomic(name.with_suffix(".txt"), lambda t, q=p[j]: Path(t).write_text(q + "\n", encoding="utf-8"))


def contact_sheet(folder: Path, results: dict, path: Path, cell: int = 192, n: int = 48) -> None:
    """The first n images, enlarged (nearest neighbour), each with its caption and scores beneath."""
    files, prompts = read_folder(folder)
    files, prompts = files[:n], prompts[:n]
    cols, text_h = 6, 44
    sheet = Image.new("RGB", (cols * cell, -(-len(files) // cols) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (f, p) in enumerate(zip(files, prompts, strict=True)):
        x, y = (k % cols) * cell, (k // cols) * (cell + text_h)
        sheet.paste(open_images([f])[0].resize((cell, cell), Image.NEAREST), (x, y))
        scores = " ".join(f"{m} {r['per_image'][f.name]:.3g}" for m, r in results.items())
        draw.text((x + 2, y + cell + 2), p[:32] + "\n" + p[32:64] + "\n" + scores, fill="black")
    write_atomic(path, lambda t: sheet.save(t, format="PNG"))


class RunEvaluator:
    """distill.py's evaluation of its one-step student (--eval N, --eval-metric, --eval-weights): the metric on N fixed
    prompts (toy: the judge's; else the first N PartiPrompts) and fixed noises (seed 0). The toy judge scores the
    decoded images themselves (the toy table's numbers); the other metrics the images as PNGs would hold them."""

    def __init__(self, metric: str, weights, n: int, student: str, latent_hw: int, dtype, device):
        from text.conditioning import sd15_context
        from toy import world
        if metric == "hpsv3":
            raise UsageError("--eval-metric hpsv3: score the exported student with evaluate.py in hpsv3's environment")
        self.metric, self.prompts = metric, read_prompts("toy" if metric == "toy" else "parti", n)
        self.judge = (world.load_judge(weights) if weights else world.load_judge()) if metric == "toy" else None
        self.score = None if metric == "toy" else scorer(metric, weights)
        clip = load_clip(find_component(student, "text_encoder"), dtype=dtype, device=device)
        self.context = sd15_context(clip, find_clip_tokenizer(student), self.prompts)
        self.noise = torch.randn((n, 4, latent_hw, latent_hw), generator=torch.Generator().manual_seed(0)).to(device)

    def __call__(self, images) -> dict:
        """images(noise, context) -> (B, 3, H, W) in [-1, 1]: the one-step sampler. Returns the scores (a dict)."""
        x = torch.cat([images(self.noise[i:i + 50], self.context[i:i + 50]).cpu()
                       for i in range(0, len(self.noise), 50)])
        if self.judge is not None:
            return self.judge.score(self.prompts, x)
        scores = self.score([Image.fromarray(px) for px in V.to_uint8(x)], self.prompts)
        return {"metric": self.metric, "mean": float(np.mean(scores)), "n": len(scores)}

    def report(self, scores: dict, timestep: int) -> None:
        """Print the scores; the toy judge's with the teacher's from assets/toy/scores.json, when it is there."""
        if self.judge is None:
            print(f"{self.metric}, one step (t = {timestep}) on {len(self.prompts)} PartiPrompts and fixed seeds:")
            for name, r in scores.items():
                print(f"  {name:8s} {r['mean']:.4f}")
            return
        from toy import presets, world
        ref = json.loads((presets.TOY / "scores.json").read_text()) if (presets.TOY / "scores.json").is_file() else {}
        scores = scores | ({"teacher (28 steps)": ref["teacher_euler28_cfg5"]} if "teacher_euler28_cfg5" in ref else {})
        print(f"judge, one step (t = {timestep}) on {len(self.prompts)} fixed prompts and seeds (all_correct = the "
              "toy HPS):")
        for name, r in scores.items():
            print(f"  {name:18s} all_correct {r['all_correct']:.3f} | " + " ".join(
                f"{k} {r[k]:.2f}" for k in world.ATTRIBUTES) + f" | fd {r['fd']:.2f}")


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", help="folder of NAME.png + NAME.txt (its caption)")
    g.add_argument("--ckpt", help="a model to sample (sample.py's: SD 1.5 students, SD3 / FLUX.1 teachers)")
    p.add_argument("--prompts", default="toy", help="--ckpt: a text file, `parti` or `toy` (default)")
    p.add_argument("--n", type=int, help="--ckpt: the first N prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", help="--ckpt: where the images go (default: eval/<ckpt name>)")
    p.add_argument("--text-encoders", help="--ckpt of a teacher: as sample.py's")
    p.add_argument("--vae", help="--ckpt of a teacher: as sample.py's")
    p.add_argument("--metric", required=True, help="comma-separated: " + ", ".join(METRICS))
    p.add_argument("--weights", action="append", default=[], help="the metric's model, once per metric in order "
                   "(clip, pickscore: a CLIPModel folder or model.safetensors; hpsv2: converted safetensors; toy: "
                   "default assets/toy/judge.safetensors)")
    p.add_argument("--out", help="FILE.json for the scores (and FILE.png, a contact sheet)")
    args = p.parse_args(argv)
    try:
        metrics = args.metric.split(",")
        if bad := [m for m in metrics if m not in METRICS]:
            raise UsageError(f"--metric {bad[0]}: not one of {', '.join(METRICS)}")
        if len(args.weights) > len(metrics):
            raise UsageError(f"--weights: {len(args.weights)} given for {len(metrics)} metrics")
        weights = args.weights + [None] * (len(metrics) - len(args.weights))
        for w in weights:
            if w is not None and not Path(w).exists():
                raise UsageError(f"--weights {w}: no such file or folder")
        folder = Path(args.images) if args.images else Path(args.out_dir or f"eval/{Path(args.ckpt).stem}")
        if args.ckpt:
            flags = [x for k in ("text_encoders", "vae") if getattr(args, k) for x in
                     ("--" + k.replace("_", "-"), getattr(args, k))]
            sample_folder(args.ckpt, read_prompts(args.prompts, args.n), folder, args.seed, flags)
        results = evaluate(folder, metrics, weights)
        if args.out:
            out = Path(args.out)
            data = list(results.values()) if len(results) > 1 else next(iter(results.values()))
            write_atomic(out, lambda t: Path(t).write_text(json.dumps(data, indent=1) + "\n"))
            contact_sheet(folder, results, out.with_suffix(".png"))
    except (UsageError, CheckpointError, sample.UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    width = max(len(m) for m in results)
    for m, r in results.items():
        print(f"{m:{width}s}  mean {r['mean']:.4f}  over {len(r['per_image'])} images of {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
