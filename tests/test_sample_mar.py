"""python/sample_mar.py: one real command-line run of a tiny random MAR (latents + grid PNG), and
in-process runs for weights files, MAR checkpoints, .npy output and the VAE decode path (a stub
decoder: diffusers is not installed here)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluid_ops.models.mar import MAR, mar_tiny

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "python" / "sample_mar.py"


def load_script():
    spec = importlib.util.spec_from_file_location("sample_mar_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def expected(model, labels, *, batch, seed, num_iter, cfg):
    """What the script should produce: batches in order from one generator."""
    g = torch.Generator().manual_seed(seed)
    out = [model.eval().sample_tokens(len(y), num_iter=num_iter, cfg=cfg, labels=y, generator=g)
           for y in torch.tensor(labels).split(batch)]
    return torch.cat(out)


def test_command_line_tiny_random_model_writes_latents_and_grid(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--labels", "1", "7", "--num-per-class", "3",
                        "--num-iter", "3", "--num-sampling-steps", "4", "--cfg", "2.0", "--seed", "5",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr
    saved = torch.load(out / "latents.pt", weights_only=True)
    assert saved["latents"].shape == (6, 16, 4, 4) and torch.isfinite(saved["latents"]).all()
    assert saved["labels"].tolist() == [1, 1, 1, 7, 7, 7]
    # the same samples as building the model and calling sample_tokens here
    torch.manual_seed(5)
    want = expected(mar_tiny(num_sampling_steps="4"), [1, 1, 1, 7, 7, 7], batch=16, seed=5, num_iter=3, cfg=2.0)
    torch.testing.assert_close(saved["latents"], want, rtol=1e-5, atol=1e-5)
    grid = Image.open(out / "grid.png")
    # 2 rows (one per class) x 3 latents of 4x4 upscaled 8x, plus a label column
    assert grid.size[1] == 2 * 32 + 3 * 2 and grid.size[0] > 3 * 32 + 4 * 2


def test_weights_file_npy_output_and_batches(tmp_path):
    torch.manual_seed(0)
    m = mar_tiny(num_sampling_steps="3", class_num=12)
    path = m.save(tmp_path / "w.safetensors")
    script = load_script()
    assert script.main(["--weights", str(path), "--labels", "3", "11", "2", "--batch-size", "2", "--num-iter", "2",
                        "--cfg", "1.5", "--seed", "9", "--latents-format", "npy", "--out", str(tmp_path / "o"),
                        "--no-progress"]) == 0
    lat = np.load(tmp_path / "o" / "latents.npy")
    assert np.load(tmp_path / "o" / "labels.npy").tolist() == [3, 11, 2]
    want = expected(MAR.load(path), [3, 11, 2], batch=2, seed=9, num_iter=2, cfg=1.5)
    np.testing.assert_allclose(lat, want.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit, match=r"--labels must be in \[0, 12\)"):
        script.main(["--weights", str(path), "--labels", "12", "--out", str(tmp_path / "x"), "--no-progress"])


def test_mar_checkpoint_ema_and_model(tmp_path):
    torch.manual_seed(0)
    m = mar_tiny(class_num=5)
    ema = {k: v + 0.01 for k, v in m.state_dict().items()}
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": m.state_dict(), "model_ema": ema}, ckpt)
    script = load_script()
    outs = {}
    for flag in ("--ema", "--no-ema"):
        o = tmp_path / flag.strip("-")
        script.main(["--ckpt", str(ckpt), flag, "--num-sampling-steps", "3", "--num-iter", "2", "--labels", "4",
                     "--cfg", "1.0", "--out", str(o), "--no-progress"])
        outs[flag] = torch.load(o / "latents.pt", weights_only=True)["latents"]
    m.load_state_dict(ema)
    m.diffloss.num_sampling_steps = 3
    torch.testing.assert_close(outs["--ema"], expected(m, [4], batch=16, seed=0, num_iter=2, cfg=1.0),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs["--ema"], outs["--no-ema"])


class StubVAE:
    """diffusers' AutoencoderKL interface: decode(z).sample, images in [-1, 1]."""

    def __init__(self):
        self.seen = []

    def decode(self, z):
        self.seen.append(z.clone())
        img = torch.tanh(z[:, :3]).repeat_interleave(16, 2).repeat_interleave(16, 3)  # (B, 3, 16h, 16w)

        class Out:
            sample = img
        return Out()


def test_vae_decode_path_writes_images_and_grid(tmp_path, monkeypatch):
    script = load_script()
    stub = StubVAE()
    monkeypatch.setattr(script, "load_vae", lambda path, device: stub)
    out = tmp_path / "o"
    script.main(["--model", "tiny", "--vae", str(tmp_path), "--labels", "0", "5", "--num-sampling-steps", "2",
                 "--num-iter", "2", "--out", str(out), "--no-progress"])
    lat = torch.load(out / "latents.pt", weights_only=True)["latents"]
    torch.testing.assert_close(stub.seen[0], lat / 0.2325)  # MAR's latent scale undone before decoding
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == ["00000_class0.png", "00001_class5.png"]
    img = np.asarray(Image.open(out / "images" / files[1]))
    want = ((torch.tanh(lat[1, :3] / 0.2325) + 1) / 2 * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    assert img.shape == (64, 64, 3) and np.array_equal(img[::16, ::16], want)
    assert Image.open(out / "grid.png").size == (2 * 64 + 3 * 2, 64 + 2 * 2)  # 2 images in one row, scale 1


def test_real_diffusers_vae_folder(tmp_path):
    """--vae with a real (tiny, random) diffusers AutoencoderKL saved to a local folder: 16 latent
    channels, 4 downsamplings (MAR's KL-16 geometry), so a 4x4 latent decodes to 64x64 pixels."""
    import diffusers
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8,) * 5,
                                  down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
                                  layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False)
    vae.save_pretrained(tmp_path / "vae")
    script = load_script()
    out = tmp_path / "o"
    script.main(["--model", "tiny", "--vae", str(tmp_path / "vae"), "--labels", "3", "--num-per-class", "2",
                 "--num-sampling-steps", "2", "--num-iter", "2", "--out", str(out), "--no-progress"])
    lat = torch.load(out / "latents.pt", weights_only=True)["latents"]
    with torch.no_grad():
        want = ((vae.eval().decode(lat / 0.2325).sample + 1) / 2).clamp(0, 1)
    img = torch.from_numpy(np.array(Image.open(out / "images" / "00001_class3.png"))).permute(2, 0, 1) / 255
    assert img.shape == (3, 64, 64) and (img - want[1]).abs().max() <= 1 / 255 + 1e-6
    with pytest.raises(SystemExit, match="local diffusers AutoencoderKL folder"):
        script.load_vae(tmp_path / "nope", "cpu")
