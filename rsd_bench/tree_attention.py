"""Attention of a few query rows (a decode step or a draft tree) over the static cache, in Triton.

Why: on an H200 a 7B step over a 4-16 node tree spent 0.80 ms in cuDNN's SDPA (a prefill-style
kernel once there are several rows) against 0.31 ms for one row, and the matmul-softmax path
pays the same again in copies; that gap alone broke the tree-step goal (<= 1.15 x an AR step)
once the AR step got faster. This is flash-decoding over a tree mask:

- `_split_kernel`: one program per (head, key split, block of 16-64 query rows) walks its share of
  the cache columns in BLOCK_N chunks with an online softmax (scores and sums in float32, P.V on
  the tensor cores in the value dtype, as FlashAttention does) and writes a partial result;
- `_combine_kernel`: one program per (head, row) merges the splits' partials.

Only the columns that can be attended are read: GraphedRunner sets `set_bound(write_pos)` before
each bucket call, and the kernels read the last row's cache write position on the device (so
the captured graph stays valid for every length). The additive mask the runner built (0 or the
dtype's min) is added to the scores; rows always see themselves, so every row's maximum is a
real score and the masked entries' weights underflow to exactly 0.

Registered with transformers as the attention implementation "rsd_tree"; GraphedRunner offers it
to its per-bucket timing (compile="parts") next to SDPA and matmul-softmax, and keeps it only
where it is faster.
"""

from __future__ import annotations

import torch

from . import skinny_matmul

triton, tl = skinny_matmul.triton, skinny_matmul.tl
NAME = "rsd_tree"
BLOCK_M = 16  # the tensor cores' smallest row tile (larger trees take the next power of two)
_BOUND: dict = {"pos": None}  # the calling runner's cache write positions (see set_bound)


def set_bound(write_pos: torch.Tensor | None) -> None:
    """Columns at or past write_pos[rows - 1] + 1 are never attended in the next call."""
    _BOUND["pos"] = write_pos


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, part_ptr, ml_ptr,
                      sq_h, sq_m, sk_h, sk_n, sv_h, sv_n, smask_m, M, C, scale,
                      GROUP: tl.constexpr, HAS_POS: tl.constexpr, SPLITS: tl.constexpr, CHUNKS: tl.constexpr,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
        h = tl.program_id(0)
        split = tl.program_id(1)
        mb = tl.program_id(2)
        kvh = h // GROUP
        rm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, D)
        row_ok = rm < M
        q = tl.load(q_ptr + h * sq_h + rm[:, None] * sq_m + rd[None, :], mask=row_ok[:, None], other=0.0)
        if HAS_POS:
            bound = tl.minimum(tl.load(pos_ptr + M - 1) + 1, C)
        else:
            bound = C
        # the attended columns [0, bound) are shared evenly by the splits (whole chunks each);
        # CHUNKS covers the largest share (bound = C), the chunks past a split's end move no bytes
        per = tl.cdiv(tl.cdiv(bound, SPLITS), BLOCK_N) * BLOCK_N
        start = split * per
        end = tl.minimum(start + per, bound)
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        for c in range(CHUNKS):
            rn = start + c * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = rn < end
            k = tl.load(k_ptr + kvh * sk_h + rn[:, None] * sk_n + rd[None, :], mask=col_ok[:, None], other=0.0)
            if UPCAST:  # the CPU interpreter's dot is wrong for 16-bit operands
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
            else:
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            mk = tl.load(mask_ptr + rm[:, None] * smask_m + rn[None, :], mask=row_ok[:, None] & col_ok[None, :],
                         other=0.0).to(tl.float32)
            s = tl.where(col_ok[None, :], s + mk, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kvh * sv_h + rn[:, None] * sv_n + rd[None, :], mask=col_ok[:, None], other=0.0)
            if UPCAST:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        base = (h * SPLITS + split) * M
        tl.store(part_ptr + (base + rm[:, None]) * D + rd[None, :], acc, mask=row_ok[:, None])
        tl.store(ml_ptr + (base + rm) * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + (base + rm) * 2 + 1, l_i, mask=row_ok)

    @triton.jit
    def _combine_kernel(part_ptr, ml_ptr, out_ptr, M, so_m, so_h,
                        SPLITS: tl.constexpr, D: tl.constexpr):
        h = tl.program_id(0)
        r = tl.program_id(1)
        rs = tl.arange(0, SPLITS)
        rd = tl.arange(0, D)
        base = (h * SPLITS + rs) * M + r
        m = tl.load(ml_ptr + base * 2)
        l = tl.load(ml_ptr + base * 2 + 1)
        w = tl.exp(m - tl.max(m, axis=0))
        acc = tl.load(part_ptr + base[:, None] * D + rd[None, :])
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + r * so_m + h * so_h + rd, out.to(out_ptr.dtype.element_ty))


