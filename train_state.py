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
"""
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from weights import save_atomic

FORMAT = "cross-space-distill/1"


class StateError(ValueError):
    """A checkpoint that can't be written or resumed from: one line for the user."""


def full(t: torch.Tensor) -> torch.Tensor:
    """DTensor (FSDP shard) -> the whole tensor; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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


def read_config(path) -> dict:
    """The config a checkpoint was written with (metadata only: no tensor is read)."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("config", "{}"))


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
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
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
