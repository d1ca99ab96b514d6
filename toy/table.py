"""The toy-world table (README, toy/LOG.md#the-full-toy-table): the judge's scores of every model and ablation,
over several seeds, with spread.

Rows (200 fixed prompts of the judge, toy.models.eval_prompts; mean +- std over --seeds):
  base student, 1 step / 25 DDIM steps (CFG 7.5)    sampling noise varies with the seed
  teacher, 28 Euler steps (CFG 5)                   the same; also the same-space reference teacher
  teacher through the student VAE                   the ceiling of a student that draws the teacher's images: those
                                                    images at the student's size, encoded and decoded by the student
                                                    VAE, or rendered by its decoder from the best latent for each
  distilled student, 1 step                         `python distill.py --preset toy --seed S`, both stages (the
                                                    Bridge on the decoded image); the judge's one-step score at the
                                                    end of the run (distill.py --eval); also told t = 800 (the
                                                    default before), and at the earlier stage-2 settings
                                                    (STAGE2_500: 500 iterations, and 2000)
  ablations, 1 step: no attention fidelity (--attn-weight 0); the Bridge on a decoder feature map (--bridge-tap
  features, 150 stage-1 steps: the toy preset before the pixel tap), with and without attention fidelity; naive Bridge
  (--bridge-kind naive: bilinear resize + 1x1 conv), exact path (--bridge-kind exact: back-propagation through
  decode-resize-encode), same-space distillation (--bridge-kind identity from the same-space teacher: no Bridge needed,
  the reference point); and a variant: the exact path for 2000 iterations instead of 500 (--steps 2000; ~40 minutes a
  run). The ablation rows keep the stage-2 settings they were measured with (STAGE2_500), the rows after the naive
  Bridge's also the feature tap's (FEATURE_TAP), so that they are the same runs as before the preset changed. Two
  retired variant rows (RETIRED) stay in the table with their numbers: their flags left distill.py (DMD1's regression,
  the projector fine-tuned in stage 2; neither helped, see toy/LOG.md); they run at the commit named there.
Wall time: sampling and judging the 200 prompts (model rows), or the whole distill.py run (both stages and its judging
before and after) for distilled rows. Every run is a subprocess on one CPU thread; --jobs run at once.

    python -m toy.table                     # everything (3 seeds; ~5 hours on 2 cores)
    python -m toy.table --rows distilled --seeds 0   # one row, one seed
Each run's result lands in out/table/ROW_sSEED/result.json; toy/results/table.json keeps its rows and seeds and takes
each finished run's in place of its own, and the markdown table is printed from it (--collect: just that).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "table"
TABLE = ROOT / "toy" / "results" / "table.json"
SAME_SPACE = ROOT / "assets" / "toy" / "same_space"
# the toy preset's stage 2 before the 10-minute default (toy/LOG.md#ten-minutes): the rows measured then keep it
STAGE2_500 = ["--batch-size", "8", "--fake-steps-per-gen", "2", "--steps", "500", "--lr", "5e-5", "--warmdown", "0",
              "--gen-timestep", "800"]
FEATURE_TAP = [*STAGE2_500, "--bridge-tap", "features", "--bridge-steps", "150"]  # the toy preset before the pixel tap
DISTILL_ROWS = {  # row -> distill.py flags (on top of --preset toy)
    "distilled": [],
    "distilled_t800": ["--gen-timestep", "800", "--steps", "1200", "--eval-every", "400"],  # the default at 2d64e6d
    "distilled_500": STAGE2_500,
    "distilled_2000": [*STAGE2_500, "--steps", "2000"],
    "no_attention_fidelity": [*STAGE2_500, "--attn-weight", "0"],
    "naive_bridge": [*STAGE2_500, "--bridge-kind", "naive"],
    "feature_tap": FEATURE_TAP,
    "feature_tap_no_attention_fidelity": [*FEATURE_TAP, "--attn-weight", "0"],
    "exact_path": [*FEATURE_TAP, "--bridge-kind", "exact"],
    "exact_path_2000": [*FEATURE_TAP, "--bridge-kind", "exact", "--steps", "2000"],
    "same_space": [*FEATURE_TAP, "--bridge-kind", "identity", "--teacher", str(SAME_SPACE / "toy_sd35_4ch.safetensors"),
                   "--text-encoders", str(SAME_SPACE / "text_encoders"), "--teacher-res", "64"],
}
# rows whose flags left distill.py: `git checkout COMMIT && python toy_table.py --rows ROW` reruns them
RETIRED = {"regression": "9592350", "bridge_finetune": "9592350"}
MODEL_ROWS = ("student_1step", "student_ddim25", "teacher_euler28", "same_space_teacher_euler28",
              "teacher_via_student_vae", "teacher_via_student_decoder")
LABELS = {"student_1step": "base student, 1 step (t = 999, CFG 7.5)", "student_ddim25": "base student, 25 DDIM steps",
          "teacher_euler28": "teacher (16 ch, 128 px), 28 Euler steps",
          "same_space_teacher_euler28": "same-space teacher (4 ch, 64 px), 28 Euler steps",
          "teacher_via_student_vae": "ceiling: the teacher's images, student VAE encode + decode",
          "teacher_via_student_decoder": "ceiling: the teacher's images, student decoder from the best latent",
          "distilled": "**distilled student, 1 step (Bridge)** (t = 600, 1100 iterations; `python distill.py`)",
          "distilled_t800": "distilled student, told t = 800, 1200 iterations (the default at 2d64e6d)",
          "distilled_500": "distilled student, the earlier 500 iterations (batch 8, 2 fake updates per student update)",
          "distilled_2000": "**distilled student, 2000 of the earlier iterations (4x), 1 step (Bridge)**",
          "no_attention_fidelity": "ablation: no attention fidelity, 1 step",
          "feature_tap": "ablation: the Bridge on a decoder feature map (`--bridge-tap features`), 1 step",
          "feature_tap_no_attention_fidelity": "ablation: feature tap, no attention fidelity, 1 step",
          "naive_bridge": "ablation: naive Bridge (resize + 1x1), 1 step",
          "exact_path": "ablation: exact decode-resize-encode path, 1 step",
          "exact_path_2000": "variant: exact path, 2000 iterations (4x), 1 step",
          "regression": "variant: feature tap + DMD1's regression onto teacher samples (--reg-weight 20), 1 step",
          "bridge_finetune": "variant: feature tap + projector fine-tuned on the current samples (--bridge-lr 1e-3), "
                             "1 step",
          "same_space": "reference: same-space distillation, 1 step"}
METRICS = ("all_correct", "shape", "color", "background", "position", "size", "fd")


def model_row(row: str, seed: int) -> dict:
    import toy.models as M
    import toy.world as toy
    torch.set_num_threads(1)
    prompts, t0 = M.eval_prompts(), time.time()
    if row.startswith("student"):
        images = M.student_images(prompts, steps=1 if row == "student_1step" else 25, seed=seed)
    else:
        parts = M.load_same_space_teacher() if row.startswith("same_space") else None
        images = M.teacher_images(prompts, seed=seed, parts=parts)
        if row.startswith("teacher_via"):
            images = through_student_vae(images, best_latent=row.endswith("decoder"))
    return toy.load_judge().score(prompts, images) | {"seconds": time.time() - t0}


def through_student_vae(images: torch.Tensor, best_latent: bool, steps: int = 40, batch: int = 50) -> torch.Tensor:
    """The teacher's images as a student could at best draw them: resized to the student's size, then encoded and
    decoded by the student VAE; or (best_latent) decoded from the latent that the decoder renders closest to them
    (Adam on the L1 error, `steps` steps from the encoder's latent). A one-step student outputs latents, so only its
    decoder bounds it; the second is that bound, the first what the encoder finds."""
    import toy.models as M
    import vae as V
    vae = V.load_vae(M.STUDENT, family="sd15").requires_grad_(False)  # the VAE alone, as load_toy_student reads it
    target = F.interpolate(images, (M.STUDENT_RES,) * 2, mode="bilinear", antialias=True)
    out = []
    for part in target.split(batch):
        with torch.no_grad():
            z = vae.encode(part)
        if best_latent:
            z.requires_grad_(True)
            opt = torch.optim.Adam([z], lr=0.05)
            for _ in range(steps):
                loss = (vae.decode(z) - part).abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            out.append(vae.decode(z).clamp(-1, 1))
    return torch.cat(out)


def distill_row(row: str, seed: int) -> dict:
    out = OUT / f"{row}_s{seed}"
    cmd = [sys.executable, "distill.py", "--preset", "toy", "--seed", str(seed), "--out", str(out),
           *DISTILL_ROWS[row]]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    t0 = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    judged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    judged = [r for r in judged if r.get("stage") == "judge"][-1]
    return judged["student"] | {"seconds": time.time() - t0, "base": judged["base"]["all_correct"],
                                "ema": judged["ema"]["all_correct"] if "ema" in judged else None}


def run(job):
    row, seed = job
    path = OUT / f"{row}_s{seed}" / "result.json"
    if row in MODEL_ROWS:  # in a subprocess too: one thread each, in parallel
        cmd = [sys.executable, "-m", "toy.table", "--one", row, str(seed)]
        done = subprocess.run(cmd, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.splitlines()[-1])
    else:
        result = distill_row(row, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result) + "\n")
    print(f"{row} seed {seed}: all_correct {result['all_correct']:.3f} ({result['seconds']:.0f}s)", flush=True)
    return row, seed, result


def collect() -> dict:
    """The committed table (toy/results/table.json), each row and seed that a finished run has in
    out/table/ROW_sSEED/result.json replaced by it (runs may come from several invocations running at once); rows
    and seeds without a run here are kept."""
    table = json.loads(TABLE.read_text()) if TABLE.is_file() else {}
    for f in sorted(OUT.glob("*_s*/result.json")):
        row, seed = f.parent.name.rsplit("_s", 1)
        table.setdefault(row, {})[seed] = json.loads(f.read_text())
    return table


def markdown(table: dict) -> str:
    lines = ["| row | seeds | fully satisfied | shape | colour | background | position | size | FD | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, runs in table.items():
        cell = []
        for m in METRICS + ("seconds",):
            v = np.array([r[m] for r in runs.values()])
            fmt = "{:.0f} s" if m == "seconds" else "{:.0f}" if m == "fd" else "{:.3f}"
            cell.append(fmt.format(v.mean()) + ("" if m == "seconds" else f" ± {fmt.format(v.std())}"))
        lines.append(f"| {LABELS[row]} | {','.join(sorted(runs))} | " + " | ".join(cell) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(MODEL_ROWS + tuple(DISTILL_ROWS)))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one CPU thread each")
    p.add_argument("--collect", action="store_true", help="only rebuild the table from the finished runs")
    p.add_argument("--one", nargs=2, metavar=("ROW", "SEED"), help=argparse.SUPPRESS)  # a model row: JSON on stdout
    args = p.parse_args()
    if args.one:
        print(json.dumps(model_row(args.one[0], int(args.one[1]))))
        return
    if retired := [r for r in args.rows.split(",") if r in RETIRED]:
        sys.exit(f"error: --rows {retired[0]}: retired; rerun it at commit {RETIRED[retired[0]]} (see RETIRED)")
    jobs = [] if args.collect else [(r, int(s)) for r in args.rows.split(",") for s in args.seeds.split(",")]
    table = collect()
    with ThreadPoolExecutor(args.jobs) as pool:  # threads that wait on subprocesses
        for _ in pool.map(run, jobs):
            table = collect()
            TABLE.write_text(json.dumps(table, indent=1) + "\n")  # after each run: an interrupted table keeps its rows
    TABLE.write_text(json.dumps(table, indent=1) + "\n")
    order = [r for r in MODEL_ROWS + tuple(DISTILL_ROWS) + tuple(RETIRED) if r in table]
    print(markdown({r: table[r] for r in order}))


if __name__ == "__main__":
    main()
