"""The method works, and the test can tell: from the committed toy models (assets/toy), a short stage-2 run of
distill.py --preset toy raises the one-step student's judge score by at least MARGIN over the base student; the same
run with the DMD gradient's sign flipped, or with the student's latent reaching the Bridge detached (no gradient into
the student), does NOT reach the margin.

The score is the judge's accuracy on the background colour (METRIC): the committed toy teacher gets it right (0.985)
and the base student's one step, as the generator starts (t = 800, no CFG), does not (0.29). Fully satisfied moves too
little in 60 iterations to tell a gain from noise (toy/LOG.md#the-method-transfers: 0.015 -> 0.122 after 500).

Stage 1 is not repeated here: the runs start from the toy preset's trained projector (assets/toy/distilled/
bridge.safetensors, what `python distill.py` wrote) and share one text cache, so the three runs cost only stage 2."""
import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bridge
import toy.world as toy
from text.encoders import load_clip
from text.tokenizer import find_clip_tokenizer
from unet import load_unet, one_step_x0
from vae import load_vae

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "assets" / "toy"
PROJECTOR = TOY / "distilled" / "bridge.safetensors"
pytestmark = pytest.mark.skipif(not (TOY / "teacher" / "toy_sd35.safetensors").is_file() or not PROJECTOR.is_file(),
                                reason="the toy models (toy/train.py) and the toy preset's projector are not there")
GEN_T = 800  # the generator's timestep of the calibration below (pinned in RUN): the base student is judged at it
N_EVAL = 200  # fixed prompts (seed 777, those of assets/toy/scores.json) and noises (seed 0)
# Batch 8, a constant --lr 2e-4 (no --warmdown) and t = 800: the settings calibrated below, not the toy preset's
# (batch 4, lr 1e-4 falling to 0 over the second half, t = 600), which were not calibrated for 60 iterations.
RUN = ["--steps", "60", "--lr", "2e-4", "--batch-size", "8", "--warmdown", "0", "--fake-steps-per-gen", "1", "--ema",
       "0", "--gen-timestep", str(GEN_T), "--eval", "0", "--ckpt-every", "1000", "--sample-every", "1000"]
# The pre-stated margin on the METRIC gain (after - before, on N_EVAL prompts), set before calibrating. Calibration
# (this RUN, the models of the toy table, the toy preset's pixel-tap projector and DMD noise levels U(0.4, 0.85)):
# the correct run gains 0.485 (0.29 -> 0.775; fully satisfied 0.015 -> 0.06-0.07), the flipped sign -0.26 (-> 0.03);
# a detached Bridge gains exactly 0 (no gradient reaches the student); 30-60 s a run (the projectors of 2d64e6d and
# a2dd80c; with ded7678's, 0.495, -0.26, 0). With the feature tap's projector it was 0.665, -0.135, 0; at the preset's
# lr 5e-5 that run gained 0.29, too close to the margin for a test.
# (Calibrated first at DMD noise levels shift 12 over U(0.02, 0.98): 0.675, -0.17, 0.)
MARGIN = 0.20
METRIC = "background"


