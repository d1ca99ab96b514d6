"""Text encoders vs transformers (tiny random models saved in the public layouts), and full-size layouts on meta."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from text.encoders import PRESETS, T5_PRESETS, CLIPTextModel, T5Encoder, clip_config, load_clip, load_t5, t5_config
from text.tokenizer import CLIPTokenizer
from weights import CheckpointError, build_meta

LAYOUTS = Path(__file__).parent / "layouts"
PROMPTS = ["a photo of a cat", "", "A very long prompt, " * 30, "an astronaut riding a horse on the moon, 8k"]


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def layout(name, prefix=""):
    d = json.loads((LAYOUTS / f"{name}.json").read_text())
    return {k[len(prefix):]: tuple(v) for k, v in d.items() if k.startswith(prefix)}


def perturb(model, seed=1):
    """Random init leaves LayerNorms at 1/0 and biases at 0: randomise everything so every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_clip(act="quick_gelu", projection=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act, eos_token_id=49407,
                         projection_dim=projection or 512)
    return perturb(CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg))


def native_state(ref):
    """The public key names (`text_model.*`); transformers 5 CLIPTextModel drops the prefix in its state_dict."""
    keep = ("text_model.", "text_projection.")
    return {(k if k.startswith(keep) else "text_model." + k): v.contiguous() for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def ids():
    tok = CLIPTokenizer()
    return torch.cat([tok.encode(PROMPTS), CLIPTokenizer(pad_id=0).encode(PROMPTS[:2])])  # both padding styles


def check_clip(model, ref, ids, tol=1e-5):
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        got = model(ids)
        short = model(ids[:, :20])  # fewer than 77 positions; the long prompt has no EOS there -> pooled at 0
        want_short = ref(ids[:, :20], output_hidden_states=True)
    errs = {"last": rel(got.last_hidden_state, want.last_hidden_state),
            "penultimate": rel(got.penultimate_hidden_state, want.hidden_states[-2]),
            "short_last": rel(short.last_hidden_state, want_short.last_hidden_state)}
    if hasattr(want, "text_embeds"):
        errs["pooled_projected"] = rel(got.pooled_projected, want.text_embeds)
        errs["pooled"] = rel(got.pooled, want.last_hidden_state[torch.arange(len(ids)), (ids == 49407).int().argmax(1)])
    else:
        errs["pooled"] = rel(got.pooled, want.pooler_output)
        errs["pooled_projected"] = rel(got.pooled_projected, want.pooler_output)
        errs["short_pooled"] = rel(short.pooled, want_short.pooler_output)
    assert all(e <= tol for e in errs.values()), errs
    return errs


def test_clip_l_from_transformers_folder(tmp_path, ids):
    ref = hf_clip()
    ref.save_pretrained(tmp_path / "text_encoder")  # transformers 5: unprefixed keys, config.json
    model = load_clip(tmp_path / "text_encoder")
    assert model.cfg == PRESETS["tiny_l"]
    check_clip(model, ref, ids)


def test_clip_g_with_projection_sharded(tmp_path, ids):
    ref = hf_clip(act="gelu", projection=96)  # non-square projection catches a transposed weight
    ref.save_pretrained(tmp_path / "text_encoder_2", max_shard_size="5MB")
    assert list((tmp_path / "text_encoder_2").glob("*.index.json"))
    model = load_clip(tmp_path / "text_encoder_2")
    assert model.cfg.act == "gelu" and model.cfg.projection == 96
    check_clip(model, ref, ids)


@pytest.mark.parametrize("kind", ["clip_l_file", "sd15_with_position_ids", "sd15_without_position_ids"])
def test_clip_single_files(tmp_path, ids, kind):
    ref = hf_clip()
    state = native_state(ref)
    if kind.startswith("sd15"):
        state = {"cond_stage_model.transformer." + k: v for k, v in state.items()}
        state["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # the rest of an SD 1.5 file
        state["betas"] = torch.zeros(1000)
        if kind == "sd15_with_position_ids":
            state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, tmp_path / "model.safetensors")  # no config.json here: everything comes from the shapes
    model = load_clip(tmp_path / "model.safetensors")
    assert model.cfg == PRESETS["tiny_l"]
    check_clip(model, ref, ids)


def test_clip_bf16(tmp_path, ids):
    ref = hf_clip()
    ref.save_pretrained(tmp_path)
    model = load_clip(tmp_path, dtype=torch.bfloat16)
    assert model.text_model.final_layer_norm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got, want = model(ids), ref(ids, output_hidden_states=True)
    assert rel(got.last_hidden_state, want.last_hidden_state) < 3e-2
    assert rel(got.penultimate_hidden_state, want.hidden_states[-2]) < 3e-2


def test_clip_bad_files(tmp_path):
    t5 = tmp_path / "t5.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}, t5)
    with pytest.raises(CheckpointError, match=r"t5\.safetensors.*T5 encoder"):
        load_clip(t5)
    state = native_state(hf_clip())
    del state["text_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*layers\.1\.mlp\.fc2\.bias"):
        load_clip(tmp_path / "broken.safetensors")
    state = native_state(hf_clip())
    state["text_model.encoder.layers.2.self_attn.q_proj.weight"] = torch.zeros(128, 64)
    save_file(state, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"shape\.safetensors.*expected shape \(128, 128\), found \(128, 64\)"):
        load_clip(tmp_path / "shape.safetensors")


@pytest.mark.parametrize("name, prefix, preset", [
    ("text_encoder_clip_l", "", PRESETS["clip_l"]),
    ("sd15_diffusers_text_encoder", "", PRESETS["clip_l"]),
    ("sd15_single_file", "cond_stage_model.transformer.", PRESETS["clip_l"]),
    ("text_encoder_clip_l_with_projection", "", replace(PRESETS["clip_l"], projection=768)),
    ("text_encoder_clip_g", "", PRESETS["clip_g"]),
])
def test_clip_full_size_layout(name, prefix, preset):
    want = layout(name, prefix)
    model = build_meta(CLIPTextModel, preset)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    assert clip_config(want) == preset  # CLIP-L vs CLIP-G told apart by shapes alone


# ---------------------------------------------------------------------------------------------------------------- T5
def hf_t5():
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return perturb(T5EncoderModel(cfg))


def t5_ids(T=300):  # longer than max_distance 128: every bucket, exact and log-spaced, both directions
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 32128, (2, T), generator=g)
    ids[:, -40:] = 0  # pads, attended to like the pipelines do (no mask)
    ids[:, -41] = 1
    return ids


