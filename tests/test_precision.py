"""precision="auto" | "bf16" | "fp32": one function decides (fluid_ops.backend), per device and CPU
flags (the flag reader monkeypatched to act as each kind of CPU seen); what sampling and training
do with it."""
import pytest
import torch

from fluid_ops import backend
from fluid_ops.nn.denoiser import auto_gemm_dtype

CPUS = {  # the three kinds of CPU this project has run on (docs/measured.md)
    "amd_avx2": {"fma", "avx", "avx2"},
    "zen4_avx512_bf16": {"fma", "avx", "avx2", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16"},
    "xeon_amx": {"fma", "avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"},
}


@pytest.fixture
def as_cpu(monkeypatch):
    monkeypatch.delenv("FLUID_OPS_PRECISION", raising=False)  # conftest pins fp32 for the other tests

    def use(flags):
        monkeypatch.setattr(backend, "_read_cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(backend, "_CPU_FLAGS", None)
    yield use
    backend._CPU_FLAGS = None  # re-read the real flags after the monkeypatch is undone


@pytest.mark.parametrize("cpu,want", [("amd_avx2", "fp32"), ("zen4_avx512_bf16", "bf16"), ("xeon_amx", "bf16")])
def test_auto_precision_follows_the_cpu_flags(as_cpu, cpu, want):
    as_cpu(CPUS[cpu])
    assert backend.native_bf16("cpu") == (want == "bf16")
    assert backend.auto_precision("cpu") == want
    assert backend.resolve_precision("auto", torch.device("cpu")) == want
    assert backend.resolve_precision("fp32", "cpu") == "fp32"
    assert backend.resolve_precision("bf16", "cpu") == "bf16"  # asked for: honoured even where emulated
    assert auto_gemm_dtype("cpu") == (torch.bfloat16 if want == "bf16" else torch.float32)
    rec = backend.precision_record("auto", "cpu")
    assert rec["resolved"] == want and rec["cpu_native_bf16"] == (want == "bf16")
    assert set(rec["cpu_simd_flags"]) <= CPUS[cpu] and "avx2" in rec["cpu_simd_flags"]


def test_unreadable_cpuinfo_means_fp32(as_cpu):
    as_cpu(set())
    assert backend.auto_precision("cpu") == "fp32" and backend.cpu_simd_flags() == []


def test_cuda_and_other_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert backend.auto_precision("cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert backend.auto_precision("cuda:0") == "fp32"
    assert backend.auto_precision("meta") == "fp32"


@pytest.mark.parametrize("bad", ["fp16", "none", "", None, "BF16"])
def test_bad_precision(bad):
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        backend.resolve_precision(bad, "cpu")


def test_real_flags_agree_with_proc_cpuinfo():
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this machine")
    native = " avx512_bf16" in text or " amx_bf16" in text
    assert backend.native_bf16("cpu") == native


def _tiny_mar():
    from fluid_ops.models.mar import mar_tiny
    torch.manual_seed(0)
    return mar_tiny(num_sampling_steps="4").eval()


def test_mar_sample_tokens_precision(as_cpu):
    """fp32 is one flag away and exact whatever the CPU; bf16 is rounding-level close to it; auto
    is fp32 on a CPU without native bf16 (the same numbers as precision="fp32")."""
    m = _tiny_mar()
    labels = torch.tensor([1, 2])

    def run(precision):
        return m.sample_tokens(2, num_iter=2, cfg=2.0, labels=labels, temperature=0.0,
                               generator=torch.Generator().manual_seed(0), precision=precision)

    fp32 = run("fp32")
    assert torch.equal(fp32, run("fp32"))
    as_cpu(CPUS["amd_avx2"])
    assert torch.equal(run("auto"), fp32)
    bf16 = run("bf16")
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() < 0.25 * fp32.abs().max() + 0.1
    with pytest.raises(ValueError, match="precision must be one of"):
        run("half")


def test_env_override_of_auto(as_cpu, monkeypatch):
    as_cpu(CPUS["zen4_avx512_bf16"])
    monkeypatch.setenv("FLUID_OPS_PRECISION", "fp32")
    assert backend.resolve_precision("auto", "cpu") == "fp32"
    assert backend.resolve_precision("bf16", "cpu") == "bf16"  # explicit wins
    assert auto_gemm_dtype("cpu") == torch.bfloat16  # gemm_dtype="auto" is the hardware's alone
    as_cpu(CPUS["amd_avx2"])
    monkeypatch.setenv("FLUID_OPS_PRECISION", "bf16")
    assert backend.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setenv("FLUID_OPS_PRECISION", "fp16")
    with pytest.raises(ValueError, match="FLUID_OPS_PRECISION must be"):
        backend.resolve_precision("auto", "cpu")


def test_fluid_generate_precision(as_cpu):
    """Fluid.generate: "fp32" exact and repeatable; "bf16" (transformer under autocast, bf16 head
    GEMMs) close to it; "auto" on a CPU without native bf16 is fp32."""
    from fluid_ops.models import Fluid
    torch.manual_seed(0)
    m = Fluid("tiny", **{"text.encoder": "hash"}).eval()

    def gen(precision):
        return m.generate(["a red circle", "a blue square"], num_iter=2, num_diffusion_steps=3, temperature=0.0,
                          generator=torch.Generator().manual_seed(0), precision=precision)

    fp32 = gen("fp32")
    as_cpu(CPUS["amd_avx2"])
    assert torch.equal(gen("auto"), fp32)
    bf16 = gen("bf16")
    assert bf16.shape == fp32.shape and bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.25
