"""Prompts -> what each model is conditioned on, exactly as the reference pipelines build it; the text cache.

SD 1.5 (student): CLIP-L last hidden state (after the final LayerNorm), 77 tokens padded with <|endoftext|>.
SD3 / SD3.5 (teacher): CLIP-L and CLIP-G penultimate hidden states (no final LayerNorm) concatenated to 2048,
  zero-padded to the T5 width 4096, then T5 (256 tokens by default) appended along the sequence: (B, 77 + 256, 4096).
  Pooled: CLIP-L projected pooled (identity when the file has no projection) ++ CLIP-G projected pooled: (B, 2048).
  Without T5, diffusers puts zeros where the T5 tokens would be (`_get_t5_prompt_embeds`, text_encoder_3=None).
FLUX.1 (teacher): T5 last hidden state, 512 tokens (dev) or 256 (schnell), no mask: (B, T, 4096); pooled: CLIP-L
  pooled output, unprojected: (B, 768).
References: diffusers 0.42 `StableDiffusionPipeline.encode_prompt`, `StableDiffusion3Pipeline.encode_prompt`,
`FluxPipeline.encode_prompt`.

The text cache (`build_text_cache` / `load_text_cache`, and the command line below) stores, for every training
prompt and for the negative (empty) prompt, the student's context and the teacher's context and pooled vector, so
that training never runs the ~5B-parameter text encoders.

    python -m text.conditioning --prompts prompts.txt --teacher sd3.5_large.safetensors --text-encoders text_encoders/ \
        --student v1-5-pruned-emaonly.safetensors --out cache.safetensors
"""
import argparse
import json
import sys
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from text.encoders import CLIPTextModel, T5Encoder, load_clip, load_t5
from text.tokenizer import CLIPTokenizer, T5Tokenizer, find_clip_tokenizer
from weights import Checkpoint, CheckpointError, describe, find_component, save_atomic

SD3_JOINT_DIM = 4096  # SD3 / SD3.5 joint_attention_dim (= T5-XXL width): CLIP features are zero-padded to it


@cache
def clip_tokenizer(pad_id: int) -> CLIPTokenizer:
    """CLIP-L (and SD 1.5) pads with <|endoftext|> 49407; SD3's CLIP-G tokenizer_2 pads with "!" (id 0)."""
    return CLIPTokenizer(pad_id=pad_id)


def _run(model, ids: torch.Tensor):
    return model(ids.to(next(model.parameters()).device))


@torch.no_grad()
def sd15_context(clip_l: CLIPTextModel, tok: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, 77, 768) SD 1.5 cross-attention context."""
    return _run(clip_l, tok.encode(prompts, 77)).last_hidden_state


@torch.no_grad()
def sd3_conditioning(clip_l: CLIPTextModel, clip_g: CLIPTextModel, t5: T5Encoder | None, prompts: list[str],
                     t5_length: int = 256, t5_tok: T5Tokenizer | None = None, tok_l: CLIPTokenizer | None = None,
                     tok_g: CLIPTokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 / SD3.5: (context (B, 77 + t5_length, 4096), pooled (B, 2048)), on clip_l's device and dtype.
    tok_l / tok_g: CLIP tokenizers other than the bundled BPE (padding with EOS / with id 0), e.g. the toy world's."""
    out_l = _run(clip_l, (tok_l or clip_tokenizer(49407)).encode(prompts))
    out_g = _run(clip_g, (tok_g or clip_tokenizer(0)).encode(prompts))
    dev, dtype = out_l.penultimate_hidden_state.device, out_l.penultimate_hidden_state.dtype
    clip = torch.cat([out_l.penultimate_hidden_state, out_g.penultimate_hidden_state.to(dev, dtype)], -1)  # (B,77,2048)
    if t5 is None:
        t5_ctx = torch.zeros(len(prompts), t5_length, SD3_JOINT_DIM, device=dev, dtype=dtype)
    else:
        t5_ctx = _run(t5, t5_tok.encode(prompts, t5_length)).to(dev, dtype)
    clip = F.pad(clip, (0, t5_ctx.shape[-1] - clip.shape[-1]))  # (B, 77, 4096)
    pooled = torch.cat([out_l.pooled_projected, out_g.pooled_projected.to(dev, dtype)], -1)
    return torch.cat([clip, t5_ctx], 1), pooled


