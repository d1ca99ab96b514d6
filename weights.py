"""The one safetensors reader and writer that every loader in the project uses.

Reads a checkpoint given as
  - a single `.safetensors` file (SD 1.5 / SD 3.5 / FLUX single files, `ae.safetensors`, `text_encoders/*.safetensors`),
  - a folder holding one `.safetensors` file (a diffusers component such as `unet/` or `vae/`),
  - a folder of shards with a `*.safetensors.index.json` (`weight_map`: key -> shard file).
Tensors are read lazily, one at a time, converted straight to the requested dtype and device, so a bf16 file
loaded in bf16 never makes an fp32 copy. Models are built on `meta` and filled with `load_state_dict(assign=True)`.

Only safetensors is read: nothing here unpickles. Every problem is a `CheckpointError` whose message names the
file, the key and the expected vs found shape; the command-line scripts print it as one line.
Reference: the safetensors format (8-byte little-endian header length, JSON header, raw data),
https://github.com/huggingface/safetensors.
"""
import argparse
import json
import os
import re
import struct
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(ValueError):
    """A checkpoint that can't be used as asked: the message is one line for the user."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags end as one `error:` line, like a bad file (argparse prints usage + message)."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# Tensors that real files carry but no model here uses; skipped by name, never silently by accident.
# DDPM schedule buffers of LDM single files, EMA copies, CLIP position ids, T5's tied embedding copy.
BENIGN = re.compile(
    r"(^|\.)(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|model_ema\..*|position_ids)$"
    r"|^model_ema\."
)


def _read_header(file: Path) -> dict:
    """Parse and sanity-check a safetensors header; a clear error for non-safetensors or truncated files."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: not a safetensors file ({size} bytes, too short for a header)")
        n = struct.unpack("<Q", head)[0]
        pickle = head[:4] == b"PK\x03\x04" or (head[0] == 0x80 and 2 <= head[1] <= 5)  # torch.save's zip, a pickle
        if (n > size - 8 or n > 100_000_000) and pickle:
            raise CheckpointError(f"{file}: a PyTorch pickle checkpoint (torch.save's zip or a raw pickle); pickles "
                                  "are not loaded (unpickling runs code): use the model's .safetensors release, or "
                                  "convert the file once with torch.load(weights_only=True) and safetensors' save_file")
        if n > size - 8 and f.read(2) == b'{"':
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, its header alone needs {n + 8})")
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{file}: not a safetensors file (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{file}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")
    return header


def _pick(folder: Path, pattern: str) -> Path | None:
    """One file matching pattern in folder; prefer the one without a variant (`x.fp16.safetensors`)."""
    found = sorted(folder.glob(pattern))
    if len(found) > 1:
        plain = [f for f in found if f.name.count(".") == pattern.count(".")]
        if len(plain) == 1:
            return plain[0]
        raise CheckpointError(f"{folder}: several candidates {[f.name for f in found]}; name one file")
    return found[0] if found else None


class Checkpoint:
    """Keys, shapes and lazily read tensors of one checkpoint (file, folder or shards)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or folder")
        if self.path.is_dir():
            index = _pick(self.path, "*.safetensors.index.json")
            if index is not None:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {k: self.path / v for k, v in weight_map.items()}
            else:
                single = _pick(self.path, "*.safetensors")
                if single is None:
                    raise CheckpointError(f"{self.path}: folder holds no .safetensors file")
                files = None
                self.path = single
        else:
            files = None
        self.metadata = {}  # a single file's string metadata (e.g. distill.py marks its students)
        if files is None:  # one file: its header lists the keys
            header = _read_header(self.path)
            files = {k: self.path for k in header if k != "__metadata__"}
            self._info = {k: header[k] for k in files}
            self.metadata = header.get("__metadata__") or {}
        else:
            self._info = {}
            for f in sorted(set(files.values())):
                if not f.exists():
                    raise CheckpointError(f"{f}: shard named in the index is missing")
                header = _read_header(f)
                self._info.update({k: v for k, v in header.items() if k != "__metadata__"})
            missing = [k for k in files if k not in self._info]
            if missing:
                raise CheckpointError(f"{self.path}: index names keys that no shard holds: {missing[:5]}")
        self.files = files  # key -> file

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, key) -> bool:
        return key in self.files

    def shape(self, key) -> tuple:
        return tuple(self._info[key]["shape"])

    def shapes(self, prefix: str = "") -> dict:
        return {k[len(prefix):]: self.shape(k) for k in self.files if k.startswith(prefix)}

    def tensors(self, prefix="", rename=None, dtype=None, device="cpu") -> dict:
        """Tensors under `prefix` (stripped), renamed by `rename(key) -> key or None` (None drops a key),
        benign extras skipped, each converted to dtype/device as it is read (one tensor in memory at a time
        besides the result)."""
        out, by_file = {}, {}
        for k, f in self.files.items():
            if k.startswith(prefix) and not BENIGN.search(k[len(prefix):]):
                by_file.setdefault(f, []).append(k)
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for k in keys:
                    name = k[len(prefix):]
                    if rename is not None:
                        name = rename(name)
                        if name is None:
                            continue
                    t = sf.get_tensor(k)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[name] = t.to(device)
        return out


def find_component(path, subfolder: str) -> Path:
    """A diffusers pipeline root holds components in subfolders (`unet/`, `vae/`, ...): step into one if present."""
    path = Path(path)
    if path.is_dir() and (path / subfolder).is_dir():
        return path / subfolder
    return path


def component_config(path) -> dict:
    """The diffusers `config.json` beside a component's weights (a `unet/` or `transformer/` folder); {} if there is
    none. One that is not a JSON object is a CheckpointError."""
    path = Path(path)
    file = (path if path.is_dir() else path.parent) / "config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not a JSON config ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    return config


def check_agrees(source, config: dict, found: dict) -> None:
    """A config.json that contradicts the weights is an error: each field of `found` (what the shapes show) that the
    config also gives (not null) must be equal, lists and tuples alike."""
    same = lambda a, b: (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple))
                                                                           else b)
    bad = [f"{k} {config[k]!r} (the weights: {v!r})" for k, v in found.items()
           if config.get(k) is not None and not same(config[k], v)]
    if bad:
        raise CheckpointError(f"{source}: config.json contradicts the weights: " + "; ".join(bad))


def describe(keys) -> str:
    """A guess at what a checkpoint holds, for error messages ('this looks like a FLUX transformer')."""
    keys = list(keys)
    tests = [("a FLUX transformer", "double_blocks."), ("an SD3 MMDiT", "joint_blocks."),
             ("a diffusers SD3/FLUX transformer", "transformer_blocks.0.attn.add_q_proj"),
             ("an SD 1.5 UNet", "input_blocks.0.0."), ("a diffusers UNet", "down_blocks.0.resnets.0.time_emb_proj"),
             ("a VAE", "decoder.conv_in."), ("a T5 encoder", "encoder.block.0."),
             ("a CLIP text encoder", "encoder.layers.0.self_attn.")]
    for name, needle in tests:
        if any(needle in k for k in keys):
            return name
    return f"an unknown model (first keys: {keys[:3]})"


def load_state(model: torch.nn.Module, state: dict, source) -> torch.nn.Module:
    """Strict, assigning load with errors that list missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: checkpoint does not match {type(model).__name__} ({describe(state)}): "
            f"{len(missing)} missing {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise CheckpointError(f"{source}: key {k}: expected shape {tuple(v.shape)}, found {tuple(state[k].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def build_meta(cls, cfg) -> torch.nn.Module:
    """Build a model without allocating memory; `load_state(..., assign=True)` then supplies real tensors."""
    with torch.device("meta"):
        return cls(cfg)


def write_atomic(path, write) -> None:
    """`write(tmp)` fills a temp file NAME.*.tmp in the same folder, which then replaces `path` (never a half file;
    the temp file is removed if anything fails, Ctrl-C included), with the usual permissions of a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (write_atomic)."""
    write_atomic(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata=metadata))
