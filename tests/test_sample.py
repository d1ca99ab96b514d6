"""sample.py against diffusers, on tiny random models of the real structures saved to disk in the real layouts:
the DDIM and flow-matching schedules vs DDIMScheduler / FlowMatchEulerDiscreteScheduler; whole sampling runs vs
StableDiffusionPipeline (DDIM), StableDiffusion3Pipeline and FluxPipeline (dev and schnell), from pipeline folders
and from single files, compared as 8-bit images; bf16; the one-line errors on bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sample
import teachers as TL
import unet as U

REPO = Path(__file__).resolve().parents[1]
# SD 1.5 `scheduler/scheduler_config.json` (stable-diffusion-v1-5); timestep_spacing is the default "leading".
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
PROMPT, NEGATIVE = "a watercolor fox in the snow", "blurry, low quality"


@pytest.mark.parametrize("steps", [1, 3, 4, 25, 50, 333, 999])
def test_ddim_schedule_matches_diffusers(steps):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(**SD15_SCHEDULER)
    ref.set_timesteps(steps)
    t, alpha, alpha_prev = U.ddim_schedule(steps)
    assert t.tolist() == ref.timesteps.tolist()
    ratio = 1000 // steps  # diffusers' step(): prev = t - 1000 // steps, final_alpha_cumprod when negative
    want_prev = [ref.alphas_cumprod[p] if p >= 0 else ref.final_alpha_cumprod for p in (t - ratio).tolist()]
    assert torch.equal(alpha, ref.alphas_cumprod[t])
    assert torch.equal(alpha_prev, torch.stack(want_prev))


def test_ddim_step_matches_diffusers():
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(**SD15_SCHEDULER)
    ref.set_timesteps(10)
    t, alpha, alpha_prev = U.ddim_schedule(10)
    g = torch.Generator().manual_seed(0)
    for i in (0, 5, 9):
        x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        want = ref.step(eps, int(t[i]), x, eta=0.0).prev_sample
        got = U.ddim_step(x, eps, alpha[i], alpha_prev[i])
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _perturb(model, scale=0.02):
    """Random offsets on every tensor so zero-initialised biases and unit norms can't hide a mistake."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def sd15_pipeline(tmp_path_factory):
    """A tiny SD 1.5-structured diffusers pipeline saved to disk: (pipeline, folder)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFCLIPTokenizer
    torch.manual_seed(0)
    # SD 1.5's block structure (3 cross-attention levels + 1 plain, 2 layers each, 8 heads), few channels.
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=128, attention_head_dim=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=64, scaling_factor=0.18215)
    # vocab 49408 so the real tokenizer's ids fit; quick_gelu and head size 64 as CLIP-L (single files carry no head
    # count: it is read as width // 64).
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=128))
    folder = REPO / "assets" / "clip_tokenizer"
    tokenizer = HFCLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                                pad_token="<|endoftext|>", model_max_length=77)
    for m in (unet, vae, clip):
        _perturb(m).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("sd15")
    pipe.save_pretrained(root / "pipeline", safe_serialization=True)
    _write_single_file(pipe, root / "single.safetensors")
    return pipe, root


def _write_single_file(pipe, path):
    """The pipeline as an original SD 1.5 single file (`v1-5-pruned-emaonly.safetensors` layout), written through
    our key maps inverted, with the DDPM buffers real files carry."""
    from unet import UNetConfig, unet_key_map
    from vae import VAEConfig, vae_key_map
    unet_cfg = UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=128)
    vae_cfg = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2))
    u, v = pipe.unet.state_dict(), pipe.vae.state_dict()
    tensors = {"model.diffusion_model." + o: u[d] for o, d in unet_key_map(unet_cfg).items()}
    for o, d in vae_key_map(vae_cfg).items():  # attention: diffusers linears [C, C] -> LDM 1x1 convs
        tensors["first_stage_model." + o] = v[d][:, :, None, None] if ".attn_1." in o and v[d].ndim == 2 else v[d]
    for k, t in pipe.text_encoder.state_dict().items():  # transformers 5 names lack `text_model.`
        tensors["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = t
    tensors["alphas_cumprod"] = U.sd15_alphas_cumprod()
    save_file({k: t.contiguous() for k, t in tensors.items()}, path)


def _diffusers_images(pipe, batch, **kw):
    images = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=batch, output_type="pil",
                  generator=torch.Generator("cpu").manual_seed(kw["seed"]), num_inference_steps=kw["steps"],
                  guidance_scale=kw["cfg"], width=kw["width"], height=kw["height"]).images
    return [np.asarray(im) for im in images]


@pytest.mark.parametrize("where,batch,size", [("pipeline", 1, (128, 64)), ("pipeline", 2, (128, 64)),
                                              ("single.safetensors", 1, (128, 64)), ("pipeline", 1, (88, 72))])
def test_sd15_matches_diffusers_pipeline(sd15_pipeline, tmp_path, where, batch, size):
    pipe, root = sd15_pipeline
    # non-square: catches a swapped width/height; 88x72 px: latents 11x9, not a multiple of the UNet's 8
    kw = dict(seed=3, steps=4, cfg=7.5, width=size[0], height=size[1])
    out, ckpt = tmp_path / "img.png", root / where
    argv = ["--ckpt", str(ckpt), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--out", str(out), "--quiet",
            "--device", "cpu", "--batch", str(batch)] + [f"--{k}={v}" for k, v in kw.items()]
    assert sample.main(argv) == 0
    want = _diffusers_images(pipe, batch, **kw)
    paths = [out] if batch == 1 else [tmp_path / f"img-{i}.png" for i in range(batch)]
    for i, (path, ref) in enumerate(zip(paths, want, strict=True)):
        im = Image.open(path)
        got = np.asarray(im.convert("RGB"))
        assert got.shape == ref.shape == (size[1], size[0], 3)
        assert 20 < got.std() and (got > 0).mean() > 0.5 and (got < 255).mean() > 0.5  # a real image, not saturated
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2
        params = json.loads(im.text["parameters"])
        assert params["prompt"] == PROMPT and params["negative_prompt"] == NEGATIVE
        assert params["model"] == str(ckpt) and params["family"] == "sd15" and params["sampler"] == "ddim"
        assert {k: params[k] for k in kw} == kw
        assert params.get("index", 0) == i
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


def test_distilled_student_samples_in_one_step(sd15_pipeline, tmp_path):
    """A file marked distilled (as distill.py writes it) samples in one step from t = 999 at its resolution, no CFG:
    the same image as x0 = (noise - sqrt(1 - abar) eps) / sqrt(abar) from diffusers' own modules, decoded."""
    pipe, root = sd15_pipeline
    tensors = load_file(root / "single.safetensors")
    meta = {"distilled": "1", "steps": "1", "timestep": "999", "resolution": "64"}
    save_file(tensors, tmp_path / "student.safetensors", metadata=meta)
    out = tmp_path / "one.png"
    assert sample.main(["--ckpt", str(tmp_path / "student.safetensors"), "--prompt", PROMPT, "--seed", "5",
                        "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    with torch.no_grad():
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
        ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
        eps = pipe.unet(noise, 999, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        abar = pipe.scheduler.alphas_cumprod[999]
        x0 = (noise - (1 - abar) ** 0.5 * eps) / abar ** 0.5
        ref = pipe.image_processor.postprocess(pipe.vae.decode(x0 / 0.18215).sample, output_type="np")
    got = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert got.shape == (64, 64, 3) and got.std() > 5
    assert np.abs(got - (ref[0] * 255).round().astype(int)).max() <= 2
    assert json.loads(Image.open(out).text["parameters"])["sampler"] == "distilled"
    code = sample.main(["--ckpt", str(tmp_path / "student.safetensors"), "--prompt", PROMPT, "--cfg", "3",
                        "--out", str(out), "--quiet"])
    assert code != 0  # CFG is distilled in: refused, not silently applied


# ----------------------------------------------------------------------------- teachers
# Scheduler configs of the released pipelines (`scheduler/scheduler_config.json`).
SD3_SCHEDULER = dict(shift=3.0)
FLUX_DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                          max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULER = dict(FLUX_DEV_SCHEDULER, shift=1.0, use_dynamic_shifting=False)


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_flow_sigmas_match_diffusers(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    ref = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    ref.set_timesteps(steps)  # as StableDiffusion3Pipeline: no sigmas given
    assert torch.equal(TL.sd3_sigmas(steps), ref.sigmas)
    for tokens, config in ((32, FLUX_DEV_SCHEDULER), (4096, FLUX_DEV_SCHEDULER), (1024, FLUX_SCHNELL_SCHEDULER)):
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        assert TL.flux_mu(tokens) == mu
        ref = FlowMatchEulerDiscreteScheduler(**config)
        ref.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # as FluxPipeline
        ours = TL.flux_sigmas(steps, mu if config["use_dynamic_shifting"] else None)
        assert torch.equal(ours, ref.sigmas), (tokens, ours, ref.sigmas)


def test_sd3_shift_from_the_scheduler_config(tmp_path):
    """An SD3 model's shift comes from its scheduler config as diffusers saves it (a pipeline's scheduler/, or beside a
    single file: the toy teacher's 12), and the sigmas then match diffusers' with that shift; none: 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from weights import CheckpointError
    ref = FlowMatchEulerDiscreteScheduler(**(SD3_SCHEDULER | {"shift": 12.0}))
    ref.save_config(tmp_path / "pipe" / "scheduler")
    ref.save_config(tmp_path / "single")  # scheduler_config.json beside single.safetensors
    for ckpt in (tmp_path / "pipe", tmp_path / "single" / "model.safetensors"):
        assert TL.sd3_shift(ckpt) == 12.0
    ref.set_timesteps(28)
    assert torch.equal(TL.sd3_sigmas(28, TL.sd3_shift(tmp_path / "pipe")), ref.sigmas)
    assert TL.sd3_shift(tmp_path / "elsewhere.safetensors") == 3.0
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scheduler_config.json").write_text('{"shift": "a lot"}')
    with pytest.raises(CheckpointError, match="bad/scheduler_config.json"):
        TL.sd3_shift(tmp_path / "bad" / "model.safetensors")

def _hf_clip(act, projection, seed):
    """A tiny CLIP text tower with the real vocabulary; head size 64 as the real ones (single files carry no head
    count)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act, eos_token_id=49407,
                         projection_dim=projection or 128)
    return _perturb(CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def _hf_clip_tokenizer(pad):
    from transformers import CLIPTokenizer as HFCLIPTokenizer
    folder = REPO / "assets" / "clip_tokenizer"
    return HFCLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad,
                           model_max_length=77)


def _hf_t5(folder):
    """A tiny T5 v1.1-style encoder (width 256: SD3 zero-pads the 2 x 128 CLIP widths to it) and a SentencePiece
    Unigram tokenizer trained here, saved to folder/spiece.model."""
    import random

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel
    from transformers import T5Tokenizer as HFT5Tokenizer
    rng = random.Random(0)
    syl = ["ka", "to", "ri", "mu", "sen", "lo", "pha", "qu", "ex", "bri", "dor", "ton", "ing", "ed", "st", "ae"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    words += (PROMPT + " " + NEGATIVE).replace(",", " ,").split()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"),
                                   vocab_size=300, hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
    for extra in ("corpus.txt", "spiece.vocab"):
        (folder / extra).unlink()
    torch.manual_seed(5)
    t5 = T5EncoderModel(T5Config(vocab_size=512, d_model=256, d_kv=32, d_ff=128, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0))
    return _perturb(t5).eval(), HFT5Tokenizer.from_pretrained(str(folder))


def _hf_vae16(scale, shift):
    from diffusers import AutoencoderKL
    torch.manual_seed(1)
    return _perturb(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scale, shift_factor=shift)).eval()


@pytest.fixture(scope="module")
def sd3_pipeline(tmp_path_factory):
    """A tiny SD3.5-structured diffusers pipeline (MMDiT-X dual attention + qk RMSNorm, CLIP-L/G with projections,
    T5) saved to disk: (pipeline, root)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    root = tmp_path_factory.mktemp("sd3") / "pipeline"
    t5, t5_tok = _hf_t5(root / "tokenizer_3")
    torch.manual_seed(2)
    transformer = _perturb(SD3Transformer2DModel(  # heads = depth (the MMDiT rule our loader reads depth by)
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=256, caption_projection_dim=32, pooled_projection_dim=256, out_channels=16,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=_hf_vae16(1.5305, 0.0609), text_encoder=_hf_clip("quick_gelu", 128, 3),
        tokenizer=_hf_clip_tokenizer("<|endoftext|>"), text_encoder_2=_hf_clip("gelu", 128, 4),
        tokenizer_2=_hf_clip_tokenizer("!"), text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root, safe_serialization=True)
    return pipe, root


def _flux_parts(guidance):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    torch.manual_seed(6)
    transformer = _perturb(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=guidance, axes_dims_rope=(4, 14, 14)))
    scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if guidance else FLUX_SCHNELL_SCHEDULER))
    return dict(transformer=transformer.eval(), scheduler=scheduler, vae=_hf_vae16(0.3611, 0.1159),
                text_encoder=_hf_clip("quick_gelu", None, 7), tokenizer=_hf_clip_tokenizer("<|endoftext|>"))


@pytest.fixture(scope="module")
def flux_dev_pipeline(tmp_path_factory):
    """A tiny FLUX.1-dev-structured diffusers pipeline root: (pipeline, root)."""
    from diffusers import FluxPipeline
    root = tmp_path_factory.mktemp("flux_dev") / "pipeline"
    t5, t5_tok = _hf_t5(root / "tokenizer_2")
    pipe = FluxPipeline(text_encoder_2=t5, tokenizer_2=t5_tok, **_flux_parts(guidance=True))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root, safe_serialization=True)
    return pipe, root


@pytest.fixture(scope="module")
def flux_schnell_files(tmp_path_factory):
    """A tiny FLUX.1-schnell as the files people download: a BFL-named transformer file, `ae.safetensors` (LDM names)
    and a text-encoder folder of single files (`clip_l.safetensors`, `t5xxl_fp16.safetensors`, `spiece.model`)."""
    from diffusers import FluxPipeline

    from teachers import detect_teacher, from_diffusers
    from vae import VAEConfig, vae_key_map
    d = tmp_path_factory.mktemp("flux_schnell")
    t5, t5_tok = _hf_t5(d / "text_encoders")
    parts = _flux_parts(guidance=False)
    pipe = FluxPipeline(text_encoder_2=t5, tokenizer_2=t5_tok, **parts)
    pipe.set_progress_bar_config(disable=True)
    sd = {k: v.contiguous() for k, v in parts["transformer"].state_dict().items()}
    cfg = detect_teacher({k: tuple(v.shape) for k, v in sd.items()}).cfg
    save_file({k: v.contiguous() for k, v in from_diffusers(dict(sd), cfg).items()}, d / "flux1-schnell.safetensors")
    v = parts["vae"].state_dict()
    ae = {o: v[k][:, :, None, None] if ".attn_1." in o and v[k].ndim == 2 else v[k]
          for o, k in vae_key_map(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), latent_channels=16, use_quant_conv=False))
          .items()}
    save_file({k: t.contiguous() for k, t in ae.items()}, d / "ae.safetensors")
    clip = {"text_model." + k.removeprefix("text_model."): t for k, t in parts["text_encoder"].state_dict().items()}
    save_file({k: t.contiguous() for k, t in clip.items()}, d / "text_encoders" / "clip_l.safetensors")
    t5_state = {k: t.contiguous() for k, t in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied
    save_file(t5_state, d / "text_encoders" / "t5xxl_fp16.safetensors")
    return pipe, d


def _compare(out, ref_images, params_want):
    im = Image.open(out)
    got = np.asarray(im.convert("RGB"))
    ref = np.asarray(ref_images[0])
    assert got.shape == ref.shape
    assert 10 < got.std() and (got > 0).mean() > 0.5 and (got < 255).mean() > 0.5  # a real image, not saturated
    diff = np.abs(got.astype(int) - ref.astype(int)).max()
    assert diff <= 2, diff
    params = json.loads(im.text["parameters"])
    assert {k: params[k] for k in params_want} == params_want


def _sd35_single_file(pipe, path):
    """The pipeline's transformer and VAE as a Stability single file (`sd3.5_large.safetensors` layout:
    `model.diffusion_model.*` MMDiT, `first_stage_model.*` VAE; text encoders ship separately)."""
    from teachers import detect_teacher, from_diffusers
    from vae import VAEConfig, vae_key_map
    sd = {k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    cfg = detect_teacher({k: tuple(v.shape) for k, v in sd.items()}).cfg
    tensors = {"model.diffusion_model." + k: v for k, v in from_diffusers(dict(sd), cfg).items()}
    v = pipe.vae.state_dict()
    vae_cfg = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), latent_channels=16, use_quant_conv=False)
    for o, k in vae_key_map(vae_cfg).items():
        tensors["first_stage_model." + o] = v[k][:, :, None, None] if ".attn_1." in o and v[k].ndim == 2 else v[k]
    save_file({k: t.contiguous() for k, t in tensors.items()}, path)


@pytest.mark.parametrize("where", ["pipeline root", "single file"])
def test_sd3_matches_diffusers_pipeline(sd3_pipeline, tmp_path, where):
    pipe, root = sd3_pipeline
    out = tmp_path / "sd3.png"
    ckpt = ["--ckpt", str(root)]
    if where == "single file":  # VAE from the file itself, text encoders from --text-encoders (a pipeline root)
        _sd35_single_file(pipe, tmp_path / "sd3.5.safetensors")
        ckpt = ["--ckpt", str(tmp_path / "sd3.5.safetensors"), "--text-encoders", str(root)]
    assert sample.main(ckpt + ["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", "4", "--width", "128",
                               "--height", "64", "--seed", "5", "--out", str(out), "--quiet"]) == 0
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.0, width=128, height=64,
               generator=torch.Generator("cpu").manual_seed(5)).images  # diffusers' defaults: cfg 7.0, T5 256
    _compare(out, ref, dict(family="sd3", sampler="euler", cfg=7.0, steps=4, seed=5, t5_length=256,
                            negative_prompt=NEGATIVE))


def test_flux_dev_matches_diffusers_pipeline(flux_dev_pipeline, tmp_path):
    pipe, root = flux_dev_pipeline
    out = tmp_path / "flux.png"
    assert sample.main(["--ckpt", str(root), "--prompt", PROMPT, "--steps", "4", "--cfg", "4.0", "--width", "64",
                        "--height", "128", "--seed", "6", "--out", str(out), "--quiet"]) == 0
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=4.0, width=64, height=128,
               generator=torch.Generator("cpu").manual_seed(6)).images  # T5 512 tokens: diffusers' default
    _compare(out, ref, dict(family="flux", sampler="euler", guidance=4.0, steps=4, seed=6, t5_length=512))


def test_flux_schnell_single_files_match_diffusers_pipeline(flux_schnell_files, tmp_path):
    pipe, d = flux_schnell_files
    out = tmp_path / "schnell.png"
    # ae.safetensors is found beside the transformer file; the T5 tokenizer beside t5xxl in --text-encoders.
    assert sample.main(["--ckpt", str(d / "flux1-schnell.safetensors"), "--text-encoders", str(d / "text_encoders"),
                        "--prompt", PROMPT, "--width", "128", "--height", "64", "--seed", "7", "--out", str(out),
                        "--quiet"]) == 0
    ref = pipe(PROMPT, num_inference_steps=4, width=128, height=64, max_sequence_length=256,
               generator=torch.Generator("cpu").manual_seed(7)).images
    _compare(out, ref, dict(family="flux", guidance=None, steps=4, seed=7, t5_length=256))


@pytest.mark.parametrize("model", ["sd15", "flux_dev"])
def test_bf16_close_to_fp32(model, sd15_pipeline, flux_dev_pipeline, tmp_path):
    """bf16 weights and compute (the GPU default for teachers), fp32 schedule and updates: close to the fp32 image
    (a random model under strong guidance amplifies rounding, hence cfg 2)."""
    ckpt = sd15_pipeline[1] / "pipeline" if model == "sd15" else flux_dev_pipeline[1]
    images = []
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.png"
        assert sample.main(["--ckpt", str(ckpt), "--prompt", PROMPT, "--steps", "2", "--width", "64", "--height",
                            "64", "--cfg", "2", "--dtype", dtype, "--out", str(out), "--quiet"]) == 0
        images.append(np.asarray(Image.open(out)).astype(int))
    diff = np.abs(images[0] - images[1])
    assert images[0].std() > 10 and diff.mean() <= 3 and diff.max() <= 40, (diff.mean(), diff.max())


def _run_in_process(argv, capsys):
    """(exit code, stderr) of sample.main(argv); an exception escaping main fails the test with its traceback."""
    try:
        code = sample.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def _run_subprocess(argv, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), *argv], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    return r.returncode, r.stderr


def test_bad_input_is_one_line(sd15_pipeline, sd3_pipeline, flux_schnell_files, tmp_path, capsys):
    """Each bad input: non-zero exit, exactly one line on stderr, `error: ...` naming the file or flag, no traceback.
    In-process (main() must return, not raise), and the first two cases also as a real process."""
    sd15, sd3, flux = sd15_pipeline[1] / "pipeline", sd3_pipeline[1], flux_schnell_files[1]
    garbage = tmp_path / "notes.safetensors"
    garbage.write_text("these are not tensors\n" * 10)
    whole = tmp_path / "whole.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, whole)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:-100])
    lone = tmp_path / "lone" / "flux1-schnell.safetensors"  # a FLUX file with no ae.safetensors beside it
    lone.parent.mkdir()
    lone.write_bytes((flux / "flux1-schnell.safetensors").read_bytes())
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    untokenized = tmp_path / "toy" / "student.safetensors"  # the toy student without the tokenizer.json beside it
    untokenized.parent.mkdir()
    untokenized.write_bytes((REPO / "assets/toy/distilled/student.safetensors").read_bytes())
    schnell = ["--ckpt", str(flux / "flux1-schnell.safetensors"), "--text-encoders", str(flux / "text_encoders")]
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, pickled)
    (tmp_path / "a_dir").mkdir()
    cases = [  # (name, argv, what the error line must contain)
        ("zero steps", ["--ckpt", str(sd15), "--steps", "0"], "--steps"),
        ("missing", ["--ckpt", str(tmp_path / "nope.safetensors")], "nope.safetensors"),
        ("not safetensors", ["--ckpt", str(garbage)], "not a safetensors file"),
        ("truncated", ["--ckpt", str(cut)], "truncated"),
        ("another model", ["--ckpt", str(sd15 / "vae")], "VAE"),
        ("flux without text encoders", ["--ckpt", str(flux / "flux1-schnell.safetensors")], "--text-encoders"),
        ("flux without vae", ["--ckpt", str(lone), "--text-encoders", str(flux / "text_encoders")], "--vae"),
        ("width", ["--ckpt", str(sd15), "--width", "100"], "--width"),
        ("height", ["--ckpt", str(sd15), "--height", "70"], "--height"),
        ("teacher width", schnell + ["--width", "72"], "--width"),
        ("sd3 beyond its position table", ["--ckpt", str(sd3), "--width", "512"], "--width"),
        ("negative steps", ["--ckpt", str(sd15), "--steps", "-3"], "--steps"),
        ("schnell with guidance", schnell + ["--cfg", "3.5"], "--cfg"),
        ("flux with a negative prompt", schnell + ["--negative-prompt", "blurry"], "--negative-prompt"),
        ("unwritable out", ["--ckpt", str(sd15), "--out", str(a_file / "img.png")], "--out"),
        ("toy model without its tokenizer", ["--ckpt", str(untokenized)], "tokenizer.json"),
        ("a pickle", ["--ckpt", str(pickled)], "pickle"),
        ("out is a directory", ["--ckpt", str(sd15), "--out", str(tmp_path / "a_dir")], "directory"),
        ("more pixels than memory", ["--ckpt", str(sd15), "--width", "100000", "--height", "100000"], "GiB"),
        ("no cuda", ["--ckpt", str(sd15), "--device", "cuda"], "--device"),
    ]
    if torch.cuda.is_available():
        cases = cases[:-1]
    for i, (name, argv, needle) in enumerate(cases):
        for run in [_run_in_process] + ([_run_subprocess] if i < 2 else []):
            code, err = run(["--prompt", "x", "--quiet"] + argv, capsys)
            lines = err.strip().splitlines()
            assert code != 0, name
            assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
            assert needle in lines[0], (name, lines[0])
    assert not (a_file / "img.png").exists() and not any((tmp_path / "a_dir").iterdir())


def test_compile_and_tiny_decoder(sd15_pipeline, tmp_path):
    """--compile (UNet and decoder through torch.compile) draws what eager draws (to 1/255); --tiny-decoder decodes
    the same latents with TAESD's decoder: exactly diffusers' AutoencoderTiny on them (random weights here)."""
    from diffusers import AutoencoderTiny

    import vae as V
    pipe, root = sd15_pipeline
    base = ["--ckpt", str(root / "pipeline"), "--prompt", PROMPT, "--quiet", "--device", "cpu", "--steps", "3",
            "--width", "64", "--height", "64", "--seed", "1"]
    got = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        assert sample.main(base + ["--out", str(tmp_path / f"{name}.png")] + extra) == 0
        got[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert np.abs(got["eager"] - got["compiled"]).max() <= 1
    torch.manual_seed(0)
    AutoencoderTiny().eval().save_pretrained(tmp_path / "taesd")
    assert sample.main(base + ["--out", str(tmp_path / "tiny.png"), "--tiny-decoder", str(tmp_path / "taesd")]) == 0
    im = Image.open(tmp_path / "tiny.png")
    assert im.size == (64, 64) and json.loads(im.text["parameters"])["decoder"] == str(tmp_path / "taesd")
    tiny, ref = V.load_tiny_decoder(tmp_path / "taesd"), AutoencoderTiny.from_pretrained(tmp_path / "taesd").eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        assert ((tiny.decode(z) - ref.decode(z).sample).abs().max() / ref.decode(z).sample.abs().max()) <= 1e-4
