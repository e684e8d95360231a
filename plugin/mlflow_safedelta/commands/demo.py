"""``mlflow-safedelta demo``: the whole governed flow on one machine, in one command.

1. a local MLflow store under ``./.demo/`` (SQLite tracking + registry, artifacts beside it);
2. a real model pair from the safety lab: SmolLM2-135M (imported from the bundled GGUF) with the
   shipped aligned-parent adapter merged in, and its content-attack fine-tune (shipped adapter);
   seconds, not a training run (``python -m safedelta.lab build --rebuild`` retrains them). With
   ``--tiny`` two random tiny models (clearly not a real result);
3. the parent registered (alias ``aligned``), the fine-tune registered naming it as its parent;
4. the gate job, the same code every route runs (:func:`mlflow_safedelta.gate_job.run_gate_job`);
5. the verdict table and where to look.

Everything it writes stays under its directory (``./.demo``): the store, the models (``lab/``) and
the caches (``cache/``: Hessians, generations, the judge head), so ``rm -rf .demo`` starts over.

:func:`run_demo` does the work; the click command only parses and prints.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from mlflow_safedelta.cli import (
    UsageError,
    cli,
    emit_json,
    json_option,
    translate_errors,
)

_logger = logging.getLogger(__name__)

PARENT_NAME = "demo-aligned"
MODEL_NAME = "demo-assistant"
EXPERIMENTS = ("safedelta-demo", "safedelta-gate", "safedelta-hessians")
#: prompts per suite of the demo policy (see :func:`_demo_policy`)
DEMO_LIMIT = 100


def show_job_progress(enabled: bool = True) -> None:
    """Let the gate job's step lines (INFO on ``mlflow_safedelta.gate_job``) reach stderr."""
    if enabled:
        import logging

        for name in ("mlflow_safedelta.gate_job",):
            if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
                logging.getLogger(name).setLevel(logging.INFO)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        click.echo(msg, err=True)


def tiny_pair(root: Path) -> tuple[Path, Path]:
    """Two random tiny Llama models (hidden 64, 2 layers) with a byte-level chat tokenizer:
    an "aligned" parent and a "fine-tune" (parent + seeded noise). For plumbing only."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    aligned, ft = root / "tiny-aligned", root / "tiny-finetuned"
    if (aligned / "config.json").is_file() and (ft / "config.json").is_file():
        return aligned, ft
    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + "
                          "m['content'] + '<|end|>\n' }}{% endfor %}"
                          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(aligned, safe_serialization=True)
    fast.save_pretrained(aligned)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(ft, safe_serialization=True)
    fast.save_pretrained(ft)
    return aligned, ft


def _demo_policy(name_or_path: str | None, limit: int | None, tiny: bool = False):
    """The policy the demo gates with. Without ``--policy``: ``default`` (two harmful suites of
    different form, decisions on the exact upper bound) judged by both the keyword rule and the
    ``minilm`` classifier (the worse call counts), with utility retention off (the harmful
    fine-tune has no task whose utility could be kept), on 100 prompts per suite instead of 50
    (:data:`DEMO_LIMIT`). ``tiny``: the keyword judge alone and default's 50 prompts (the
    plumbing run should not train the classifier's head first).

    Why 100: the demo parent itself answers about 7-10 % of SimpleSafetyTests, so a protected
    model as safe as its parent shows ~5/50 there, and the exact one-sided 95 % upper bound of
    6/50 is 0.223 > 0.2: with 50 prompts the ``max_asr`` rule cannot pass a model that is as
    safe as the parent (a recorded run failed so). At 100 prompts, 10/100 has the bound 0.164 and
    12/100 0.187."""
    from mlflow_safedelta.policy import load_policy

    pol = load_policy(name_or_path or "default")
    updates: dict[str, Any] = {}
    if name_or_path is None:
        updates["name"] = "demo"
        updates["description"] = ("default's safety limits on its two suites, judged by the "
                                  "keyword rule and the minilm classifier (worst call counts); "
                                  "utility retention not checked (the demo's harmful fine-tune "
                                  "has no task to keep)")
        judges = ["keyword"] if tiny else ["keyword", "minilm"]
        updates["safety"] = pol.safety.model_copy(update={"judge": judges,
                                                          "judge_combine": "worst"})
        updates["utility"] = pol.utility.model_copy(update={"min_retention": None})
        if not tiny and limit is None:
            limit = DEMO_LIMIT
    if limit is not None:
        updates["evaluation"] = pol.evaluation.model_copy(update={"limit": limit})
    if updates:
        pol = pol.model_validate({**pol.model_dump(), **{k: (v.model_dump() if hasattr(
            v, "model_dump") else v) for k, v in updates.items()}})
        pol._source = f"derived from {name_or_path or 'default'}"
    return pol


def run_demo(root: str | Path = ".demo", *, tiny: bool = False, policy: str | None = None,
             limit: int | None = None, device: str | None = None, force: bool = False,
             quiet: bool = False, evaluator: Any = None) -> dict:
    """Set up the demo store (governed: see :func:`governed_demo`), register the pair, run the
    gate job; returns what to print."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    pol = _demo_policy(policy, limit, tiny)
    with governed_demo(root, pol):
        return _run_demo(root, pol, tiny=tiny, device=device, force=force, quiet=quiet,
                         evaluator=evaluator)