@torch.no_grad()
def flux_conditioning(clip_l: CLIPTextModel, t5: T5Encoder, prompts: list[str], t5_length: int = 512,
                      t5_tok: T5Tokenizer | None = None, tok_l: CLIPTokenizer | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.1: (context (B, t5_length, 4096), pooled (B, 768)), on clip_l's device and dtype."""
    ids = (tok_l or clip_tokenizer(49407)).encode(prompts)
    pooled = _run(clip_l, ids).pooled  # CLIPTextModel.pooler_output: no projection
    return _run(t5, t5_tok.encode(prompts, t5_length)).to(pooled.device, pooled.dtype), pooled


# ---------------------------------------------------------------------------------------------------------- teachers
@dataclass
class TeacherText:
    """The text side of a teacher: its encoders, the T5 tokenizer and length; call it on prompts."""
    family: str  # "sd3" or "flux"
    clip_l: CLIPTextModel
    clip_g: CLIPTextModel | None  # SD3 only
    t5: T5Encoder | None  # may be None for SD3 (zeros instead, as diffusers without text_encoder_3)
    t5_tok: T5Tokenizer | None
    t5_length: int
    tok_l: CLIPTokenizer | None = None  # None: the bundled CLIP BPE (padding with EOS)
    tok_g: CLIPTokenizer | None = None  # None: the bundled CLIP BPE (padding with id 0)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.family == "sd3":
            return sd3_conditioning(self.clip_l, self.clip_g, self.t5, prompts, self.t5_length, self.t5_tok,
                                    self.tok_l, self.tok_g)
        return flux_conditioning(self.clip_l, self.t5, prompts, self.t5_length, self.t5_tok, self.tok_l)


def teacher_family(path) -> tuple[str, int]:
    """("sd3" | "flux", default T5 length) of a teacher checkpoint, from its keys: SD3 256 tokens (diffusers
    default), FLUX.1-dev 512, FLUX.1-schnell (no guidance embedder) 256."""
    from teacher_mmdit import FluxConfig
    from teachers import detect_teacher
    ckpt = Checkpoint(find_component(path, "transformer"))
    found = detect_teacher({k: ckpt.shape(k) for k in ckpt.keys()})
    if found is None:
        raise CheckpointError(f"{ckpt.path}: not an SD3/FLUX.1 teacher; it looks like {describe(ckpt.keys())}")
    if isinstance(found.cfg, FluxConfig):
        return "flux", 512 if found.cfg.guidance_embed else 256
    return "sd3", 256


def _text_paths(family: str, folder: Path, t5_tokenizer=None) -> dict:
    """Where each text encoder of `family` lies in `folder`: a diffusers pipeline root (`text_encoder*/`,
    `tokenizer_*/`) or a folder of single files (`clip_l.safetensors`, `clip_g.safetensors`, `t5xxl*.safetensors`,
    with a T5 `tokenizer.json` / `spiece.model` beside them or in `t5_tokenizer/`, or given as t5_tokenizer).
    Missing entries are None."""
    def first(*candidates):
        return next((c for c in candidates if c is not None and c.exists()), None)

    given = Path(t5_tokenizer) if t5_tokenizer else None
    if (folder / "text_encoder").is_dir():  # pipeline root
        t5_sub, tok_sub = ("text_encoder_3", "tokenizer_3") if family == "sd3" else ("text_encoder_2", "tokenizer_2")
        return {"clip_l": folder / "text_encoder", "clip_g": first(folder / "text_encoder_2"),
                "t5": first(folder / t5_sub), "t5_tok": first(given, folder / tok_sub)}
    t5 = sorted(folder.glob("t5xxl*.safetensors"), key=lambda p: "fp16" not in p.name)  # prefer t5xxl_fp16
    return {"clip_l": first(folder / "clip_l.safetensors"), "clip_g": first(folder / "clip_g.safetensors"),
            "t5": t5[0] if t5 else None,
            "t5_tok": first(given, folder / "tokenizer.json", folder / "spiece.model", folder / "t5_tokenizer")}


def load_teacher_text(teacher, text_encoders=None, t5_tokenizer=None, t5_length=None, use_t5=True,
                      dtype=None, device=None) -> TeacherText:
    """The teacher's text encoders: from the teacher's own pipeline folder, or from `text_encoders` (a folder of
    single files or a pipeline root). use_t5=False (SD3 only) drops T5 the way diffusers does (zeros).
    CLIP tokenizers: `tokenizer.find_clip_tokenizer(root)` (a CLIP-style tokenizer.json in the folder, else CLIP's
    BPE). T5 length: t5_length, else the T5 tokenizer.json's fixed padding length if it has one (the toy teacher's),
    else the family default."""
    family, default_length = teacher_family(teacher)
    if not use_t5 and family == "flux":
        raise CheckpointError(f"{teacher}: a FLUX teacher is conditioned on T5; it can't be left out")
    if t5_tokenizer and not Path(t5_tokenizer).exists():
        raise CheckpointError(f"{t5_tokenizer}: T5 tokenizer not found")
    root = Path(text_encoders) if text_encoders else Path(teacher)
    if not root.is_dir():
        raise CheckpointError(f"{teacher}: a single-file teacher needs --text-encoders (a folder with clip_l / "
                              f"clip_g / t5xxl safetensors, or a diffusers pipeline root)")
    paths = _text_paths(family, root, t5_tokenizer)
    need = ["clip_l"] + (["clip_g"] if family == "sd3" else []) + (["t5", "t5_tok"] if use_t5 else [])
    missing = [n for n in need if paths[n] is None]
    if missing:
        raise CheckpointError(f"{root}: no {', '.join(missing)} found for the {family} teacher's text encoders")
    load = dict(dtype=dtype, device=device)
    t5_tok = T5Tokenizer.from_file(paths["t5_tok"]) if "t5" in need else None
    tok_l, tok_g = find_clip_tokenizer(root), find_clip_tokenizer(root, pad_eos=False) if family == "sd3" else None
    clip_l, clip_g = load_clip(paths["clip_l"], **load), load_clip(paths["clip_g"], **load) if family == "sd3" else None
    # The pooled output is read at the first EOS, and the EOS id is the tokenizer's, not the weights' (49407 in
    # CLIP's vocabulary; the toy world's own vocabulary has 4). Left at 49407, a toy pooled vector read position 0.
    for clip, tok in ((clip_l, tok_l), (clip_g, tok_g)):
        if clip is not None:
            clip.cfg = replace(clip.cfg, eos_id=tok.eos_id)
    return TeacherText(family, clip_l, clip_g, load_t5(paths["t5"], **load) if "t5" in need else None,
                       t5_tok, t5_length or (t5_tok and t5_tok.length) or default_length, tok_l, tok_g)


# --------------------------------------------------------------------------------------------------------- the cache
@dataclass
class TextCache:
    prompts: list[str]
    negative_prompt: str
    family: str  # teacher family, "sd3" or "flux"
    student_context: torch.Tensor  # (N, 77, 768)
    teacher_context: torch.Tensor  # (N, L, 4096)
    teacher_pooled: torch.Tensor  # (N, 2048 SD3 / 768 FLUX)
    negative_student_context: torch.Tensor  # (1, 77, 768)
    negative_teacher_context: torch.Tensor  # (1, L, 4096)
    negative_teacher_pooled: torch.Tensor  # (1, P)


TENSORS = ["student_context", "teacher_context", "teacher_pooled"]


def build_text_cache(prompts: list[str], student_clip: CLIPTextModel, teacher: TeacherText, out_path,
                     negative_prompt: str = "", batch_size: int = 8, dtype=torch.bfloat16, progress=None,
                     student_tok: CLIPTokenizer | None = None) -> None:
    """Encode every prompt (and the negative prompt) for student and teacher; one safetensors file, written
    atomically. Tensors are stored in `dtype` (bf16: the models consume them in bf16). student_tok: the student's
    CLIP tokenizer (`find_clip_tokenizer(student)`); None: the bundled CLIP BPE."""
    rows = [negative_prompt] + list(prompts)  # row 0: the negative prompt
    out = {name: [] for name in TENSORS}
    tok = student_tok or clip_tokenizer(49407)
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        context, pooled = teacher(batch)
        for name, t in zip(TENSORS, (sd15_context(student_clip, tok, batch), context, pooled), strict=True):
            out[name].append(t.to("cpu", dtype))
        if progress:
            progress(len(batch))
    tensors = {}
    for name in TENSORS:
        full = torch.cat(out[name])
        tensors[name], tensors["negative_" + name] = full[1:].contiguous(), full[:1].contiguous()
    meta = {"prompts": json.dumps(list(prompts)), "negative_prompt": negative_prompt, "family": teacher.family,
            "t5_length": str(teacher.t5_length)}
    save_atomic(tensors, out_path, metadata=meta)


def load_text_cache(path, device="cpu") -> TextCache:
    path = Path(path)
    ckpt = Checkpoint(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    missing = [k for k in TENSORS + ["negative_" + n for n in TENSORS] if k not in ckpt] + \
        [k for k in ("prompts", "negative_prompt", "family") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: not a text cache (missing {missing}); it looks like {describe(ckpt.keys())}")
    t = ckpt.tensors(device=device)
    prompts = json.loads(meta["prompts"])
    if t["student_context"].shape[0] != len(prompts):
        raise CheckpointError(f"{path}: {t['student_context'].shape[0]} cached rows for {len(prompts)} prompts")
    return TextCache(prompts, meta["negative_prompt"], meta["family"], **t)


def text_cache(path, prompts, teacher, text_encoders, student, family: str, dims: tuple, t5_tokenizer=None,
               t5_length=None, use_t5=True, negative="", dtype=None, device=None, build=True, wait=None) -> TextCache:
    """distill.py's cache: built when missing (by the process with `build`: rank 0 of a run, the others `wait()`),
    then loaded and checked against the run: its prompts (if given) and its models' family and widths `dims` =
    (teacher context, teacher pooled, student context). CheckpointError (one line) otherwise."""
    if not Path(path).is_file():
        if not (text_encoders and prompts):
            raise CheckpointError(f"--text-cache {path}: no such file; build it with `python -m text.conditioning`, "
                                  "or pass --prompts and --text-encoders to build it here")
        if build:
            text = load_teacher_text(teacher, text_encoders, t5_tokenizer, t5_length, use_t5, dtype=dtype,
                                     device=device)
            clip = load_clip(find_component(student, "text_encoder"), dtype=dtype, device=device)
            build_text_cache(prompts, clip, text, path, negative, student_tok=find_clip_tokenizer(student))
            del text, clip  # T5 and the CLIPs leave memory for good: training reads the cache only
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        wait() if wait else None
    tc = load_text_cache(path)
    if prompts is not None and tc.prompts != prompts:
        raise CheckpointError(f"--text-cache {path} holds other prompts than --prompts")
    if (tc.family, tc.teacher_context.shape[-1], tc.teacher_pooled.shape[-1], tc.student_context.shape[-1]) \
            != (family, *dims):
        raise CheckpointError(f"--text-cache {path} was built for other models ({tc.family} teacher)")
    return tc


def read_prompts(path) -> list[str]:
    """One prompt per line; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: prompt file not found")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); prompts are UTF-8, one per line") from None
    if not prompts:
        raise CheckpointError(f"{path}: prompt file holds no prompts")
    return prompts


def main(argv=None):
    p = argparse.ArgumentParser(description="Cache the text conditioning of student (SD 1.5) and teacher.")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--teacher", required=True, help="teacher checkpoint file or diffusers pipeline folder")
    p.add_argument("--text-encoders", help="folder with clip_l/clip_g/t5xxl*.safetensors, or a pipeline root "
                   "(default: the teacher's own pipeline folder)")
    p.add_argument("--t5-tokenizer", help="T5 tokenizer.json or spiece.model (default: found beside the encoders)")
    p.add_argument("--student", required=True, help="SD 1.5 single file or diffusers folder (its CLIP-L)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--t5-length", type=int, help="T5 tokens (default: SD3 256, FLUX dev 512, schnell 256)")
    p.add_argument("--no-t5", action="store_true", help="SD3 only: no T5 (zeros in its place, as diffusers)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    try:
        prompts = read_prompts(args.prompts)
        teacher = load_teacher_text(args.teacher, args.text_encoders, args.t5_tokenizer, args.t5_length,
                                    not args.no_t5, dtype, args.device)
        student = load_clip(find_component(args.student, "text_encoder"), dtype=dtype, device=args.device)
        from tqdm import tqdm
        with tqdm(total=len(prompts) + 1, desc="encoding", unit="prompt") as bar:
            build_text_cache(prompts, student, teacher, args.out, args.negative_prompt, args.batch_size,
                             progress=bar.update, student_tok=find_clip_tokenizer(args.student))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(prompts)} prompts + negative, {teacher.family} teacher, T5 {teacher.t5_length}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
