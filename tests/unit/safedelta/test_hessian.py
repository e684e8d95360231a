"""The streaming calibration pass and the Hessian cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from safedelta import hessian
from safedelta.calibration import load_calibration
from safedelta.errors import CalibrationError
from safedelta.hessian import HessianAccumulator, HessianSet, hessians_from_model, prepare_hessians
from tests.helpers.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_pair

KW = dict(max_samples=5, max_length=40, progress=False)


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("llama"), arch="llama", seed=1)


def test_running_mean_is_two_over_n_sum_xxT():
    torch.manual_seed(0)
    xs = [torch.randn(1, t, 6) for t in (3, 7, 1, 5)]
    rh = HessianAccumulator(6)
    for x in xs:
        rh.add(x)
    want = 2 / len(xs) * sum(x[0].T @ x[0] for x in xs)
    assert rh.nsamples == 4
    torch.testing.assert_close(rh.H, want, rtol=1e-5, atol=1e-5)
    rh2 = HessianAccumulator(6)
    rh2.add(torch.cat([xs[0][:, :3], xs[1][:, :3]]))   # a batch of 2 counts as 2 samples
    torch.testing.assert_close(
        rh2.H, (xs[0][0, :3].T @ xs[0][0, :3] + xs[1][0, :3].T @ xs[1][0, :3]), rtol=1e-5,
        atol=1e-5)


def test_padding_is_left_out_and_one_product_per_call_equals_per_sample_adds():
    torch.manual_seed(1)
    lengths = (4, 9, 2)
    xs = [torch.randn(t, 5) for t in lengths]
    one_by_one = HessianAccumulator(5)
    for x in xs:
        one_by_one.add(x)
    padded = torch.full((3, 9, 5), 1e3)                # padding values that would dominate H
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for b, x in enumerate(xs):
        padded[b, :len(x)], mask[b, :len(x)] = x, True
    batched = HessianAccumulator(5)
    batched.add(padded, mask)
    assert batched.nsamples == one_by_one.nsamples == 3 and batched.ntokens == sum(lengths)
    torch.testing.assert_close(batched.H, one_by_one.H, rtol=1e-6, atol=1e-6)
    unmasked = HessianAccumulator(5)
    unmasked.add(padded)
    assert unmasked.H.max() > 1e5                       # the mask is what keeps padding out


def test_the_layer_api_accumulates_with_the_calibration_accumulator():
    from safedelta.errors import ShapeMismatch
    from safedelta.solver import SafeDeltaLayer

    torch.manual_seed(2)
    layer = SafeDeltaLayer(torch.nn.Linear(5, 3))
    assert isinstance(layer.hessian, HessianAccumulator)
    x = torch.randn(2, 6, 5)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    layer.add_batch(x, mask)
    want = 2 / 2 * (x[0].T @ x[0] + x[1, :2].T @ x[1, :2])
    torch.testing.assert_close(layer.H, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ShapeMismatch, match="5 features"):
        layer.add_batch(torch.randn(2, 4))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_padded_micro_batches_equal_the_per_sample_reference(tmp_path, arch):
    """Batching changes the rounding only: the tolerance is fp32 accumulation error."""
    d = tmp_path / arch
    model = make_tiny_model(d, arch=arch, seed=5)
    torch.manual_seed(0)
    samples = [torch.randint(3, 200, (n,)) for n in (17, 5, 11, 30, 8, 2, 23)]
    ref = hessians_from_model(model, samples)          # batch size 1, no padding
    batched = prepare_hessians(d, samples, cache_dir=tmp_path / "c", micro_batch=3, **KW)
    single = prepare_hessians(d, samples, cache_dir=tmp_path / "c", micro_batch=1, **KW)
    assert not single.cache_hit and single.fingerprint != batched.fingerprint
    fields = json.loads((batched.cache_path / "manifest.json").read_text())["key_fields"]
    assert fields["micro_batch"] == 3 and fields["accumulation"] == hessian.ACCUMULATION
    assert batched.n_tokens == sum(len(s) for s in samples)
    for n in batched.weight_names:
        torch.testing.assert_close(batched.get(n), ref[n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(single.get(n), ref[n], rtol=1e-4, atol=1e-5)


def test_micro_batch_must_be_a_positive_integer(tmp_path, llama_dir):
    with pytest.raises(CalibrationError, match="micro_batch"):
        prepare_hessians(llama_dir, None, cache_dir=tmp_path, micro_batch=0, **KW)


@pytest.mark.parametrize("arch, dtype", [("llama", None), ("gpt2", None), ("qwen3", None),
                                         ("phi3", torch.bfloat16), ("gemma3", None)])
def test_streaming_equals_in_memory_reference(tmp_path, tok, arch, dtype):
    d = save_tiny_pair(tmp_path / arch, arch=arch, seed=3, dtype=dtype)
    hs = prepare_hessians(d, None, **KW)
    samples = load_calibration(None, tok, max_samples=5, max_length=40)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ref = hessians_from_model(model, samples)
    assert hs.weight_names == list(ref)
    assert hs.n_samples == 5 and hs.n_tokens == sum(len(s) for s in samples)
    for name, H_ref in ref.items():
        H = hs.get(name)
        assert H.dtype == torch.float32 and H.shape == H_ref.shape == (hs.in_features(name),) * 2
        torch.testing.assert_close(H, H_ref, rtol=1e-4, atol=1e-5)
    # the blocks really see different inputs (outputs of block 0 feed block 1)
    first, second = hs.weight_names[0], hs.weight_names[len(hs.weight_names) // 2]
    assert hs.block_of[first] == 0 and hs.block_of[second] == 1
    assert not torch.allclose(hs.get(first), hs.get(second))
    if arch == "gpt2":
        assert hs.conv1d == set(hs.weight_names)
    else:
        assert hs.conv1d == set()


def test_qkv_and_gate_up_share_one_hessian(tmp_path, llama_dir):
    hs = prepare_hessians(llama_dir, None, cache_dir=tmp_path, **KW)
    p = "model.layers.1."
    assert hs.shared[p + "self_attn.k_proj.weight"] == p + "self_attn.q_proj.weight"
    assert hs.shared[p + "self_attn.v_proj.weight"] == p + "self_attn.q_proj.weight"
    assert hs.shared[p + "mlp.up_proj.weight"] == p + "mlp.gate_proj.weight"
    assert p + "self_attn.o_proj.weight" not in hs.shared
    assert p + "mlp.down_proj.weight" not in hs.shared
    blk = hs.block(1)
    assert len(blk) == 7
    assert blk[p + "self_attn.k_proj.weight"] is blk[p + "self_attn.q_proj.weight"]
    with safe_open(hs.cache_path / "block_00001.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == sorted(p + n for n in ("self_attn.q_proj.weight",
                                                          "self_attn.o_proj.weight",
                                                          "mlp.gate_proj.weight",
                                                          "mlp.down_proj.weight"))
    with pytest.raises(IndexError):
        hs.block(2)


def _forbid_forward(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the calibration pass ran although the cache was valid")

    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", boom)
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", boom)
    monkeypatch.setattr(hessian, "_calibration_pass", boom)


def test_cache_hit_skips_the_pass_and_returns_identical_tensors(tmp_path, llama_dir,
                                                                 monkeypatch):
    first = prepare_hessians(llama_dir, None, cache_dir=tmp_path, **KW)
    assert not first.cache_hit and first.timings["calibration_forward"] > 0
    assert first.cache_path.parent == tmp_path / "hessians"
    with monkeypatch.context() as m:
        _forbid_forward(m)
        second = prepare_hessians(llama_dir, None, cache_dir=tmp_path, **KW)
    assert second.cache_hit and second.fingerprint == first.fingerprint
    assert second.timings["calibration_forward"] == 0.0
    assert second.n_tokens == first.n_tokens and second.weight_names == first.weight_names
    for n in first.weight_names:
        assert torch.equal(first.get(n), second.get(n))
    # another calibration setting is another entry
    third = prepare_hessians(llama_dir, None, cache_dir=tmp_path, max_samples=4, max_length=40,
                             progress=False)
    assert not third.cache_hit and third.fingerprint != first.fingerprint


def test_default_cache_dir_follows_env(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEDELTA_CACHE", str(tmp_path / "c"))
    hs = prepare_hessians(llama_dir, None, **KW)
    assert hs.cache_path == tmp_path / "c" / "hessians" / hs.fingerprint


@pytest.mark.parametrize("damage", ["no_manifest", "garbled_manifest", "missing_block",
                                    "truncated_block"])
def test_partial_or_corrupt_cache_is_recomputed(tmp_path, llama_dir, damage):
    first = prepare_hessians(llama_dir, None, cache_dir=tmp_path, **KW)
    want = {n: first.get(n).clone() for n in first.weight_names}
    path = first.cache_path
    del first
    if damage == "no_manifest":
        (path / "manifest.json").unlink()
    elif damage == "garbled_manifest":
        (path / "manifest.json").write_text('{"format": 1, "tensors": ')
    elif damage == "missing_block":
        (path / "block_00001.safetensors").unlink()
    else:  # e.g. an interrupted copy of the cache from an artifact store
        blob = (path / "block_00000.safetensors").read_bytes()
        (path / "block_00000.safetensors").write_bytes(blob[: len(blob) // 2])
    again = prepare_hessians(llama_dir, None, cache_dir=tmp_path, **KW)
    assert not again.cache_hit and again.cache_path == path
    for n, H in want.items():
        assert torch.equal(again.get(n), H)
    assert prepare_hessians(llama_dir, None, cache_dir=tmp_path, **KW).cache_hit


def test_crash_during_the_pass_leaves_nothing_that_looks_valid(tmp_path, llama_dir,
                                                               monkeypatch):
    calls = {"n": 0}
    real = hessian._group_shared

    def crash_on_second_block(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(hessian, "_group_shared", crash_on_second_block)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_hessians(llama_dir, None, cache_dir=tmp_path, **KW)
    assert calls["n"] == 2
    assert list((tmp_path / "hessians").iterdir()) == []      # no entry, no leftover tmp dir
    monkeypatch.setattr(hessian, "_group_shared", real)
    hs = prepare_hessians(llama_dir, None, cache_dir=tmp_path, **KW)
    assert not hs.cache_hit and json.loads((hs.cache_path / "manifest.json").read_text())


def test_token_ids_need_no_tokenizer(tmp_path):
    d = tmp_path / "bare"
    model = make_tiny_model(d, arch="llama", seed=2)      # weights only, no tokenizer
    torch.manual_seed(0)
    samples = [torch.randint(3, 200, (n,)) for n in (9, 4, 12)]
    with pytest.raises(CalibrationError, match="no usable tokenizer"):
        prepare_hessians(d, None, **KW)
    hs = prepare_hessians(d, samples, **KW)
    assert hs.n_samples == 3 and hs.n_tokens == 25
    ref = hessians_from_model(model, samples)
    for n in hs.weight_names:
        torch.testing.assert_close(hs.get(n), ref[n], rtol=1e-4, atol=1e-5)
    hs2 = prepare_hessians(d, samples[:2], **KW)           # other tokens, other key
    assert not hs2.cache_hit and hs2.n_tokens == 13


def test_hessian_set_reads_back_from_its_directory(tmp_path, llama_dir):
    hs = prepare_hessians(llama_dir, None, cache_dir=tmp_path, **KW)
    again = HessianSet(hs.cache_path)
    assert again.weight_names == hs.weight_names and again.block_of == hs.block_of
    name = hs.weight_names[-1]
    assert torch.equal(again.get(name), hs.get(name))
    with pytest.raises(Exception, match="no Hessian for 'lm_head.weight'"):
        again.get("lm_head.weight")


def test_falls_back_to_block0_arguments_when_blocks_cannot_be_passed_through(
        tmp_path, llama_dir, tok, monkeypatch, caplog):
    real = hessian._capture_inputs

    def refuse_pass_through(model, layers, *args):
        def boom(_m, _a):
            raise RuntimeError("this loop needs real block outputs")

        h = layers[1].register_forward_pre_hook(boom)
        try:
            return real(model, layers, *args)
        finally:
            h.remove()

    monkeypatch.setattr(hessian, "_capture_inputs", refuse_pass_through)
    hs = prepare_hessians(llama_dir, None, cache_dir=tmp_path, **KW)
    assert "reusing block 0's for every block" in caplog.text
    # Llama passes the same arguments to every block, so the result is still exact
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ref = hessians_from_model(model, load_calibration(None, tok, max_samples=5, max_length=40))
    for n in hs.weight_names:
        torch.testing.assert_close(hs.get(n), ref[n], rtol=1e-4, atol=1e-5)


def test_checkpoint_of_a_bare_base_model_uses_its_own_names(tmp_path, tok):
    from transformers import LlamaForCausalLM, LlamaModel

    from tests.helpers.tiny import make_tiny_config

    torch.manual_seed(4)
    base = LlamaModel(make_tiny_config("llama")).eval()
    d = tmp_path / "base"
    base.save_pretrained(d)
    tok.save_pretrained(d)
    hs = prepare_hessians(d, None, **KW)
    assert hs.weight_names[0] == "layers.0.self_attn.q_proj.weight"
    full = LlamaForCausalLM(make_tiny_config("llama")).eval()
    full.model.load_state_dict(base.state_dict())
    ref = hessians_from_model(full, load_calibration(None, tok, max_samples=5, max_length=40))
    for n in hs.weight_names:
        torch.testing.assert_close(hs.get(n), ref["model." + n], rtol=1e-4, atol=1e-5)


def test_missing_block_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from safedelta.errors import MissingTensor

    d = save_tiny_pair(tmp_path / "m", arch="llama", seed=0)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingTensor, match="'model.layers.1.mlp.down_proj.weight'"):
        prepare_hessians(d, None, cache_dir=tmp_path / "c", **KW)
    assert list((tmp_path / "c" / "hessians").iterdir()) == []
