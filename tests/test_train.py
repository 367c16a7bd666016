"""fluid_ops.train and fluid_ops.checkpoint on a tiny stand-in model and dataset.

The stand-in keeps the Fluid model's contract: forward(images, captions, *, generator) -> scalar
loss with all of its own randomness from `generator`, a dataclass `.config`, a frozen
submodule, and (for the discrete variant) needs_tokenizer_fit / fit_tokenizer."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from fluid_ops import checkpoint as ckpt_mod
from fluid_ops.checkpoint import CheckpointError, load_checkpoint, previous_path, save_checkpoint
from fluid_ops.training import StepInfo, _BatchStream, _epoch_permutation, load_ema, lr_at, param_groups, train
from tests.conftest import requires_cuda

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The stand-in is tiny: a second intra-op thread only adds spin-wait contention (10x slower
    steps on a busy 2-core machine). The SIGKILL child sets the same, so numerics match."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
COLOURS = ["red", "green", "blue", "yellow"]
RGB = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])


@dataclass
class ToyConfig:
    image_size: int = 4
    width: int = 32
    vocab: int = 8
    loss_scale: float = 1.0
    nan_after: int = -1          # forward returns NaN from this call on (-1: never)
    vector_loss: bool = False    # forward returns a (B,) tensor instead of a scalar


class ToyModel(nn.Module):
    """Predict the noise added to an image from the noisy image and the caption. The image is
    determined by the caption, so the loss can fall well below its starting value."""

    def __init__(self, config: ToyConfig = ToyConfig()):
        super().__init__()
        self.config = config
        d = 3 * config.image_size ** 2
        self.text = nn.Embedding(config.vocab, config.width)   # the frozen "text encoder"
        self.text.requires_grad_(False)
        self.null_text = nn.Parameter(torch.zeros(config.width))  # 1-D learned embedding
        self.inp = nn.Linear(d, config.width)
        self.norm = nn.LayerNorm(config.width)
        self.drop = nn.Dropout(0.1)                            # draws from the global torch RNG
        self.out = nn.Linear(config.width, d)
        self.calls = 0

    def forward(self, images, captions, *, generator=None):
        self.calls += 1
        b = images.shape[0]
        ids = torch.tensor([COLOURS.index(c.split()[0]) for c in captions], device=images.device)
        t = self.text(ids)
        dropped = torch.rand(b, generator=generator, device=images.device) < 0.1
        t = torch.where(dropped[:, None], self.null_text.expand_as(t), t)
        noise = torch.randn(images.shape, generator=generator, device=images.device).flatten(1)
        h = self.drop(self.norm(torch.relu(self.inp(images.flatten(1) + noise) + t)))
        per_item = ((self.out(h) - noise) ** 2).mean(1) * self.config.loss_scale
        if self.config.nan_after >= 0 and self.calls > self.config.nan_after:
            per_item = per_item * float("nan")
        return per_item if self.config.vector_loss else per_item.mean()


class TokenizerToy(ToyModel):
    """Discrete-variant stand-in: a 'codebook' buffer fitted on training images before step 0."""

    needs_tokenizer_fit = True

    def __init__(self, config: ToyConfig = ToyConfig()):
        super().__init__(config)
        self.register_buffer("codebook", torch.zeros(3))
        self.fit_calls = 0

    def fit_tokenizer(self, images):
        self.fit_calls += 1
        self.codebook.copy_(images.mean((0, 2, 3)))


class ToyShapes(torch.utils.data.Dataset):
    def __init__(self, size=64, image_size=4):
        self.size, self.image_size = size, image_size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        c = i % len(COLOURS)
        img = RGB[c][:, None, None].expand(3, self.image_size, self.image_size).clone()
        return img, f"{COLOURS[c]} square number {i}"


def run(out, *, model=None, steps=20, **kw):
    torch.manual_seed(123)  # model init; train() must not depend on it after a resume
    model = model if model is not None else ToyModel()
    args = dict(steps=steps, batch_size=8, lr=3e-3, warmup_steps=3, ema_decay=0.9, ckpt_every=1000,
                progress=False, seed=7)
    args.update(kw)
    return train(model, ToyShapes(), out_dir=out, **args)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n} differs: max |diff| {(a[n] - b[n]).abs().max().item():.3e}"


# ---- learning, EMA, outputs ---------------------------------------------------------------
def test_loss_falls_ema_tracks_and_outputs_written(tmp_path):
    torch.manual_seed(123)
    model = ToyModel()
    start = params(model)
    res = train(model, ToyShapes(), out_dir=tmp_path, steps=150, batch_size=16, lr=1e-2, warmup_steps=5,
                ema_decay=0.9, ckpt_every=1000, progress=False, seed=1, log_every=7)
    losses = res.history["loss"]
    assert len(losses) == 150 and res.history["step"] == list(range(1, 151))
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.6 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    end = params(model)
    # the frozen text encoder is neither trained nor averaged
    assert torch.equal(start["text.weight"], end["text.weight"]) and "text.weight" not in res.ema
    assert set(res.ema) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, e in res.ema.items():
        assert not torch.equal(e, end[n]), f"EMA of {n} equals the parameter"
        # tracks: much nearer the final weights than the initial ones
        assert (e - end[n]).norm() < 0.5 * (start[n] - end[n]).norm(), n
    # outputs: checkpoint (EMA strict-loadable), history.json, loss.png
    hist = json.loads((tmp_path / "history.json").read_text())
    assert hist["step"] == res.history["step"] and hist["loss"] == pytest.approx(losses)
    assert set(hist) >= {"step", "loss", "lr", "time"}
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 150 and state["config"]["width"] == 32
    fresh = load_ema(ToyModel(), tmp_path)
    for n, e in res.ema.items():
        assert torch.equal(dict(fresh.named_parameters())[n], e)
    assert torch.equal(load_ema(ToyModel(), res).out.weight, res.ema["out.weight"])


def test_warmup_lr_and_ema_formula(tmp_path):
    res = run(tmp_path, steps=6, lr=1e-2, warmup_steps=4, ema_decay=0.5)
    assert res.history["lr"] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    assert [lr_at(s, 1.0, 0) for s in range(3)] == [1.0, 1.0, 1.0]
    assert lr_at(9, 2.0, 10) == 2.0 and lr_at(10, 2.0, 10) == 2.0 and lr_at(0, 2.0, 10) == pytest.approx(0.2)


def test_lr_decay_schedule(tmp_path):
    """Warmup-stable-decay: lr_at multiplies the warmup factor by (1 - progress) / decay over the
    last `decay` of the run; train() feeds it step / steps (and records the schedule)."""
    assert lr_at(5, 2.0, 0, 0.5, 0.4) == 2.0                      # before the decay window
    assert lr_at(5, 2.0, 0, 0.5, 0.75) == pytest.approx(1.0)      # half-way through it
    assert lr_at(5, 2.0, 0, 0.5, 1.0) == 0.0
    assert lr_at(0, 2.0, 10, 0.5, 0.75) == pytest.approx(0.1)     # warmup x decay
    assert lr_at(5, 2.0, 0, 0.0, 0.99) == 2.0                     # decay 0: constant
    res = run(tmp_path, steps=8, lr=1e-2, warmup_steps=2, lr_decay=0.5)
    # step s runs at progress s / 8: decay from step 4 on, (1 - s/8) / 0.5 of the peak
    assert res.history["lr"] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["lr_schedule"]["kind"] == "linear_warmup_stable_decay" and state["lr_schedule"]["decay"] == 0.5
    assert state["train_args"]["lr_decay"] == 0.5
    # by the clock: a 1-minute budget, no step count; the first steps run at the full rate
    res = run(tmp_path / "clock", steps=None, minutes=1.0, lr=1e-2, warmup_steps=0, lr_decay=0.5,
              callback=lambda info: info.step >= 3, log_every=1)
    assert res.history["lr"][:3] == [1e-2, 1e-2, 1e-2]


def test_clock_share_is_one_scalar_reduce_per_step(tmp_path, monkeypatch):
    """With `minutes` and lr_decay the deadline check and the next step's LR read one clock
    share: one max_over_ranks before the loop and one after each step but the last (which stops
    on `steps`), and no separate any_rank for the deadline."""
    from fluid_ops import distributed as D
    shares, flags = [], []      # the scalar reductions train() asks for (each one all-reduce under DDP)
    real_max, real_any = D.max_over_ranks, D.any_rank
    monkeypatch.setattr(D, "max_over_ranks", lambda ctx, x: shares.append(x) or real_max(ctx, x))
    monkeypatch.setattr(D, "any_rank", lambda ctx, f: flags.append(f) or real_any(ctx, f))
    res = run(tmp_path, steps=6, minutes=10.0, lr=1e-2, warmup_steps=0, lr_decay=0.5, log_every=6)
    assert res.step == 6 and len(shares) == 1 + 5
    assert shares == sorted(shares) and 0 <= shares[0] and shares[-1] < 1   # as time passes
    assert flags == [False]                         # only the final save's finiteness check
    assert res.history["lr"] == pytest.approx([1e-2, 1e-2, 1e-2, 1e-2, 2 / 3 * 1e-2, 1 / 3 * 1e-2], abs=1e-6)


def test_ema_update_formula(tmp_path):
    """EMA_t = d * EMA_{t-1} + (1 - d) * p_t, from EMA_0 = initial weights: recomputed from a
    step-by-step replay (steps=1, 2, 3 resumed) and compared."""
    torch.manual_seed(123)
    w = [ToyModel().out.weight.detach().clone()]
    emas = []
    for s in (1, 2, 3):
        r = run(tmp_path, steps=s, ema_decay=0.75)
        w.append(r.model.out.weight.detach().clone())
        emas.append(r.ema["out.weight"])
    e = w[0]
    for s in (1, 2, 3):
        e = 0.75 * e + 0.25 * w[s]
        torch.testing.assert_close(emas[s - 1], e, rtol=1e-6, atol=1e-7)


def test_weight_decay_groups():
    model = ToyModel()
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert set(decay["names"]) == {"inp.weight", "out.weight"}
    assert set(no_decay["names"]) == {"null_text", "inp.bias", "norm.weight", "norm.bias", "out.bias"}
    model.no_weight_decay = lambda: {"out.weight"}
    assert set(param_groups(model, 0.05)[0]["names"]) == {"inp.weight"}


def test_optimizer_in_checkpoint_has_the_groups(tmp_path):
    run(tmp_path, steps=2, weight_decay=0.05)
    groups = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [len(g["params"]) for g in groups] == [2, 5] and groups[0]["betas"] == (0.9, 0.95)


def test_grad_clip_applied(tmp_path):
    big = ToyConfig(loss_scale=1e4)
    res = run(tmp_path / "a", steps=1, model=ToyModel(big), grad_clip=1e-3)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in res.model.parameters()
                                                 if p.grad is not None]))
    assert res.history["grad_norm"][0] > 100  # the pre-clip norm is recorded
    assert norm.item() == pytest.approx(1e-3, rel=1e-4)
    res = run(tmp_path / "b", steps=1, model=ToyModel(big), grad_clip=None)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in res.model.parameters()
                                                 if p.grad is not None]))
    assert norm.item() > 100


# ---- data order ---------------------------------------------------------------------------
def test_batch_stream_is_a_permutation_per_epoch_and_resumable():
    it = iter(_BatchStream(10, 4, seed=3, epoch=0, index=0))
    flat = [i for _ in range(5) for i in next(it)]  # 20 items = 2 epochs
    assert flat[:10] == _epoch_permutation(10, 3, 0).tolist() and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    it2 = iter(_BatchStream(10, 4, seed=3, epoch=1, index=2))  # position after 3 batches of 4
    assert next(it2) == flat[12:16]


def test_workers_give_the_same_run(tmp_path):
    a = run(tmp_path / "a", steps=4, num_workers=0)
    b = run(tmp_path / "b", steps=4, num_workers=1)
    assert_same_params(params(a.model), params(b.model))


# ---- exact resume -------------------------------------------------------------------------
def test_resume_is_exact(tmp_path):
    ref = run(tmp_path / "ref", steps=20)
    half = run(tmp_path / "run", steps=10, ckpt_every=4)
    assert half.step == 10 and load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 10
    torch.manual_seed(999)  # a different global RNG and init: the checkpoint must restore all of it
    resumed = train(ToyModel(), ToyShapes(), out_dir=tmp_path / "run", steps=20, batch_size=8, lr=3e-3,
                    warmup_steps=3, ema_decay=0.9, ckpt_every=1000, progress=False, seed=7)
    assert resumed.step == 20 and (resumed.epoch, resumed.index) == (ref.epoch, ref.index)
    assert_same_params(params(ref.model), params(resumed.model))
    assert_same_params(ref.ema, resumed.ema)
    assert resumed.history["loss"] == ref.history["loss"]
    # resuming a finished run does nothing
    again = run(tmp_path / "run", steps=20)
    assert again.stopped_by == "already_done" and again.step == 20


_CHILD = """
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from tests.test_train import run
run({out!r}, steps=40, ckpt_every=5, log_every=1, callback=lambda info: time.sleep(0.04))
"""


def test_sigkill_mid_run_then_resume_is_exact(tmp_path):
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(repo=str(REPO), out=str(out))], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint.pt").exists():
            assert child.poll() is None, f"child exited early: {child.communicate()[1].decode()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared within 60 s"
            time.sleep(0.01)
        time.sleep(0.5)  # into the run, quite possibly inside a later checkpoint write
        assert child.poll() is None, "the child finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    killed_at = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 5 <= killed_at < 40 and killed_at % 5 == 0
    resumed = run(out, steps=40, ckpt_every=5)
    ref = run(tmp_path / "ref", steps=40)
    assert_same_params(params(ref.model), params(resumed.model))
    assert_same_params(ref.ema, resumed.ema)
    assert not list(out.glob(".checkpoint.pt.*.tmp"))


# ---- checkpoint integrity -----------------------------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run folder after 4 steps with ckpt_every=2: checkpoint.pt (step 4), checkpoint.prev.pt (step 2)."""
    out = tmp_path_factory.mktemp("two") / "run"
    run(out, steps=4, ckpt_every=2)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert load_checkpoint(out / "checkpoint.prev.pt")["step"] == 2
    return out


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "append"])
def test_corrupt_checkpoint_is_refused(tmp_path, two_checkpoints, damage):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    path = out / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_payload":
        data[len(data) * 2 // 3] ^= 0x01
    elif damage == "flip_header":
        data[3] ^= 0x20
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        run(out, steps=8, ckpt_every=2)
    msg = str(err.value)
    assert str(path) in msg and "checkpoint.prev.pt" in msg
    assert path.read_bytes() == bytes(data), "the refused checkpoint was overwritten"
    assert load_checkpoint(out / "checkpoint.prev.pt")["step"] == 2
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_missing_latest_with_previous_present_is_refused(tmp_path, two_checkpoints):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    (out / "checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.prev.pt"):
        run(out, steps=8)


def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *a, **kw)
        f.write(b"partial bytes")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        run(out, steps=4, ckpt_every=2)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert not list(out.glob(".checkpoint.pt.*.tmp")), "temporary file left behind"
    # and the run resumes from it to the uninterrupted result
    resumed = run(out, steps=4, ckpt_every=2)
    assert_same_params(params(run(tmp_path / "ref", steps=4).model), params(resumed.model))


