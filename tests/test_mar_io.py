"""Loading and saving MAR: MAR's own `.pth` checkpoints (`MAR.from_checkpoint`), our
safetensors files (`fluid_ops.models.io`, `MAR.save` / `MAR.load`), and their errors."""
from __future__ import annotations

import argparse
import json
import os
from functools import partial

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import fluid_ops
from fluid_ops.models import io as mio
from fluid_ops.models.mar import FACTORIES, KIND, MAR, _factory_of_shapes, mar_tiny


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny(seed=0, **kw) -> MAR:
    torch.manual_seed(seed)
    m = mar_tiny(class_num=10, **kw)
    g = gen(seed + 100)
    with torch.no_grad():  # every tensor distinct and non-zero (MAR zero-inits the head's adaLN)
        for p in m.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return m


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# ---- safetensors: MAR.save / MAR.load -------------------------------------------------------
def test_save_load_round_trip_is_bit_exact(tmp_path):
    m = tiny(num_sampling_steps="5", buffer_size=3)
    path = m.save(tmp_path / "sub" / "mar.safetensors")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["mar.safetensors"]  # no temp left
    n = MAR.load(path)
    assert same_weights(m, n) and n.config == m.config and not n.training
    assert all(p.requires_grad for p in n.parameters())
    assert n.diffloss.num_sampling_steps == 5 and n.buffer_size == 3
    lab = torch.tensor([1, 7])
    a = m.eval().sample_tokens(2, num_iter=3, cfg=2.0, labels=lab, generator=gen(0))
    assert torch.equal(a, n.sample_tokens(2, num_iter=3, cfg=2.0, labels=lab, generator=gen(0)))
    meta = mio.read_metadata(path)
    assert meta["kind"] == KIND and meta["fluid_ops_version"] == fluid_ops.__version__ and meta["format"] == 1
    assert meta["config"] == json.loads(json.dumps(m.config))


def test_save_load_keeps_dtype(tmp_path):
    m = tiny().to(torch.bfloat16)
    n = MAR.load(m.save(tmp_path / "bf16.safetensors"))
    assert same_weights(m, n) and n.class_emb.weight.dtype == torch.bfloat16


def test_save_replaces_atomically_and_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    tiny(seed=1).save(path)
    m2 = tiny(seed=2)
    m2.save(path)  # overwrite
    assert same_weights(MAR.load(path), m2)

    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):  # writes half a file, then fails
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        tiny(seed=3).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert same_weights(MAR.load(path), m2)


def test_load_refuses_other_kind_missing_and_misshapen_tensors(tmp_path):
    m = tiny()
    other = tmp_path / "other.safetensors"
    mio.save_safetensors(m, other, config=m.config, kind="fluid_ops.models.Fluid")
    with pytest.raises(ValueError, match="holds a 'fluid_ops.models.Fluid', not a 'fluid_ops.models.MAR'"):
        MAR.load(other)

    sd = dict(m.state_dict())
    sd.pop("mask_token")
    sd.pop("diffloss.net.input_proj.bias")
    missing = tmp_path / "missing.safetensors"
    mio.save_safetensors(sd, missing, config=m.config, kind=KIND)
    with pytest.raises(ValueError, match=r"2 tensors are missing: \['mask_token', 'diffloss.net.input_proj.bias'\]"):
        MAR.load(missing)

    sd = dict(m.state_dict())
    sd["z_proj.weight"] = torch.zeros(64, 8)
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    mio.save_safetensors(sd, bad, config=m.config, kind=KIND)
    with pytest.raises(ValueError, match=r"z_proj.weight: expected \(64, 16\), found \(64, 8\)") as e:
        MAR.load(bad)
    assert "extra.weight" in str(e.value)


