"""The safedelta flavor: save/load/pyfunc round trips on tiny models, full weights and LoRA."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import yaml

import mlflow
from mlflow.exceptions import MlflowException

from mlflow_safedelta import flavor
from mlflow_safedelta.flavor.model_io import locate_weights
from tests.helpers.tiny import make_tiny_tokenizer, save_tiny_pair

GEN = {"max_new_tokens": 4}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    aligned = save_tiny_pair(root / "aligned", seed=0)
    finetuned = save_tiny_pair(root / "finetuned", seed=1)
    return aligned, finetuned


def _native(model_dir, prompts, params=GEN):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_safedelta.flavor.model_io import generate_texts

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    return generate_texts(model, AutoTokenizer.from_pretrained(str(model_dir)), prompts, params)


def test_save_load_pyfunc_round_trip(tiny_dirs, tmp_path):
    _, finetuned = tiny_dirs
    path = tmp_path / "m"
    flavor.save_model(str(finetuned), path, parent="models:/aligned/1", parent_fingerprint="f00")

    conf = yaml.safe_load((path / "MLmodel").read_text())["flavors"]
    sd = conf["safedelta"]
    assert sd["parent_uri"] == "models:/aligned/1" and sd["parent_fingerprint"] == "f00"
    assert sd["delta_format"] == "full" and sd["role"] == "finetuned" and sd["fingerprint"]
    assert conf["python_function"]["loader_module"] == "mlflow_safedelta.flavor"
    assert (path / "model" / "model.safetensors").is_file()
    assert (path / "components" / "tokenizer" / "tokenizer.json").is_file()
    reqs = (path / "requirements.txt").read_text()
    assert "transformers==" in reqs and "mlflow-safedelta==" in reqs

    prompts = ["hello", "how are you"]
    expected = _native(finetuned, prompts)
    loaded = flavor.load_model(str(path))
    assert loaded.parent == "models:/aligned/1"
    assert loaded.generate(prompts, GEN) == expected

    pyf = mlflow.pyfunc.load_model(str(path))
    assert pyf.predict(prompts, params=GEN) == expected
    assert pyf.predict(pd.DataFrame({"prompt": prompts}), params=GEN) == expected
    chat = pyf.predict([{"role": "user", "content": "hello"}], params=GEN)
    assert chat == expected[:1]  # a bare prompt goes through the same chat template
    assert len(pyf.predict("hello", params={"max_new_tokens": 2})) == 1


def test_params_change_generation(tiny_dirs, tmp_path):
    path = tmp_path / "m"
    flavor.save_model(str(tiny_dirs[1]), path, parent="models:/aligned/1")
    pyf = mlflow.pyfunc.load_model(str(path))
    short = pyf.predict(["hi"], params={"max_new_tokens": 1})
    long = pyf.predict(["hi"], params={"max_new_tokens": 6})
    assert short == _native(tiny_dirs[1], ["hi"], {"max_new_tokens": 1})
    assert long == _native(tiny_dirs[1], ["hi"], {"max_new_tokens": 6})
    assert short != long


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"parent": "models:/noversion"}, "models:/<name>/<version>"),
    ({"role": "villain"}, "role"),
    ({"pip_requirements": ["a"], "conda_env": {"x": 1}}, "conda_env"),
])
def test_bad_arguments_fail_before_touching_disk(tiny_dirs, tmp_path, kwargs, match):
    path = tmp_path / "never"
    with pytest.raises(MlflowException, match=match):
        flavor.save_model(str(tiny_dirs[1]), path, **kwargs)
    assert not path.exists()


def test_pickle_only_checkpoint_refused(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    (tmp_path / "ck" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(MlflowException, match="pickle"):
        flavor.save_model(str(tmp_path / "ck"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_log_model_registers_and_loads(tiny_dirs, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run():
            info = flavor.log_model(str(tiny_dirs[1]), name="model", parent="models:/aligned/1",
                                    registered_model_name="ft")
        assert info.flavors["safedelta"]["parent_uri"] == "models:/aligned/1"
        local = mlflow.artifacts.download_artifacts("models:/ft/1", dst_path=str(tmp_path / "dl"))
        loc = locate_weights(local)
        assert (loc.flavor, loc.kind, loc.parent_uri) == ("safedelta", "full", "models:/aligned/1")
        assert (loc.weights_dir / "config.json").is_file() and loc.tokenizer_dir is not None
        assert len(mlflow.pyfunc.load_model("models:/ft/1").predict(["x"], params=GEN)) == 1
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


def test_lora_adapter_applied_onto_parent(tiny_dirs, tmp_path):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    aligned, _ = tiny_dirs
    base = AutoModelForCausalLM.from_pretrained(str(aligned))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    lora = peft.get_peft_model(base, cfg)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    merged = tmp_path / "merged"
    lora.merge_and_unload().save_pretrained(merged)
    make_tiny_tokenizer().save_pretrained(merged)

    path = tmp_path / "m"
    with pytest.raises(MlflowException, match="parent"):
        flavor.save_model(str(adapter), path, tokenizer=make_tiny_tokenizer())
    assert not path.exists()
    flavor.save_model(str(adapter), path, tokenizer=make_tiny_tokenizer(), parent=str(aligned))
    sd = yaml.safe_load((path / "MLmodel").read_text())["flavors"]["safedelta"]
    assert sd["delta_format"] == "lora"
    assert sorted(os.listdir(path / "model")) == ["adapter_config.json", "adapter_model.safetensors"]
    pyf = mlflow.pyfunc.load_model(str(path))
    prompts = ["hello there"]
    assert pyf.predict(prompts, params=GEN) == _native(merged, prompts)


def test_pyfunc_model_config_reaches_the_loader(tiny_dirs, tmp_path):
    """``mlflow.pyfunc.load_model(..., model_config={"base_model_path": ...})`` is passed on
    (MLflow drops keys a model did not declare when saved)."""
    import peft
    from transformers import AutoModelForCausalLM

    aligned, _ = tiny_dirs
    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(str(aligned)),
                               peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "m"
    flavor.save_model(str(tmp_path / "adapter"), path, tokenizer=make_tiny_tokenizer(),
                      parent="models:/nowhere/1")  # never resolved: base_model_path wins
    pyf = mlflow.pyfunc.load_model(str(path), model_config={"base_model_path": str(aligned)})
    assert len(pyf.predict(["hi"], params=GEN)) == 1


def test_registrant_paths_must_stay_inside_the_downloaded_artifact(tmp_path):
    """MLmodel fields and symlinks that point outside the model's own artifact are errors that
    name the field (the gate must never read the worker's own disk)."""
    import os

    import yaml

    from mlflow_safedelta.errors import ModelWeightsNotFound
    from mlflow_safedelta.flavor.model_io import confine_tree, locate_weights

    elsewhere = tmp_path / "worker-disk"
    save_tiny_pair(elsewhere, seed=0)
    model = tmp_path / "artifact"
    flavor.save_model(str(save_tiny_pair(tmp_path / "ft", seed=1)), model, parent="models:/p/1")
    assert locate_weights(model).weights_dir == (model / "model").resolve()
    ml = yaml.safe_load((model / "MLmodel").read_text())
    for field, value in (("model_data", str(elsewhere)), ("model_data", "../worker-disk"),
                         ("tokenizer", "/etc")):
        bad = dict(ml, flavors={**ml["flavors"], "safedelta": {**ml["flavors"]["safedelta"],
                                                              field: value}})
        (model / "MLmodel").write_text(yaml.safe_dump(bad))
        with pytest.raises(ModelWeightsNotFound, match=f"flavors.safedelta.{field}"):
            locate_weights(model)
    (model / "MLmodel").write_text(yaml.safe_dump(ml))
    os.symlink(elsewhere / "model.safetensors", model / "model" / "extra.safetensors")
    with pytest.raises(ModelWeightsNotFound, match="symlink model/extra.safetensors"):
        confine_tree(model)
    os.unlink(model / "model" / "extra.safetensors")
    os.symlink("config.json", model / "model" / "alias.json")  # inside: fine
    confine_tree(model)
