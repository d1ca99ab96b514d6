"""Where a distillation iteration's time goes: distill.py run under torch.profiler (a script, not a test).

    python -m bench.profile -- --bridge-steps 20 --eval 0 --out out/profile_toy       # the toy preset, CPU
    python -m bench.profile --iters 4 --skip 2 -- --preset tiny --out out/profile_tiny   # a smoke test
    python -m bench.profile --skip 8 -- --student ... --teacher ... --compile          # a GPU run (bench/cycle.py's)

Runs distill.py in this process with the arguments after `--`, lets --skip stage-2 iterations pass (warm-up,
compilation), profiles the next --iters, and prints a table: each part of the loop that distill.py names with
`phase(...)` (student + Bridge forward, real score, fake score, the backward passes, the optimizers), its time per
iteration and its share of the iteration, then the operators (CUDA kernels on a GPU) with the most self time. On a
GPU a part's time is the span of its kernels (the profiler's gpu_user_annotation), on the CPU its wall time.
--json writes the same (bench/results/).
"""
import argparse
import json
import runpy
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

import train_state as TS

PARTS = ["student + bridge", "real score", "fake score", "generator backward", "student optimizer",
         "fake update forward", "fake update backward", "fake optimizer"]  # distill.py's phase(...) names

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--skip", type=int, default=4, help="stage-2 iterations before the profile (warm-up, compilation)")
p.add_argument("--iters", type=int, default=8, help="profiled stage-2 iterations (a multiple of "
               "--fake-steps-per-gen gives whole two-time-scale cycles)")
p.add_argument("--top", type=int, default=15, help="operators listed")
p.add_argument("--json", help="write the table here")
args, rest = p.parse_known_args()
rest = rest[1:] if rest[:1] == ["--"] else rest
if "--steps" not in rest:
    rest += ["--steps", str(args.skip + args.iters)]
device = rest[rest.index("--device") + 1] if "--device" in rest[:-1] else "cuda" if torch.cuda.is_available() else "cpu"
cuda = device.startswith("cuda")  # distill.py's default device rule

# ----------------------------------------------------------------------------- run distill.py, one profiler step per
# stage-2 iteration: train_state.append_log is called once per iteration with the iteration's record
marks, traces = [], []
prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
               schedule=schedule(wait=args.skip, warmup=0, active=args.iters, repeat=1),
               on_trace_ready=lambda pr: traces.append(pr.key_averages()))
append_log = TS.append_log


def stepping_log(path, record):
    append_log(path, record)
    if record.get("stage") == "distill":
        torch.cuda.synchronize() if cuda else None
        marks.append(time.perf_counter())
        prof.step()


TS.append_log = stepping_log
sys.argv = ["distill.py", *rest]
with prof:
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "distill.py"), run_name="__main__")
if not traces or len(marks) < args.skip + args.iters:
    sys.exit(f"error: the run made {len(marks)} stage-2 iterations, the profile needs --skip + --iters = "
             f"{args.skip + args.iters}")

# ----------------------------------------------------------------------------- the table
events = traces[0]
iteration_ms = 1e3 * (marks[args.skip + args.iters - 1] - marks[args.skip - 1]) / args.iters if args.skip else \
    1e3 * (marks[args.iters - 1] - marks[0]) / max(args.iters - 1, 1)
device_ms = lambda e: getattr(e, "device_time_total", 0.0) / 1e3  # noqa: E731  (us -> ms)
rows = {}
for e in events:
    if e.key in PARTS:  # on a GPU both the CPU range and its gpu_user_annotation carry the name
        ms = device_ms(e) if cuda else e.cpu_time_total / 1e3
        rows[e.key] = max(rows.get(e.key, 0.0), ms / args.iters)
rows = {part: rows[part] for part in PARTS if part in rows}  # in the loop's order
rows["other (draws, logging, checkpoints, unnamed)"] = iteration_ms - sum(rows.values())
self_ms = lambda e: (getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total) / 1e3  # noqa: E731
ops = sorted((e for e in events if e.key not in PARTS), key=self_ms, reverse=True)[:args.top]
top = [dict(op=e.key, ms_per_iter=self_ms(e) / args.iters, calls_per_iter=e.count / args.iters) for e in ops]

name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
print(f"\n{name}, torch {torch.__version__}: stage-2 iterations {args.skip + 1}..{args.skip + args.iters}, "
      f"{iteration_ms:.1f} ms per iteration (profiler on)")
print(f"{'part':<46} {'ms/iter':>9} {'share':>7}")
for part, ms in rows.items():
    print(f"{part:<46} {ms:9.1f} {100 * ms / iteration_ms:6.1f}%")
print(f"\n{'operator (self time)':<46} {'ms/iter':>9} {'calls':>7}")
for r in top:
    print(f"{r['op'][:46]:<46} {r['ms_per_iter']:9.1f} {r['calls_per_iter']:7.1f}")
if args.json:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(
        device=name, torch=torch.__version__, commit=commit, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        distill_args=rest, iterations=args.iters, iteration_ms=iteration_ms, parts_ms=rows, top_ops=top),
        indent=1) + "\n")
