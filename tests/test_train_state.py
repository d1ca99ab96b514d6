"""train_state.py: a run saved mid-way and restored into fresh objects continues bitwise as the uninterrupted run
(AdamW moments and step count, torch / numpy / python / generator RNG); a config mismatch names every differing key;
a non-finite tensor never overwrites the file; the file is plain safetensors (no pickle)."""
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

import train_state as TS

CONFIG = {"lr": 1e-3, "rank": 4, "prompts": ["a", "b"]}


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    opts = {"main": torch.optim.AdamW(model[0].parameters(), lr=1e-2, weight_decay=0.01),
            "head": torch.optim.AdamW(model[2].parameters(), lr=3e-3, betas=(0.8, 0.95))}
    return model, opts


def step(model, opts, gen):
    """One training step whose data come from every RNG a run uses; returns the draws it made."""
    x = torch.randn(4, 6, generator=gen) + torch.rand(4, 6)  # the data generator and torch's global one
    y = torch.from_numpy(np.random.standard_normal((4, 3)).astype(np.float32)) * random.random()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    for opt in opts.values():
        opt.step()
        opt.zero_grad(set_to_none=True)
    return x, y


def save(path, model, opts, gen, step_, config=CONFIG):
    TS.save_state(path, step_, config, {"model": model.state_dict()}, opts, {"data": gen}, metadata={"extra": "x"})


def test_round_trip_continues_bitwise(tmp_path):
    model, opts = make()
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2), np.random.seed(3), random.seed(4)
    for _ in range(3):
        step(model, opts, gen)
    save(tmp_path / "ck.safetensors", model, opts, gen, 3)
    want = [step(model, opts, gen) for _ in range(2)]  # the uninterrupted run
    want_state = {k: v.clone() for k, v in model.state_dict().items()}
    want_opt = {n: o.state_dict() for n, o in opts.items()}

    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # everything fresh and elsewhere
    model2, opts2 = make()
    gen2 = torch.Generator().manual_seed(123)
    state = TS.read_state(tmp_path / "ck.safetensors")
    assert state.step == 3 and state.config == CONFIG and state.meta["extra"] == "x"
    model2.load_state_dict(state.part("model."))
    assert TS.restore(state, opts2, {"data": gen2}) == 3
    got = [step(model2, opts2, gen2) for _ in range(2)]
    for (xa, ya), (xb, yb) in zip(want, got, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # the same draws from every generator
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in want_state.items())  # the same updates
    for name, sd in want_opt.items():
        other = opts2[name].state_dict()
        assert sd["param_groups"] == other["param_groups"]
        for i, s in sd["state"].items():
            assert s.keys() == other["state"][i].keys() and all(torch.equal(v, other["state"][i][k])
                                                                 for k, v in s.items())
    assert want_opt["main"]["state"][0]["step"].item() == 5  # AdamW's bias correction counts on


def test_plain_safetensors(tmp_path):
    model, opts = make()
    step(model, opts, gen := torch.Generator().manual_seed(0))
    save(tmp_path / "ck.safetensors", model, opts, gen, 1)
    with safe_open(str(tmp_path / "ck.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {"model.0.weight", "opt.main.0.exp_avg", "opt.head.1.exp_avg_sq", "opt.main.0.step", "rng.torch",
            "rng.data", "rng.numpy"} <= keys
    assert meta["format"] == TS.FORMAT and json.loads(meta["config"]) == CONFIG and meta["step"] == "1"
    assert json.loads(meta["opt.head"])[0]["betas"] == [0.8, 0.95]


def test_config_mismatch_lists_every_differing_key(tmp_path):
    model, opts = make()
    save(tmp_path / "ck.safetensors", model, opts, torch.Generator(), 0)
    TS.check_config(tmp_path / "ck.safetensors", dict(CONFIG))  # equal: fine
    other = {"lr": 1e-3, "rank": 8, "prompts": ["a", "c"], "new": 1}
    with pytest.raises(TS.StateError) as e:
        TS.check_config(tmp_path / "ck.safetensors", other)
    msg = str(e.value)
    assert "another configuration" in msg and "\n" not in msg
    assert "differing: new, prompts, rank)" in msg and "rank 4 != 8" in msg and "lr" not in msg.split(":")[1]
    with pytest.raises(TS.StateError, match="no checkpoint"):
        TS.check_config(tmp_path / "missing.safetensors", CONFIG)


def test_non_finite_never_overwrites(tmp_path):
    path = tmp_path / "ck.safetensors"
    model, opts = make()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(TS.StateError, match=r"none written yet"):  # a NaN before any checkpoint: still refused
        TS.save_state(path, 1, CONFIG, {"model": {"w": torch.tensor([1.0, float("inf")])}}, {}, {})
    assert not path.exists()
    step(model, opts, gen)
    save(path, model, opts, gen, 1)
    before = path.read_bytes()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(TS.StateError, match=r"non-finite values in \['model.2.bias'\] at step 2"):
        save(path, model, opts, gen, 2)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp*"))
