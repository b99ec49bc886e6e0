"""The Triton kernels of compile="parts" (skinny_matmul, kv_write, tree_attention) and the fused
q/k/v, gate/up, residual-add and linear layers.

The kernels run on the CPU under Triton's interpreter (TRITON_INTERPRET=1, read when Triton
decorates a kernel, so these checks run in a fresh interpreter process). On the GPU the same
kernels are compiled; scripts/bench_engine.py's equivalence section checks them there.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _interpret(code: str) -> str:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_kernels_match_float64_reference():
    """Every row count from 1 to MAX_ROWS's buckets, widths that do and do not divide the blocks:
    ||out - ref|| / ||ref|| against a float64 product, on fresh random inputs, with the output
    poisoned with NaN first so an unwritten element fails. Tolerances: float32 accumulation
    (1e-5), and one bf16 rounding of each output (2^-8 relative at worst, 8e-3 for the norm)."""
    out = _interpret("""
        import torch
        from rsd_bench import skinny_matmul as sm
        g = torch.Generator().manual_seed(0)
        worst = {}
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 8e-3)):
            for M, N, K in [(1, 64, 1024), (1, 70, 1000), (1, 8, 520), (2, 33, 48), (3, 64, 512),
                            (16, 96, 256), (17, 40, 300), (33, 64, 128), (64, 50, 200)]:
                x = torch.randn(M, K, generator=g).to(dtype)
                w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
                assert sm.supports(x, w)
                ref = x.double() @ w.double().T
                bucket = sm.rows_bucket(M)
                for choice in sm.CANDIDATES[bucket]:
                    y = torch.full((M, N), float("nan"), dtype=dtype)
                    sm._run(x, w, y, choice)
                    assert not y.isnan().any(), (M, N, K, choice)
                    err = float((y.double() - ref).norm() / ref.norm())
                    assert err < tol, (dtype, M, N, K, choice, err)
                    worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
                y = sm.linear(x.view(1, M, K), w)  # leading dims kept, default choice
                assert y.shape == (1, M, N)
                assert float((y[0].double() - ref).norm() / ref.norm()) < tol
        print(worst)
    """)
    assert "torch.float32" in out and "torch.bfloat16" in out


def test_supports_limits():
    from rsd_bench import skinny_matmul as sm

    w = torch.randn(8, 16)
    # no GPU and no interpreter in this process: the kernels are never offered
    assert not sm.supports(torch.randn(1, 16), w) or sm.INTERPRET
    assert sm.rows_bucket(1) == "gemv" and sm.rows_bucket(2) == 16 and sm.rows_bucket(17) == 32
    assert sm.rows_bucket(64) == 64


def test_parts_runner_uses_the_kernels_and_matches_plain():
    """GraphedRunner(compile="parts") on a tiny float32 Llama: its bucket forwards go through the
    kernels (counted), and greedy AR and sampled RSD-S give the same tokens as the plain static
    path, with logits within 1e-5 at every forward."""
    out = _interpret("""
        import copy, shutil, torch
        from rsd_bench import skinny_matmul as sm
        from rsd_bench.engine import generate
        from rsd_bench.graphed_lm import GraphedRunner
        from rsd_bench.tiny_models import tiny_llama
        if not (shutil.which("c++") or shutil.which("g++")):
            print("SKIP no C++ compiler"); raise SystemExit(0)
        calls = []
        run = sm._run
        sm._run = lambda x, w, o, c: (calls.append((x.shape[0], w.shape[0], c)), run(x, w, o, c))[1]
        from rsd_bench import tree_attention as ta
        attn_calls = [0]
        kernel = ta.tree_attention
        def counted(*a, **k):
            attn_calls[0] += 1
            return kernel(*a, **k)
        ta.tree_attention = counted
        # head dim 16 (tree_attention needs a power of two >= 16); GQA in both
        target, draft = tiny_llama(layers=2, seed=3), tiny_llama(layers=1, seed=4, hidden=32, heads=2)
        t2, d2 = copy.deepcopy(target), copy.deepcopy(draft)
        t3, d3 = copy.deepcopy(target), copy.deepcopy(draft)
        variants = {"plain": (target, draft, False, "sdpa"), "parts": (t2, d2, "parts", "sdpa"),
                    "parts_tree": (t3, d3, "parts", "rsd_tree")}  # + tree_attention's kernel
        for method, L, kw in (("ar", 1, dict(temperature=0.0)), ("rsd_s", 2, dict(temperature=1.0, W=3))):
            got = {}
            for name, (t, d, comp, att) in variants.items():
                logits = []
                tr = GraphedRunner(t, capacity=256, compile=comp, attention=att)
                dr = GraphedRunner(d, capacity=256, compile=comp, attention=att)
                res = generate(tr, dr if method != "ar" else None, [1, 40, 50, 60], method, L,
                               vocab_size=259, max_new_tokens=16, seed=5,
                               trace=lambda m, s, tree, n, o: logits.append(o.clone()), **kw)
                got[name] = (res.tokens, logits)
            for name in ("parts", "parts_tree"):
                assert got["plain"][0] == got[name][0], (method, name, got)
                assert len(got["plain"][1]) == len(got[name][1])
                diff = max(float((a - b).abs().max()) for a, b in zip(got["plain"][1], got[name][1]))
                assert diff <= 1e-5, (method, name, diff)
        rows = {m for m, n, c in calls}
        assert 1 in rows and max(rows) > 1, rows  # the 1-row kernel and the tile kernel both ran
        widths = {n for m, n, c in calls}
        # one product each: the draft's q/k/v (32 + 16 + 16) and the target's gate/up (2 x 128)
        assert 64 in widths and 256 in widths, widths
        assert attn_calls[0] > 0  # the tree attention kernel ran
        print("OK", len(calls))
    """)
    if out.startswith("SKIP"):
        pytest.skip(out)
    assert out.startswith("OK")


def test_fused_weights_fall_back_when_stale_or_reordered():
    """q_proj hands k_proj/v_proj their slices only for the same input; a parameter replaced
    after fusion (model.to, load) makes every module compute its own product again."""
    from rsd_bench import fused_ops
    from rsd_bench.tiny_models import tiny_llama

    model = tiny_llama(layers=1, seed=2)
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 3, 64)
    ref = {n: getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")}
    ref_mlp = mlp(x)
    fused_ops.fuse_small_ops(model)
    with fused_ops.enabled(), torch.no_grad():
        other = torch.randn(1, 3, 64)
        attn.q_proj(x)
        assert torch.allclose(attn.k_proj(other), torch.nn.functional.linear(other, attn.k_proj.weight))
        assert torch.allclose(attn.v_proj(x), ref["v_proj"], atol=1e-6)  # its stash, from q_proj(x)
        assert torch.allclose(attn.k_proj(x), ref["k_proj"], atol=1e-6)  # stash gone: own product
        new_k = torch.nn.Parameter(torch.randn_like(attn.k_proj.weight))
        attn.k_proj.weight = new_k  # no longer a view of the concatenated weight
        assert not fused_ops._still_views(attn.q_proj._rsd_qkv, attn.q_proj, attn.k_proj, attn.v_proj)
        attn.q_proj(x)
        assert torch.allclose(attn.k_proj(x), torch.nn.functional.linear(x, new_k), atol=1e-6)
        assert torch.allclose(mlp(x), ref_mlp, atol=1e-5)
        mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach().clone())  # not a view
        assert torch.allclose(mlp(x), ref_mlp, atol=1e-5)


def test_tree_attention_matches_float64_reference():
    """softmax(q k^T * scale + mask) v for random tree masks (every row sees itself), GQA, rows
    1..64, with and without the device bound on the columns, against float64."""
    out = _interpret("""
        import torch
        from rsd_bench import tree_attention as ta
        g = torch.Generator().manual_seed(0)
        def ref(q, k, v, mask, scale):
            G = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
            s = (q.double() @ k.double().transpose(-1, -2)) * scale + mask.double()
            return (s.softmax(-1) @ v.double()).transpose(1, 2)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 8e-3)):
            for H, Hkv, M, C, D, bound in [(4, 2, 1, 100, 16, 37), (4, 4, 5, 300, 32, 260), (2, 1, 16, 64, 16, 64),
                                           (4, 2, 20, 200, 16, 150), (2, 2, 64, 520, 32, 500)]:
                q, k, v = (torch.randn(1, h, n, D, generator=g).to(dtype) for h, n in ((H, M), (Hkv, C), (Hkv, C)))
                allowed = torch.rand(M, C, generator=g) < 0.5
                allowed[:, bound:] = False
                allowed[torch.arange(M), bound - M + torch.arange(M)] = True
                mask = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype).view(1, 1, M, C)
                assert ta.supports(q, k, mask)
                r = ref(q, k, v, mask, D ** -0.5)
                for pos in (None, torch.arange(bound - M, bound)):
                    ta.set_bound(pos)
                    o = ta.tree_attention(q, k, v, mask, D ** -0.5)
                    err = float((o.double() - r).norm() / r.norm())
                    assert o.shape == (1, M, H, D) and err < tol, (dtype, H, Hkv, M, C, bound, pos is None, err)
        print("OK")
    """)
    assert out.startswith("OK")


def test_kv_write_matches_index_copy():
    out = _interpret("""
        import torch
        from rsd_bench import kv_write
        g = torch.Generator().manual_seed(1)
        for dtype in (torch.float32, torch.bfloat16):
            kv = torch.randn(2, 2, 1, 3, 20, 8, generator=g).to(dtype)
            ref = kv.clone()
            y = torch.randn(1, 4, 3 * 8, generator=g).to(dtype)
            ks = y.view(1, 4, 3, 8).transpose(1, 2)  # the strided view HF's attention passes
            vs = torch.randn(1, 3, 4, 8, generator=g).to(dtype)
            pos = torch.tensor([5, 6, 19, 2])
            assert kv_write.supported(kv[1, 0], kv[1, 1], ks, vs)
            kv_write.write_kv(kv[1, 0], kv[1, 1], ks, vs, pos)
            ref[1, 0].index_copy_(2, pos, ks)
            ref[1, 1].index_copy_(2, pos, vs)
            assert torch.equal(kv, ref)
        print("OK")
    """)
    assert out.startswith("OK")