def governed_demo(root: Path, pol: Any):
    """The demo's registry enforces the gate, as a platform would set it up: its own keys and
    governance file under ``root`` (binding the demo model to the demo policy, guarding
    ``production``), the ``safedelta+sqlite`` registry store, and its own job queue. The
    variables (and the demo's own cache root) are set for the duration of the demo only."""
    import contextlib
    import os

    import yaml

    from mlflow_safedelta.policy import policy_to_yaml
    from mlflow_safedelta.signing import generate_keypair
    from mlflow_safedelta.vocab import ENV_CACHE, ENV_GOVERNANCE, ENV_QUEUE_URI, ENV_SIGNING_KEY

    gdir = root / "governance"
    for name in ("gate", "admin"):
        if not (gdir / f"{name}.key").is_file():
            generate_keypair(gdir / f"{name}.key", gdir / f"{name}.pub")
    (gdir / "demo-policy.yaml").write_text(policy_to_yaml(pol))
    (gdir / "governance.yaml").write_text(yaml.safe_dump({
        "governance_version": 1, "verify_keys": ["gate.pub"], "admin_keys": ["admin.pub"],
        "bindings": [{"models": [MODEL_NAME], "policy": "demo-policy.yaml",
                      "guarded_aliases": ["production"]}]}, sort_keys=False))
    env = {ENV_GOVERNANCE: str(gdir / "governance.yaml"),
           ENV_SIGNING_KEY: str(gdir / "gate.key"),
           ENV_QUEUE_URI: f"sqlite:///{root / 'jobs.sqlite'}",
           ENV_CACHE: str(root / "cache")}

    @contextlib.contextmanager
    def scope():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return scope()


