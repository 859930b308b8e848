"""A faster LSTM layer for training on CPUs: one recurrence loop with a hand-written backward.

``nn.LSTM`` on a CPU (oneDNN) computes every GEMM one time step at a time. Here only the
recurrent product ``h @ W_hh`` stays inside the time loop; the input projection (done by the
caller), the weight gradient ``dW_hh`` and the input gradient are each one large GEMM over all
time steps, and the backward pass runs a few element-wise operations per step on gate
derivatives that are precomputed for all steps at once.

Two CPU-specific choices:
* ``tanh(x)`` is computed as ``2 sigmoid(2x) - 1``: PyTorch's CPU ``tanh`` is several times
  slower than its ``sigmoid``, and the identity is exact up to rounding.
* GEMMs run in the weights' dtype (bf16 under autocast), while gate activations and the cell
  state stay in fp32 so that the recurrence does not accumulate bf16 rounding.

Gate order and parameter layout are ``nn.LSTM``'s (i, f, g, o), so checkpoints are the same
whichever implementation runs.
"""

from __future__ import annotations

import torch


def _tanh_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    torch.mul(x, 2.0, out=out)
    torch.sigmoid(out, out=out)
    return out.mul_(2.0).sub_(1.0)


class _LSTMSequence(torch.autograd.Function):
    """xp (T, B, 4H) input projections with both biases; w_hh (4H, H); h0, c0 (B, H)."""

    @staticmethod
    def forward(ctx, xp: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor):
        steps, batch, gate_width = xp.shape
        hidden = gate_width // 4
        dtype = w_hh.dtype
        w_t = w_hh.t()
        hs = xp.new_empty((steps + 1, batch, hidden), dtype=dtype)
        cs = xp.new_empty((steps + 1, batch, hidden), dtype=torch.float32)
        acts = xp.new_empty((steps, batch, gate_width), dtype=torch.float32)
        tanh_cs = xp.new_empty((steps, batch, hidden), dtype=torch.float32)
        gates = xp.new_empty((batch, gate_width), dtype=dtype)
        hs[0].copy_(h0)
        cs[0].copy_(c0)
        g_slice = slice(2 * hidden, 3 * hidden)
        for t in range(steps):
            torch.addmm(xp[t], hs[t], w_t, out=gates)
            gates[:, g_slice].mul_(2.0)  # tanh(g) = 2 sigmoid(2g) - 1
            act = acts[t]
            torch.sigmoid(gates, out=act)
            act[:, g_slice].mul_(2.0).sub_(1.0)
            i, f, g, o = act.chunk(4, dim=1)
            c = cs[t + 1]
            torch.mul(f, cs[t], out=c)
            c.addcmul_(i, g)
            tanh_c = _tanh_into(c, tanh_cs[t])
            torch.mul(o, tanh_c, out=hs[t + 1])
        ctx.save_for_backward(w_hh, hs, cs, acts, tanh_cs)
        return hs[1:], hs[steps].to(h0.dtype), cs[steps].to(c0.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hs, grad_h_last, grad_c_last):
        w_hh, hs, cs, acts, tanh_cs = ctx.saved_tensors
        steps, batch, gate_width = acts.shape
        hidden = gate_width // 4
        dtype, device = w_hh.dtype, acts.device
        mult, dc_from_dh = _gate_multipliers(acts, cs, tanh_cs)
        f = acts[..., hidden:2 * hidden]

        if grad_hs is None:
            grad_hs = hs.new_zeros((steps, batch, hidden))
        grad_hs = grad_hs.to(dtype)
        dgates = torch.empty((steps, batch, gate_width), dtype=dtype, device=device)
        d32 = torch.empty((batch, 4, hidden), dtype=torch.float32, device=device)
        dh32 = torch.empty((batch, hidden), dtype=torch.float32, device=device)
        dh = grad_hs[steps - 1].clone()
        if grad_h_last is not None:
            dh.add_(grad_h_last.to(dtype))
        dc = (grad_c_last.float().clone() if grad_c_last is not None
              else torch.zeros((batch, hidden), dtype=torch.float32, device=device))
        for t in range(steps - 1, -1, -1):
            dh32.copy_(dh)
            dc.addcmul_(dh32, dc_from_dh[t])
            m = mult[t].view(batch, 4, hidden)
            torch.mul(m[:, :3], dc.unsqueeze(1), out=d32[:, :3])
            torch.mul(m[:, 3], dh32, out=d32[:, 3])
            dgates[t].copy_(d32.view(batch, gate_width))
            dc.mul_(f[t])
            if t:
                torch.addmm(grad_hs[t - 1], dgates[t], w_hh, out=dh)
            else:
                dh = dgates[t] @ w_hh
        flat = dgates.view(steps * batch, gate_width)
        d_w_hh = flat.t() @ hs[:-1].reshape(steps * batch, hidden)
        return dgates, d_w_hh, dh, dc


def _gate_multipliers(acts: torch.Tensor, cs: torch.Tensor, tanh_cs: torch.Tensor):
    """For all steps at once: d loss/d gate pre-activations = mult * (dc, dc, dc, dh), and the
    share of dh that flows into dc. In place, to keep memory traffic low."""
    i, f, g, o = acts.chunk(4, dim=2)
    mult = torch.addcmul(acts, acts, acts, value=-1.0)  # s (1 - s): sigmoid derivatives
    m_i, m_f, m_g, m_o = mult.chunk(4, dim=2)
    torch.mul(g, g, out=m_g)
    m_g.neg_().add_(1.0).mul_(i)  # i (1 - g^2)
    m_i.mul_(g)
    m_f.mul_(cs[:-1])
    m_o.mul_(tanh_cs)
    dc_from_dh = torch.mul(tanh_cs, tanh_cs)
    dc_from_dh.neg_().add_(1.0).mul_(o)  # o (1 - tanh(c)^2)
    return mult, dc_from_dh


def lstm_sequence(xp: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor):
    """Run one LSTM layer over time-major input projections.

    xp: (T, B, 4H) = x @ W_ih^T + b_ih + b_hh, in the compute dtype; w_hh: (4H, H) in the
    compute dtype; h0, c0: (B, H). Returns outputs (T, B, H) in the compute dtype and the
    final (h, c) in the dtypes of h0 and c0.
    """
    return _LSTMSequence.apply(xp, w_hh, h0, c0)
