"""Conditioning vs diffusers' encode_prompt (SD 1.5, SD3 with and without T5, FLUX) on tiny random text encoders and
tokenizers saved to tmp_path; the text cache and its command line."""
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import text.conditioning as C
from text.encoders import load_clip, load_t5
from text.tokenizer import CLIP_FOLDER, T5Tokenizer

PROMPTS = ["a photo of a cat", "An astronaut riding a horse on the moon, 8k!!", "", "kato rimu senlo " * 40]
NEGATIVE = "blurry, low quality"


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_clip(act, projection=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act, eos_token_id=49407,
                         projection_dim=projection or 512)
    return perturb(CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg), seed + 1)


def hf_t5(d_model=256):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(5)
    cfg = T5Config(vocab_size=32128, d_model=d_model, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return perturb(T5EncoderModel(cfg), 6)


def hf_clip_tokenizer(pad):
    from transformers import CLIPTokenizer
    return CLIPTokenizer(vocab=str(CLIP_FOLDER / "vocab.json"), merges=str(CLIP_FOLDER / "merges.txt"),
                         pad_token=pad, model_max_length=77)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny SD3-style pipeline root: text_encoder (CLIP-L + projection), text_encoder_2 (CLIP-G style, gelu,
    projection), text_encoder_3 (T5), tokenizer_3 (a SentencePiece Unigram model trained here), transformer."""
    import sentencepiece as spm
    from diffusers import SD3Transformer2DModel
    from transformers import T5Tokenizer as HFT5Tokenizer
    d = tmp_path_factory.mktemp("sd3")
    rng = random.Random(0)
    syl = ["ka", "to", "ri", "mu", "sen", "lo", "pha", "qu", "ex", "bri", "dor", "ton", "ing", "ed", "st", "ae"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(300)] + "a photo of".split()
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(2000)))
    (d / "tokenizer_3").mkdir()
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer_3" / "spiece"),
                                   vocab_size=300, hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
    (d / "tokenizer_3" / "spiece.vocab").unlink()
    hf_clip("quick_gelu", projection=128, seed=0).save_pretrained(d / "text_encoder")
    hf_clip("gelu", projection=96, seed=2).save_pretrained(d / "text_encoder_2")
    hf_t5().save_pretrained(d / "text_encoder_3")
    torch.manual_seed(0)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=4096, caption_projection_dim=16,
                          pooled_projection_dim=224, out_channels=16, pos_embed_max_size=8
                          ).save_pretrained(d / "transformer")
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert HFT5Tokenizer.from_pretrained(str(d / "tokenizer_3")) is not None
    return d


def sd3_pipe(root, with_t5=True):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel
    from transformers import T5Tokenizer as HFT5Tokenizer
    t5 = dict(text_encoder_3=T5EncoderModel.from_pretrained(root / "text_encoder_3"),
              tokenizer_3=HFT5Tokenizer.from_pretrained(str(root / "tokenizer_3"))) if with_t5 else \
        dict(text_encoder_3=None, tokenizer_3=None)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(root / "transformer"), scheduler=None, vae=None,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder"),
        tokenizer=hf_clip_tokenizer("<|endoftext|>"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"),
        tokenizer_2=hf_clip_tokenizer("!"), **t5)


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_matches_diffusers(root, with_t5):
    pipe = sd3_pipe(root, with_t5)
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", negative_prompt=[NEGATIVE] * len(PROMPTS), max_sequence_length=40)
    clip_l, clip_g = load_clip(root / "text_encoder"), load_clip(root / "text_encoder_2")
    t5, tok = (load_t5(root / "text_encoder_3"), T5Tokenizer.from_file(root / "tokenizer_3")) if with_t5 else (None,
                                                                                                            None)
    ours, ours_pooled = C.sd3_conditioning(clip_l, clip_g, t5, PROMPTS, 40, tok)
    ours_neg, ours_neg_pooled = C.sd3_conditioning(clip_l, clip_g, t5, [NEGATIVE], 40, tok)
    assert ours.shape == ctx.shape == (len(PROMPTS), 77 + 40, 256 if with_t5 else 4096)
    assert ours_pooled.shape == pooled.shape == (len(PROMPTS), 128 + 96)
    errs = [rel(ours, ctx), rel(ours_pooled, pooled), rel(ours_neg, neg_ctx[:1]), rel(ours_neg_pooled, neg_pooled[:1])]
    assert max(errs) <= 1e-5, errs
    if not with_t5:
        assert (ours[:, 77:] == 0).all() and (ours[:, :77, 256:] == 0).all()  # 2 x 128 CLIP widths, then zeros


def test_flux_matches_diffusers(root):
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel
    from transformers import T5Tokenizer as HFT5Tokenizer
    clip_ref = hf_clip("quick_gelu", seed=4)
    clip_ref.save_pretrained(root / "flux_clip")
    pipe = FluxPipeline(scheduler=None, vae=None, transformer=None,
                        text_encoder=CLIPTextModel.from_pretrained(root / "flux_clip"),
                        tokenizer=hf_clip_tokenizer("<|endoftext|>"),
                        text_encoder_2=T5EncoderModel.from_pretrained(root / "text_encoder_3"),
                        tokenizer_2=HFT5Tokenizer.from_pretrained(str(root / "tokenizer_3")))
    with torch.no_grad():
        ctx, pooled, _ = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=48)
    ours, ours_pooled = C.flux_conditioning(load_clip(root / "flux_clip"), load_t5(root / "text_encoder_3"), PROMPTS,
                                            48, T5Tokenizer.from_file(root / "tokenizer_3"))
    assert ours.shape == ctx.shape == (len(PROMPTS), 48, 256) and ours_pooled.shape == pooled.shape == (4, 128)
    assert rel(ours, ctx) <= 1e-5 and rel(ours_pooled, pooled) <= 1e-5, (rel(ours, ctx), rel(ours_pooled, pooled))


def sd15_reference(root):
    """diffusers' SD 1.5 encode_prompt on a tiny CLIP-L, and the same weights as an SD 1.5 single file."""
    from diffusers import StableDiffusionPipeline
    ref = hf_clip("quick_gelu", seed=6)
    state = {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
             for k, v in ref.state_dict().items()}
    state["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    save_file(state, root / "student.safetensors")
    pipe = StableDiffusionPipeline(vae=None, text_encoder=ref, tokenizer=hf_clip_tokenizer("<|endoftext|>"),
                                   unet=None, scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe, root / "student.safetensors"


def test_sd15_matches_diffusers(root):
    pipe, student = sd15_reference(root)
    with torch.no_grad():
        ctx, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[NEGATIVE] * len(PROMPTS))
    clip = load_clip(student)
    ours = C.sd15_context(clip, C.clip_tokenizer(49407), PROMPTS)
    assert ours.shape == ctx.shape == (4, 77, 128)
    assert rel(ours, ctx) <= 1e-5 and rel(C.sd15_context(clip, C.clip_tokenizer(49407), [NEGATIVE]), neg[:1]) <= 1e-5


def test_text_cache_cli(root, tmp_path, capsys):
    pipe, student = sd15_reference(root)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2] + ["", "  a third prompt  "]) + "\n")
    out = tmp_path / "cache.safetensors"
    assert C.main(["--prompts", str(prompts), "--teacher", str(root), "--student", str(student), "--out", str(out),
                   "--negative-prompt", NEGATIVE, "--t5-length", "24", "--batch-size", "2", "--device", "cpu"]) == 0
    cache = C.load_text_cache(out)
    assert cache.prompts == PROMPTS[:2] + ["a third prompt"] and cache.family == "sd3"
    assert cache.negative_prompt == NEGATIVE and cache.teacher_context.dtype == torch.bfloat16
    texts = cache.prompts + [NEGATIVE]
    with torch.no_grad():
        s_ctx, _ = pipe.encode_prompt(texts, "cpu", 1, False)
        t_ctx, _, t_pooled, _ = sd3_pipe(root).encode_prompt(texts, None, None, device="cpu",
                                                            do_classifier_free_guidance=False, max_sequence_length=24)
    got = {"s": torch.cat([cache.student_context, cache.negative_student_context]),
           "t": torch.cat([cache.teacher_context, cache.negative_teacher_context]),
           "p": torch.cat([cache.teacher_pooled, cache.negative_teacher_pooled])}
    errs = [rel(got["s"], s_ctx), rel(got["t"], t_ctx), rel(got["p"], t_pooled)]
    assert got["t"].shape == (4, 77 + 24, 256) and max(errs) < 1e-2, errs  # bf16 storage

    # a single-file teacher with --text-encoders holding single files and the T5 tokenizer
    enc = tmp_path / "text_encoders"
    enc.mkdir()
    for name, src in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5xxl_fp16", "text_encoder_3")):
        model = load_t5(root / src) if name.startswith("t5") else load_clip(root / src)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, enc / f"{name}.safetensors")
    shutil.copy(root / "tokenizer_3" / "spiece.model", enc / "spiece.model")
    teacher_file = tmp_path / "sd3_teacher.safetensors"
    shutil.copy(next((root / "transformer").glob("*.safetensors")), teacher_file)
    out2 = tmp_path / "cache2.safetensors"
    assert C.main(["--prompts", str(prompts), "--teacher", str(teacher_file), "--text-encoders", str(enc),
                   "--student", str(student), "--out", str(out2), "--negative-prompt", NEGATIVE,
                   "--t5-length", "24", "--batch-size", "2", "--device", "cpu"]) == 0
    cache2 = C.load_text_cache(out2)
    # CLIP-L and T5 parts identical. The tiny CLIP-G's exact GELU can't be read off a width-128 single file (the rule
    # is by width: 1280 = OpenCLIP bigG), so it runs quick GELU there: close, not equal.
    for a, b in ((cache2.teacher_context, cache.teacher_context), (cache2.negative_teacher_context,
                                                                   cache.negative_teacher_context)):
        assert torch.equal(a[:, :77, :128], b[:, :77, :128]) and torch.equal(a[:, 77:], b[:, 77:])
        assert 0 < rel(a[:, :77, 128:256], b[:, :77, 128:256]) < 2e-2
    assert torch.equal(cache2.teacher_pooled[:, :128], cache.teacher_pooled[:, :128])
    assert torch.equal(cache2.student_context, cache.student_context)