def test_save_checkpoint_roundtrip_and_kept_previous(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint({"a": torch.arange(5), "s": "x", "n": None, "t": (1, 2.5)}, p)
    save_checkpoint({"b": 1}, p)
    assert load_checkpoint(p) == {"b": 1}
    prev = load_checkpoint(previous_path(p))
    assert torch.equal(prev["a"], torch.arange(5)) and prev["t"] == (1, 2.5) and prev["n"] is None
    # what weights_only loading would refuse is refused at write time, and nothing is replaced
    with pytest.raises(TypeError, match=r"payload\['bad'\].*Path"):
        save_checkpoint({"bad": Path("x")}, p)
    assert load_checkpoint(p) == {"b": 1} and not list(tmp_path.glob(".c.pt.*.tmp"))


# ---- budgets, tokenizer fit, errors ---------------------------------------------------------
def test_minutes_budget_stops_and_checkpoints(tmp_path):
    t0 = time.monotonic()
    res = run(tmp_path, steps=None, minutes=0.01)
    took = time.monotonic() - t0
    assert res.stopped_by == "minutes" and res.step > 0
    assert 0.6 <= took < 5.0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == res.step
    # steps and minutes: whichever comes first
    res = run(tmp_path / "b", steps=3, minutes=10)
    assert res.stopped_by == "steps" and res.step == 3


def test_callback_stops_and_sees_progress(tmp_path):
    seen = []

    def cb(info: StepInfo):
        seen.append(info.step)
        return info.step >= 6

    res = run(tmp_path, steps=100, log_every=3, callback=cb)
    assert seen == [3, 6] and res.stopped_by == "callback" and res.step == 6
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 6


def test_tokenizer_fit_once_and_not_on_resume(tmp_path):
    m = TokenizerToy()
    run(tmp_path, steps=2, model=m)
    assert m.fit_calls == 1 and torch.allclose(m.codebook, RGB.mean(0), atol=0.2)
    m2 = TokenizerToy()
    run(tmp_path, steps=4, model=m2)
    assert m2.fit_calls == 0 and torch.equal(m2.codebook, m.codebook)


def test_config_mismatch_and_no_overwrite(tmp_path):
    run(tmp_path, steps=2)
    with pytest.raises(ValueError, match="width: checkpoint 32, model 16"):
        run(tmp_path, steps=4, model=ToyModel(ToyConfig(width=16)))
    with pytest.raises(FileExistsError, match="resume=False"):
        run(tmp_path, steps=4, resume=False)


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1e-3), "lr"), (dict(steps=None, minutes=None), "steps and minutes"),
    (dict(batch_size=0), "batch_size"), (dict(steps=0), "steps"), (dict(minutes=-1), "minutes"),
    (dict(betas=(0.9, 1.5)), "betas"), (dict(ema_decay=1.5), "ema_decay"), (dict(amp="fp8"), "amp"),
    (dict(ckpt_every=0), "ckpt_every"), (dict(grad_clip=0), "grad_clip"), (dict(warmup_steps=-1), "warmup"),
    (dict(lr_decay=1.5), "lr_decay"), (dict(lr_decay=-0.1), "lr_decay"), (dict(lr_decay=True), "lr_decay"),
])
def test_bad_hyperparameters(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        run(tmp_path, **kw)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train(ToyModel(), ToyShapes(size=0), out_dir=tmp_path, steps=2, progress=False)


def test_non_scalar_loss_names_the_step(tmp_path):
    with pytest.raises(TypeError, match=r"step 0 .*shape \(8,\)"):
        run(tmp_path, model=ToyModel(ToyConfig(vector_loss=True)))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="step 5 is nan") as err:
        run(tmp_path, steps=20, ckpt_every=2, log_every=10, model=ToyModel(ToyConfig(nan_after=4)))
    assert "step 4" in str(err.value)  # the last good checkpoint
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["model"].values())


