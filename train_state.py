"""A training run's state as ONE safetensors file, no pickle: weights, optimizer states, RNG states, step, config.

`torch.save` pickles, and unpickling runs code; a checkpoint here is plain tensors plus string metadata:
  <part>.<key>              the weights, by the caller's parts (distill.py: student., projector., lora., ema.)
  opt.<name>.<i>.<field>    optimizer <name>'s state of its i-th parameter (AdamW: step, exp_avg, exp_avg_sq);
                            its param_groups (lr, betas, parameter indices, ...) as JSON in metadata "opt.<name>"
  rng.torch, rng.cuda       torch's global CPU (and CUDA) generator states, uint8
  rng.<generator>           the caller's torch.Generator states (distill.py: rng.data, every draw of its loop)
  rng.numpy                 numpy's MT19937 key (624 words, as int64); python's `random` state and numpy's position
                            as JSON in metadata "rng"
  metadata                  format, step, config (JSON: what a resumed run must agree with)
The file is written atomically (weights.save_atomic: temp file + rename), and not at all if any floating tensor is
non-finite: a NaN never replaces the last good checkpoint. Under FSDP, sharded parameters and optimizer states
(DTensors) are gathered into full tensors on save (a collective: every rank calls `save_state`, one writes) and
sharded again like their parameter on restore, so a file is independent of the number of processes.

Beside it, the plumbing of a data-parallel loop that the checkpoint's guarantees rest on: `Draw` (every random draw
from one checkpointed generator, for the global batch, then this rank's slice), `check_finite` (the NaN guard, before
any update) and `all_reduce_grads` (modules used twice a step, so not DDP-wrapped).
"""
import hashlib
import json
import os
import random
import struct
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import bridge as BR
from weights import Checkpoint, CheckpointError, save_atomic

FORMAT = "cross-space-distill/1"


class StateError(ValueError):
    """A checkpoint that can't be written or resumed from: one line for the user."""


