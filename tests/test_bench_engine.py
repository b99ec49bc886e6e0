"""scripts/bench_engine.py end to end on the CPU with tiny shapes (--quick): every section runs and
records no error. Nothing here asserts on a timing: the script's numbers are only meaningful on a GPU.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_engine", REPO / "scripts" / "bench_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _errors(obj, where="") -> list[str]:
    """Every 'error' entry anywhere in the report."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "error":
                found.append(f"{where}: {str(v)[-400:]}")
            else:
                found += _errors(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _errors(v, f"{where}[{i}]")
    return found


def test_quick_run_has_every_section_without_errors(bench, tmp_path):
    out = tmp_path / "bench.json"
    rc = bench.main(["--quick", "--device", "cpu", "--out", str(out),
                     "--pair-target", "random-llama:seed=0", "--pair-draft", "random-llama:layers=1,hidden=32,seed=1"])
    assert rc == 0
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == set(bench.SECTIONS)
    assert {name: s["status"] for name, s in sections.items()} == {name: "ok" for name in bench.SECTIONS}
    assert _errors(report) == []

    assert sections["bandwidth"]["bytes_per_second"] > 0
    ar = {r["model"]: r for r in sections["ar"]["results"]}
    assert set(ar) == {"7b", "13b"}
    for r in ar.values():
        for kind in ("eager", "fast"):
            assert r[kind]["ms_per_token"] > 0 and r[kind]["steps"] >= 1
            assert r[kind]["fraction_of_floor"] > 0
        assert 0 < r["streamed_weight_bytes"] < r["weight_bytes"]
    assert [r["nodes"] for r in sections["tree"]["results"]] == [3, 6, 16]
    assert all(r["ratio"] > 0 for r in sections["tree"]["results"])
    ov = {r["method"]: r for r in sections["overhead"]["results"]}
    assert set(ov) == {"sd", "spectr", "rsd_c", "rsd_s"}
    for r in ov.values():
        assert 0 <= r["overhead_fraction"] < 1
        assert 0 <= r["instrumented"]["outside_forwards_fraction"] < 1
        assert r["new_tokens"] == sections["overhead"]["new_tokens"]
    e2e = sections["e2e"]
    assert {p["dataset"] for p in e2e["prompts"]} == {"wmt", "xsum", "dolly"}
    assert e2e["ar"]["tokens_per_second"] > 0
    cells = {(r["method"], r["L"]) for r in e2e["results"] if r.get("tokens_per_second")}
    assert cells == {(m, L) for m in ("sd", "spectr", "rsd_c", "rsd_s") for L in (2, 3)}
    assert e2e["hf"]["status"] == "ok" and e2e["hf"]["ar"]["tokens_per_second"] > 0
    assert [r["L"] for r in e2e["hf"]["sd"] if r.get("tokens_per_second")] == [2, 3]
    eq = sections["equivalence"]
    assert set(eq["greedy"]) >= {"ar", "rsd_s"}
    for role in ("target", "draft"):
        assert eq["tree_logits"][role]["within_tolerance"], eq["tree_logits"][role]
    assert "| section | status |" in report["summary"]


def _trimmed_draft_dir(path: Path, kept: int = 200) -> Path:
    from rsd_bench.tiny_models import tiny_llama
    from rsd_bench.trimmed_vocab import TrimmedVocabLM, save_trimmed

    inner = tiny_llama(vocab_size=kept + 1, layers=1, hidden=32, seed=5)
    save_trimmed(TrimmedVocabLM(inner, torch.arange(kept), 259), path)
    return path


def test_trimmed_draft_wrapped_for_hf_gives_the_same_logits(bench, tmp_path):
    from rsd_bench.trimmed_vocab import load_trimmed
    from transformers import PreTrainedModel

    tv = load_trimmed(_trimmed_draft_dir(tmp_path / "draft"))
    hf = bench.trimmed_as_hf(tv)
    assert isinstance(hf, PreTrainedModel) and hf.config.vocab_size == 259
    assert tv.config.vocab_size == 259 and tv.inner.config.vocab_size == 201  # the original is untouched
    ids = torch.tensor([[1, 40, 250, 7, 258, 3]])
    with torch.no_grad():
        want = tv(input_ids=ids).logits
        got = hf(input_ids=ids).logits
    assert got.shape == (1, 6, 259)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[torch.isfinite(got)], want[torch.isfinite(want)])


