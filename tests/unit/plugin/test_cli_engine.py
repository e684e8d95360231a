"""``mlflow-safedelta protect`` (and friends) through click's CliRunner.

Every bad input exits 2 with a message naming the problem, no traceback, and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mlflow_safedelta.cli import cli
from tests.helpers.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_pair

CALIB = [{"prompt": f"Explain how to do harmful thing number {i}.",
          "response": "I'm sorry, but I cannot help with that."} for i in range(3)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Aligned + fine-tuned (aligned + small delta) tiny Llamas and a calibration file."""
    root = tmp_path_factory.mktemp("models")
    aligned = save_tiny_pair(root / "aligned", seed=0)
    m = make_tiny_model(None, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    m.save_pretrained(root / "ft")
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps(c) + "\n" for c in CALIB))
    return {"aligned": aligned, "ft": root / "ft", "calib": calib, "root": root}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def protect_args(models, ft, out, *extra):
    return ("protect", "--aligned", models["aligned"], "--finetuned", ft, "--out", out,
            "--calibration", models["calib"], *extra)


def copy_ft(models, tmp_path, name="ft") -> Path:
    dst = tmp_path / name
    shutil.copytree(models["ft"], dst)
    return dst


def edit_weights(d: Path, fn):
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def assert_refused(result, out: Path, *patterns):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for p in patterns:
        assert p in result.output, result.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_protect_json_and_summary(models, tmp_path):
    out = tmp_path / "out"
    res = run(*protect_args(models, models["ft"], out, "--s", "0.05", "--json"))
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["config"]["s"] == 0.05 and data["inputs"]["finetuned_kind"] == "full"
    assert 0 < data["totals"]["kept_fraction"] < 1
    assert len(data["matrices"]) == 14
    assert (out / "model.safetensors").is_file() and (out / "safedelta_report.json").is_file()
    # refused without --overwrite, nothing changed; replaced with it
    before = (out / "model.safetensors").read_bytes()
    res = run(*protect_args(models, models["ft"], out, "--s", "0.5"))
    assert res.exit_code == 2 and "already holds a model" in res.output
    assert "--overwrite" in res.output and "Traceback" not in res.output
    assert (out / "model.safetensors").read_bytes() == before
    res = run(*protect_args(models, models["ft"], out, "--s", "0.5", "--budget", "official",
                            "--nonlinear", "finetuned", "--overwrite"))
    assert res.exit_code == 0, res.output
    assert "total" in res.stdout and "Hessian cache hit" in res.stdout
    assert (out / "model.safetensors").read_bytes() != before


def test_shape_mismatch_names_first_tensor(models, tmp_path):
    other = tmp_path / "wide"
    make_tiny_model(other, seed=1, intermediate_size=96)
    out = tmp_path / "out"
    res = run(*protect_args(models, other, out))
    assert_refused(res, out, "'model.layers.0.mlp.down_proj.weight'", "[64, 128]", "[64, 96]")


def test_architecture_mismatch(models, tmp_path):
    other = tmp_path / "gpt2"
    make_tiny_model(other, arch="gpt2", seed=1)
    out = tmp_path / "out"
    assert_refused(run(*protect_args(models, other, out)), out, "model_type", "'llama'", "'gpt2'")