def full(t: torch.Tensor) -> torch.Tensor:
    """DTensor (FSDP shard) -> the whole tensor; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_and_step(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip the optimizer's gradients to a total norm of `max_norm`, step, zero them; returns the norm before clipping
    (the whole norm under FSDP)."""
    params = [q for group in optimizer.param_groups for q in group["params"]]
    norm = full(torch.nn.utils.clip_grad_norm_(params, max_norm)).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def save_state(path, step: int, config: dict, parts: dict, optimizers: dict, generators: dict, write: bool = True,
               metadata: dict | None = None) -> None:
    """parts: {"student": state_dict, ...}; optimizers: {"student": AdamW, ...}; generators: {"data": Generator}.
    write=False: gather and check only (the other ranks of a distributed run). Raises StateError on non-finite
    values, before anything is written."""
    tensors = {f"{part}.{k}": full(v) for part, state in parts.items() for k, v in state.items()}
    meta = {"format": FORMAT, "step": str(step), "config": json.dumps(config)} | (metadata or {})
    for name, opt in optimizers.items():  # flattened: tensors by "opt.NAME.INDEX.FIELD", the rest as JSON
        sd = opt.state_dict()
        tensors |= {f"opt.{name}.{i}.{k}": full(v) for i, s in sd["state"].items() for k, v in s.items()}
        meta[f"opt.{name}"] = json.dumps(sd["param_groups"])
    _, key, pos, has_gauss, gauss = np.random.get_state()
    tensors |= {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(key.astype(np.int64))}
    tensors |= {f"rng.{name}": g.get_state() for name, g in generators.items()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta["rng"] = json.dumps({"python": random.getstate(), "numpy": [int(pos), int(has_gauss), float(gauss)]})
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise StateError(f"non-finite values in {bad[:3]} at step {step}: stopped; {path} keeps the last good "
                         "checkpoint" + ("" if Path(path).exists() else " (none written yet)"))
    if write:
        save_atomic(tensors, path, meta)


def _metadata(path) -> dict:
    """A checkpoint's metadata, or StateError: a file that can't be read, or is not one of this format, is reported
    and left as it is (never replaced)."""
    hint = "it is left as it is: delete it, or choose another --out, to start over"
    try:
        meta = Checkpoint(path).metadata
    except CheckpointError as e:
        raise StateError(f"{e}; {hint}") from None
    if meta.get("format") != FORMAT:
        raise StateError(f"{path}: not a distill.py checkpoint (its metadata has no format {FORMAT!r}); {hint}")
    return meta


def read_config(path) -> dict:
    """The config a checkpoint was written with (metadata only: no tensor is read)."""
    return json.loads(_metadata(path).get("config", "{}"))


def check_config(path, config: dict) -> None:
    """Resuming is only sound with the settings the run started with: StateError naming every differing key."""
    if not Path(path).is_file():
        raise StateError(f"no checkpoint at {path}")
    saved = read_config(path)
    diff = sorted(k for k in saved.keys() | config.keys() if saved.get(k) != config.get(k))
    if diff:
        raise StateError(f"{path} comes from another configuration (differing: {', '.join(diff)}): " +
                         ", ".join(f"{k} {saved.get(k)!r} != {config.get(k)!r}" for k in diff[:4]))


@dataclass
class TrainState:
    step: int
    config: dict
    tensors: dict  # every tensor of the file, by its flat name
    meta: dict

    def part(self, prefix: str) -> dict:
        """The tensors under `prefix` ("student."), the prefix stripped: a state dict."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def read_state(path) -> TrainState:
    meta = _metadata(path)
    return TrainState(int(meta["step"]), json.loads(meta.get("config", "{}")), load_file(str(path)), meta)


def restore(state: TrainState, optimizers: dict, generators: dict) -> int:
    """Optimizer and RNG states back into the live objects (weights go through `state.part`); returns the step.
    Call it once the optimizers exist, after any FSDP sharding: states of sharded parameters are sharded alike."""
    for name, opt in optimizers.items():
        params = [q for group in opt.param_groups for q in group["params"]]
        per_param = {}
        for k, v in state.part(f"opt.{name}.").items():
            i, field = k.split(".", 1)
            q = params[int(i)]
            if hasattr(q, "device_mesh") and v.ndim:  # FSDP: shard the full tensor like its parameter
                from torch.distributed.tensor import distribute_tensor
                v = distribute_tensor(v.to(q.device), q.device_mesh, q.placements)
            per_param.setdefault(int(i), {})[field] = v
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
                  for group in json.loads(state.meta[f"opt.{name}"])]  # JSON made tuples (betas) lists
        opt.load_state_dict({"state": per_param, "param_groups": groups})
    t, rng = state.tensors, json.loads(state.meta["rng"])
    torch.set_rng_state(t["rng.torch"])
    for name, g in generators.items():
        g.set_state(t[f"rng.{name}"])
    if "rng.cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng.cuda"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    pos, has_gauss, cached = rng["numpy"]
    np.random.set_state(("MT19937", t["rng.numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    return state.step


def _world() -> tuple[int, int]:
    ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)


class Draw:
    """Every random draw of a loop, for the GLOBAL batch (world x batch) from one generator (saved in the checkpoint
    as rng.<name>), then this rank's slice: the same data as one process with world x the batch."""

    def __init__(self, seed: int, batch: int, device):
        (self.rank, self.world), self.device = _world(), device
        self.gen, self.global_batch = torch.Generator().manual_seed(seed), batch * self.world

    def mine(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n].to(self.device)

    def sigmas(self, lo: float, hi: float, shift: float) -> torch.Tensor:
        return self.mine(BR.sample_sigmas(self.global_batch, lo, hi, shift, generator=self.gen))

    def noise(self, shape: tuple) -> torch.Tensor:
        return self.mine(torch.randn((self.global_batch, *shape), generator=self.gen))


def check_finite(step: int, ckpt_path: Path, **losses) -> dict:
    """The NaN guard: every rank sees the same verdict, before any update (StateError naming the losses). Returns the
    losses averaged over ranks (= the global batch's, for the log)."""
    v = torch.stack([x.detach().float().reshape(()) for x in losses.values()])
    world = _world()[1]
    torch.distributed.all_reduce(v) if world > 1 else None
    v = v / world
    if not torch.isfinite(v).all():
        values = ", ".join(f"{k}={x:.4g}" for k, x in zip(losses, v.tolist(), strict=True))
        raise StateError(f"non-finite loss at step {step + 1} ({values}): stopped; {ckpt_path} keeps the last good "
                         "checkpoint" + ("" if Path(ckpt_path).exists() else " (none written yet)"))
    return dict(zip(losses, v.tolist(), strict=True))


def all_reduce_grads(params) -> None:
    """Mean of the grads over ranks, for a module that is not DDP-wrapped (no-op in one process)."""
    world = _world()[1]
    for q in params:
        if world > 1 and q.grad is not None:
            torch.distributed.all_reduce(q.grad)
            q.grad /= world


def trim_log(log_path: Path, step: int) -> None:
    """On resume: drop the log's training lines past the checkpoint's step (a crash after logging), atomically."""
    lines = [ln for ln in log_path.read_text().splitlines()
             if json.loads(ln).get("stage") != "distill" or json.loads(ln)["step"] <= step]
    (tmp := log_path.with_name("." + log_path.name)).write_text("".join(ln + "\n" for ln in lines))
    tmp.replace(log_path)


def init_processes(device: str, fsdp: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world, device): under torchrun (RANK set) the process group (NCCL on CUDA, else gloo) and this rank's
    GPU; else one process on `device`. The timeout is long: rank 0 alone builds caches while the others wait."""
    if int(os.environ.get("RANK", -1)) == -1:
        if fsdp:
            raise StateError("--fsdp shards the teacher over processes: launch with torchrun")
        return 0, 1, torch.device(device)
    cuda = device.startswith("cuda")
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    dev = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    torch.cuda.set_device(dev) if cuda else None
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), dev


def prepare_folder(folder: Path, rank: int = 0) -> None:
    """Create the run folder and write a probe file there (per rank), before minutes of loading: StateError if not.
    Rank 0 removes the temp files that an interrupted save left (weights.write_atomic's NAME.*.tmp)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f".probe{rank}").write_text("")
        (folder / f".probe{rank}").unlink()
        for pattern in ("*.safetensors.*.tmp", "grid_*.png.*.tmp") if rank == 0 else ():
            for orphan in folder.glob(pattern):
                orphan.unlink(missing_ok=True)
    except OSError as e:
        raise StateError(f"--out {folder}: cannot write there ({e.strerror or e})") from None


def portable(value, folder: Path):
    """A setting as a resumed run compares it: a path inside the run folder relative to it ("OUT/..."), an existing
    file or folder outside it by name and content (size, and a hash of its safetensors header or of its text), so
    that a run folder moved or copied as a whole resumes; anything else as it is."""
    if not isinstance(value, str) or ("/" not in value and not Path(value).exists()):
        return value
    path = Path(value).resolve()
    if path.is_relative_to(folder.resolve()):  # (a preset's files may not be written yet)
        return "OUT/" + path.relative_to(folder.resolve()).as_posix()
    if not path.exists():
        return value
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files[:64]:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if f.suffix == ".safetensors" and len(head) == 8 else 1 << 20
            h.update(f.name.encode() + str(f.stat().st_size).encode() + head + fh.read(min(n, 1 << 24)))
    return f"{path.name} (content {h.hexdigest()[:16]})"


def one_line_errors(*kinds, checkpoint=lambda: None) -> None:
    """Uncaught errors of `kinds` (and StateError) print one `error:` line; Ctrl-C prints where the last checkpoint
    (`checkpoint()`, a path) is and the command that continues from it; anything else the usual traceback."""
    def hook(kind, e, tb):
        if issubclass(kind, KeyboardInterrupt):
            path = checkpoint()
            if path is None or not Path(path).is_file():
                print("interrupted before the first checkpoint: nothing to resume", file=sys.stderr)
            else:
                again = ["python"] + sys.argv + ([] if "--resume" in sys.argv else ["--resume"])
                print(f"interrupted: {path} keeps step {Checkpoint(path).metadata.get('step')}; continue with: "
                      + " ".join(again), file=sys.stderr)
        elif issubclass(kind, (StateError, *kinds)):
            print(f"error: {e}", file=sys.stderr)
        else:
            sys.__excepthook__(kind, e, tb)
    sys.excepthook = hook


def timing(t_it: float, device) -> dict:
    """An iteration's seconds since `t_it` (its losses' .item() synchronised the device) and peak GPU memory."""
    return {"sec": time.perf_counter() - t_it} | ({"peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}
                                                 if torch.device(device).type == "cuda" else {})


def seed_all(seed: int) -> None:
    """torch's, python's and numpy's global generators (the checkpoint saves and restores all three)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def finished(ckpt_path: Path, export: Path, config: dict, steps: int) -> bool:
    """A run folder holds a FINISHED run of this config: its checkpoint's config and its export's step agree."""
    done = Checkpoint(export).metadata if Path(export).is_file() else {}
    return read_config(ckpt_path) == config and done.get("step") == str(steps)


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
