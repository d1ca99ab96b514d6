"""distill.py on the tiny preset: the loop (finite losses, what changes and what must not), resume = uninterrupted,
2-process torchrun (DDP, and FSDP for the teacher) = one process with the same global batch, the NaN guard, and
bad input (one `error:` line, non-zero exit, nothing overwritten)."""
import hashlib
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from bridge import Bridge
from teachers import LoRALinear
from vae import load_vae

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--latents", "12", "--held-out", "4", "--bridge-steps", "4", "--fake-steps-per-gen", "2",
        "--sample-every", "3", "--ckpt-every", "3", "--batch-size", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TIMING = {"sec", "peak_gib"}  # logged per iteration; wall-clock, so never compared between runs


def start(args, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 else \
        [sys.executable]
    return subprocess.Popen(launcher + [str(ROOT / "distill.py"), *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def run(args, nproc=1):
    return finish(start(args, nproc))


def records(out, stage="distill"):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["stage"] == stage]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """The uninterrupted run, in this process (so that its models can be inspected afterwards)."""
    out = tmp_path_factory.mktemp("main")
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["distill.py", *FAST, "--steps", "6", "--out", str(out)]
    torch.set_num_threads(1)
    try:
        g = runpy.run_path(str(ROOT / "distill.py"), run_name="__main__")
    finally:
        sys.argv, sys.excepthook = argv, sys.__excepthook__
        torch.set_num_threads(threads)
    return out, g


def test_tiny_loop(main_run):
    out, g = main_run
    logged = records(out)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for r in logged for k, v in r.items() if k.startswith(("loss", "grad")))
    assert [r["step"] for r in logged if "loss_gen" in r] == [1, 3, 5]  # every --fake-steps-per-gen
    assert len(records(out, "bridge")) == 4
    report = records(out, "bridge_eval")[0]
    assert all(math.isfinite(report[k]) and report[k] > 0 for k in ("mse_bridge", "mse_naive", "ms_bridge", "ms_exact"))

    base = load_file(out / "tiny" / "student.safetensors")
    teacher_file = load_file(out / "tiny" / "teacher.safetensors")
    # the student changed, and the exported file holds it with the distilled marking
    student = g["model"].state_dict()
    assert any(not torch.equal(v, base["model.diffusion_model." + k]) for k, v in student.items())
    exported = load_file(out / "student.safetensors")
    assert all(torch.equal(exported["model.diffusion_model." + k], v) for k, v in student.items())
    with safe_open(str(out / "student.safetensors"), "pt") as f:
        assert f.metadata()["distilled"] == "1" and f.metadata()["steps"] == "1"
    # the projector trained in stage 1 (same seed, same constructor = its init), and was saved
    torch.manual_seed(0)
    init = Bridge(load_vae(out / "tiny" / "student.safetensors", family="sd15"), 16, 2, 32, 1).state_dict()
    trained = g["bridge"].state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)
    assert all(torch.equal(v, trained[k]) for k, v in load_file(out / "bridge.safetensors").items())
    # the LoRA (fake score) trained: its up-projections start at zero
    loras = [m for m in g["raw_teacher"].modules() if isinstance(m, LoRALinear)]
    assert loras and any(m.lora_up.weight.abs().max() > 0 for m in loras)
    # frozen: teacher base weights, both VAEs (the student's decoder is the Bridge's) bitwise equal to the files
    teacher = {k: v for k, v in g["raw_teacher"].state_dict().items() if ".lora_" not in k}
    assert teacher.keys() == {k[22:] for k in teacher_file if k.startswith("model.diffusion_model.")}
    assert all(torch.equal(v, teacher_file["model.diffusion_model." + k]) for k, v in teacher.items())
    for vae, file, name in ((g["tvae"], teacher_file, "teacher"), (g["svae"], base, "student")):
        assert all(torch.equal(v, file["first_stage_model." + k]) for k, v in vae.state_dict().items()), name
    assert g["bridge"].vae is g["svae"]
    for name in ("grid_000003.png", "grid_000006.png", "checkpoint.safetensors", "student_ema.safetensors"):
        assert (out / name).is_file(), name
    # 4 prompts; student and EMA rows; 64 px cells enlarged 3x (nearest), a 40 px caption strip beneath
    assert Image.open(out / "grid_000006.png").size == (4 * 3 * 64, 2 * 3 * 64 + 40)