# ---- precision and devices ----------------------------------------------------------------
def test_bf16_autocast_on_cpu(tmp_path):
    fp32 = run(tmp_path / "a", steps=3, amp="none")
    bf16 = run(tmp_path / "b", steps=3, amp="bf16")
    assert all(map(math.isfinite, bf16.history["loss"]))
    assert bf16.history["loss"] != fp32.history["loss"]  # autocast really ran the GEMMs in bf16
    assert bf16.history["loss"] == pytest.approx(fp32.history["loss"], rel=0.05)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # weights stay fp32


@requires_cuda
def test_cuda_bf16_train_and_resume(tmp_path):
    ref = run(tmp_path / "ref", steps=12, device="cuda")
    assert all(map(math.isfinite, ref.history["loss"])) and ref.model.out.weight.is_cuda
    run(tmp_path / "run", steps=6, device="cuda")
    resumed = run(tmp_path / "run", steps=12, device="cuda")
    for n, p in ref.model.named_parameters():
        torch.testing.assert_close(resumed.model.state_dict()[n], p.detach(), msg=n)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["train_args"]["amp"] == "auto" and "cuda" in state["rng"]


def test_precision_is_chosen_by_the_hardware_and_recorded(tmp_path, monkeypatch):
    """amp="auto" is bf16 autocast where the device computes bf16 natively (backend.auto_precision),
    fp32 elsewhere; "fp32" is the same as "none"; the resolved choice and the CPU's SIMD flags are
    in the checkpoint's train_args."""
    from fluid_ops import backend
    from fluid_ops.checkpoint import load_checkpoint
    monkeypatch.delenv("FLUID_OPS_PRECISION", raising=False)  # conftest pins fp32 for the other tests
    for flags, want in (({"avx2", "fma"}, "fp32"), ({"avx2", "avx512f", "avx512_bf16"}, "bf16")):
        monkeypatch.setattr(backend, "_read_cpu_flags", lambda flags=flags: frozenset(flags))
        monkeypatch.setattr(backend, "_CPU_FLAGS", None)
        out = tmp_path / want
        run(out, steps=2, device="cpu")
        args = load_checkpoint(out / "checkpoint.pt")["train_args"]
        assert args["amp"] == "auto" and args["precision"] == want and "avx2" in args["cpu_simd_flags"]
    run(tmp_path / "fp32", steps=2, device="cpu", amp="fp32")
    assert load_checkpoint(tmp_path / "fp32" / "checkpoint.pt")["train_args"]["precision"] == "fp32"
    with pytest.raises(ValueError, match="amp: expected"):
        run(tmp_path / "bad", steps=1, device="cpu", amp="fp16")
    monkeypatch.setattr(backend, "_CPU_FLAGS", None)