@pytest.mark.parametrize("kind", ["diffusers_sharded", "file_with_embed_tokens", "file_shared_only",
                                  "file_embed_tokens_only", "sd3_all_in_one"])
def test_t5_parity(tmp_path, kind):
    ref = hf_t5()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}  # shared.weight + tied encoder.embed_tokens
    if kind == "diffusers_sharded":
        ref.save_pretrained(tmp_path / "text_encoder_3", max_shard_size="2MB")
        assert list((tmp_path / "text_encoder_3").glob("*.index.json"))
        path = tmp_path / "text_encoder_3"
    else:
        if kind == "file_with_embed_tokens":
            state["encoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"].clone()
        elif kind == "file_shared_only":
            del state["encoder.embed_tokens.weight"]
        elif kind == "file_embed_tokens_only":
            state["encoder.embed_tokens.weight"] = state.pop("shared.weight").clone()
        else:  # SD3 single file with the text encoders inside
            state = {"text_encoders.t5xxl.transformer." + k: v.clone() for k, v in state.items()}
            state["model.diffusion_model.x_embedder.proj.bias"] = torch.zeros(4)
        path = tmp_path / "t5.safetensors"
        save_file(state, path)
    model = load_t5(path)
    assert model.cfg == T5_PRESETS["tiny"]
    ids = t5_ids()
    with torch.no_grad():
        err = rel(model(ids), ref(ids).last_hidden_state)
        err_short = rel(model(ids[:, :7]), ref(ids[:, :7]).last_hidden_state)
    assert err <= 1e-5 and err_short <= 1e-5, (err, err_short)


def test_t5_bf16(tmp_path):
    """bf16 stays finite and close, and closer than the same model run naively in bf16 (transformers .bfloat16()),
    thanks to the fp32 residual stream, norms and attention softmax."""
    import copy
    ref = hf_t5()
    with torch.no_grad():  # a large residual stream, as in the real XXL, where bf16 rounding of the stream shows
        ref.shared.weight.mul_(100.0)
        for block in ref.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(30.0)
        for p in ref.parameters():  # bf16-exact weights: only the computation differs between the runs below
            p.copy_(p.bfloat16().float())
    ref.save_pretrained(tmp_path)
    model = load_t5(tmp_path, dtype=torch.bfloat16)
    assert model.shared.weight.dtype == torch.bfloat16
    ids = t5_ids(256)
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        got = model(ids)
        naive = copy.deepcopy(ref).bfloat16()(ids).last_hidden_state
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    err, err_naive = rel(got, want), rel(naive, want)
    assert err < 1e-2 and err < err_naive, (err, err_naive)


def test_t5_bad_files(tmp_path):
    clip = tmp_path / "clip.safetensors"
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, clip)
    with pytest.raises(CheckpointError, match=r"clip\.safetensors.*CLIP text encoder"):
        load_t5(clip)
    state = {k: v.clone() for k, v in hf_t5().state_dict().items()}
    del state["encoder.block.2.layer.1.DenseReluDense.wi_1.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*block\.2\.layer\.1\.DenseReluDense\.wi_1"):
        load_t5(tmp_path / "broken.safetensors")


def test_t5_full_size_layout():
    want = layout("text_encoder_t5xxl")
    model = build_meta(T5Encoder, T5_PRESETS["t5xxl"])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    assert t5_config(want) == T5_PRESETS["t5xxl"]


def test_clip_too_narrow_for_64_wide_heads_is_a_clear_error():
    shapes = {"text_model.embeddings.token_embedding.weight": (10, 32),
              "text_model.embeddings.position_embedding.weight": (77, 32),
              "text_model.encoder.layers.0.mlp.fc1.weight": (64, 32)}
    with pytest.raises(CheckpointError, match="x.safetensors: CLIP width 32 does not split into heads of 64"):
        clip_config(shapes, source="x.safetensors")


def test_ids_past_the_vocabulary_are_a_clear_error(ids):
    """A tokenizer that is not the encoder's (CLIP's BPE on a 40-token toy encoder): CheckpointError, not IndexError;
    ids inside the vocabulary pass."""
    clip = CLIPTextModel(replace(PRESETS["tiny_l"], vocab_size=40, eos_id=4))
    t5 = T5Encoder(replace(T5_PRESETS["tiny"], vocab_size=40))
    for model, name in ((clip, "CLIP text encoder"), (t5, "T5 encoder")):
        with pytest.raises(CheckpointError, match=f"{name}: token id 49407 is past its vocabulary of 40"):
            model(ids)
        model(ids.clamp(max=39))