@torch.no_grad()
def judge(student) -> dict:
    """The judge's scores of a student's one-step samples (x0 from pure noise told t = GEN_T) on the fixed set."""
    rng = np.random.default_rng(777)
    prompts = [toy.caption(s, rng) for s in toy.sample_scenes(N_EVAL, 777)]
    unet, vae, clip = load_unet(student), load_vae(student, family="sd15"), load_clip(student)
    context = clip(find_clip_tokenizer(student).encode(prompts)).last_hidden_state
    noise = torch.randn((N_EVAL, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    images = torch.cat([vae.decode(one_step_x0(unet, noise[i:i + 50], GEN_T, context[i:i + 50]))
                        for i in range(0, N_EVAL, 50)])
    return toy.load_judge().score(prompts, images)


def distill(out: Path, *extra) -> Path:
    """distill.py in this process (so that a monkeypatch reaches it); returns the exported student."""
    argv, sys.argv = sys.argv, ["distill.py", "--preset", "toy", "--out", str(out), *map(str, extra)]
    try:
        runpy.run_path(str(ROOT / "distill.py"), run_name="__main__")
    finally:
        sys.argv, sys.excepthook = argv, sys.__excepthook__
    return out / "student.safetensors"


@pytest.fixture(scope="module")
def base():
    return judge(TOY / "student" / "toy_sd15.safetensors")


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """A one-step toy run: its training prompts and text cache serve the runs below; its export is checked."""
    out = tmp_path_factory.mktemp("shared")
    distill(out, "--bridge", PROJECTOR, "--steps", "1", "--eval", "0", "--gen-timestep", "750")  # not a default
    return out


@pytest.fixture(scope="module")
def shared(one_step_run):
    out = one_step_run
    return ["--bridge", PROJECTOR, "--prompts", out / "prompts.txt", "--text-cache", out / "text_cache.safetensors"]


def break_dmd_sign(monkeypatch):
    loss = bridge.dmd_generator_loss
    monkeypatch.setattr(bridge, "dmd_generator_loss", lambda *a: -loss(*a))


def detach_bridge_input(monkeypatch):
    forward = bridge.Bridge.forward  # the student's latent reaches the Bridge detached; the loss still backpropagates
    monkeypatch.setattr(bridge.Bridge, "forward", lambda self, z: forward(self, z.detach()).requires_grad_())


@pytest.mark.parametrize("method", ["correct", "dmd_sign_flipped", "bridge_detached"])
def test_distillation_gain(method, base, shared, tmp_path, monkeypatch):
    {"correct": lambda m: None, "dmd_sign_flipped": break_dmd_sign, "bridge_detached": detach_bridge_input}[method](
        monkeypatch)
    after = judge(distill(tmp_path, *shared, *RUN))
    gain = after[METRIC] - base[METRIC]
    print(json.dumps({"method": method, "before": base, "after": after, "gain": gain}))
    if method == "correct":
        assert gain >= MARGIN, (base, after)
    else:
        assert gain < MARGIN, (base, after)


def test_export_samples_like_the_run(one_step_run, tmp_path):
    """export.py on the run's checkpoint: the single file and the diffusers unet/ carry the one-step timestep (the
    run's, 750) and resolution (64 px), the student's own tokenizer.json comes along, and sample.py draws the same
    pixels from the export as from the run's student.safetensors; the PNG records the timestep. Usual permissions;
    no temp file stays."""
    from PIL import Image

    import export
    import sample
    from weights import Checkpoint
    run = one_step_run
    assert export.main(["--student", str(run / "checkpoint.safetensors"), "--out", str(tmp_path / "x")]) == 0
    meta = Checkpoint(tmp_path / "x" / "student.safetensors").metadata
    assert (meta["timestep"], meta["resolution"], meta["distilled"]) == ("750", "64", "1")
    assert Checkpoint(tmp_path / "x" / "unet").metadata["timestep"] == "750"
    assert json.loads((tmp_path / "x" / "unet" / "config.json").read_text())["sample_size"] == 8
    assert (tmp_path / "x" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    (tmp_path / "run.png.x1y2.tmp").write_bytes(b"what a killed write leaves")  # removed by the next write
    pixels = {}
    for name, ckpt in (("run", run / "student.safetensors"), ("export", tmp_path / "x" / "student.safetensors")):
        png = tmp_path / f"{name}.png"
        assert sample.main(["--ckpt", str(ckpt), "--prompt", "a large red circle on a blue background, center",
                            "--seed", "3", "--out", str(png), "--quiet"]) == 0
        image = Image.open(png)
        assert json.loads(image.info["parameters"])["timestep"] == 750 and image.size == (64, 64)
        pixels[name] = np.asarray(image)
    assert np.array_equal(pixels["run"], pixels["export"]) and not list(tmp_path.glob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "run.png", tmp_path / "x" / "unet" / "config.json", tmp_path / "x" / "student.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
