"""Checkpoint reading checks and the progressive, atomic writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safedelta.checkpoint import CheckpointReader, CheckpointWriter, check_compatible
from safedelta.errors import (
    ArchitectureMismatch,
    MissingTensor,
    NonFiniteWeights,
    OutputExists,
    ShapeMismatch,
)


def _ckpt(path: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1,
          model_type: str = "llama") -> Path:
    """A checkpoint dir: config.json + tokenizer file + one or ``shards`` safetensors files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type,
                                                  "architectures": ["LlamaForCausalLM"]}))
    (path / "tokenizer_config.json").write_text("{}")
    (path / "README.md").write_text("not copied")
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n] for n in names}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        return path
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(3, generator=g),
        "c.weight": torch.randn(2, 5, generator=g).half(),
        "d.ids": torch.arange(7, dtype=torch.int64),
    }


def test_compatible_models_pass(tmp_path):
    a = CheckpointReader(_ckpt(tmp_path / "a", _tensors(0)))
    f = CheckpointReader(_ckpt(tmp_path / "f", _tensors(1), shards=2))
    check_compatible(a, f)  # no error


def test_shape_mismatch_names_first_tensor(tmp_path):
    t = _tensors(1)
    t["b.weight"] = torch.zeros(4)
    t["c.weight"] = torch.zeros(5, 2)
    a = CheckpointReader(_ckpt(tmp_path / "a", _tensors(0)))
    f = CheckpointReader(_ckpt(tmp_path / "f", t), label="fine-tuned model")
    with pytest.raises(ShapeMismatch, match=r"'b\.weight'.*\[3\].*\[4\]"):
        check_compatible(a, f)


def test_missing_and_extra_tensor(tmp_path):
    t = _tensors(1)
    del t["c.weight"]
    a = CheckpointReader(_ckpt(tmp_path / "a", _tensors(0)))
    f = CheckpointReader(_ckpt(tmp_path / "f", t))
    with pytest.raises(MissingTensor, match="'c.weight'"):
        check_compatible(a, f)
    t = _tensors(1)
    t["e.extra"] = torch.zeros(1)
    f2 = CheckpointReader(_ckpt(tmp_path / "f2", t))
    with pytest.raises(MissingTensor, match="'e.extra'"):
        check_compatible(a, f2)


def test_architecture_mismatch_from_config(tmp_path):
    a = CheckpointReader(_ckpt(tmp_path / "a", _tensors(0)))
    f = CheckpointReader(_ckpt(tmp_path / "f", _tensors(1), model_type="mistral"))
    with pytest.raises(ArchitectureMismatch, match="model_type.*llama.*mistral"):
        check_compatible(a, f)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_named(tmp_path, bad):
    t = _tensors(0)
    t["c.weight"][1, 2] = bad
    r = CheckpointReader(_ckpt(tmp_path / "a", t), label="fine-tuned model")
    r.get("a.weight", check_finite=True)  # fine
    with pytest.raises(NonFiniteWeights, match=r"'c\.weight' of the fine-tuned model"):
        r.get("c.weight", check_finite=True)


@pytest.mark.parametrize("shards", [1, 3])
def test_writer_reproduces_layout_and_values(tmp_path, shards):
    src = _ckpt(tmp_path / "a", _tensors(0), shards=shards)
    r = CheckpointReader(src)
    out = tmp_path / "out"
    with CheckpointWriter(out, template=r) as w:
        for name in reversed(w.names()):  # any order works
            w.add(name, r.get(name).clone())
        assert not out.exists()  # nothing visible before commit
        w.commit()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in src.iterdir() if p.name != "README.md")
    back = CheckpointReader(out)
    assert back.weight_map == r.weight_map
    for name in r.names():
        assert back.dtype(name) == r.dtype(name)
        assert torch.equal(back.get(name), r.get(name))
    # the files are plain safetensors
    for f in back.files():
        load_file(str(f))
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_writer_casts_to_output_dtype(tmp_path):
    r = CheckpointReader(_ckpt(tmp_path / "a", _tensors(0)))
    with CheckpointWriter(tmp_path / "out", template=r, dtype=torch.float16) as w:
        for name in w.names():
            w.add(name, r.get(name))
        w.commit()
    back = CheckpointReader(tmp_path / "out")
    assert back.dtype("a.weight") == "F16" and back.dtype("b.weight") == "F16"
    assert back.dtype("d.ids") == "I64"


def test_writer_failure_leaves_nothing(tmp_path):
    r = CheckpointReader(_ckpt(tmp_path / "a", _tensors(0), shards=2))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, template=r) as w:
            w.add(w.names()[0], r.get(w.names()[0]))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_existing_model_refused_then_replaced(tmp_path):
    r = CheckpointReader(_ckpt(tmp_path / "a", _tensors(0)))
    out = _ckpt(tmp_path / "out", _tensors(5))
    before = load_file(str(out / "model.safetensors"))
    with pytest.raises(OutputExists, match="already holds a model"):
        CheckpointWriter(out, template=r)
    assert torch.equal(load_file(str(out / "model.safetensors"))["b.weight"], before["b.weight"])
    with CheckpointWriter(out, template=r, overwrite=True) as w:
        for name in w.names():
            w.add(name, r.get(name))
        w.commit()
    assert torch.equal(CheckpointReader(out).get("b.weight"), r.get("b.weight"))
    assert not (out / "README.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]


def test_truncated_file_is_a_checkpoint_error(tmp_path):
    from safedelta.errors import CheckpointError

    src = _ckpt(tmp_path / "a", _tensors(0))
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-8])
    r = CheckpointReader(src)
    with pytest.raises(CheckpointError, match="truncated"):
        for name in r.names():
            r.get(name)
    (src / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        CheckpointReader(src)


def test_get_rows_reads_exactly_the_requested_rows(tmp_path):
    import torch
    from safetensors.torch import save_file

    from safedelta.checkpoint import CheckpointReader

    emb = torch.randn(50, 6).to(torch.bfloat16)
    save_file({"emb": emb, "other": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    r = CheckpointReader(tmp_path)
    for rows in ([0], [3, 4, 5, 9, 49], list(range(50)), []):
        idx = torch.tensor(rows, dtype=torch.long)
        assert torch.equal(r.get_rows("emb", idx), emb[idx])
    with pytest.raises(IndexError):
        r.get_rows("emb", torch.tensor([50]))