def test_resume_reproduces_the_uninterrupted_run(main_run, tmp_path):
    full, _ = main_run
    out = tmp_path / "b"
    rc, _, err = run([*FAST, "--steps", "3", "--out", out])
    assert rc == 0, err
    with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "3"
    out = out.rename(tmp_path / "moved")  # a run folder moved as a whole resumes (paths in it compared relative to it)
    rc, _, err = run([*FAST, "--steps", "6", "--out", out, "--resume"])
    assert rc == 0, err
    a, b = records(full), records(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in set(ra) - {"stage"} - TIMING:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def explicit(main, out, *extra):
    """The tiny models by path (no preset), stage 1 skipped with the main run's projector and text cache."""
    return ["--student", main / "tiny" / "student.safetensors", "--teacher", main / "tiny" / "teacher.safetensors",
            "--bridge", main / "bridge.safetensors", "--text-cache", main / "text_cache.safetensors",
            "--student-res", "64", "--teacher-res", "128", "--bridge-width", "32", "--bridge-depth", "1",
            "--lora-rank", "4", "--lr", "1e-4", "--fake-lr", "1e-3", "--ema", "0", "--out", out, *extra]


def real_images(main, folder, n=2):
    """n random images captioned with the tiny prompts: --real-images for DMD2's GAN term."""
    folder.mkdir()
    for i, caption in enumerate((main / "tiny" / "prompts.txt").read_text().splitlines()[:n]):
        pixels = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption + "\n")


def test_two_processes_match_one(main_run, tmp_path):
    main, _ = main_run
    # stage 1 too (2 steps), so that it is data-parallel-checked as well; and DMD2's GAN term (its classifier is not
    # DDP-wrapped: its grads are averaged by hooks; its generator pass runs through the raw, possibly sharded teacher)
    real_images(main, tmp_path / "real")

    def args(name, batch, *extra):
        a = explicit(main, tmp_path / name, "--steps", "1", "--batch-size", batch, "--bridge-batch", batch,
                     "--latents", "6", "--held-out", "2", "--bridge-steps", "2", "--gan-weight", "1",
                     "--real-images", tmp_path / "real", *extra)
        return [x for x in a if x not in ("--bridge", main / "bridge.safetensors")]

    procs = {"one": start(args("one", 2)), "ddp": start(args("ddp", 1), nproc=2),
             "fsdp": start(args("fsdp", 1, "--fsdp"), nproc=2)}
    results = {k: finish(p) for k, p in procs.items()}
    for k, (rc, _, err) in results.items():
        assert rc == 0, (k, err[-3000:])
    base = load_file(main / "tiny" / "student.safetensors")
    one = load_file(tmp_path / "one" / "student.safetensors")
    keys = [k for k in base if k.startswith("model.diffusion_model.")]
    update = torch.cat([(one[k] - base[k]).flatten() for k in keys])
    assert update.abs().max() > 0.5e-4  # one AdamW step at lr 1e-4 moved the student
    for name in ("ddp", "fsdp"):
        other = load_file(tmp_path / name / "student.safetensors")
        diff = torch.cat([(other[k] - one[k]).flatten() for k in keys])
        # AdamW's first step is lr g / (|g| + eps): where |g| is near eps (1e-8) float noise sets the step's size
        # (a few dozen such elements, their steps up to 0.6 lr apart). So: the whole update
        # in norm, and every element whose step is a full one (> 0.9 lr: 70% of them) to 5% of lr
        assert (diff.norm() / update.norm()).item() < 1e-3, name
        assert diff[update.abs() > 0.9e-4].abs().max().item() < 0.05 * 1e-4, name
        # the logged losses and gradient norms are the global batch's (all-reduced), as one process logs them
        (ra,), (rb,) = records(tmp_path / "one"), records(tmp_path / name)
        pa, pb = load_file(tmp_path / "one" / "bridge.safetensors"), load_file(tmp_path / name / "bridge.safetensors")
        d = torch.cat([(pa[k] - pb[k]).flatten() for k in pa])  # stage 1's projector (2 steps at lr 1e-3)
        # the same eps effect as above (measured: 31 of 16k elements > 2% of lr apart, at most 14%), so: the norm, and
        # all but 0.5% of the elements to 5% of lr, and none by a whole step
        assert d.norm() < 1e-4 * torch.cat([v.flatten() for v in pa.values()]).norm(), name
        assert (d.abs() > 0.05 * 1e-3).float().mean() < 0.005 and d.abs().max() < 1e-3, name
        assert ra.keys() == rb.keys()
        for k in set(ra) - {"stage"} - TIMING:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4), (name, k)


