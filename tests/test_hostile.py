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


class ToyModel(torch.nn.Module):
    """The smallest model `train` accepts: a scalar loss drawn from `generator`, a dict config."""

    def __init__(self):
        super().__init__()
        self.config = {"toy": 1}
        self.lin = torch.nn.Linear(3 * 4 * 4, 1)

    def forward(self, images, captions, *, generator=None):
        noise = torch.randn(images.shape[0], 1, generator=generator)
        return ((self.lin(images.flatten(1)) - noise) ** 2).mean()


class ToyShapes(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((3, 4, 4), (i % 4) / 4), f"colour {i % 4}"


SMALL = {"text.encoder": "hash", "image.size": 16, "image.patch_size": 4, "image.codebook_size": 16,
         "model.width": 64, "model.depth": 1, "model.num_heads": 2, "text.aligner_depth": 1, "head.depth": 1,
         "head.width": 64, "sampling.num_diffusion_steps": 5}
CAPTIONS = ["a red circle at the top left", "a blue square"]


# ---- 2. one writer per run folder; no command writes over a checkpoint it did not make ---------
_HOLD = """
import sys, time
from fluid_ops.checkpoint import RunLock
lock = RunLock(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_second_training_on_the_same_folder_fails_at_once_naming_the_holder(tmp_path):
    import subprocess
    import sys
    from fluid_ops.checkpoint import RunInUseError
    from fluid_ops.training import train
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / ".checkpoint.pt.123.tmp").write_bytes(b"half-written by the other run")
        with pytest.raises(RunInUseError, match=f"pid {holder.pid}"):
            train(ToyModel(), ToyShapes(), out_dir=out, steps=2, batch_size=8, progress=False, device="cpu")
        assert (out / ".checkpoint.pt.123.tmp").exists()  # the other run's file was not cleaned up
    finally:
        holder.kill()
        holder.wait()
    # the holder died (the kernel dropped its lock): the folder is usable again
    r = train(ToyModel(), ToyShapes(), out_dir=out, steps=2, batch_size=8, progress=False, device="cpu")
    assert r.step == 2
    # released after the run: a resume in this process takes it again
    assert train(ToyModel(), ToyShapes(), out_dir=out, steps=3, batch_size=8, progress=False, device="cpu").step == 3


def test_train_on_cuda_without_cuda_fails_before_making_the_folder(tmp_path):
    from fluid_ops.training import train
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(ToyModel(), ToyShapes(), out_dir=tmp_path / "o", steps=1, batch_size=8, progress=False, device="cuda")
    assert not (tmp_path / "o").exists()


def test_report_and_image_outputs_refuse_checkpoints_and_run_files(tmp_path):
    from fluid_ops.checkpoint import refuse_overwriting_run_file, save_checkpoint
    save_checkpoint({"a": 1}, tmp_path / "model.bin")
    for bad in ("checkpoint.pt", "x.pt", "history.json", "loss.png", "model.bin", ".lock"):
        with pytest.raises(FileExistsError, match="--out"):
            refuse_overwriting_run_file(tmp_path / bad)
    with pytest.raises(FileExistsError, match="folder"):
        refuse_overwriting_run_file(tmp_path)
    refuse_overwriting_run_file(tmp_path / "eval.json")  # fine


# ---- 5. the CLI: one line for an input error, exit status 2 -------------------------------------
def _cli(args, capsys):
    from fluid_ops import cli
    with pytest.raises(SystemExit) as ei:
        cli.main(args)
    err = capsys.readouterr().err
    return ei.value.code, err


TINY = ["--config", "tiny", "--set", "text.encoder=hash", "--batch-size", "8", "--warmup", "1", "--no-progress"]


def test_cli_input_errors_are_one_line_exit_2(tmp_path, capsys):
    code, err = _cli(["generate", "--ckpt", str(tmp_path), "--prompt", "a", "-n", "0", "--out",
                      str(tmp_path / "g.png")], capsys)
    assert code == 2 and err.strip() == "fluid-ops: error: -n: images per prompt must be >= 1, got 0"
    code, err = _cli(["train", *TINY, "--steps", "1", "--config", "no-such-config", "--out", str(tmp_path / "o")],
                     capsys)
    assert code == 2 and err.startswith("fluid-ops: error: ") and "Traceback" not in err and err.count("\n") == 1
    if not torch.cuda.is_available():
        code, err = _cli(["train", *TINY, "--steps", "1", "--device", "cuda", "--out", str(tmp_path / "c")], capsys)
        assert code == 2 and "CUDA is not available" in err and not (tmp_path / "c").exists()
    (tmp_path / "p.txt").write_bytes(b"a red circle\n\xff\xfe bad\n")
    code, err = _cli(["generate", "--ckpt", str(tmp_path), "--prompts-file", str(tmp_path / "p.txt"),
                      "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2 and "not UTF-8" in err and "line 2" in err
    # --debug keeps the traceback of an input error
    from fluid_ops import cli
    with pytest.raises(ValueError):
        cli.main(["--debug", "train", *TINY, "--steps", "1", "--config", "no-such-config",
                  "--out", str(tmp_path / "o")])


def test_cli_evaluate_and_generate_do_not_overwrite_a_checkpoint(tmp_path, capsys):
    from fluid_ops.checkpoint import save_checkpoint
    ck = save_checkpoint({"a": 1}, tmp_path / "checkpoint.pt")
    before = ck.read_bytes()
    for cmd in (["evaluate", "--ckpt", str(tmp_path)], ["generate", "--ckpt", str(tmp_path), "--prompt", "a"]):
        code, err = _cli([*cmd, "--out", str(ck)], capsys)
        assert code == 2 and "refusing to overwrite" in err
    assert ck.read_bytes() == before


# ---- 3. bad data is named where it enters ----------------------------------------------------------
def _png(path, size=8, colour=(255, 0, 0)):
    from PIL import Image
    Image.new("RGB", (size, size), colour).save(path, format="PNG")


def _folder(tmp_path, n=3):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(n):
        _png(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a red square {i}")
    return root


def test_truncated_image_is_named_at_construction_or_skipped(tmp_path):
    from fluid_ops.data import DataError, ImageCaptionFolder
    root = _folder(tmp_path)
    data = (root / "1.png").read_bytes()
    (root / "1.png").write_bytes(data[: len(data) // 2])
    (root / "3.png").write_bytes(b"not an image at all")
    (root / "3.txt").write_text("junk")
    with pytest.raises(DataError, match="1.png"):
        ImageCaptionFolder(root, size=8)
    with pytest.warns(UserWarning, match=r"skipped 2 of 4 .*1\.png"):
        ds = ImageCaptionFolder(root, size=8, on_bad="skip")
    assert len(ds) == 2 and [p for p, _ in ds.skipped] == [str(root / "1.png"), str(root / "3.png")]
    # without the decode pass the error still names the file when the sample is read
    ds = ImageCaptionFolder(root, size=8, verify=False)
    with pytest.raises(DataError, match="3.png"):
        ds[3]


def test_captions_bom_non_utf8_and_skipped_formats(tmp_path):
    from PIL import Image
    from fluid_ops.data import DataError, ImageCaptionFolder
    root = _folder(tmp_path)
    (root / "0.txt").write_bytes("\ufeffa red square".encode("utf-8"))
    ds = ImageCaptionFolder(root, size=8)
    assert ds[0][1] == "a red square"
    (root / "1.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match=r"1\.txt.*not UTF-8"):
        ImageCaptionFolder(root, size=8)
    (root / "1.txt").write_text("ok")
    Image.new("RGB", (8, 8)).save(root / "4.gif")
    (root / "4.txt").write_text("a gif")
    (root / "5.heic").write_bytes(b"x")
    (root / "5.txt").write_text("a heic")
    with pytest.warns(UserWarning, match=r"format it does not read.*5\.heic"):
        ds = ImageCaptionFolder(root, size=8)
    assert len(ds) == 4  # the gif is read


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    import numpy as np
    from PIL import Image
    from fluid_ops.data import ImageCaptionFolder
    root = tmp_path / "d"
    root.mkdir()
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(root / "a.png")
    (root / "a.txt").write_text("grey")
    img, _ = ImageCaptionFolder(root, size=8)[0]
    assert img.shape == (3, 8, 8) and abs(float(img.mean()) - 0.5) < 1e-3


def test_symlink_out_of_the_data_folder_is_refused(tmp_path):
    from fluid_ops.data import DataError, ImageCaptionFolder
    root = _folder(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (root / "2.txt").unlink()
    (root / "2.txt").symlink_to(secret)
    with pytest.raises(DataError, match="outside the data folder"):
        ImageCaptionFolder(root, size=8)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(ImageCaptionFolder(root, size=8, on_bad="skip")) == 2


def test_corrupt_shard_member_is_named(tmp_path):
    import tarfile
    from fluid_ops.data import ShardDataset, ShardError
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tf:
        for key, data, cap in (("a", None, b"ok"), ("b", b"garbage", b"fine"), ("c", None, b"\xff\xfe")):
            if data is None:
                buf = io.BytesIO()
                _png(buf)
                data = buf.getvalue()
            for ext, payload in (("png", data), ("txt", cap)):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    ds = ShardDataset(shard, size=8)
    assert ds[0][1] == "ok"
    with pytest.raises(ShardError, match=r"b\.png of shard .*s\.tar"):
        ds[1]
    with pytest.raises(ShardError, match=r"c\.txt of shard .*not UTF-8"):
        ds[2]
    with pytest.raises(ShardError, match=r"b\.png"):
        ShardDataset(shard, size=8, verify=True)
    # on_bad="skip": the next readable sample stands in, the same one on every read (a resumed run
    # reads what the interrupted one read), one warning naming the member
    skip = ShardDataset(shard, size=8, on_bad="skip")
    with pytest.warns(UserWarning, match=r"b\.png of shard"):
        first = skip[1]
    assert first[1] == "ok" and torch.equal(first[0], skip[0][0])   # b -> c (bad caption) -> a
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = skip[1]                                           # no second warning for the same sample
    assert torch.equal(again[0], first[0]) and again[1] == first[1]
    assert set(skip.skipped) == {1, 2}
    with pytest.raises(ValueError, match="on_bad"):
        ShardDataset(shard, size=8, on_bad="ignore")


def test_cli_names_a_bad_shard_member_before_the_run_folder(tmp_path, capsys):
    import tarfile
    from fluid_ops import cli
    data = tmp_path / "shards"
    data.mkdir()
    with tarfile.open(data / "s.tar", "w") as tf:
        for ext, payload in (("png", b"garbage"), ("txt", b"a red circle")):
            ti = tarfile.TarInfo(f"x.{ext}")
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", "tiny", "--set", "text.encoder=hash", "--data", str(data), "--out", str(out),
                  "--steps", "1", "--no-progress"])
    assert e.value.code == 2 and "x.png of shard" in capsys.readouterr().err
    assert not out.exists()


# ---- 4. ops validate before they write; NaN never stands for a defined result ------------------------
def _kv(b=2, nmax=8, h=2, d=32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, nmax, h, d, generator=g), torch.randn(b, nmax, h, d, generator=g),
            torch.randn(b, 1, h, d, generator=g), torch.randn(b, 1, h, d, generator=g))


def test_kvcache_zero_queries_appends_and_returns_empty():
    import fluid_ops
    kc, vc, kn, vn = _kv()
    want_k, want_v = kc.clone(), vc.clone()
    seq = torch.tensor([3, 5])
    for bi, s in enumerate(seq.tolist()):
        want_k[bi, s], want_v[bi, s] = kn[bi, 0], vn[bi, 0]
    q = torch.randn(2, 0, 2, 32)
    o = fluid_ops.attention_kvcache(q, kc, vc, kn, vn, cache_seqlens=seq)
    assert o.shape == (2, 0, 2, 32)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_kvcache_refuses_aliased_and_grad_caches_before_writing():
    import fluid_ops
    kc, vc, kn, vn = _kv()
    q = torch.randn(2, 1, 2, 32)
    seq = torch.tensor([1, 2])
    expanded = torch.randn(1, 8, 2, 32).expand(2, 8, 2, 32)
    before = expanded.clone()
    with pytest.raises(ValueError, match="k_cache has elements that share memory"):
        fluid_ops.attention_kvcache(q, expanded, vc, kn, vn, cache_seqlens=seq)
    assert torch.equal(expanded, before)
    with pytest.raises(ValueError, match="same memory"):
        fluid_ops.attention_kvcache(q, kc, kc, kn, vn, cache_seqlens=seq)
    leaf = kc.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="k_cache requires grad"):
        fluid_ops.attention_kvcache(q, leaf, vc, kn, vn, cache_seqlens=seq)
    with torch.no_grad():  # allowed without grad mode
        fluid_ops.attention_kvcache(q, leaf, vc, kn, vn, cache_seqlens=seq)


def test_messages_name_the_argument():
    import fluid_ops
    q = torch.randn(1, 2, 1, 32)
    with pytest.raises(ValueError, match="softmax_scale must be at most .*largest float32.*got 1e\\+39"):
        fluid_ops.attention(q, q, q, softmax_scale=1e39)
    table = torch.zeros(10, 6)
    x = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="step must be a Python int, got bool"):
        fluid_ops.ddpm_step(x, torch.zeros(2, 8), torch.zeros(2, 4), table, True)


def test_fluid_forward_refuses_0_255_images_and_an_empty_batch():
    from fluid_ops.models import Fluid
    model = Fluid("tiny", **SMALL)
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got values in .*divide by 255"):
        model(images * 255, CAPTIONS[:2], generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="batch is empty"):
        model(images[:0], [], generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        model(images, CAPTIONS[:2], generator=123)
    assert torch.isfinite(model(images, CAPTIONS[:2], generator=torch.Generator().manual_seed(0)))


def test_mar_label_out_of_range_is_named():
    from fluid_ops.models.mar import MAR
    torch.manual_seed(0)
    mar = MAR(img_size=64, vae_stride=16, encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2,
              decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2, buffer_size=4, class_num=10,
              diffloss_d=1, diffloss_w=64, num_sampling_steps="8")
    imgs = torch.randn(2, 16, 4, 4)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\)"):
        mar(imgs, torch.tensor([1, 10]))


def test_diffusion_sample_runs_an_fp64_head_and_names_a_bad_generator():
    import fluid_ops
    from fluid_ops.nn import DenoiserMLP
    net = DenoiserMLP(4, 32, 8, 16, 2).double()
    z = torch.randn(3, 16, dtype=torch.float64)
    x = fluid_ops.diffusion_sample(net, z, num_steps=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 4) and torch.isfinite(x).all()
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fluid_ops.diffusion_sample(net.float(), z.float(), num_steps=3, generator=123)


def test_cli_train_names_a_bad_image_before_making_the_run_folder(tmp_path, capsys):
    root = _folder(tmp_path)
    (root / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, err = _cli(["train", *TINY, "--steps", "1", "--data", str(root), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "2.png" in err and err.startswith("fluid-ops: error: ")
    assert not (tmp_path / "o").exists()