def _run_demo(root: Path, pol: Any, *, tiny: bool, device: str | None, force: bool,
              quiet: bool, evaluator: Any) -> dict:
    import shutil

    from mlflow import MlflowClient

    from mlflow_safedelta import flavor
    from mlflow_safedelta import registry as reg
    from mlflow_safedelta.gate_job import run_gate_job

    uri = f"sqlite:///{root / 'mlflow.db'}"
    registry_uri = f"safedelta+{uri}"  # the store plugin: guarded aliases, signed state only
    cl = MlflowClient(tracking_uri=uri, registry_uri=registry_uri)
    for name in EXPERIMENTS:  # artifacts live under .demo/artifacts, not the working directory
        if cl.get_experiment_by_name(name) is None:
            cl.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())

    if tiny:
        _say("[1/4] building two random TINY models (plumbing only: the numbers mean nothing)",
             quiet)
        aligned_dir, ft_dir = tiny_pair(root / "models")
    else:
        _say("[1/4] building the demo pair: SmolLM2-135M from the bundled GGUF + the shipped "
             "aligned-parent adapter, and its content-attack fine-tune (shipped adapter)", quiet)
        try:
            from safedelta.lab.models import build_demo_pair
        except ImportError as exc:
            raise UsageError(f"the safety lab is not available ({exc}); run with --tiny") from exc
        aligned_dir, ft_dir = build_demo_pair(root / "lab", progress=not quiet)

    _say(f"[2/4] registering {PARENT_NAME} and {MODEL_NAME} in {uri}", quiet)
    exp_id = cl.get_experiment_by_name("safedelta-demo").experiment_id

    def register(src: Path, name: str, **flavor_kw: Any) -> str:
        run = cl.create_run(exp_id, run_name=f"register-{name}")
        saved = root / "staging" / f"{name}-{run.info.run_id}"
        flavor.save_model(str(src), saved, **flavor_kw)
        mv = reg.register_saved_model(cl, saved, name, run_id=run.info.run_id)
        cl.set_terminated(run.info.run_id, "FINISHED")
        shutil.rmtree(saved, ignore_errors=True)
        return str(mv.version)

    if not cl.search_model_versions(f"name='{PARENT_NAME}'"):
        cl.set_registered_model_alias(PARENT_NAME, "aligned",
                                      register(aligned_dir, PARENT_NAME, role="aligned"))
    fts = [v for v in cl.search_model_versions(f"name='{MODEL_NAME}'")
           if (v.tags or {}).get(reg.TAG_ROLE) != reg.ROLE_PROTECTED]
    if fts:
        version = str(min(int(v.version) for v in fts))
    else:
        version = register(ft_dir, MODEL_NAME, parent=f"models:/{PARENT_NAME}@aligned")

    _say(f"[3/4] gating {MODEL_NAME} v{version} with policy '{pol.name}' "
         "(Safe Delta, then evaluation of all three models)", quiet)
    result = run_gate_job(MODEL_NAME, version, policy=pol, tracking_uri=uri,
                          registry_uri=registry_uri,
                          device=device, force=force, evaluator=evaluator, progress=not quiet)
    gate = result.to_dict()
    run_dir = None
    if result.run_id:
        run_dir = cl.get_run(result.run_id).info.artifact_uri.replace("file://", "")
    _say("[4/4] done", quiet)
    gov_file = root / "governance" / "governance.yaml"
    return {"gate": gate, "tracking_uri": uri, "registry_uri": registry_uri, "tiny": tiny,
            "governance": str(gov_file),
            "ui": f"SAFEDELTA_GOVERNANCE={gov_file} mlflow server --backend-store-uri {uri} "
                  f"--registry-store-uri {registry_uri} --port 5000",
            "artifacts": run_dir,
            "report": f"{run_dir}/eval/report.md" if run_dir else None}


@cli.command()
@click.option("--dir", "root", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".demo"), show_default=True,
              help="Where the demo's MLflow store (SQLite + artifacts) lives.")
@click.option("--tiny", is_flag=True,
              help="Use two random tiny models instead of the lab's SmolLM2 pair (seconds, "
                   "not minutes; the numbers mean nothing).")
@click.option("--policy", "policy_", default=None,
              help="Policy name or file.  [default: 'demo' = default without the utility rule]")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Prompts per suite (overrides the policy's evaluation.limit).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where the calibration pass, Safe Delta and generation run.  [default: cuda if "
                   "available, else cpu]")
@click.option("--force", is_flag=True, help="Gate again although a verdict is recorded.")
@json_option
@translate_errors
def demo(root, tiny, policy_, limit, device, force, json_):
    """Run the whole flow locally: register an aligned model and a harmful fine-tune, protect,
    evaluate, gate, promote.

    \b
    Example:
      mlflow-safedelta demo            # real SmolLM2 pair (first run: slow on CPU, cached)
      mlflow-safedelta demo --tiny     # plumbing only, in seconds
    """
    from mlflow_safedelta.verdict import render_markdown

    show_job_progress(not json_)
    out = run_demo(root, tiny=tiny, policy=policy_, limit=limit, device=device, force=force,
                   quiet=json_)
    if json_:
        emit_json(out)
        return
    if tiny:
        click.echo("NOTE: --tiny used random tiny models; the verdict shows the plumbing, "
                   "not Safe Delta's effect.\n")
    click.echo(render_markdown(out["gate"]))
    click.echo("Where to look:")
    click.echo(f"  {out['ui']}    (then open http://127.0.0.1:5000)")
    if out["artifacts"]:
        click.echo(f"  run artifacts: {out['artifacts']}")
        click.echo(f"  evaluation report: {out['report']}")
    click.echo(f"  gate state: SAFEDELTA_GOVERNANCE={out['governance']} "
               f"mlflow-safedelta status --tracking-uri {out['tracking_uri']}")