def test_images_then_nan_guard(main_run, tmp_path):
    """Stage 1 from a folder of images; then a fake-score learning rate of 1e30 blows the LoRA up: the guard stops
    the run with one error line and the checkpoint on disk is the last good (finite) one."""
    main, _ = main_run
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(6):  # non-square, to exercise the centre crop
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    out = tmp_path / "o"
    args = explicit(main, out, "--steps", "6", "--images", tmp_path / "imgs", "--latents", "6", "--held-out", "2",
                    "--bridge-steps", "2", "--bridge-batch", "2", "--fake-lr", "1e30", "--ckpt-every", "1",
                    "--fake-steps-per-gen", "1")
    args.remove("--bridge")
    args.remove(main / "bridge.safetensors")
    rc, stdout, err = run(args)
    assert "reconstruction MSE" in stdout and "ms/sample" in stdout, err[-2000:]
    assert load_file(out / "bridge_targets.safetensors")["z_s"].shape == (6, 4, 8, 8)
    assert rc != 0 and err.strip().splitlines()[-1].startswith("error: non-finite"), err[-2000:]
    with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:
        step = int(f.metadata()["step"])
    ck = load_file(out / "checkpoint.safetensors")
    assert any(k.startswith("opt.student.") for k in ck) and any(k.startswith("opt.lora.") for k in ck)
    assert 1 <= step < 6 and all(torch.isfinite(v).all() for v in ck.values() if v.is_floating_point())
    assert not (out / "student.safetensors").exists()


