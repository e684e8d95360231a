"""The streaming protect pipeline against an in-memory reference on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safedelta.checkpoint import CheckpointReader
from safedelta.config import SafeDeltaConfig
from safedelta.errors import NonFiniteWeights
from safedelta.pipeline import protect
from safedelta.report import ProtectReport
from tests.helpers.tiny import make_tiny_model, make_tiny_tokenizer


def samples(n=4, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200, (length,), generator=g) for _ in range(n)]


def make_pair(tmp_path: Path, arch="llama", shard=None, delta=0.02):
    """Aligned (optionally sharded) + fine-tuned = aligned + small random change everywhere."""
    aligned = make_tiny_model(None, arch=arch, seed=0)
    tok = make_tiny_tokenizer()
    a_dir, f_dir = tmp_path / "aligned", tmp_path / "ft"
    aligned.save_pretrained(a_dir, max_shard_size=shard or "10GB")
    tok.save_pretrained(a_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(delta * torch.randn(p.shape, generator=g))
    aligned.save_pretrained(f_dir)
    return a_dir, f_dir


def reference(a_dir, f_dir, hs, cfg):
    """Both models whole in memory, every decoder linear through protect_matrix."""
    from transformers import AutoModelForCausalLM

    from safedelta.solver import protect_matrix

    a = AutoModelForCausalLM.from_pretrained(a_dir).state_dict()
    f = AutoModelForCausalLM.from_pretrained(f_dir).state_dict()
    out = {}
    for name, w0 in a.items():
        if name in hs.weight_names:
            t = name in hs.conv1d
            w0_, w1_ = (w0.T, f[name].T) if t else (w0, f[name])
            res = protect_matrix(w0_, w1_, hs.get(name), config=cfg)
            out[name] = res.weight.T if t else res.weight
        else:
            out[name] = (f if cfg.nonlinear == "finetuned" else a)[name]
    return out, a, f


@pytest.mark.parametrize("arch,shard", [("llama", "60KB"), ("gpt2", None)])
def test_streaming_equals_in_memory_reference(tmp_path, arch, shard):
    from transformers import AutoModelForCausalLM

    from safedelta.hessian import prepare_hessians

    a_dir, f_dir = make_pair(tmp_path, arch=arch, shard=shard)
    cfg = SafeDeltaConfig(s=0.05)
    toks = samples()
    report = protect(a_dir, f_dir, tmp_path / "out", calibration=toks, config=cfg,
                     progress=False)
    hs = prepare_hessians(a_dir, toks, progress=False)
    assert hs.cache_hit  # the pipeline filled the cache
    ref, a, f = reference(a_dir, f_dir, hs, cfg)

    out_dir = tmp_path / "out"
    src, got = CheckpointReader(a_dir), CheckpointReader(out_dir)
    assert got.weight_map == src.weight_map  # same sharding
    if shard:
        assert len(set(src.weight_map.values())) > 1
    assert (out_dir / "config.json").read_bytes() == (a_dir / "config.json").read_bytes()
    assert (out_dir / "tokenizer_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    state = model.state_dict()
    for name in src.names():
        torch.testing.assert_close(got.get(name), ref[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(state[name], ref[name], rtol=0, atol=0, msg=name)

    # the report: one entry per decoder linear, kept entries are exactly the fine-tuned values
    assert sorted(report.matrices) == sorted(hs.weight_names)
    for name, st in report.matrices.items():
        w = got.get(name)
        exact = ((w == f[name]) & (f[name] != a[name])).sum().item()
        assert exact == st["n_kept"], name
    assert 0 < report.totals["kept_fraction"] < 1
    assert report.inputs["finetuned_kind"] == "full"
    assert set(report.nonlinear) == set(src.names()) - set(hs.weight_names)
    emb = next(n for n in report.nonlinear if "emb" in n or "wte" in n)
    want = float(torch.linalg.vector_norm(f[emb] - a[emb]))
    assert report.nonlinear[emb]["delta_norm"] == pytest.approx(want, rel=1e-5)
    assert not report.nonlinear[emb]["kept"]
    saved = ProtectReport.load(out_dir)
    assert saved.totals["n_kept"] == report.totals["n_kept"]
    assert (out_dir / "safedelta_report.md").read_text().startswith("# Safe Delta report")
    assert {"fingerprint", "hessians", "protect", "write", "total"} <= set(report.timings)
    assert report.memory["peak_rss_mib"] > 0
    assert set(report.memory["phases"]) == {"validate", "hessians", "stream"}
    assert report.memory["peak_rss_mib"] == max(p["peak_rss_mib"]
                                                for p in report.memory["phases"].values())


def test_nonlinear_finetuned_and_warm_cache(tmp_path):
    a_dir, f_dir = make_pair(tmp_path)
    toks = samples()
    first = protect(a_dir, f_dir, tmp_path / "o1", calibration=toks, progress=False)
    cfg = SafeDeltaConfig(nonlinear="finetuned")
    second = protect(a_dir, f_dir, tmp_path / "o2", calibration=toks, config=cfg,
                     progress=False)
    assert not first.cache["hit"] and second.cache["hit"]
    # the second request reads the cached factorisations (and output energies) back
    assert first.inputs["hessians_factored"] > 0 and first.inputs["factorisations_cached"] == 0
    assert second.inputs["hessians_factored"] == 0
    assert second.inputs["factorisations_cached"] == first.inputs["hessians_factored"]
    f, o1, o2 = (CheckpointReader(d) for d in (f_dir, tmp_path / "o1", tmp_path / "o2"))
    for name in second.nonlinear:
        assert torch.equal(o2.get(name), f.get(name))
        assert second.nonlinear[name]["kept"]
    for name in second.matrices:  # the linear layers do not depend on the non-linear choice
        assert torch.equal(o2.get(name), o1.get(name))
    assert second.totals["nonlinear_discarded_norm"] == 0
    assert first.totals["nonlinear_discarded_norm"] == pytest.approx(
        second.totals["nonlinear_kept_norm"])


def test_lora_input_equals_merged_checkpoint(tmp_path):
    from tests.unit.safedelta.test_lora import make_lora

    a_dir, _ = make_pair(tmp_path)
    merged = make_lora(a_dir, tmp_path / "lora", r=4, lora_alpha=8,
                       target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"],
                       modules_to_save=["lm_head"])
    m = make_tiny_model(None, seed=0)
    m.load_state_dict(merged)
    m.save_pretrained(tmp_path / "merged")
    toks = samples()
    cfg = SafeDeltaConfig(s=0.05, nonlinear="finetuned")
    r_lora = protect(a_dir, tmp_path / "lora", tmp_path / "o_lora", calibration=toks,
                     config=cfg, progress=False)
    r_full = protect(a_dir, tmp_path / "merged", tmp_path / "o_full", calibration=toks,
                     config=cfg, progress=False)
    assert r_lora.inputs["finetuned_kind"] == "lora"
    lo, fu = CheckpointReader(tmp_path / "o_lora"), CheckpointReader(tmp_path / "o_full")
    for name in lo.names():
        torch.testing.assert_close(lo.get(name), fu.get(name), rtol=0, atol=1e-6, msg=name)
    assert r_lora.totals["n_kept"] == r_full.totals["n_kept"]
    assert r_lora.nonlinear["lm_head.weight"]["delta_norm"] > 0


def test_failure_mid_stream_leaves_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    a_dir, f_dir = make_pair(tmp_path)
    sd = load_file(str(f_dir / "model.safetensors"))
    sd["model.norm.weight"][3] = float("inf")  # written late in the stream
    save_file(sd, str(f_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeights, match=r"'model\.norm\.weight' of the fine-tuned model"):
        protect(a_dir, f_dir, tmp_path / "out", calibration=samples(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned", "ft", "safedelta-cache"]
