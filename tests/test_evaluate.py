"""evaluate.py and metrics/clip.py: the CLIP vision tower and whole-CLIP loaders against transformers' CLIPModel (tiny,
random weights, both layouts), CLIP's preprocessing against CLIPImageProcessor, the full-size vision towers on `meta`,
the command line against the library call, bad input, and the toy metric against distill.py's judge."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from metrics.clip import PRESETS, CLIPVisionModel, load_clip_model, preprocess, vision_config
from weights import build_meta, save_atomic

ROOT = Path(__file__).resolve().parents[1]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def hf_clip(act="quick_gelu"):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(3)  # a seed whose (image, prompt) cosines take both signs (CLIP score clamps the negative)
    cfg = CLIPConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                                      max_position_embeddings=77, vocab_size=49408, hidden_act=act),
                     vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, image_size=32, patch_size=8, hidden_act=act),
                     projection_dim=32, logit_scale_init_value=2.5)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # LayerNorms and the class token away from their init, so that they matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def images():
    rng = np.random.default_rng(0)  # square, landscape, portrait, smaller than the crop
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in
            ((48, 48), (40, 71), (90, 33), (20, 26))]


PROMPTS = ["a red circle", "two dogs playing in the snow, photograph", "a", "an astronaut riding a horse on mars"]


def reference(model):
    """transformers' unit embeddings of images() (through CLIPImageProcessor) and PROMPTS (through our ids)."""
    from transformers import CLIPImageProcessor

    from text.tokenizer import CLIPTokenizer
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = torch.as_tensor(np.array(proc(images=images(), return_tensors="np")["pixel_values"]))
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=CLIPTokenizer().encode(PROMPTS))
    img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
    return pixels, torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


def open_clip_state(model) -> dict:
    """The same weights in OpenCLIP's layout, written independently of metrics/clip.py's map."""
    sd, out = model.state_dict(), {}
    for tower, src in (("visual.transformer", "vision_model"), ("transformer", "text_model")):
        for i in range(2):
            a, b = f"{tower}.resblocks.{i}.", f"{src}.encoder.layers.{i}."
            for p in ("weight", "bias"):
                out[a + "attn.in_proj_" + p] = torch.cat([sd[b + f"self_attn.{q}_proj.{p}"] for q in "qkv"])
                for x, y in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[a + x + "." + p] = sd[b + y + "." + p]
    for p in ("weight", "bias"):
        out |= {f"visual.ln_pre.{p}": sd[f"vision_model.pre_layrnorm.{p}"],
                f"visual.ln_post.{p}": sd[f"vision_model.post_layernorm.{p}"],
                f"ln_final.{p}": sd[f"text_model.final_layer_norm.{p}"]}
    return out | {"visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
                  "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
                  "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
                  "visual.proj": sd["visual_projection.weight"].t(),
                  "text_projection": sd["text_projection.weight"].t(),
                  "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
                  "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
                  "logit_scale": sd["logit_scale"]}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    model = hf_clip()
    model.save_pretrained(root / "clip")
    save_atomic(open_clip_state(model), root / "open_clip.safetensors")
    return root, model, reference(model)


def test_preprocessing_matches_clip_image_processor(ref):
    _, _, (pixels, _, _) = ref
    assert torch.allclose(preprocess(images(), 32), pixels, atol=1e-5)


@pytest.mark.parametrize("layout", ["clip", "open_clip.safetensors"])
def test_parity_with_transformers(ref, layout):
    root, model, (_, img, txt) = ref
    ours = load_clip_model(root / layout)
    assert rel_err(ours.embed_images(images()), img) <= 1e-4
    assert rel_err(ours.embed_texts(PROMPTS), txt) <= 1e-4
    cos = (img[:, None] * txt[None]).sum(-1).flatten()  # every (image, prompt) pair: of either sign
    assert (cos > 0).any() and (cos < 0).any()
    assert ours.logit_scale.item() == pytest.approx(model.logit_scale.item())
    want = {"clip": 100 * cos.clamp(min=0), "pickscore": model.logit_scale.exp().item() * cos, "hpsv2": cos}
    metric = "hpsv2" if layout.startswith("open_clip") else "clip"
    for m in (metric, "pickscore") if metric == "clip" else (metric,):
        pairs = [(im, p) for im in images() for p in PROMPTS]
        got = torch.tensor(evaluate.scorer(m, root / layout)(*map(list, zip(*pairs, strict=True))))
        assert rel_err(got, want[m]) <= 1e-4, m


