"""Settings of a Safe Delta run, validated by pydantic.

``SafeDeltaConfig`` holds what changes the *result*; where the run happens (device, cache folder,
progress bars) is passed to :func:`safedelta.protect` separately.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from safedelta.budget import DEFAULT_S, add_budget_enum, check_budget_name

#: a registered budget rule's name (:mod:`safedelta.budget`); the JSON schema lists the names
Budget = Annotated[str, AfterValidator(check_budget_name), Field(json_schema_extra=add_budget_enum)]
NonLinearPolicy = Literal["aligned", "finetuned"]

# ``s`` used when none is given: each rule's ``default_s`` (``DEFAULT_S[name]``). Official: the
# paper's 0.1 (tuned for width 4096). Default budget: the tolerated (damped) safety loss as a
# fraction of the layer's output energy on safe inputs. 4e-6 is the value at which the default
# budget loses as much as the official s = 0.1 on the 4096-wide benchmark layer
# (``benchmarks/bench_kernel.py``: relative delta 0.05, it then keeps ~15 % of the entries where
# the official keeps ~10 %); a placeholder until it is tuned on a real model by the evaluation.


class SafeDeltaConfig(BaseModel):
    """How Safe Delta decides, per linear layer, which delta entries to keep.

    Args:
        s: the safety budget. With ``budget="default"`` it is the tolerated safety loss as a
            fraction of the aligned layer's output energy on the safe calibration set (width
            independent; see ``docs/algorithm.md``, "The default rule"). With
            ``budget="official"`` it is the constant of the authors' code
            (``eps_B = mean(key) * s/2 * r/4096``).
        budget: a registered budget rule (:mod:`safedelta.budget`): ``"default"``
            (width-independent) or ``"official"`` (the published code), or one added with
            ``register_budget_rule``.
        exclude_fraction: the most safety-sensitive share of delta entries that is never kept.
        damp: Hessian damping as a fraction of ``mean(diag H)``.
        block_size: columns per budget block in the official mode.
        sub_block: columns per compensation step in the official mode (no compensation inside one).
        reference_width: the width the official budget constant was tuned for (Llama-2-7B).
        nonlinear: what to do with parameters outside the decoder blocks' linear layers
            (embeddings, norms, head): keep the ``"aligned"`` values (the paper) or the
            ``"finetuned"`` ones. What is discarded is reported either way.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    s: float | None = Field(default=None,
                            description="Safety budget (see budget); None = the budget's default.")
    budget: Budget = Field(default="default",
                           description="Budget rule, one registered in safedelta.budget.")
    exclude_fraction: float = Field(default=0.15, ge=0.0, lt=1.0,
                                    description="Most sensitive share of entries never kept.")
    damp: float = Field(default=0.01, gt=0.0, description="Hessian damping, fraction of mean diag.")
    block_size: int = Field(default=2048, gt=0, description="Official mode: columns per block.")
    sub_block: int = Field(default=4, gt=0, description="Official mode: columns per step.")
    reference_width: int = Field(default=4096, gt=0, description="Official mode: r/4096 constant.")
    nonlinear: NonLinearPolicy = Field(default="aligned",
                                       description="Non-linear parameters: aligned | finetuned.")

    @field_validator("s")
    @classmethod
    def _s_not_negative(cls, v: float | None) -> float | None:
        if v is not None and not (0 <= v < float("inf")):
            raise ValueError(f"s must be a finite number >= 0, got {v!r}")
        return v

    @property
    def resolved_s(self) -> float:
        """``s`` as given, or the budget's own default when it was left out."""
        return self.s if self.s is not None else DEFAULT_S[self.budget]
