"""Write a forward's keys and values into the static cache with one Triton kernel.

StaticTreeCache.update otherwise issues two index_copy_ launches per layer (keys, values): at
~2-3 us each inside a decode step's CUDA graph that is ~0.1 ms of a 4.6 ms 7B step. One kernel
per layer copies both, one program per (row, kv head). Positions come from the device buffer
the graph reads, so it is captured like the rest. Where it cannot run (no Triton, a CPU tensor
outside the interpreter, a head dim not contiguous) the caller keeps index_copy_.
"""

from __future__ import annotations

import torch

from . import skinny_matmul

triton, tl = skinny_matmul.triton, skinny_matmul.tl

if triton is not None:

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, sk_h, sk_r, sv_h, sv_r, sc_h, sc_p,
                         D: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        p = tl.load(pos_ptr + row)
        d = tl.arange(0, BLOCK_D)
        m = d < D
        k = tl.load(k_ptr + head * sk_h + row * sk_r + d, mask=m)
        v = tl.load(v_ptr + head * sv_h + row * sv_r + d, mask=m)
        tl.store(kc_ptr + head * sc_h + p * sc_p + d, k, mask=m)
        tl.store(vc_ptr + head * sc_h + p * sc_p + d, v, mask=m)


def supported(keys: torch.Tensor, values: torch.Tensor, key_states: torch.Tensor,
              value_states: torch.Tensor) -> bool:
    """[1, heads, rows, D] states into [1, heads, capacity, D] caches of the same dtype, last dim
    contiguous everywhere, on a device where Triton runs."""
    ok = all(t.dim() == 4 and t.shape[0] == 1 and t.stride(-1) == 1 for t in (keys, values, key_states, value_states))
    return (ok and skinny_matmul.available(keys.device) and keys.stride() == values.stride()
            and key_states.dtype == keys.dtype == values.dtype == value_states.dtype
            and key_states.shape == value_states.shape and key_states.shape[1] == keys.shape[1]
            and key_states.shape[3] == keys.shape[3])


def write_kv(keys: torch.Tensor, values: torch.Tensor, key_states: torch.Tensor,
             value_states: torch.Tensor, positions: torch.Tensor) -> None:
    """keys[0, :, positions[r]] = key_states[0, :, r] (and the same for values), for every row r."""
    _, heads, rows, d = key_states.shape
    _write_kv_kernel[(rows, heads)](
        key_states, value_states, keys, values, positions,
        key_states.stride(1), key_states.stride(2), value_states.stride(1), value_states.stride(2),
        keys.stride(1), keys.stride(2), D=d, BLOCK_D=triton.next_power_of_2(d))
