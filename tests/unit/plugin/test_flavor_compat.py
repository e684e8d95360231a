"""Saved-model back-compat: models saved by an earlier version of the ``safedelta`` flavor must keep
loading. ``tests/resources/safedelta_flavor_v1/`` is committed, not rebuilt by the tests:

- ``aligned_full/``: full weights (``delta_format: full``, role ``aligned``);
- ``finetuned_lora/``: a PEFT LoRA adapter (``delta_format: lora``) whose ``parent_uri`` is
  ``models:/tiny-aligned/1``, loaded here onto ``aligned_full`` with ``base_model_path``;
- ``expected.json``: the last-position logits of a fixed prompt for each model, as saved.

Both are tiny (hidden 32, one decoder layer, the byte-level test tokenizer; ~250 KB in all).
A change to the flavor format that stops these loading (a renamed MLmodel key, a moved
sub-directory, another tokenizer layout) fails here: keep reading old keys (see
``flavor_config.py``) instead of regenerating.

Regenerate ONLY for a deliberately new format version, into a NEW directory (keep the old one
and its test), e.g.::

    .venv/bin/python -m tests.unit.plugin.test_flavor_compat tests/resources/safedelta_flavor_v2

(the function :func:`build` below; deterministic: seeded weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

RESOURCES = Path(__file__).resolve().parents[2] / "resources" / "safedelta_flavor_v1"
PROMPT = "Hello there, how are you?"
PARENT_URI = "models:/tiny-aligned/1"
#: hidden 32, one layer: small enough to commit
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)


def _last_logits(model, tokenizer) -> list[float]:
    import torch

    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return [float(x) for x in model(**ids).logits[0, -1].float()]


def build(dst: Path) -> None:
    """Write the resource directory (see the module docstring)."""
    import shutil
    import tempfile

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from mlflow_safedelta import flavor
    from tests.helpers.tiny import make_tiny_tokenizer, save_tiny_pair

    dst = Path(dst)
    if dst.exists():
        raise SystemExit(f"{dst} exists: regenerate into a new directory")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        aligned = save_tiny_pair(tmp / "aligned", seed=0, **TINY)
        base = AutoModelForCausalLM.from_pretrained(str(aligned))
        torch.manual_seed(3)
        lora = peft.get_peft_model(base, peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        lora.save_pretrained(tmp / "adapter")
        dst.mkdir(parents=True)
        flavor.save_model(str(aligned), dst / "aligned_full", role="aligned")
        flavor.save_model(str(tmp / "adapter"), dst / "finetuned_lora", parent=PARENT_URI,
                          tokenizer=make_tiny_tokenizer())
        tok = make_tiny_tokenizer()
        expected = {"prompt": PROMPT,
                    "aligned_full": _last_logits(AutoModelForCausalLM.from_pretrained(
                        str(aligned)).eval(), tok),
                    "finetuned_lora": _last_logits(lora.merge_and_unload().eval(), tok)}
        (dst / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    for junk in dst.rglob("__pycache__"):
        shutil.rmtree(junk)


def _expected() -> dict:
    return json.loads((RESOURCES / "expected.json").read_text())


def test_resources_are_small_and_committed():
    files = [p for p in RESOURCES.rglob("*") if p.is_file()]
    assert (RESOURCES / "aligned_full" / "MLmodel").is_file()
    assert (RESOURCES / "finetuned_lora" / "MLmodel").is_file()
    assert sum(p.stat().st_size for p in files) < 400_000


def test_old_full_model_loads_with_the_flavor_and_pyfunc():
    import mlflow

    from mlflow_safedelta import flavor

    path = str(RESOURCES / "aligned_full")
    m = flavor.load_model(path)
    assert m.delta_format == "full" and m.conf["role"] == "aligned"
    assert _last_logits(m.model, m.tokenizer) == pytest.approx(_expected()["aligned_full"],
                                                               abs=1e-4)
    pyf = mlflow.pyfunc.load_model(path)
    assert pyf.metadata.flavors["safedelta"]["flavor_version"] == 1
    out = pyf.predict([PROMPT], params={"max_new_tokens": 3})
    assert len(out) == 1 and isinstance(out[0], str)
    assert out == m.generate([PROMPT], {"max_new_tokens": 3})


def test_old_lora_model_loads_onto_its_parent():
    import mlflow

    from mlflow_safedelta import flavor

    path = str(RESOURCES / "finetuned_lora")
    base = str(RESOURCES / "aligned_full" / "model")
    m = flavor.load_model(path, base_model_path=base)
    assert m.delta_format == "lora" and m.parent == PARENT_URI
    assert _last_logits(m.model, m.tokenizer) == pytest.approx(_expected()["finetuned_lora"],
                                                               abs=1e-4)
    # pyfunc: models of this age declared no model_config, so the parent is resolved through
    # the registry (this test's own SQLite store) as in production
    from mlflow_safedelta import registry as reg

    cl = reg.client()
    run = cl.create_run(cl.create_experiment("parents"))
    mv = reg.register_saved_model(cl, RESOURCES / "aligned_full", "tiny-aligned",
                                  run_id=run.info.run_id)
    assert f"models:/tiny-aligned/{mv.version}" == PARENT_URI
    pyf = mlflow.pyfunc.load_model(path)
    assert pyf.metadata.flavors["safedelta"]["parent_uri"] == PARENT_URI
    out = pyf.predict([{"role": "user", "content": PROMPT}], params={"max_new_tokens": 3})
    assert out == m.generate([{"role": "user", "content": PROMPT}], {"max_new_tokens": 3})


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else RESOURCES)
    print(f"written; now add it: git add {sys.argv[1] if len(sys.argv) > 1 else RESOURCES}")