@pytest.mark.parametrize("name,hf", [
    ("vit_l14", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=768)),  # openai/clip-vit-large-patch14
    ("vit_h14", dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"))])  # PickScore_v1
def test_full_size_vision_towers(name, hf):
    """Our vision towers on `meta` have the keys and shapes of transformers' at the released configs, and the config
    read off those shapes is the preset."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    with torch.device("meta"):
        theirs = CLIPVisionModelWithProjection(CLIPVisionConfig(**hf)).state_dict()
    shapes = {k: tuple(v.shape) for k, v in theirs.items()}
    ours = {k: tuple(v.shape) for k, v in build_meta(CLIPVisionModel, PRESETS[name]).state_dict().items()}
    assert ours == shapes
    assert vision_config(shapes, None, name) == PRESETS[name]


def test_command_line_matches_the_library(ref, tmp_path, capsys):
    root, _, _ = ref
    (folder := tmp_path / "images").mkdir()
    for i, (im, p) in enumerate(zip(images(), PROMPTS, strict=True)):
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(p + "\n")
    out = tmp_path / "scores.json"
    assert evaluate.main(["--images", str(folder), "--metric", "clip,pickscore", "--weights", str(root / "clip"),
                          "--weights", str(root / "clip"), "--out", str(out)]) == 0
    written = {r["metric"]: r for r in json.loads(out.read_text())}
    library = evaluate.evaluate(folder, ["clip", "pickscore"], [root / "clip"] * 2)
    for m in ("clip", "pickscore"):
        assert written[m]["per_image"] == pytest.approx(library[m]["per_image"])
        assert written[m]["mean"] == pytest.approx(np.mean(list(library[m]["per_image"].values())))
    assert out.with_suffix(".png").is_file()
    printed = capsys.readouterr().out
    assert "clip" in printed and "pickscore" in printed


def test_bad_input(ref, tmp_path, capsys):
    root, _, _ = ref
    (tmp_path / "ok").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ok" / "a.png")
    (tmp_path / "ok" / "a.txt").write_text("a red circle\n")
    (tmp_path / "uncaptioned").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "uncaptioned" / "a.png")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    (tmp_path / "broken" / "a.txt").write_text("x\n")
    ok = ["--images", str(tmp_path / "ok")]
    cases = [(ok + ["--metric", "clip", "--weights", str(tmp_path / "nope")], "--weights"),
             (ok + ["--metric", "clip"], "--weights"),
             (["--images", str(tmp_path / "uncaptioned"), "--metric", "toy"], "caption"),
             (["--images", str(tmp_path / "broken"), "--metric", "toy"], "decode"),
             (ok + ["--metric", "hpsv2", "--weights", str(root / "clip")], "OpenCLIP"),
             (ok + ["--metric", "clip", "--weights", str(root / "open_clip.safetensors")], "transformers"),
             (ok + ["--metric", "clip", "--weights", str(ROOT / "assets/toy/judge.safetensors")], "not a CLIP"),
             (ok + ["--metric", "fid"], "--metric"),
             (ok + ["--metric", "hpsv3"], "hpsv3")]
    for argv, needle in cases:
        code = evaluate.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (argv, err)


@pytest.mark.skipif(not (ROOT / "assets/toy/distilled/student.safetensors").is_file(), reason="no toy student")
def test_toy_metric_is_the_judge_of_distill(tmp_path):
    """--metric toy on the committed distilled student's samples of the judge's 200 prompts gives the all_correct
    that distill.py's judge computes for it (same prompts, noises and timestep) on the same 8-bit images; on the
    decoded images themselves (distill.py's route) a pixel on a rounding edge may flip a prompt or two."""
    from unet import load_unet, one_step_x0
    from vae import load_vae, to_uint8
    from weights import Checkpoint
    student = ROOT / "assets/toy/distilled/student.safetensors"
    assert evaluate.main(["--ckpt", str(student), "--prompts", "toy", "--n", "200", "--metric", "toy",
                          "--out-dir", str(tmp_path / "s"), "--out", str(tmp_path / "s.json")]) == 0
    got = json.loads((tmp_path / "s.json").read_text())["mean"]
    assert evaluate.main(["--ckpt", str(student), "--prompts", "toy", "--n", "100", "--metric", "toy",  # 100 more
                          "--out-dir", str(tmp_path / "s")]) == 1  # images there than it writes: scored too, so no
    judge = evaluate.RunEvaluator("toy", None, 200, str(student), 8, torch.float32, "cpu")  # distill.py --eval
    unet, vae, t = load_unet(student), load_vae(student, family="sd15"), int(Checkpoint(student).metadata["timestep"])
    as_png = lambda x: torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        floats = judge(lambda noise, ctx: vae.decode(one_step_x0(unet, noise, t, ctx)))
        pngs = judge(lambda noise, ctx: as_png(vae.decode(one_step_x0(unet, noise, t, ctx))))
    assert got == pytest.approx(pngs["all_correct"]) and abs(got - floats["all_correct"]) <= 0.01, (got, floats, pngs)


def test_distill_scores_with_a_metric(ref, tmp_path):
    """distill.py --eval N --eval-metric clip --eval-weights W: the score before, along (--eval-every) and after the
    run goes to log.jsonl, and equals the evaluator's score of the exported student's one-step samples."""
    import subprocess
    import sys
    root, _, _ = ref
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "distill.py"), "--preset", "tiny", "--steps", "2", "--bridge-steps", "2",
            "--eval", "4", "--eval-metric", "clip", "--eval-weights", str(root / "clip"), "--eval-every", "1",
            "--out", str(out)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    curve = [r for r in records if r["stage"] == "judge_step"]
    final = next(r for r in records if r["stage"] == "judge")
    assert [r["step"] for r in curve] == [1] and final["student"]["metric"] == "clip"
    assert {"base", "student"} <= final.keys() and final["student"]["n"] == 4
    from unet import load_unet, one_step_x0
    from vae import load_vae
    student = out / "student.safetensors"
    ev = evaluate.RunEvaluator("clip", root / "clip", 4, str(student), 8, torch.float32, "cpu")
    unet, vae = load_unet(student), load_vae(student, family="sd15")
    with torch.no_grad():
        again = ev(lambda noise, ctx: vae.decode(one_step_x0(unet, noise, 999, ctx)))
    assert again["mean"] == pytest.approx(final["student"]["mean"], rel=1e-4)
    assert "clip, one step" in done.stdout


@pytest.mark.skipif(not (ROOT / "assets/toy/teacher/toy_sd35.safetensors").is_file(), reason="no toy teacher")
def test_a_teacher_through_sample_py(tmp_path):
    """--ckpt of a teacher: sample.py's own run, image by image (seed + i), then the folder's scores."""
    import sample
    toy = ROOT / "assets/toy/teacher"
    assert evaluate.main(["--ckpt", str(toy / "toy_sd35.safetensors"), "--text-encoders", str(toy / "text_encoders"),
                          "--prompts", "toy", "--n", "2", "--seed", "5", "--metric", "toy",
                          "--out-dir", str(tmp_path / "t")]) == 0
    assert sorted(f.name for f in (tmp_path / "t").iterdir()) == ["0000.png", "0000.txt", "0001.png", "0001.txt"]
    prompt = (tmp_path / "t" / "0001.txt").read_text().strip()
    sample.main(["--ckpt", str(toy / "toy_sd35.safetensors"), "--text-encoders", str(toy / "text_encoders"),
                 "--prompt", prompt, "--seed", "6", "--quiet", "--out", str(tmp_path / "direct.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "direct.png")), np.asarray(Image.open(tmp_path / "t" /
                                                                                                  "0001.png")))


def test_convert_pickle(tmp_path):
    """The one-time conversion: a pickled {"state_dict": ...} (DataParallel's module. prefix dropped) -> safetensors
    with the same tensors; a pickle that needs code to load is refused in one line."""
    from safetensors.torch import load_file

    from metrics import convert_pickle
    state = {"module.visual.proj": torch.randn(4, 3), "module.logit_scale": torch.tensor(4.6)}
    torch.save({"state_dict": state}, tmp_path / "hps.pt")
    assert convert_pickle.main([str(tmp_path / "hps.pt"), str(tmp_path / "hps.safetensors")]) == 0
    got = load_file(tmp_path / "hps.safetensors")
    assert got.keys() == {"visual.proj", "logit_scale"} and torch.equal(got["visual.proj"], state["module.visual.proj"])
    torch.save({"state_dict": state, "opt": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)},
               tmp_path / "code.pt")
    assert convert_pickle.main([str(tmp_path / "code.pt"), str(tmp_path / "x.safetensors")]) == 1
    assert not (tmp_path / "x.safetensors").exists()
