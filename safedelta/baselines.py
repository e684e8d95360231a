"""Baselines Safe Delta is compared with, implemented from their papers' formulas.

Each method is a pure function on one tensor (or one layer's tensors), plus a checkpoint-level
wrapper that streams the models tensor by tensor with :class:`~safedelta.checkpoint.
CheckpointReader`/:class:`~safedelta.checkpoint.CheckpointWriter` (:func:`map_checkpoints`), so
memory holds one tensor of each input at a time. Arithmetic is float32; the output keeps the
aligned model's dtypes.

- **Linear merging** (weight interpolation): ``W = W0 + alpha (W1 - W0)``; ``alpha = 0`` is the
  aligned model, ``alpha = 1`` the fine-tune. The lab sweeps ``alpha``.
- **Safe LoRA-style projection** (Hsu et al., NeurIPS 2024, "Safe LoRA: the Silver Lining of
  Reducing Safety Risks when Fine-tuning Large Language Models"), applied to full-weight deltas:
  per linear layer the alignment matrix ``V = W_aligned - W_base`` (aligned minus its unaligned
  base) gives ``C = V V^T / ||V||_F``; the fine-tuning delta is replaced by ``C dW`` in the layers
  where the cosine similarity between ``dW`` and ``C dW`` (Frobenius inner product over the norms)
  is below a threshold ``tau`` (or, alternatively, in the ``num_layers`` layers with the lowest
  similarity). Other tensors keep their fine-tuned values.
- **Resta** (Bhardwaj et al., ACL 2024, "Language Models are Homer Simpson! Safety Re-Alignment of
  Fine-tuned Language Models through Task Arithmetic"): the safety vector is the aligned model
  minus a copy of it fine-tuned on harmful data, ``v = W_aligned - W_harmful``; it is added to the
  fine-tuned model, ``W = W1 + gamma v``. The paper's optional DARE step (drop a fraction ``p`` of
  the fine-tuning delta's entries at random and rescale the rest by ``1/(1-p)``) is
  :func:`dare` (``resta_checkpoint(..., dare_p=p)``).

Example::

    from safedelta.baselines import linear_merge_checkpoint
    linear_merge_checkpoint("aligned/", "finetuned/", "merged-0.5/", alpha=0.5)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from safedelta.errors import InvalidConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# per-tensor formulas


def linear_merge(w0: "torch.Tensor", w1: "torch.Tensor", alpha: float) -> "torch.Tensor":
    """``W0 + alpha (W1 - W0)`` in float32."""
    w0f = w0.float()
    return w0f + alpha * (w1.float() - w0f)


def alignment_projector(v: "torch.Tensor") -> "torch.Tensor":
    """Safe LoRA's ``C = V V^T / ||V||_F`` for an alignment matrix ``V`` (out x in): out x out.

    A zero ``V`` (the layer did not change during alignment) gives ``C = 0``.
    """
    import torch

    vf = v.float()
    if vf.ndim != 2:
        raise InvalidConfig(f"the alignment matrix must be 2-D (out x in), got shape "
                            f"{list(vf.shape)}")
    norm = torch.linalg.matrix_norm(vf)  # Frobenius
    if float(norm) == 0.0:
        return torch.zeros(vf.shape[0], vf.shape[0], dtype=torch.float32, device=vf.device)
    return (vf @ vf.T) / norm


def cosine_similarity(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """Frobenius cosine ``<a, b> / (||a|| ||b||)`` (0 when either is zero)."""
    import torch

    af, bf = a.float().reshape(-1), b.float().reshape(-1)
    den = float(torch.linalg.vector_norm(af) * torch.linalg.vector_norm(bf))
    return float(af @ bf) / den if den > 0 else 0.0


@dataclass
class ProjectionResult:
    """One layer of :func:`safe_lora_project`."""

    delta: "torch.Tensor"
    similarity: float
    projected: bool


def safe_lora_project(delta: "torch.Tensor", v: "torch.Tensor", tau: float | None = 0.5, *,
                      force: bool | None = None) -> ProjectionResult:
    """Safe LoRA on one layer: ``C dW`` when ``cos(dW, C dW) < tau``, else ``dW`` unchanged.

    Args:
        delta: the fine-tuning delta ``W1 - W_aligned`` (out x in).
        v: the alignment matrix ``W_aligned - W_base`` (out x in).
        tau: the similarity threshold.
        force: ``True``/``False`` projects / keeps regardless of ``tau`` (used when layers are
            chosen by rank, ``num_layers``).
    """
    c = alignment_projector(v)
    df = delta.float()
    proj = c @ df
    sim = cosine_similarity(df, proj)
    do = force if force is not None else (tau is not None and sim < tau)
    return ProjectionResult(proj if do else df, sim, bool(do))


def safety_vector(w_aligned: "torch.Tensor", w_harmful: "torch.Tensor") -> "torch.Tensor":
    """Resta's safety vector for one tensor: ``W_aligned - W_harmful`` (float32)."""
    return w_aligned.float() - w_harmful.float()


