"""The shared safetensors reader: files, folders, shards, prefixes, dtype on load, strict loading, clear errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from weights import Checkpoint, CheckpointError, build_meta, describe, find_component, load_state, save_atomic


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"model.a.weight": torch.randn(4, 3, generator=g), "model.a.bias": torch.randn(4, generator=g),
            "model.b.weight": torch.randn(2, 4, generator=g), "betas": torch.rand(10, generator=g),
            "model.pos.position_ids": torch.arange(5)}


def test_single_file_prefix_and_benign(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "m.safetensors")
    ck = Checkpoint(tmp_path / "m.safetensors")
    assert set(ck.keys()) == set(t)
    assert ck.shape("model.a.weight") == (4, 3)
    got = ck.tensors("model.")
    # DDPM buffers and position_ids are skipped by name; the prefix is stripped
    assert set(got) == {"a.weight", "a.bias", "b.weight"}
    torch.testing.assert_close(got["a.weight"], t["model.a.weight"], rtol=0, atol=0)
    renamed = ck.tensors("model.", rename=lambda k: None if k.startswith("b.") else "x." + k)
    assert set(renamed) == {"x.a.weight", "x.a.bias"}


def test_sharded_folder_matches_single(tmp_path):
    t = {k: v for k, v in _tensors().items() if k.startswith("model.")}
    save_file({k: t[k] for k in ["model.a.weight"]}, tmp_path / "m-00001-of-00002.safetensors")
    save_file({k: t[k] for k in ["model.a.bias", "model.b.weight", "model.pos.position_ids"]},
              tmp_path / "m-00002-of-00002.safetensors")
    weight_map = {"model.a.weight": "m-00001-of-00002.safetensors"}
    weight_map.update({k: "m-00002-of-00002.safetensors" for k in t if k != "model.a.weight"})
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = Checkpoint(tmp_path).tensors("model.")
    for k in ["a.weight", "a.bias", "b.weight"]:
        torch.testing.assert_close(got[k], t["model." + k], rtol=0, atol=0)


def test_folder_prefers_file_without_variant(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert Checkpoint(tmp_path).tensors()["w"].sum().item() == 2


def test_dtype_on_load_keeps_bf16_without_copy(tmp_path):
    save_file({"w": torch.randn(8, 8).to(torch.bfloat16)}, tmp_path / "b.safetensors")
    w = Checkpoint(tmp_path / "b.safetensors").tensors(dtype=torch.bfloat16)["w"]
    assert w.dtype == torch.bfloat16
    w32 = Checkpoint(tmp_path / "b.safetensors").tensors(dtype=torch.float32)["w"]
    torch.testing.assert_close(w32, w.float(), rtol=0, atol=0)
    save_file({"i": torch.arange(3)}, tmp_path / "i.safetensors")  # integer tensors are never cast
    assert Checkpoint(tmp_path / "i.safetensors").tensors(dtype=torch.bfloat16)["i"].dtype == torch.int64


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Checkpoint(tmp_path / "junk.safetensors")
    save_file({"w": torch.randn(64)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        Checkpoint(tmp_path / "empty")


def test_load_state_strict_with_listed_errors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to("meta")
    good = {"0.weight": torch.randn(4, 3), "0.bias": torch.randn(4), "1.weight": torch.randn(2, 4),
            "1.bias": torch.randn(2)}
    load_state(model, dict(good), "f.safetensors")
    assert model[0].weight.device.type == "cpu"
    torch.testing.assert_close(model[0].weight, good["0.weight"], rtol=0, atol=0)
    fresh = lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to("meta")
    with pytest.raises(CheckpointError, match=r"f.safetensors.*1 missing \['1.bias'\]"):
        load_state(fresh(), {k: v for k, v in good.items() if k != "1.bias"}, "f.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected \['extra'\]"):
        load_state(fresh(), {**good, "extra": torch.zeros(1)}, "f.safetensors")
    with pytest.raises(CheckpointError, match=r"key 1.weight: expected shape \(2, 4\), found \(2, 5\)"):
        load_state(fresh(), {**good, "1.weight": torch.zeros(2, 5)}, "f.safetensors")


def test_build_meta_allocates_nothing():
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        n: int = 4096

    class Big(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.w = torch.nn.Linear(cfg.n, cfg.n)

    m = build_meta(Big, Cfg())
    assert m.w.weight.is_meta and m.w.weight.shape == (4096, 4096)


def test_save_atomic_and_find_component(tmp_path):
    save_atomic({"w": torch.arange(4.0)}, tmp_path / "sub" / "x.safetensors", metadata={"k": "v"})
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.safetensors"]  # no temp file left behind
    assert (tmp_path / "sub" / "x.safetensors").stat().st_mode & 0o044  # readable by others, not mkstemp's 0600
    ck = Checkpoint(tmp_path / "sub" / "x.safetensors")
    torch.testing.assert_close(ck.tensors()["w"], torch.arange(4.0))
    assert ck.metadata == {"k": "v"}
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    assert find_component(tmp_path / "pipe", "unet") == tmp_path / "pipe" / "unet"
    assert find_component(tmp_path / "sub", "unet") == tmp_path / "sub"
    assert describe(["double_blocks.0.img_attn.qkv.weight"]) == "a FLUX transformer"
    assert describe(["model.diffusion_model.input_blocks.0.0.weight"]) == "an SD 1.5 UNet"