def test_missing_tensor(models, tmp_path):
    ft = copy_ft(models, tmp_path)
    edit_weights(ft, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    out = tmp_path / "out"
    assert_refused(run(*protect_args(models, ft, out)), out,
                   "'model.layers.1.self_attn.k_proj.weight'", "missing")


@pytest.mark.parametrize("which,value", [("ft", float("nan")), ("aligned", float("inf"))])
def test_non_finite_weights(models, tmp_path, which, value):
    bad = copy_ft(models, tmp_path, which) if which == "ft" else tmp_path / "aligned"
    if which == "aligned":
        shutil.copytree(models["aligned"], bad)
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(sd):
        sd[name][0, 0] = value

    edit_weights(bad, poison)
    args = protect_args(models, bad if which == "ft" else models["ft"], tmp_path / "out")
    if which == "aligned":
        args = ("protect", "--aligned", bad, *args[3:])
    label = "fine-tuned model" if which == "ft" else "aligned model"
    assert_refused(run(*args), tmp_path / "out", f"'{name}' of the {label}", "non-finite")


def test_pickle_refused_unless_allowed(models, tmp_path):
    pk = tmp_path / "pickled"
    m = make_tiny_model(None, seed=1)
    m.config.save_pretrained(pk)
    torch.save({k: v.contiguous() for k, v in m.state_dict().items()}, pk / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_refused(run(*protect_args(models, pk, out)), out, "pickle", "--allow-pickle")
    res = run(*protect_args(models, pk, out, "--allow-pickle"))
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("content", [b"not a pickle at all", b"PK\x03\x04truncated zip"])
def test_an_unreadable_pickle_with_allow_pickle_exits_2_with_a_message(models, tmp_path,
                                                                        content):
    pk = tmp_path / "pickled"
    make_tiny_model(None, seed=1).config.save_pretrained(pk)
    (pk / "pytorch_model.bin").write_bytes(content)
    out = tmp_path / "out"
    res = run(*protect_args(models, pk, out, "--allow-pickle"))
    assert_refused(res, out, "cannot read pickle-based weights", "pytorch_model.bin")


def test_empty_calibration(models, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "out"
    res = run("protect", "--aligned", models["aligned"], "--finetuned", models["ft"],
              "--out", out, "--calibration", empty)
    assert_refused(res, out, "no samples")


def test_negative_s(models, tmp_path):
    out = tmp_path / "out"
    assert_refused(run(*protect_args(models, models["ft"], out, "--s", "-0.1")), out, "s", "-0.1")


def test_bad_lora_adapter(models, tmp_path):
    """An adapter whose factors do not fit the aligned weights is refused."""
    ad = tmp_path / "lora"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              str(ad / "adapter_model.safetensors"))
    out = tmp_path / "out"
    assert_refused(run(*protect_args(models, ad, out)), out, "q_proj.weight", "[64, 32]")


def test_help_reads_like_documentation():
    res = run("protect", "--help")
    assert res.exit_code == 0
    for opt in ("--aligned", "--finetuned", "--out", "--calibration", "--s", "--budget",
                "--nonlinear", "--device", "--cache-dir", "--overwrite", "--allow-pickle",
                "--json", "Example usage"):
        assert opt in res.output
    for cmd in ("import-gguf", "generate-calibration"):
        assert run(cmd, "--help").exit_code == 0


def test_import_gguf_missing_file(tmp_path):
    res = run("import-gguf", tmp_path / "nope.gguf", tmp_path / "out")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_output_onto_an_input_refused_even_with_overwrite(models):
    before = (models["ft"] / "model.safetensors").read_bytes()
    res = run(*protect_args(models, models["ft"], models["ft"], "--overwrite"))
    assert res.exit_code == 2 and "is the fine-tuned input" in res.output
    assert (models["ft"] / "model.safetensors").read_bytes() == before


def _register(cl, exp, name, model_dir, tmp_path, **kw):
    from mlflow_safedelta import flavor, registry as reg

    saved = tmp_path / f"saved-{name}"
    flavor.save_model(str(model_dir), saved, tokenizer=make_tiny_tokenizer(), **kw)
    run_ = cl.create_run(exp)
    mv = reg.register_saved_model(cl, saved, name, run_id=run_.info.run_id)
    cl.set_terminated(run_.info.run_id)
    return mv


def test_protect_takes_registered_models_by_version_and_alias(models, tmp_path):
    """--aligned models:/NAME@ALIAS and --finetuned models:/NAME/VERSION, resolved and downloaded
    from a local SQLite registry (the test's own tracking URI), give the same protected weights
    as the local directories; nothing is left in the registry or the download area."""
    import os

    from mlflow_safedelta import registry as reg

    uri = os.environ["MLFLOW_TRACKING_URI"]
    cl = reg.client(uri)
    exp = cl.create_experiment("sources")
    _register(cl, exp, "aligned", models["aligned"], tmp_path, role="aligned")
    cl.set_registered_model_alias("aligned", "base", "1")
    ft = _register(cl, exp, "bot", models["ft"], tmp_path, parent="models:/aligned@base")

    local, remote = tmp_path / "local", tmp_path / "remote"
    res = run(*protect_args(models, models["ft"], local, "--s", "0.05", "--json"))
    assert res.exit_code == 0, res.output
    res = run("protect", "--aligned", "models:/aligned@base", "--finetuned",
              f"models:/bot/{ft.version}", "--out", remote, "--calibration", models["calib"],
              "--s", "0.05", "--json", "--tracking-uri", uri)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["totals"]
    want = json.loads((local / "safedelta_report.json").read_text())["totals"]
    assert got.keys() == want.keys()  # the same inputs (float sums may differ in the last bits)
    assert all(got[k] == pytest.approx(want[k], rel=1e-5) for k in want
               if isinstance(want[k], (int, float)))
    a, b = load_file(str(local / "model.safetensors")), load_file(str(remote / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert (remote / "tokenizer.json").is_file()
    assert len(cl.search_model_versions("name='bot'")) == 1  # nothing registered


@pytest.mark.parametrize("aligned, finetuned, why", [
    ("models:/aligned/7", None, "cannot resolve models:/aligned/7"),
    ("models:/a/b/c", None, "is not a registered-model URI"),
    (None, "models:/nobody@prod", "cannot resolve models:/nobody@prod"),
])
def test_protect_with_a_bad_models_uri_is_refused(models, tmp_path, aligned, finetuned, why):
    out = tmp_path / "out"
    res = run("protect", "--aligned", aligned or models["aligned"], "--finetuned",
              finetuned or models["ft"], "--out", out, "--calibration", models["calib"])
    assert_refused(res, out, why)
