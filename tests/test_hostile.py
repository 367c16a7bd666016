"""Hostile but fair input (issue 22): a run folder cannot run code, two trainings cannot share a
run folder, bad data is named where it enters, ops validate before they write, and the CLI says
what was wrong in one line."""
from __future__ import annotations

import io
import json
import os
import pickle
import warnings

import pytest
import torch

from fluid_ops import distributed as D
from fluid_ops.checkpoint import CheckpointError


# ---- 1. nothing in a run folder runs code ------------------------------------------------------
class _Gadget:
    def __reduce__(self):
        return (os.system, ("touch GADGET_RAN",))


def _dcp_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    m = torch.nn.Linear(3, 4)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = D.save_dcp_checkpoint(D.DistContext(), out, 2, m, opt, {"weight": torch.zeros(4, 3)},
                                       {"step": 2, "config": {}})
    return out, folder, m, opt


def _rewrite_manifest(folder):
    man = json.loads((folder / "manifest.json").read_text())
    for name in man["files"]:
        p = folder / name
        man["files"][name] = [p.stat().st_size, D._sha256(p)]
    (folder / "manifest.json").write_text(json.dumps(man))


def test_dcp_metadata_with_a_pickle_gadget_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, folder, m, opt = _dcp_run(tmp_path)
    assert D.consolidate(out, tmp_path / "ok.pt").exists()  # the honest folder reads
    (folder / ".metadata").write_bytes(pickle.dumps(_Gadget()))
    _rewrite_manifest(folder)  # the attacker writes the sha256 values too
    with pytest.raises(CheckpointError, match="os.system|posix.system|not allowed"):
        D.consolidate(out, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not allowed"):
        D.load_dcp_checkpoint(folder, m, opt, {"weight": torch.zeros(4, 3)})
    assert not (tmp_path / "GADGET_RAN").exists()


def test_dcp_bytes_items_load_weights_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    planner = D._safe_planner()
    planner.flatten_state_dict = False
    planner.state_dict = {}

    class Item:
        class dest_index:
            fqn = "x"
    buf = io.BytesIO()
    torch.save(_Gadget(), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(Item, buf)
    assert not (tmp_path / "GADGET_RAN").exists()