def test_cli_bad_inputs(root, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    args = ["--teacher", str(root), "--student", str(root / "text_encoder"), "--out", str(tmp_path / "x.safetensors")]
    for prompts, needle in ((empty, "holds no prompts"), (tmp_path / "missing.txt", "not found")):
        assert C.main(["--prompts", str(prompts)] + args) == 1
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(Exception, match="not a text cache"):
        C.load_text_cache(root / "text_encoder" / "model.safetensors")


def test_pooled_is_read_at_the_tokenizers_eos():
    """A CLIP's pooled output is its state at the first EOS of the TOKENIZER's vocabulary (the toy world's id 4, not
    CLIP's 49407): the committed toy teacher's CLIP-L / CLIP-G against transformers told eos_token_id = 4. Read at
    CLIP's 49407, which the toy ids never contain, every prompt pooled the same state (position 0)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    import toy.models as M
    text = C.load_teacher_text(M.TEACHER, M.TEXT_ENCODERS)
    prompts = ["a small red circle on a blue background, top left", "upper right: a big green ring, black background"]
    _, pooled = text(prompts)
    for i, (clip, tok, name) in enumerate(((text.clip_l, text.tok_l, "clip_l"), (text.clip_g, text.tok_g, "clip_g"))):
        c = clip.cfg
        assert tok.eos_id == 4 and c.eos_id == 4
        hf = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp, num_hidden_layers=c.layers,
            num_attention_heads=c.heads, max_position_embeddings=c.max_positions, hidden_act=c.act,
            projection_dim=c.projection, eos_token_id=4, bos_token_id=3, pad_token_id=0)).eval()
        hf.load_state_dict({k: v.float() for k, v in load_file(M.TEXT_ENCODERS / f"{name}.safetensors").items()})
        with torch.no_grad():
            want = hf(tok.encode(prompts)).text_embeds
        got = pooled[:, i * c.projection:(i + 1) * c.projection]
        assert rel(got, want) < 1e-5, name
        assert (got[0] - got[1]).norm() > 0.1 * got[0].norm(), f"{name}: the pooled output ignores the prompt"