def test_quick_e2e_with_a_trimmed_draft_compares_with_hf(bench, tmp_path):
    draft = _trimmed_draft_dir(tmp_path / "draft")
    out = tmp_path / "bench.json"
    rc = bench.main(["--quick", "--device", "cpu", "--out", str(out), "--sections", "e2e,equivalence",
                     "--pair-target", "random-llama:seed=0", "--pair-draft", str(draft), "--e2e-L", "2",
                     "--e2e-methods", "sd,rsd_s"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert _errors(report) == []
    assert report["sections"]["e2e"]["status"] == "ok" and report["sections"]["equivalence"]["status"] == "ok"
    assert report["sections"]["bandwidth"]["status"] == "not selected"
    e2e = report["sections"]["e2e"]
    assert e2e["draft_type"] == "TrimmedVocabLM"
    assert "wrapped" in e2e["hf"]["draft"]
    assert e2e["hf"]["sd"][0]["tokens_per_second"] > 0


def test_block_ab_quick_run_reports_every_variant(tmp_path, monkeypatch):
    """scripts/bench_block_ab.py's plumbing on the CPU: every variant and round is recorded."""
    import sys

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("bench_block_ab", REPO / "scripts" / "bench_block_ab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["bench_block_ab.py"])
    out = tmp_path / "ab.json"
    assert mod.main(["--quick", "--rounds", "2", "--methods", "sd,rsd_s", "--variants", ",".join(mod.VARIANTS),
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["sd", "rsd_s"]
    for row in report["results"]:
        assert set(row["variants"]) == set(mod.VARIANTS)
        for got in row["variants"].values():
            assert len(got["wall_ms_per_block"]) == len(got["timeline_outside"]) == 2
            assert all(x > 0 for x in got["wall_ms_per_block"])
            assert set(got["median"]["outside_ms_per_block_by_phase"]) == {"draft", "verify", "overhead"}


def test_profile_host_quick_run_splits_the_reads(tmp_path, monkeypatch):
    """scripts/profile_host.py's plumbing on the CPU: both host reads of a block are found."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("profile_host", REPO / "scripts" / "profile_host.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "host.json"
    assert mod.main(["--quick", "--methods", "rsd_c", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["method"] == "rsd_c" and row["blocks"] >= 1
    assert any("finish" in k for k in row["read_wait_ms_per_block"])  # the tree read
    assert any("verify" in k for k in row["read_wait_ms_per_block"])  # the verification read
    assert row["other_host_ms_per_block"] > 0 and row["top_own_time"]


def test_profile_host_timeline_finds_the_turnaround_steps(monkeypatch):
    """profile_host.HostTimeline on the CPU (the pooled verification path, as on a GPU): each
    block's steps from the verification read to the target call are found, in order, and the
    functions it wrapped are put back."""
    from rsd_bench import device_graph, engine
    from rsd_bench.graphed_lm import GraphedRunner
    from rsd_bench.tiny_models import tiny_llama

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("profile_host", REPO / "scripts" / "profile_host.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(device_graph, "FORCE_POOLED", True)
    walk = engine.walk
    target, draft = (GraphedRunner(tiny_llama(seed=s), capacity=256, use_graphs=False) for s in (0, 1))
    with mod.HostTimeline() as line:
        engine.generate(target, draft, [1, 40, 50, 60], "rsd_c", 3, vocab_size=259, max_new_tokens=12, seed=0,
                        timing=False, branching=[2, 1, 1])
    assert engine.walk is walk
    steps, count = line.summary()[:-1], line.summary()[-1]
    assert count["blocks"] >= 2
    names = [s["step"] for s in steps]
    for first, then in [("rsd_bench.engine.walk>", "_DraftSession.keep>"), ("_DraftSession.keep>", "GraphedRunner.forward>"),
                        ("GraphedRunner.forward>", "DraftLevelsGraph.replay>"),
                        ("DraftLevelsGraph.replay>", "<GraphedRunner.forward_rows")]:
        assert names.index(first) < names.index(then)
    offsets = [s["us_after_read"] for s in steps]
    assert offsets == sorted(offsets) and offsets[0] > 0