def dare(delta: "torch.Tensor", p: float, generator: "torch.Generator | None" = None
         ) -> "torch.Tensor":
    """DARE: zero each entry with probability ``p``, rescale the kept ones by ``1/(1-p)``."""
    import torch

    if not 0.0 <= p < 1.0:
        raise InvalidConfig(f"DARE drop rate must satisfy 0 <= p < 1, got {p!r}")
    if p == 0.0:
        return delta.float()
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) >= p
    return delta.float() * keep / (1.0 - p)


def resta(w_finetuned: "torch.Tensor", w_aligned: "torch.Tensor", w_harmful: "torch.Tensor",
          gamma: float = 1.0, *, dare_p: float = 0.0,
          generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """Resta on one tensor: ``W_aligned + DARE(W1 - W_aligned) + gamma (W_aligned - W_harmful)``.

    Without DARE (``dare_p=0``) this is ``W1 + gamma v``.
    """
    wa = w_aligned.float()
    delta = w_finetuned.float() - wa
    if dare_p:
        delta = dare(delta, dare_p, generator)
    return wa + delta + gamma * safety_vector(wa, w_harmful)


# ---------------------------------------------------------------------------------------------
# streaming over checkpoints


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Heuristic for "a decoder block's linear weight": 2-D ``.weight`` outside embeddings/head."""
    return (len(shape) == 2 and name.endswith(".weight") and "embed" not in name
            and "lm_head" not in name and "wte" not in name and "wpe" not in name)


TensorFn = Callable[[str, Mapping[str, "torch.Tensor"]], "torch.Tensor"]


def map_checkpoints(out: str | Path, inputs: Mapping[str, str | Path], fn: TensorFn, *,
                    template: str = "aligned", overwrite: bool = False, progress: bool = True,
                    desc: str = "baseline") -> Path:
    """Write ``out`` with ``fn(name, {role: tensor})`` for every tensor of ``inputs[template]``.

    Every input checkpoint is checked to share the template's architecture (headers only),
    tensors are read one name at a time (positioned reads), and the output is laid out like the
    template (sharding, config, tokenizer, chat template) and appears atomically.
    Non-floating tensors are copied from the template unchanged.
    """
    from tqdm.auto import tqdm

    from safedelta.checkpoint import CheckpointReader, CheckpointWriter, check_compatible

    if template not in inputs:
        raise InvalidConfig(f"template role {template!r} is not among the inputs "
                            f"({', '.join(inputs)})")
    readers = {role: CheckpointReader(p, label=f"{role} model") for role, p in inputs.items()}
    tpl = readers[template]
    for role, r in readers.items():
        if role != template:
            check_compatible(tpl, r)
    with CheckpointWriter(out, template=tpl, overwrite=overwrite) as w:
        for name in tqdm(w.names(), desc=desc, disable=not progress, unit="tensor"):
            tensors = {role: r.get(name, check_finite=True) for role, r in readers.items()}
            t = tensors[template]
            w.add(name, fn(name, tensors) if t.is_floating_point() else t)
        return w.commit()


def linear_merge_checkpoint(aligned: str | Path, finetuned: str | Path, out: str | Path, *,
                            alpha: float, overwrite: bool = False, progress: bool = True) -> Path:
    """Linear merge of two checkpoints: ``W0 + alpha (W1 - W0)`` for every tensor."""
    return map_checkpoints(out, {"aligned": aligned, "finetuned": finetuned},
                           lambda n, t: linear_merge(t["aligned"], t["finetuned"], alpha),
                           overwrite=overwrite, progress=progress, desc=f"merge a={alpha}")


@dataclass
class SafeLoRAReport:
    """Which layers were projected and their similarities ``cos(dW, C dW)``."""

    tau: float | None
    num_layers: int | None
    similarity: dict[str, float] = field(default_factory=dict)
    projected: list[str] = field(default_factory=list)


def safe_lora_checkpoint(base: str | Path, aligned: str | Path, finetuned: str | Path,
                         out: str | Path, *, tau: float | None = 0.5,
                         num_layers: int | None = None,
                         select: Callable[[str, tuple[int, ...]], bool] = is_linear_weight,
                         overwrite: bool = False, progress: bool = True
                         ) -> tuple[Path, SafeLoRAReport]:
    """Safe LoRA-style projection of a full-weight fine-tune (see module docstring).

    ``tau``: project the layers whose ``cos(dW, C dW) < tau``. ``num_layers``: instead, project
    the ``num_layers`` selected layers with the lowest similarity (a first pass computes them).
    Tensors not chosen by ``select`` keep their fine-tuned values.
    """
    from safedelta.checkpoint import CheckpointReader

    if (tau is None) == (num_layers is None):
        raise InvalidConfig("give exactly one of tau (similarity threshold) or num_layers")
    report = SafeLoRAReport(tau=tau, num_layers=num_layers)
    chosen: set[str] | None = None
    if num_layers is not None:
        rb, ra, rf = (CheckpointReader(p) for p in (base, aligned, finetuned))
        sims = {}
        for name in ra.names():
            if select(name, ra.shape(name)):
                wa = ra.get(name).float()
                sims[name] = safe_lora_project(rf.get(name).float() - wa, wa - rb.get(name).float(),
                                               None, force=True).similarity
        chosen = set(sorted(sims, key=sims.get)[:num_layers])

    def fn(name, t):
        wa = t["aligned"].float()
        if not select(name, tuple(wa.shape)):
            return t["finetuned"].float()
        force = None if chosen is None else (name in chosen)
        res = safe_lora_project(t["finetuned"].float() - wa, wa - t["base"].float(), tau,
                                force=force)
        report.similarity[name] = res.similarity
        if res.projected:
            report.projected.append(name)
        return wa + res.delta

    path = map_checkpoints(out, {"aligned": aligned, "finetuned": finetuned, "base": base}, fn,
                           overwrite=overwrite, progress=progress, desc="safe-lora")
    logger.info("Safe LoRA: projected %d of %d layers", len(report.projected),
                len(report.similarity))
    return path, report


def resta_checkpoint(aligned: str | Path, harmful: str | Path, finetuned: str | Path,
                     out: str | Path, *, gamma: float = 1.0, dare_p: float = 0.0, seed: int = 0,
                     overwrite: bool = False, progress: bool = True) -> Path:
    """Resta: the fine-tune plus ``gamma`` times the safety vector ``aligned - harmful``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return map_checkpoints(
        out, {"aligned": aligned, "finetuned": finetuned, "harmful": harmful},
        lambda n, t: resta(t["finetuned"], t["aligned"], t["harmful"], gamma, dare_p=dare_p,
                           generator=gen),
        overwrite=overwrite, progress=progress, desc=f"resta g={gamma}")