def test_gan_term(main_run, tmp_path):
    """DMD2's GAN term: a classifier on the fake score's tokens, real images captioned with lines of the prompts.
    Its losses are logged, it is checkpointed, and it learns from its own loss only: with --gan-critic-weight 0 it
    ends bit-identical whatever the generator's GAN weight (which does change the student); with weight 1 it moves.
    Resumed, the run repeats the uninterrupted one. A caption that is not one of the prompts is refused, naming the
    file."""
    main, _ = main_run
    prompts = (main / "tiny" / "prompts.txt").read_text().splitlines()
    rng = np.random.default_rng(0)
    for folder, captions in (("real", prompts[:3]), ("stray", ["not one of the prompts"])):
        (tmp_path / folder).mkdir()
        for i, caption in enumerate(captions):
            Image.fromarray(rng.integers(0, 255, (70, 60, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
            (tmp_path / folder / f"{i}.txt").write_text(caption + "\n")
    gan = lambda name, real, gw, cw, steps="2", *extra: start(explicit(
        main, tmp_path / name, "--steps", steps, "--fake-steps-per-gen", "1", "--real-images", tmp_path / real,
        "--gan-weight", gw, "--gan-critic-weight", cw, "--ckpt-every", "2", *extra))
    procs = {"a": gan("a", "real", "0.01", "0"), "b": gan("b", "real", "1", "0"), "c": gan("c", "real", "1", "1"),
             "stray": gan("stray", "stray", "0.01", "1"), "c4": gan("c4", "real", "1", "1", "4")}
    results = {name: finish(proc) for name, proc in procs.items()}
    rc, _, err = finish(gan("c", "real", "1", "1", "4", "--resume"))  # run c, resumed to 4 steps = c4
    assert rc == 0, err[-2000:]
    for ra, rb in zip(records(tmp_path / "c4"), records(tmp_path / "c"), strict=True):
        assert ra.keys() == rb.keys()
        for k in set(ra) - {"stage"} - TIMING:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    results.pop("c4")
    rc, _, err = results.pop("stray")
    assert rc != 0 and err.strip().startswith("error: --real-images") and "0.png" in err, err[-2000:]
    parts = {}
    for name, (rc, _, err) in results.items():
        assert rc == 0, (name, err[-2000:])
        logged = records(tmp_path / name)
        assert all(math.isfinite(r["loss_gan"]) and math.isfinite(r["loss_critic"]) for r in logged), logged
        ck = load_file(tmp_path / name / "checkpoint.safetensors")
        parts[name] = {k: v for k, v in ck.items() if k.startswith(("critic.", "student."))}
    critic = lambda name: {k: v for k, v in parts[name].items() if k.startswith("critic.")}
    assert critic("a") and all(torch.equal(v, critic("b")[k]) for k, v in critic("a").items())
    assert any(not torch.equal(v, critic("c")[k]) for k, v in critic("a").items())
    assert any(not torch.equal(v, parts["b"][k]) for k, v in parts["a"].items() if k.startswith("student."))


def test_compile_matches_eager(main_run, tmp_path):
    """--compile (the teacher compiled block by block) with the GAN term (its classifier reads a compiled block's
    output through a forward hook): every logged loss of 2 iterations equals eager's."""
    main, _ = main_run
    real_images(main, tmp_path / "real")
    both = lambda name, *extra: start(explicit(
        main, tmp_path / name, "--steps", "2", "--fake-steps-per-gen", "1", "--real-images", tmp_path / "real",
        "--gan-weight", "1", *extra))
    procs = {"eager": both("eager"), "compiled": both("compiled", "--compile")}
    for name, proc in procs.items():
        rc, _, err = finish(proc)
        assert rc == 0, (name, err[-2000:])
    eager, compiled = records(tmp_path / "eager"), records(tmp_path / "compiled")
    assert len(eager) == 2 and {"loss_gan", "loss_critic"} <= eager[0].keys()
    for ra, rb in zip(eager, compiled, strict=True):
        losses = [k for k in ra if k.startswith("loss_")]
        assert rb.keys() == ra.keys() and losses
        for k in losses:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k, ra[k], rb[k])


def in_process(args, capsys):
    """(exit code, stderr) of the script run here: the quick way for most bad-input cases (no torch import);
    an escaping exception goes to the script's own sys.excepthook, as the interpreter would send it."""
    argv, sys.argv = sys.argv, ["distill.py", *map(str, args)]
    capsys.readouterr()
    try:
        runpy.run_path(str(ROOT / "distill.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    except Exception as e:
        sys.excepthook(type(e), e, e.__traceback__)
        code = 1
    finally:
        sys.argv, sys.excepthook = argv, sys.__excepthook__
    return code, capsys.readouterr().err


def test_bad_input(main_run, tmp_path, capsys):
    main, _ = main_run
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "file").write_text("x")
    tiny = main / "tiny"
    before = digest(main / "checkpoint.safetensors")
    (tmp_path / "latin1.txt").write_bytes("un caf\xe9 rouge\n".encode("latin-1"))
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "model.ckpt")
    bad = {"j": (main / "checkpoint.safetensors").read_bytes()[:20000], "k": b"not a checkpoint\n",
           "l": (tiny / "clip_l.safetensors").read_bytes()}  # cut short; a text file; another file of tensors
    for d, content in bad.items():
        (tmp_path / d).mkdir()
        (tmp_path / d / "checkpoint.safetensors").write_bytes(content)
    cases = {  # name: (arguments, a word the message must hold, run as a real process?)
        "teacher is SD 1.5": (["--student", tiny / "student.safetensors", "--teacher", tiny / "student.safetensors",
                               "--out", tmp_path / "a"], "SD3/FLUX", True),
        "resume, other config": ([*FAST, "--out", main, "--resume", "--lora-rank", "8"], "configuration", True),
        "student is a teacher": (["--student", tiny / "teacher.safetensors", "--teacher", tiny / "teacher.safetensors",
                                  "--out", tmp_path / "b"], "SD 1.5", False),
        "empty prompts": (["--prompts", tmp_path / "empty.txt", "--out", tmp_path / "c"], "no prompts", False),
        "missing prompts": (["--prompts", tmp_path / "nope.txt", "--out", tmp_path / "d"], "not found", False),
        "unwritable out": (["--out", tmp_path / "file" / "sub"], "cannot write", False),
        "one model only": (["--student", tiny / "student.safetensors", "--out", tmp_path / "e"], "--teacher", False),
        "fresh run, old checkpoint": ([*FAST, "--out", main], "--resume", False),
        "bad flag value": (["--batch-size", "0", "--out", tmp_path / "f"], "--batch-size", False),
        "identity, 16-channel teacher": ([*FAST, "--bridge-kind", "identity", "--out", tmp_path / "g"],
                                         "student's latent space", False),
        "GAN without real images": ([*FAST, "--gan-weight", "0.01", "--out", tmp_path / "h"], "--real-images", False),
        "GAN block": ([*FAST, "--gan-weight", "0.01", "--gan-block", "2", "--out", tmp_path / "i"], "fraction", False),
        "prompts not UTF-8": ([*FAST, "--prompts", tmp_path / "latin1.txt", "--out", tmp_path / "m"], "UTF-8", False),
        "zero steps": ([*FAST, "--steps", "0", "--out", tmp_path / "n"], "--steps", False),
        "a pickle": (["--student", tmp_path / "model.ckpt", "--teacher", tiny / "teacher.safetensors",
                      "--out", tmp_path / "o"], "pickle", False),
        "resume, truncated": ([*FAST, "--out", tmp_path / "j", "--resume"], "truncated", True),
        "truncated, no --resume": ([*FAST, "--out", tmp_path / "j"], "truncated", False),
        "resume, a text file": ([*FAST, "--out", tmp_path / "k", "--resume"], "not a safetensors", False),
        "resume, not a checkpoint": ([*FAST, "--out", tmp_path / "l", "--resume"], "not a distill.py checkpoint",
                                     False),
    }
    procs = {name: start(args) for name, (args, _, real) in cases.items() if real}
    results = {name: in_process(args, capsys) for name, (args, _, real) in cases.items() if not real}
    results |= {name: finish(proc)[::2] for name, proc in procs.items()}
    for name, (rc, err) in results.items():
        assert rc != 0, name
        assert err.strip().startswith("error: ") and "\n" not in err.strip(), (name, err[-2000:])
        assert cases[name][1] in err, (name, err)
    for d in "abcdefhimno":  # nothing written
        assert not (tmp_path / d).exists() or not any((tmp_path / d).iterdir()), d
    for d, content in bad.items():  # a bad checkpoint is reported, never replaced; the message says how to start over
        assert [f.name for f in (tmp_path / d).iterdir()] == ["checkpoint.safetensors"], d
        assert (tmp_path / d / "checkpoint.safetensors").read_bytes() == content, d
    assert "delete it" in results["resume, truncated"][1]
    assert (tmp_path / "file").read_text() == "x"
    assert digest(main / "checkpoint.safetensors") == before


def test_preset_reruns_over_its_own_finished_run(main_run):
    """The same preset command again into the same folder: a finished run with the same settings is run again from
    the start (its log restarts, the results repeat); anything else there stays refused (test_bad_input)."""
    main, _ = main_run
    before = records(main)
    rc, out, err = run([*FAST, "--steps", "6", "--out", main])
    assert rc == 0 and "running it again" in out, err[-2000:]
    after = records(main)
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6] and len(records(main, "bridge")) == 4
    for ra, rb in zip(before, after, strict=True):
        for k in set(ra) - {"stage"} - TIMING:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def test_bridge_kinds(main_run, tmp_path):
    """The ablations' maps into teacher space (--bridge-kind): naive is trained in stage 1 beside the Bridge and saved;
    exact skips stage 1 and back-propagates through decode-resize-encode. And the Bridge with the pixel tap
    (--bridge-tap pixels): trained in stage 1, its strided convs saved. All train the student. A pixel-tap projector
    given to a feature-tap run is refused, naming the keys."""
    main, _ = main_run
    flags = {"naive": ["--bridge-kind", "naive"], "exact": ["--bridge-kind", "exact"],
             "pixels": ["--bridge-tap", "pixels"]}
    procs = {kind: start([*FAST, "--steps", "2", *f, "--out", tmp_path / kind]) for kind, f in flags.items()}
    base = load_file(main / "tiny" / "student.safetensors")
    for kind, proc in procs.items():
        rc, _, err = finish(proc)
        assert rc == 0, err[-2000:]
        logged = records(tmp_path / kind)
        assert [r["step"] for r in logged] == [1, 2] and all(math.isfinite(r["loss_gen"]) for r in logged[:1])
        assert len(records(tmp_path / kind, "bridge")) == (0 if kind == "exact" else 4)
        assert (tmp_path / kind / "naive.safetensors").exists() == (kind != "exact")
        after = load_file(tmp_path / kind / "student.safetensors")
        changed = [k for k in base if k.startswith("model.diffusion_model.") and not torch.equal(base[k], after[k])]
        assert changed, kind
    assert any(k.startswith("down.") for k in load_file(tmp_path / "pixels" / "bridge.safetensors"))
    rc, _, err = run([*FAST, "--steps", "1", "--bridge", tmp_path / "pixels" / "bridge.safetensors",
                      "--out", tmp_path / "mismatch"])
    assert rc != 0 and "bridge.safetensors" in err and "down." in err, err[-2000:]


def test_gradient_checkpointing_changes_nothing(main_run, tmp_path):
    """--grad-ckpt (the default on CUDA) recomputes the teacher's, UNet's and decoder's blocks in the backward: the
    same losses as the main run (which has it off), stage 1's attention-fidelity backward included."""
    main, _ = main_run
    rc, _, err = run([*FAST, "--steps", "2", "--grad-ckpt", "--out", tmp_path])
    assert rc == 0, err[-2000:]
    for stage, keys in (("bridge", ("rec", "attn", "naive")), ("distill", ("loss_gen", "loss_fake"))):
        got, want = records(tmp_path, stage), records(main, stage)[:len(records(tmp_path, stage))]
        assert len(got) == (4 if stage == "bridge" else 2)
        for g, w in zip(got, want, strict=True):
            for k in (k for k in keys if k in w):
                assert math.isclose(g[k], w[k], rel_tol=1e-4, abs_tol=1e-7), (stage, g["step"], k, g[k], w[k])


def test_ctrl_c_says_how_to_resume_and_no_temp_file_stays(main_run, tmp_path):
    """Ctrl-C (SIGINT) during a run: one line naming the last checkpoint and the command that continues from it.
    Temp files of an interrupted save (NAME.*.tmp, as weights.write_atomic names them) are removed by the next run."""
    out = tmp_path / "run"
    proc = start([*FAST, "--steps", "1000", "--ckpt-every", "1", "--out", out])
    deadline = time.time() + 240
    while not (out / "checkpoint.safetensors").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc)
    lines = err.strip().splitlines()
    assert rc != 0 and "Traceback" not in err and lines[-1].startswith("interrupted: "), err[-2000:]
    assert str(out / "checkpoint.safetensors") in lines[-1] and lines[-1].endswith("--resume"), lines[-1]
    (out / "checkpoint.safetensors.k2x9.tmp").write_bytes(b"half a save")  # what a kill -9 mid-save leaves
    (out / "grid_000003.png.q7.tmp").write_bytes(b"half a grid")
    rc, _, err = run([*FAST, "--steps", "3", "--out", out, "--resume"])
    assert rc == 0, err[-2000:]
    assert not list(out.glob("*.tmp")) and (out / "student.safetensors").is_file()