def supports(query: torch.Tensor, key: torch.Tensor, mask) -> bool:
    """16-bit, batch 1, at most 64 rows, head dim a power of two >= 16, a [1, 1, rows, columns] float
    mask, last dims contiguous, on a device where Triton runs."""
    if mask is None or not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        return False
    b, heads, rows, d = query.shape
    # float32 only in the interpreter: on a GPU tl.dot would round float32 to tf32
    dtypes = (torch.bfloat16, torch.float16) + ((torch.float32,) if skinny_matmul.INTERPRET else ())
    return (query.dtype in dtypes and key.dtype == query.dtype and b == 1 and key.shape[0] == 1 and rows <= 64 and d >= 16 and d & (d - 1) == 0
            and heads % key.shape[1] == 0 and mask.dim() == 4 and mask.shape[:3] == (1, 1, rows)
            and mask.shape[3] >= key.shape[2] and query.stride(-1) == 1 and key.stride(-1) == 1
            and mask.stride(-1) == 1 and skinny_matmul.available(query.device))


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                   scale: float, splits: int = 8, block_n: int = 64) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [1, H, M, D], k/v [1, Hkv, C, D] (GQA: H % Hkv == 0),
    mask [1, 1, M, >= C]; returns [1, M, H, D] (the layout HF's attention functions return)."""
    _, heads, rows, d = query.shape
    kv_heads, cols = key.shape[1], key.shape[2]
    pos = _BOUND["pos"]
    has_pos = pos is not None and pos.device == query.device and pos.numel() >= rows
    chunks = max(1, triton.cdiv(triton.cdiv(cols, splits), block_n))
    # one row block for up to 64 rows, so each split reads its keys and values once
    block_m = max(BLOCK_M, triton.next_power_of_2(rows))
    part = torch.empty(heads, splits, rows, d, dtype=torch.float32, device=query.device)
    ml = torch.empty(heads, splits, rows, 2, dtype=torch.float32, device=query.device)
    out = torch.empty(1, rows, heads, d, dtype=query.dtype, device=query.device)
    _split_kernel[(heads, splits, triton.cdiv(rows, block_m))](
        query, key, value, mask, pos if has_pos else query, part, ml,
        query.stride(1), query.stride(2), key.stride(1), key.stride(2), value.stride(1), value.stride(2),
        mask.stride(2), rows, cols, scale, GROUP=heads // kv_heads, HAS_POS=has_pos, SPLITS=splits,
        CHUNKS=chunks, D=d, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=skinny_matmul.INTERPRET,
        num_warps=4 if block_m <= 16 else 8)
    _combine_kernel[(heads, rows)](part, ml, out, rows, out.stride(1), out.stride(2), SPLITS=splits, D=d)
    return out


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature; falls back to SDPA where the kernel does not apply."""
    if dropout == 0.0 and supports(query, key, attention_mask) and value.stride(-1) == 1:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return tree_attention(query, key, value, attention_mask, scale), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def register() -> bool:
    """Make "rsd_tree" an attention implementation transformers' models can select (idempotent);
    False where Triton is missing."""
    if triton is None:
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    try:  # 4-D masks are returned as they are, but the mask interface is looked up by name
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    except ImportError:  # pragma: no cover
        pass
    return True
