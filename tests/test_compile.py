"""torch.compile(fullgraph=True) traces models built on fluid_ops' custom ops with no graph
break, forward and backward (fake implementations + registered autograd), and the compiled
model computes what the eager one does."""
import pytest
import torch
import torch.nn as nn

import fluid_ops
from fluid_ops.reference.diffusion import DiffusionSchedule


class TinyBlock(nn.Module):
    """A transformer-style block: fused-QKV attention with a key-padding mask, then the
    diffusion head's fused LayerNorm + modulate and gated residual."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ada = nn.Linear(dim, 3 * dim)

    def forward(self, x, mask, cond):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = fluid_ops.attention(q, k, v, key_padding_mask=mask).reshape(b, n, d)
        shift, scale, gate = self.ada(cond).unsqueeze(1).expand(b, n, 3 * d).reshape(b * n, 3 * d).chunk(3, -1)
        h = fluid_ops.layernorm_modulate(x.reshape(b * n, d), shift, scale)
        return fluid_ops.gated_residual(x.reshape(b * n, d), gate, self.proj(h + a.reshape(b * n, d))).view(b, n, d)


def _count_graph_breaks(fn, *args):
    import torch._dynamo as dynamo
    explain = dynamo.explain(fn)(*args)
    return explain.graph_break_count, explain.break_reasons


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_block_compiles_fullgraph_forward_and_backward(backend):
    torch.manual_seed(0)
    m = TinyBlock()
    x = torch.randn(2, 9, 64, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    cond = torch.randn(2, 64)
    with fluid_ops.use_backend(backend):
        eager = m(x, mask, cond)
        (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        out = compiled(x, mask, cond)
        (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-4, atol=1e-4)
    breaks, reasons = _count_graph_breaks(m, x, mask, cond)
    assert breaks == 0, reasons


def test_denoiser_and_ddpm_step_compile_fullgraph():
    torch.manual_seed(0)
    net = fluid_ops.nn.DenoiserMLP(in_channels=4, model_channels=32, out_channels=8, z_channels=16, num_res_blocks=2)
    for p in net.parameters():  # MAR zero-inits adaLN / output layers; make the test non-trivial
        nn.init.normal_(p, std=0.1)
    table = DiffusionSchedule(10).table()

    def step(x, t, z, noise):
        mo = net(torch.cat([x, x]), t, z)
        return fluid_ops.ddpm_step(x, mo, noise, table, 5, temperature=0.9, cfg=2.0)

    x, z, noise = torch.randn(3, 4), torch.randn(6, 16), torch.randn(3, 4)
    t = torch.full((6,), 7)
    eager = step(x, t, z, noise)
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, t, z, noise)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    breaks, reasons = _count_graph_breaks(step, x, t, z, noise)
    assert breaks == 0, reasons
