"""One rank of a tests/test_distributed.py run (launched by torchrun), and the same run built
in-process for the one-process reference: `build(spec)` is shared by both."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fluid_ops.data import ShapesDataset, ShardDataset  # noqa: E402
from fluid_ops.models import Fluid  # noqa: E402
from fluid_ops.training import train  # noqa: E402

TINY = dict(text_encoder="hash", depth=2, width=128, num_heads=2, head_width=64, head_depth=1, aligner_depth=1)


class Recording(torch.utils.data.Dataset):
    """Appends the key of every item read to `log` (append mode: safe across DataLoader workers)."""

    def __init__(self, ds, log):
        self.ds, self.log = ds, str(log)
        self.collate = getattr(ds, "collate", None)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{self.ds.keys[i] if hasattr(self.ds, 'keys') else i}\n")
        return self.ds[i]


def build(spec: dict, rank: int = 0):
    torch.manual_seed(spec.get("seed", 0))
    model = Fluid("tiny", **{**TINY, **spec.get("set", {})})
    data = spec.get("data", "shapes")
    # shapes: the data set `fluid-ops train --data shapes --seed S` builds
    ds = (ShapesDataset(size=32, seed=spec.get("train", {}).get("seed", 0)) if data == "shapes"
          else ShardDataset(data, size=32))
    if spec.get("record"):
        ds = Recording(ds, f"{spec['record']}.rank{rank}")
    return model, ds


def run(spec: dict, out_dir, rank: int = 0, **overrides):
    model, ds = build(spec, rank)
    kw = dict(spec["train"])
    kw.update(overrides)
    if spec.get("sleep"):
        kw.update(log_every=1, callback=lambda info: time.sleep(spec["sleep"]))
    return train(model, ds, out_dir=out_dir, progress=False, collate_fn=getattr(ds, "collate", None), **kw)


def full_params(model) -> dict:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    rank = int(os.environ.get("RANK", 0))
    result = run(spec, spec["out"], rank)
    if spec.get("dump"):
        torch.save({"params": full_params(result.model), "step": result.step,
                    "data": (result.epoch, result.index)}, Path(spec["out"]) / f"params.rank{rank}.pt")
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
