"""What `fluid_ops.train` costs per step beyond the bare forward / backward / AdamW step.

Stand-in model: an MLP denoiser (image + caption embedding -> predicted noise) at two widths,
batch 32 of 3x16x16 images. Three loops, interleaved round by round (the machine is shared;
compare medians):
  bare        fixed batch already on the device: zero_grad, forward, backward, opt.step
  bare+algo   bare + grad-norm clipping + EMA update (work the training recipe asks for)
  train()     fluid_ops.train: data loading + collation, per-step generator, lr schedule,
              loss bookkeeping, progress off; timed as train(W + N steps) - train(W steps),
              so setup and the final checkpoint cancel out.
    python benchmarks/train_loop_overhead.py [--steps 200] [--rounds 5] [--threads 1] [--clock cpu|wall]
Times are CPU seconds of this process by default (see _clock).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import nn

from fluid_ops.training import default_collate, param_groups, train


# CPU time of this process: on a shared machine it moves far less than wall time with other
# people's load (--clock wall for wall time, e.g. on an idle machine or a GPU).
_clock = time.process_time


@dataclass
class MLPConfig:
    image_size: int = 16
    width: int = 256


class MLPDenoiser(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        d = 3 * config.image_size ** 2
        self.text = nn.Embedding(16, config.width).requires_grad_(False)
        self.net = nn.Sequential(nn.Linear(d, config.width), nn.GELU(), nn.LayerNorm(config.width),
                                 nn.Linear(config.width, config.width), nn.GELU(), nn.Linear(config.width, d))

    def forward(self, images, captions, *, generator=None):
        ids = torch.tensor([hash(c) % 16 for c in captions], device=images.device)
        noise = torch.randn(images.shape, generator=generator, device=images.device).flatten(1)
        h = self.net[0](images.flatten(1) + noise) + self.text(ids)
        for layer in self.net[1:]:
            h = layer(h)
        return ((h - noise) ** 2).mean()


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n=4096, size=16):
        self.images = torch.rand(n, 3, size, size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], f"caption {i % 16}"


def bare_loop(model, batch, steps, *, algo: bool) -> float:
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-4, betas=(0.9, 0.95))
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    g = torch.Generator()
    images, captions = batch
    t = _clock()
    for s in range(steps):
        g.manual_seed(s)
        loss = model(images, captions, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if algo:
            nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if algo:
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 0.001)
    return (_clock() - t) / steps


def train_loop(model, data, steps, warm) -> float:
    times = []
    for n in (warm, warm + steps):
        with tempfile.TemporaryDirectory() as d:
            t = _clock()
            train(model, data, out_dir=d, steps=n, batch_size=32, lr=1e-4, warmup_steps=10, ckpt_every=10 ** 9,
                  progress=False, device="cpu")
            times.append(_clock() - t)
    return (times[1] - times[0]) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = ap.parse_args()
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    data = RandomImages()
    batch = default_collate([data[i] for i in range(32)])
    rows = []
    for width in args.widths:
        model = MLPDenoiser(MLPConfig(width=width))
        times = {"bare": [], "bare+algo": [], "train()": []}
        train_loop(model, data, 5, 5)  # warm-up: imports, allocator
        for _ in range(args.rounds):
            times["bare"].append(bare_loop(model, batch, args.steps, algo=False))
            times["bare+algo"].append(bare_loop(model, batch, args.steps, algo=True))
            times["train()"].append(train_loop(model, data, args.steps, 20))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append({"width": width, "ms_per_step": med,
                     "overhead_vs_bare_ms": med["train()"] - med["bare"],
                     "overhead_vs_bare_algo_ms": med["train()"] - med["bare+algo"]})
        print(f"width {width:4d}: bare {med['bare']:.3f} ms, bare+clip+EMA {med['bare+algo']:.3f} ms, "
              f"train() {med['train()']:.3f} ms per step -> overhead {med['train()'] - med['bare']:+.3f} ms "
              f"({med['train()'] / med['bare'] - 1:+.1%}) vs bare, "
              f"{med['train()'] - med['bare+algo']:+.3f} ms vs bare+clip+EMA")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "clock": args.clock, "torch": str(torch.__version__), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
