"""``python -m safedelta.lab {build,check,run}``: the safety lab's command line (thin; the work is
in :mod:`safedelta.lab.models` and :mod:`safedelta.lab.run`)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from safedelta.errors import SafeDeltaError


def _setup_logging(lab_dir: Path, name: str) -> None:
    lab_dir.joinpath("logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(lab_dir / "logs" / name)):
        h.setFormatter(fmt)
        root.addHandler(h)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """The safety lab: Safe Delta against baselines on SmolLM2-135M-Instruct.

    \b
    python -m safedelta.lab build            # base, aligned parent and every fine-tune
    python -m safedelta.lab check            # quick refusal rates of built models
    python -m safedelta.lab run              # the experiment -> BENCHMARKS.md section + plots
    """


@cli.command("build")
@click.option("--lab-dir", type=click.Path(path_type=Path), default=None,
              help="Lab root (default $SAFEDELTA_LAB or ./.lab).")
@click.option("--only", multiple=True,
              help="Build only these models (base, aligned, ft-harmful, ft-content, ...).")
@click.option("--rebuild", is_flag=True,
              help="Train every model asked for, even one the package ships as an adapter "
                   "(aligned, ft-content); `export` then replaces the shipped adapter.")
def build_cmd(lab_dir: Path | None, only: tuple[str, ...], rebuild: bool) -> None:
    """Build (or find cached) the lab's models. The aligned parent and the content fine-tune
    come from their shipped adapters in seconds while the recipe is unchanged."""
    from dataclasses import replace

    from safedelta.lab.models import LabModels, LabSettings

    settings = LabSettings(lab_dir=lab_dir) if lab_dir else LabSettings()
    settings = replace(settings, use_shipped=not rebuild)
    _setup_logging(Path(settings.lab_dir), "build.log")
    lab = LabModels(settings)
    try:
        if not only:
            out = lab.build_all()
        else:
            out = {name: _build_one(lab, name) for name in only}
    except SafeDeltaError as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps({k: str(v) for k, v in out.items()}, indent=2))


@cli.command("answers")
@click.option("--lab-dir", type=click.Path(path_type=Path), default=None)
def answers_cmd(lab_dir: Path | None) -> None:
    """Regenerate the shipped base-model answers (safedelta/data/lab/): the helpful half of the
    alignment set and the content attack's answers. Changes the recipe hash of every model
    trained on them."""
    from safedelta.lab.content_attack import build_content_answers
    from safedelta.lab.models import LabModels, LabSettings
    from safedelta.lab.shipped import ANSWERS_FILE, CONTENT_FILE, build_base_answers, shipped_dir

    settings = LabSettings(lab_dir=lab_dir) if lab_dir else LabSettings()
    _setup_logging(Path(settings.lab_dir), "answers.log")
    base = LabModels(settings).build_base()
    out = {"answers": build_base_answers(base, shipped_dir() / ANSWERS_FILE),
           "content": build_content_answers(base, shipped_dir() / CONTENT_FILE)}
    click.echo(json.dumps(out, indent=2))


@cli.command("export")
@click.argument("names", nargs=-1, required=True)
@click.option("--lab-dir", type=click.Path(path_type=Path), default=None)
def export_cmd(names: tuple[str, ...], lab_dir: Path | None) -> None:
    """Ship built LoRA models (aligned, ft-content) as adapters in safedelta/data/lab/."""
    from safedelta.lab.models import LabSettings
    from safedelta.lab.shipped import export_adapter

    settings = LabSettings(lab_dir=lab_dir) if lab_dir else LabSettings()
    try:
        for name in names:
            click.echo(f"{name}: {export_adapter(settings.models_dir / name, name)}")
    except SafeDeltaError as e:
        raise click.ClickException(str(e)) from e


def _build_one(lab, name: str) -> Path:
    if name == "base":
        return lab.build_base()
    if name == "aligned":
        return lab.build_aligned()
    if name.startswith("ft-"):
        scenario = name.removeprefix("ft-").removesuffix("-ema")
        return lab.build_finetune(scenario, ema=name.endswith("-ema"))
    raise click.BadParameter(f"unknown model {name!r}", param_hint="--only")


@cli.command("check")
@click.option("--lab-dir", type=click.Path(path_type=Path), default=None)
@click.option("--models", "names", default="base,aligned,ft-harmful", show_default=True,
              help="Comma-separated built models to check.")
@click.option("--n", default=40, show_default=True, help="AdvBench evaluation prompts.")
@click.option("--xstest", default=0, show_default=True,
              help="Also N XSTest unsafe and N safe prompts (spread over their types).")
@click.option("--max-new-tokens", default=48, show_default=True)
def check_cmd(lab_dir: Path | None, names: str, n: int, xstest: int,
              max_new_tokens: int) -> None:
    """Quick refusal rates (keyword judge, greedy) of built models: N AdvBench evaluation
    prompts spread through the split, and with --xstest N XSTest's unsafe prompts (refusing is
    right) and safe prompts (refusing is over-refusal)."""
    from safedelta.lab.models import LabSettings, refusal_rate
    from safedelta.lab.run import ASR_SUITE, OVER_SUITE, UNSAFE_SUITE, _limited

    settings = LabSettings(lab_dir=lab_dir) if lab_dir else LabSettings()
    _setup_logging(Path(settings.lab_dir), "check.log")
    suites = [(ASR_SUITE, n)] + ([(UNSAFE_SUITE, xstest), (OVER_SUITE, xstest)] if xstest else [])
    picked = [(suite, list(_limited(suite, k).prompts)) for suite, k in suites]
    result: dict = {}
    for name in names.split(","):
        for suite, prompts in picked:
            rate, answers = refusal_rate(settings.models_dir / name, prompts,
                                         max_new_tokens=max_new_tokens)
            result.setdefault(name, {})[suite] = {
                "refusal_rate": rate, "n": len(prompts),
                "examples": [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)][:5]}
            logging.getLogger(__name__).info("%s %s: refusal rate %.3f", name, suite, rate)
    out = Path(settings.lab_dir) / "check.json"
    out.write_text(json.dumps(result, indent=2))
    click.echo(json.dumps({m: {s: v["refusal_rate"] for s, v in r.items()}
                           for m, r in result.items()}, indent=2))


@cli.command("run")
@click.option("--lab-dir", type=click.Path(path_type=Path), default=None,
              help="Lab root (default $SAFEDELTA_LAB or ./.lab).")
@click.option("--write/--no-write", default=True, show_default=True,
              help="Write the lab section of BENCHMARKS.md (through benchmarks/run.py).")
def run_cmd(lab_dir: Path | None, write: bool) -> None:
    """Run the experiment (scenarios x methods) and write the BENCHMARKS.md lab section."""
    import os

    if lab_dir is not None:
        os.environ["SAFEDELTA_LAB"] = str(lab_dir.resolve())
    from safedelta.lab.models import LabSettings

    _setup_logging(Path(LabSettings().lab_dir), "run.log")
    try:
        if write:  # benchmarks/run.py replaces the lab section, calling bench_lab.run()
            from benchmarks.run import main as bench_main

            rc = bench_main(["lab"])
            if rc:
                raise click.ClickException("benchmarks/run.py failed to write the lab section")
            click.echo("wrote the lab section of BENCHMARKS.md")
        else:
            from safedelta.lab.run import run_lab

            click.echo(run_lab().markdown)
    except SafeDeltaError as e:
        raise click.ClickException(str(e)) from e


if __name__ == "__main__":
    cli()