def test_load_refuses_corrupt_truncated_foreign_and_missing_files(tmp_path):
    path = tiny().save(tmp_path / "m.safetensors")
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    for p in (trunc, garbage):
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            MAR.load(p)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="no 'fluid_ops' metadata entry"):
        MAR.load(foreign)
    bad_json = tmp_path / "badjson.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad_json), metadata={"fluid_ops": "{not json"})
    with pytest.raises(ValueError, match="not valid JSON"):
        mio.load_safetensors(bad_json)
    with pytest.raises(FileNotFoundError, match="no such file"):
        MAR.load(tmp_path / "nope.safetensors")


def test_save_safetensors_generic_arguments(tmp_path):
    lin = nn.Linear(3, 2)
    tied = nn.Sequential(lin, nn.Linear(2, 3))
    tied[1].weight = nn.Parameter(lin.weight.t())  # a view of another parameter: shared storage
    path = mio.save_safetensors(tied, tmp_path / "t.safetensors", config={"a": [1, 2.5, "x"]}, kind="test.Tied")
    sd, meta = mio.load_safetensors(path, kind="test.Tied")
    assert meta["config"] == {"a": [1, 2.5, "x"]} and meta["kind"] == "test.Tied"
    assert all(torch.equal(sd[k], v) for k, v in tied.state_dict().items()) and set(sd) == set(tied.state_dict())
    with pytest.raises(ValueError, match="JSON-serialisable"):
        mio.save_safetensors(lin, tmp_path / "x.safetensors", config={"f": nn.LayerNorm}, kind="k")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        mio.save_safetensors(lin, tmp_path / "x.safetensors", config={"f": float("nan")}, kind="k")
    with pytest.raises(TypeError, match="kind must be a non-empty str"):
        mio.save_safetensors(lin, tmp_path / "x.safetensors", config={}, kind="")
    with pytest.raises(TypeError, match="config must be a dict"):
        mio.save_safetensors(lin, tmp_path / "x.safetensors", config=None, kind="k")
    with pytest.raises(TypeError, match="model must be an nn.Module or a state dict"):
        mio.save_safetensors([1], tmp_path / "x.safetensors", config={}, kind="k")
    with pytest.raises(TypeError, match="str name to a tensor"):
        mio.save_safetensors({"a": 1}, tmp_path / "x.safetensors", config={}, kind="k")
    assert not (tmp_path / "x.safetensors").exists()


def test_check_state_dict_names_each_problem():
    lin = nn.Linear(3, 2)
    mio.check_state_dict(lin, lin.state_dict(), source="src")
    with pytest.raises(ValueError, match=r"^src: .*weight: expected \(2, 3\), found \(3, 3\)"):
        mio.check_state_dict(lin, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, source="src")
    with pytest.raises(ValueError, match=r"1 tensors are missing: \['bias'\]"):
        mio.check_state_dict(lin, {"weight": torch.zeros(2, 3)}, source="src")
    mio.check_state_dict(lin, {"weight": torch.zeros(2, 3), "x": torch.zeros(1)}, source="src", strict=False)
    with pytest.raises(ValueError, match="not tensors"):
        mio.check_state_dict(lin, {"weight": 3, "bias": torch.zeros(2)}, source="src")


def test_save_refuses_a_norm_layer_it_cannot_describe(tmp_path):
    m = MAR(img_size=32, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=1, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=1, diffloss_d=1, diffloss_w=32, buffer_size=2, class_num=3,
            norm_layer=partial(nn.LayerNorm, eps=1e-6, bias=False))
    assert m.config["norm_layer"] is None
    with pytest.raises(ValueError, match="norm_layer"):
        m.save(tmp_path / "x.safetensors")
    m = MAR(img_size=32, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=1, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=1, diffloss_d=1, diffloss_w=32, buffer_size=2, class_num=3)
    assert m.config["norm_layer"] == {"type": "LayerNorm", "eps": 1e-5}
    n = MAR.load(m.save(tmp_path / "y.safetensors"))
    assert n.encoder_norm.eps == 1e-5 and same_weights(m, n)


def test_from_config_rebuilds_and_rejects_bad_configs():
    m = tiny()
    n = MAR.from_config(json.loads(json.dumps(m.config)))
    assert n.config == m.config and n.encoder_norm.eps == 1e-6
    with pytest.raises(TypeError, match="does not take"):
        MAR.from_config({**m.config, "bogus": 1})
    with pytest.raises(ValueError, match="norm_layer must be"):
        MAR.from_config({**m.config, "norm_layer": {"type": "RMSNorm", "eps": 1e-6}})
    with pytest.raises(TypeError, match="config must be a dict"):
        MAR.from_config([1])


# ---- MAR's own checkpoints: MAR.from_checkpoint --------------------------------------------
def write_mar_ckpt(path, model, ema, **extra):
    torch.save({"model": model.state_dict(), "model_ema": ema, **extra}, path)
    return path


def test_from_checkpoint_picks_ema_or_model_and_infers_the_size(tmp_path):
    m = tiny(buffer_size=5, diffloss_d=3, diffloss_w=32)
    ema = {k: v + 1.0 for k, v in m.state_dict().items()}
    path = write_mar_ckpt(tmp_path / "checkpoint-last.pth", m, ema, epoch=3)
    n = MAR.from_checkpoint(path)
    assert not n.training and all(torch.equal(n.state_dict()[k], v) for k, v in ema.items())
    # everything but the head count came from the shapes; width 64 / depth 2 is mar_tiny's size
    for k in ("class_num", "buffer_size", "diffloss_d", "diffloss_w", "img_size", "vae_embed_dim",
              "encoder_num_heads"):
        assert n.config[k] == m.config[k], k
    n = MAR.from_checkpoint(str(path), ema=False, num_sampling_steps="3")
    assert same_weights(n, m) and n.diffloss.num_sampling_steps == 3


def test_from_checkpoint_reads_mar_training_args(tmp_path):
    """MAR's training checkpoints hold its argparse Namespace: read (weights_only) and used."""
    m = tiny(patch_size=2, img_size=128, vae_embed_dim=4)  # 16 tokens of width 16 = 4 * 2^2
    args = argparse.Namespace(model="mar_tiny", img_size=128, vae_stride=16, patch_size=2, vae_embed_dim=4,
                              num_sampling_steps="6", class_num=10, lr=1e-4, output_dir="./out")
    path = write_mar_ckpt(tmp_path / "c.pth", m, m.state_dict(), args=args, optimizer={"state": {}}, epoch=1)
    n = MAR.from_checkpoint(path)
    assert same_weights(n, m)
    assert (n.patch_size, n.vae_embed_dim, n.img_size, n.diffloss.num_sampling_steps) == (2, 4, 128, 6)
    x = torch.randn(2, 4, 8, 8, generator=gen(0))
    assert torch.equal(n.unpatchify(n.patchify(x)), x)
    # explicit keyword arguments win over the checkpoint's args
    assert MAR.from_checkpoint(path, num_sampling_steps="2").diffloss.num_sampling_steps == 2


def test_from_checkpoint_of_no_published_size_needs_heads(tmp_path):
    m = MAR(img_size=32, encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32,
            decoder_depth=2, decoder_num_heads=1, mlp_ratio=2.0, diffloss_d=1, diffloss_w=32, buffer_size=2,
            class_num=3, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    path = write_mar_ckpt(tmp_path / "c.pth", m, m.state_dict())
    with pytest.raises(ValueError, match="pass encoder_num_heads and decoder_num_heads"):
        MAR.from_checkpoint(path)
    n = MAR.from_checkpoint(path, encoder_num_heads=2, decoder_num_heads=1)
    assert same_weights(n, m) and n.config["mlp_ratio"] == 2.0 and n.decoder_blocks[0].attn.num_heads == 1
    z = torch.randn(2, 3, 64)
    assert torch.equal(n.encoder_blocks[0](z), m.eval().encoder_blocks[0](z))


def test_published_sizes_are_recognised_by_their_weights():
    for name, factory in FACTORIES.items():
        with torch.device("meta"):
            sd = factory().state_dict()
        assert _factory_of_shapes(sd) == name


def test_from_checkpoint_errors(tmp_path):
    m = tiny()
    with pytest.raises(FileNotFoundError, match="no such file"):
        MAR.from_checkpoint(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*junk.pth as a torch checkpoint"):
        MAR.from_checkpoint(junk)
    only_model = tmp_path / "only_model.pth"
    torch.save({"model": m.state_dict()}, only_model)
    with pytest.raises(KeyError, match="no 'model_ema' entry.*pass ema=False"):
        MAR.from_checkpoint(only_model)
    assert same_weights(MAR.from_checkpoint(only_model, ema=False), m)
    none_ema = write_mar_ckpt(tmp_path / "none_ema.pth", m, None)
    with pytest.raises(KeyError, match="a None 'model_ema' entry"):
        MAR.from_checkpoint(none_ema)
    # a size that does not fit: every misshapen tensor named, with both shapes
    path = write_mar_ckpt(tmp_path / "c.pth", m, m.state_dict())
    with pytest.raises(ValueError, match=r"class_emb.weight: expected \(1000, 64\), found \(10, 64\)"):
        MAR.from_checkpoint(path, class_num=1000)
    with pytest.raises(ValueError, match=r"encoder_pos_embed_learned: expected \(1, 68, 64\), found \(1, 20, 64\)"):
        MAR.from_checkpoint(path, img_size=128)
    with pytest.raises(ValueError, match="model must be one of"):
        MAR.from_checkpoint(path, model="mar_gigantic")
    sd = m.state_dict()
    sd.pop("decoder_norm.weight")
    with pytest.raises(ValueError, match=r"missing: \['decoder_norm.weight'\]"):
        MAR.from_checkpoint({"model": sd, "model_ema": sd})
    with pytest.raises(ValueError, match="no tensor 'class_emb.weight'"):
        MAR.from_checkpoint({"model_ema": {"w": torch.zeros(1)}})
    with pytest.raises(TypeError, match="checkpoint must be a path or a dict"):
        MAR.from_checkpoint(3)


def test_from_checkpoint_of_a_dict_copies_and_load_mar_checkpoint_names_bad_shapes():
    m = tiny()
    ckpt = {"model": m.state_dict(), "model_ema": {k: v.clone() for k, v in m.state_dict().items()}}
    n = MAR.from_checkpoint(ckpt)
    with torch.no_grad():
        n.mask_token.add_(1.0)
    assert torch.equal(ckpt["model_ema"]["mask_token"], m.mask_token)  # the caller's dict is untouched
    other = mar_tiny(class_num=11)
    with pytest.raises(ValueError, match=r"class_emb.weight: expected \(11, 64\), found \(10, 64\)"):
        other.load_mar_checkpoint(ckpt)


def test_build_with_weights_generic():
    src = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).to(torch.float64)
    m = mio.build_with_weights(lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), src.state_dict(), source="s")
    assert all(torch.equal(a, b) and a.dtype == torch.float64 for a, b in zip(m.state_dict().values(),
                                                                              src.state_dict().values()))
    assert not any(p.is_meta for p in m.parameters()) and all(p.requires_grad for p in m.parameters())
    sd = src.state_dict()
    sd.pop("1.bias")
    with pytest.raises(ValueError, match=r"no weights for \['1.bias'\]"):
        mio.build_with_weights(lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), sd, source="s", strict=False)
    with pytest.raises(TypeError, match="must return an nn.Module"):
        mio.build_with_weights(lambda: 3, {}, source="s")


@pytest.mark.parametrize("name", ["mar_base", "mar_huge"])
def test_factory_config_rebuilds_the_same_model(name):
    with torch.device("meta"):
        m = FACTORIES[name](num_sampling_steps="50")
        n = MAR.from_config(json.loads(json.dumps(m.config)))
    assert {k: v.shape for k, v in n.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert n.config == m.config and n.encoder_blocks[0].attn.num_heads == m.encoder_blocks[0].attn.num_heads
    assert n.encoder_norm.eps == 1e-6 and n.diffloss.num_sampling_steps == 50
