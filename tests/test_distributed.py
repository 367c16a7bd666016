"""Training past one process: torchrun + DDP / FSDP2 on CPU with gloo (2 processes), WebDataset
shards, `prepare`d caches, exact resume after SIGKILL on the same or another number of ranks.

Each launch of 2 ranks costs ~10 s on a busy 2-core machine (interpreters importing torch), so
the launches are few and each checks several things: the worker runs are started directly
with torchrun's environment variables, the command-line resume with torchrun itself. Tiny Fluid (hash text encoder, 2
blocks); the one-process references run in this process with `tests/dist_worker.build`."""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fluid_ops import distributed as D
from fluid_ops.checkpoint import CheckpointError, load_checkpoint
from fluid_ops.data import ImageCaptionFolder, ShapesDataset, ShardDataset, ShardError, write_shards
from fluid_ops.nn.prepared import PreparedText, PreparedTokens
from fluid_ops.prepare import prepare
from fluid_ops.training import _BatchStream
from tests import dist_worker

REPO = Path(__file__).resolve().parents[1]
TRAIN = dict(steps=4, batch_size=8, lr=2e-3, warmup_steps=2, ema_decay=0.9, ckpt_every=2, seed=3, grad_clip=0.05)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run with OMP_NUM_THREADS=1: same kernels, same rounding
    yield
    torch.set_num_threads(n)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return env


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def _launch(nproc: int, args: list[str], timeout=900):
    p = subprocess.run(_torchrun(nproc, args), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _spawn(nproc: int, spec: dict, **popen) -> list[subprocess.Popen]:
    """The ranks of a worker run, started directly with torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT): one interpreter less per launch than torchrun itself."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for r in range(nproc):
        env = {**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE":
               str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "dist_worker.py"), json.dumps(spec)],
                                      cwd=REPO, env=env, **popen))
    return procs


def _worker(nproc: int, spec: dict, timeout=900):
    procs = _spawn(nproc, spec, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, (o, e)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed ({p.returncode}):\n{o[-2000:]}\n{e[-5000:]}"


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _close(a: dict, b: dict, atol=2e-6, what="parameters"):
    assert a.keys() == b.keys()
    worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)
    assert worst[0] <= atol, f"{what}: {worst[1]} differs by {worst[0]:.3e} (> {atol:.3e})"


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """32 shapes as a WebDataset of png + txt (written by webdataset.TarWriter), 4 shards."""
    from PIL import Image
    root = tmp_path_factory.mktemp("wds")
    ds = ShapesDataset(size=32, length=32, seed=1)

    def samples():
        for i in range(len(ds)):
            img, cap = ds[i]
            buf = io.BytesIO()
            Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "png")
            yield {"__key__": f"s{i:04d}", "png": buf.getvalue(), "txt": cap}
    paths = write_shards(samples(), root, samples_per_shard=8)
    assert len(paths) == 4
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """48 shapes prepared for the tiny test model, with both flip views, 3 shards."""
    out = tmp_path_factory.mktemp("prep")
    model, _ = dist_worker.build({})
    prepare(ShapesDataset(size=32, length=48, seed=2), out, model.config, flip=True, batch_size=16,
            samples_per_shard=16, progress=False)
    return out


# ---- DDP --------------------------------------------------------------------------------------
def test_ddp_two_ranks_equal_each_other_and_one_process(tmp_path, image_shards):
    """2 ranks x 4 per rank == 1 process x 8: same parameters, EMA, losses; every sample of the
    WebDataset read exactly once in the epoch the 4 steps cover, by one rank only."""
    spec = {"data": str(image_shards), "train": TRAIN, "out": str(tmp_path / "ddp"), "dump": True,
            "record": str(tmp_path / "reads")}
    _worker(2, spec)
    r0, r1 = (torch.load(tmp_path / "ddp" / f"params.rank{r}.pt") for r in (0, 1))
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"ranks disagree on {k}"
    ref = dist_worker.run({"data": str(image_shards), "train": TRAIN}, tmp_path / "one")
    _close(r0["params"], _params(ref.model))
    ck = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    _close(ck["ema"], ref.ema_state_dict(), what="EMA")
    np.testing.assert_allclose(ck["history"]["loss"], ref.history["loss"], rtol=1e-5)
    assert ck["world_size"] == 2 and len(ck["rng_per_rank"]) == 2
    assert all(g is not None and g > TRAIN["grad_clip"] for g in ck["history"]["grad_norm"])  # clipping active
    reads = [(tmp_path / f"reads.rank{r}").read_text().split() for r in (0, 1)]
    assert not set(reads[0]) & set(reads[1])
    assert sorted(reads[0] + reads[1]) == sorted(ShardDataset(image_shards).keys)  # 4 x 8 = the epoch


_KILLED = dict(steps=40, batch_size=8, lr=2e-3, warmup_steps=2, ema_decay=0.9, ckpt_every=3, seed=5)


def test_sigkill_then_resume_on_two_and_on_one_rank_is_exact(tmp_path):
    """A 2-rank DDP run SIGKILLed (both ranks) at some point after its first checkpoint,
    resumed (a) on 2 ranks and (b) in one process, ends with the parameters of an uninterrupted
    one-process run."""
    out = tmp_path / "run"
    spec = {"train": _KILLED, "out": str(out), "sleep": 0.15}
    procs = _spawn(2, spec, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():
            for p in procs:
                assert p.poll() is None, f"a rank exited early: {p.communicate()[1].decode()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        time.sleep(0.6)  # some steps into the run, perhaps inside the next checkpoint write
        assert all(p.poll() is None for p in procs), "the run finished before it could be killed"
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            assert p.wait(10) == -signal.SIGKILL
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    killed_at = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 3 <= killed_at < 12 and killed_at % 3 == 0
    steps = 12
    one = tmp_path / "one"
    shutil.copytree(out, one)
    spec12 = {"train": {**_KILLED, "steps": steps}}
    ref = dist_worker.run(spec12, tmp_path / "ref")
    resumed_one = dist_worker.run(spec12, one)                          # (b) one process
    # The bound: 2 ranks sum gradients in another order than one process, and AdamW carries that
    # rounding forward; an uninterrupted 2-rank run of the same 12 steps measures how far it goes
    # on this CPU, and the resumed run (2 ranks for fewer steps) may differ at most twice as much.
    _worker(2, {"train": spec12["train"], "out": str(tmp_path / "ddp12"), "dump": True})
    ddp12 = torch.load(tmp_path / "ddp12" / "params.rank0.pt")
    ck12 = load_checkpoint(tmp_path / "ddp12" / "checkpoint.pt")
    atol = max(2e-6, 2 * _worst(ddp12["params"], _params(ref.model)))
    atol_ema = max(2e-6, 2 * _worst({k: ck12["ema"][k] for k in ref.ema}, ref.ema))
    _close(_params(resumed_one.model), _params(ref.model), atol=atol)
    _close(resumed_one.ema, ref.ema, atol=atol_ema, what="EMA")
    assert resumed_one.history["loss"] == pytest.approx(ref.history["loss"], rel=1e-5)
    # (a) two ranks again, through the command line
    cli = ["-m", "fluid_ops", "train", "--config", "tiny", "--data", "shapes", "--out", str(out), "--steps",
           str(steps), "--batch-size", "8", "--lr", "2e-3", "--warmup", "2", "--ema-decay", "0.9",
           "--ckpt-every", "3", "--seed", "5", "--no-progress", "--device", "cpu"]
    for k, v in dist_worker.TINY.items():
        cli += ["--set", f"{k}={v}"]
    _launch(2, cli)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == steps and (ck["data"]["epoch"], ck["data"]["index"]) == (ref.epoch, ref.index)
    assert ck["world_size"] == 2
    _close(ck["model"], ref.model.state_dict(), what="state dict")  # parameters and buffers (e.g. running text statistics)
    _close(ck["ema"], ref.ema_state_dict(), what="EMA")
    assert not list(out.glob(".checkpoint.pt.*.tmp"))
    from fluid_ops.cli import load_model
    load_model(out)


# ---- FSDP2 ------------------------------------------------------------------------------------
@contextlib.contextmanager
def one_process_group(tmp_path):
    """A gloo process group of one process, in this process (FSDP2 needs a group)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_two_ranks_match_one_process_and_resume_on_one_rank(tmp_path, prepared):
    """FSDP2 (fully_shard on CPU/gloo, clipping on DTensor grads) on prepared shards with flip
    views: 2 ranks match the one-process run; its torch.distributed.checkpoint folder resumes on
    1 rank (resharded), here with bf16 autocast, to the one-process run resumed alike;
    consolidate() gives a checkpoint.pt that load_model reads; a damaged file is refused."""
    out = tmp_path / "fsdp"
    _worker(2, {"data": str(prepared), "train": {**TRAIN, "fsdp": True}, "out": str(out), "dump": True})
    spec = {"data": str(prepared), "train": TRAIN}
    ref = dist_worker.run(spec, tmp_path / "one")
    ref6 = dist_worker.run(spec, tmp_path / "one", steps=6, amp="bf16")
    got = torch.load(out / "params.rank0.pt")
    _close(got["params"], _params(ref.model))
    folder = D.latest_dcp_dir(out)
    assert folder.name == "ckpt-00000004.dcp" and (out / "ckpt-00000002.dcp").is_dir()
    meta = D.load_dcp_meta(folder)
    assert meta["step"] == 4 and len(meta["rng_per_rank"]) == 2 and meta["data"]["index"] == 32
    assert all(g > TRAIN["grad_clip"] for g in meta["history"]["grad_norm"])  # clipping was active
    with one_process_group(tmp_path):
        res = dist_worker.run(spec, out, steps=6, amp="bf16", fsdp=True)  # 1 rank now, bf16 autocast
        res_ema = {n: t.full_tensor() for n, t in res.ema.items()}
        res_params = dist_worker.full_params(res.model)
    assert res.step == 6 and (res.epoch, res.index) == (ref6.epoch, ref6.index)
    # bf16: the GEMMs round differently at another batch split and AdamW turns tiny gradient
    # differences into steps of up to lr (2e-3): a rounding-level check only
    _close(res_params, _params(ref6.model), atol=2 * 2e-3)
    np.testing.assert_allclose(res.history["loss"], ref6.history["loss"], rtol=2e-2)
    ck = D.consolidate(out, tmp_path / "consolidated.pt")
    from fluid_ops.cli import load_model
    m = load_model(ck, ema=True)
    _close(_params(m), res_ema, atol=0, what="EMA")
    with pytest.raises(CheckpointError, match="fsdp=True"):
        dist_worker.run(spec, out, steps=8)
    victim = next(D.latest_dcp_dir(out).glob("*.distcp"))
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    with pytest.raises(CheckpointError, match=victim.name):
        D.load_dcp_meta(D.latest_dcp_dir(out))


def test_fsdp_needs_a_process_group(tmp_path):
    with pytest.raises(ValueError, match="torchrun"):
        dist_worker.run({"train": {**TRAIN, "fsdp": True}}, tmp_path)


# ---- per-global-batch randomness ----------------------------------------------------------------
def test_batch_slices_give_the_full_batch_loss_and_gradient(prepared):
    model, _ = dist_worker.build({})
    ds = ShardDataset(prepared)
    tokens, text = ds.collate([ds[i] for i in range(8)])
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    full = model(tokens, text, generator=g())
    grads_full = torch.autograd.grad(full, [p for p in model.parameters() if p.requires_grad])
    halves = []
    for s in (0, 4):
        part_t = PreparedTokens(tokens.tokens[s:s + 4])
        part_x = PreparedText(text.emb[s:s + 4], text.mask[s:s + 4])
        halves.append(model(part_t, part_x, generator=g(), batch_slice=(s, 8)))
    mean = (halves[0] + halves[1]) / 2
    grads = torch.autograd.grad(mean, [p for p in model.parameters() if p.requires_grad])
    assert mean.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(grads_full, grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    with pytest.raises(ValueError, match="batch_slice"):
        model(part_t, part_x, generator=g(), batch_slice=(6, 8))


# ---- data: shards, workers, errors ----------------------------------------------------------------
def test_shards_read_once_per_epoch_across_ranks_and_workers(tmp_path, image_shards):
    ds = ShardDataset(image_shards, size=32)
    n, batch = len(ds), 8
    for world in (1, 2, 4):
        seen = []
        for rank in range(world):
            log = tmp_path / f"w{world}r{rank}"
            rec = dist_worker.Recording(ds, log)
            # the training loop's sampler, cut after two epochs (the endless stream would let the
            # workers prefetch into a third)
            sampler = D.RankSlicedBatches(_BatchStream(n, batch, 0, 0, 0), D.DistContext(rank, world))
            two_epochs = list(itertools.islice(iter(sampler), 2 * n // batch))
            loader = torch.utils.data.DataLoader(rec, batch_sampler=two_epochs, num_workers=2, collate_fn=ds.collate)
            for images, caps in loader:
                assert images.shape == (batch // world, 3, 32, 32) and len(caps) == batch // world
            seen += log.read_text().split()
        counts = {k: seen.count(k) for k in ds.keys}
        assert set(counts.values()) == {2}, f"world {world}: {counts}"  # once per epoch, two epochs


def test_our_shards_are_webdataset_shards(image_shards):
    import webdataset as wds
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in image_shards.glob("*.tar")), shardshuffle=False)]
    assert keys == ShardDataset(image_shards).keys


def test_truncated_shard_names_the_file(tmp_path, image_shards):
    src = sorted(image_shards.glob("*.tar"))[1]
    data = src.read_bytes()
    with tarfile.open(src) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # end of the last member's data blocks
    # cut: into the end-of-archive blocks, into the last member's data, inside the first, in a header
    for cut in (end + 600, last.offset_data + last.size // 2, 700, 10):
        bad = tmp_path / f"cut{cut}"
        bad.mkdir()
        (bad / src.name).write_bytes(data[:cut])
        with pytest.raises(ShardError, match=f"{src.name}.*(truncated|not a tar)"):
            ShardDataset(bad)


def test_missing_caption_names_the_file_and_sample(tmp_path):
    tar = tmp_path / "shard-000000.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in (("a.png", b"x"), ("a.txt", b"cap"), ("b.png", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*'b' has no caption"):
        ShardDataset(tmp_path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image
    Image.new("RGB", (4, 4)).save(folder / "x.png")
    with pytest.raises(FileNotFoundError, match=r"x\.png.*x\.txt"):
        ImageCaptionFolder(folder)


# ---- prepare --------------------------------------------------------------------------------------
def test_prepared_cache_gives_the_images_loss_and_flipped_view(tmp_path, prepared):
    model, _ = dist_worker.build({})
    src = ShapesDataset(size=32, length=48, seed=2)
    ds = ShardDataset(prepared)
    assert ds.prepared and len(ds) == 48 and json.loads((prepared / "prepared.json").read_text())["views"] == 2
    ds.check_model_config(model.config.flat_dict())  # caches are keyed by the flat names
    items = [ds[i] for i in range(6)]
    images = torch.stack([src[i][0] for i in range(6)])
    caps = [src[i][1] for i in range(6)]
    tokens, text = ds.collate(items)
    torch.testing.assert_close(tokens.tokens[:, 0], model.tokenizer.encode(images), atol=0, rtol=0)
    torch.testing.assert_close(tokens.tokens[:, 1], model.tokenizer.encode(images.flip(-1)), atol=0, rtol=0)
    one_view = PreparedTokens(tokens.tokens[:, :1].contiguous())
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    torch.testing.assert_close(model(one_view, text, generator=g()), model(images, caps, generator=g()),
                               atol=1e-6, rtol=1e-6)
    other, _ = dist_worker.build({"set": {"patch_size": 8}})
    with pytest.raises(ValueError, match="patch_size"):
        ds.check_model_config(other.config.flat_dict())
    layer = model.config.text.layer
    assert model.config.text.encoder == "hash"          # no layers: another text_layer is the same cache
    ds.check_model_config({**model.config.flat_dict(), "text_layer": layer + 1})
    with pytest.raises(ValueError, match="text_encoder: cache 'hash', model 'minilm'"):
        ds.check_model_config({**model.config.flat_dict(), "text_encoder": "minilm"})
    ds.meta["model"]["text_encoder"] = "minilm"        # as if prepared with a transformers encoder
    minilm = {**model.config.flat_dict(), "text_encoder": "minilm"}
    ds.check_model_config(minilm)
    with pytest.raises(ValueError, match=f"text_layer: cache {layer}, model {layer + 1}"):  # another hidden state
        ds.check_model_config({**minilm, "text_layer": layer + 1})
