"""Baselines: the papers' formulas on small tensors, and the streaming checkpoint wrappers."""

from __future__ import annotations

import pytest
import torch

from safedelta import baselines as B
from safedelta.checkpoint import CheckpointReader
from safedelta.errors import ArchitectureMismatch, InvalidConfig
from tests.helpers.tiny import save_tiny_pair


def test_linear_merge_endpoints_and_midpoint():
    w0, w1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]])
    assert torch.equal(B.linear_merge(w0, w1, 0.0), w0)
    assert torch.equal(B.linear_merge(w0, w1, 1.0), w1)
    assert torch.equal(B.linear_merge(w0, w1, 0.25), torch.tensor([[1.5, 1.0]]))


def test_alignment_projector_is_v_vt_over_frobenius_norm():
    v = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])  # ||V||_F = 5
    c = B.alignment_projector(v)
    expected = torch.tensor([[9.0, 0, 0], [0, 16.0, 0], [0, 0, 0]]) / 5
    torch.testing.assert_close(c, expected)
    assert torch.equal(B.alignment_projector(torch.zeros(3, 2)), torch.zeros(3, 3))
    with pytest.raises(InvalidConfig):
        B.alignment_projector(torch.zeros(3))


def test_safe_lora_projects_only_below_the_threshold():
    v = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # alignment direction: output row 0 only
    c = B.alignment_projector(v)
    aligned_delta = torch.tensor([[2.0, 1.0], [0.0, 0.0]])  # C dW = dW: similarity 1
    r = B.safe_lora_project(aligned_delta, v, tau=0.5)
    assert r.similarity == pytest.approx(1.0) and not r.projected
    assert torch.equal(r.delta, aligned_delta)
    off = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # mostly outside the direction
    r = B.safe_lora_project(off, v, tau=0.5)
    # <dW, C dW> = 1, ||dW|| = sqrt(10), ||C dW|| = 1  -> cos = 1/sqrt(10)
    assert r.similarity == pytest.approx(1 / 10 ** 0.5)
    assert r.projected
    torch.testing.assert_close(r.delta, c @ off)
    assert not B.safe_lora_project(off, v, tau=0.3).projected
    assert B.safe_lora_project(aligned_delta, v, tau=0.5, force=True).projected


def test_resta_adds_the_safety_vector():
    wa = torch.tensor([1.0, 1.0, 1.0])
    wh = torch.tensor([0.0, 2.0, 1.0])  # harmful fine-tune of the aligned model
    w1 = torch.tensor([1.5, 1.0, 0.0])
    torch.testing.assert_close(B.safety_vector(wa, wh), torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(B.resta(w1, wa, wh, gamma=0.5), torch.tensor([2.0, 0.5, 0.0]))
    torch.testing.assert_close(B.resta(w1, wa, wh, gamma=0.0), w1)


def test_dare_drops_and_rescales():
    g = torch.Generator().manual_seed(0)
    d = torch.ones(10_000)
    out = B.dare(d, 0.75, g)
    kept = out != 0
    assert torch.all(out[kept] == 4.0)
    assert 0.2 < kept.float().mean() < 0.3
    assert torch.equal(B.dare(d, 0.0), d)
    with pytest.raises(InvalidConfig):
        B.dare(d, 1.0)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("trio")
    return {k: save_tiny_pair(root / k, seed=i) for i, k in
            enumerate(("base", "aligned", "finetuned", "harmful"))}


def _state(path):
    r = CheckpointReader(path)
    return {n: r.get(n).float().clone() for n in r.names()}


def test_checkpoint_wrappers_match_the_tensor_formulas(trio, tmp_path):
    sa, sf, sb, sh = (_state(trio[k]) for k in ("aligned", "finetuned", "base", "harmful"))
    m = _state(B.linear_merge_checkpoint(trio["aligned"], trio["finetuned"], tmp_path / "m",
                                         alpha=0.3, progress=False))
    for n in sa:
        torch.testing.assert_close(m[n], sa[n] + 0.3 * (sf[n] - sa[n]))
    r = _state(B.resta_checkpoint(trio["aligned"], trio["harmful"], trio["finetuned"],
                                  tmp_path / "r", gamma=0.7, progress=False))
    for n in sa:
        torch.testing.assert_close(r[n], sf[n] + 0.7 * (sa[n] - sh[n]))
    path, rep = B.safe_lora_checkpoint(trio["base"], trio["aligned"], trio["finetuned"],
                                       tmp_path / "s", tau=2.0, progress=False)  # all projected
    s = _state(path)
    assert rep.projected and set(rep.projected) == set(rep.similarity)
    for n in sa:
        if n in rep.similarity:
            c = B.alignment_projector(sa[n] - sb[n])
            torch.testing.assert_close(s[n], sa[n] + c @ (sf[n] - sa[n]), rtol=1e-5, atol=1e-6)
        else:  # embeddings, norms, head keep the fine-tuned values
            assert torch.equal(s[n], sf[n])
    assert (tmp_path / "s" / "tokenizer.json").is_file()


def test_safe_lora_by_rank_projects_exactly_k_layers(trio, tmp_path):
    _, rep = B.safe_lora_checkpoint(trio["base"], trio["aligned"], trio["finetuned"],
                                    tmp_path / "k", tau=None, num_layers=3, progress=False)
    assert len(rep.projected) == 3
    lowest = sorted(rep.similarity, key=rep.similarity.get)[:3]
    assert set(rep.projected) == set(lowest)
    with pytest.raises(InvalidConfig):
        B.safe_lora_checkpoint(trio["base"], trio["aligned"], trio["finetuned"], tmp_path / "x",
                               tau=0.5, num_layers=2)


def test_mismatched_models_are_refused_and_nothing_written(trio, tmp_path):
    other = save_tiny_pair(tmp_path / "wide", seed=0, intermediate_size=96)
    with pytest.raises(ArchitectureMismatch):
        B.linear_merge_checkpoint(trio["aligned"], other, tmp_path / "o", alpha=0.5,
                                  progress=False)
    assert not (tmp_path / "o").exists()
