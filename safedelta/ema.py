"""Parameter-space EMA during fine-tuning (Kim et al. 2025, arXiv 2508.12531), as a callback.

During fine-tuning keep an exponential moving average of the weights, started from the weights
the training starts with (the aligned model),

    theta_ema <- beta * theta_ema + (1 - beta) * theta_t      after every optimizer step,

and serve ``theta_ema`` instead of the last iterate. The average stays closer to the aligned
weights than the last iterate does (after ``T`` steps the initial weights still weigh
``beta**T``), which the paper found keeps much of the safety alignment while keeping utility.
It composes with Safe Delta: EMA during training, Safe Delta when the model is registered.

:class:`EMACallback` is a ``transformers.TrainerCallback`` that users add to their own
``Trainer``; :class:`ParameterEMA` is the same average for a hand-written training loop.

Example::

    from safedelta.ema import EMACallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[EMACallback(beta=0.99)])
    trainer.train()          # at the end the model holds theta_ema (swap_at_end=True)
    trainer.save_model(out)  # saves the averaged weights

Only trainable parameters (``requires_grad``) are averaged (for a PEFT model: the adapter); the
average is kept in float32 on the parameters' device (or ``device``) whatever the model dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from safedelta.errors import SafeDeltaError

try:  # the callback base class; ParameterEMA works without transformers
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"


class EMAError(SafeDeltaError):
    """The EMA state does not fit the model (or was used before it was started)."""


class ParameterEMA:
    """The EMA of a model's trainable parameters: ``start``, ``update`` after every step, ``copy_to``.

    Args:
        beta: the decay, ``0 <= beta < 1`` (``theta_ema <- beta theta_ema + (1-beta) theta``).
        include: optional predicate on parameter names; only matching trainable ones are averaged.
        device: where the float32 average lives (default: each parameter's device).
    """

    def __init__(self, beta: float = 0.99, *, include: Callable[[str], bool] | None = None,
                 device: "str | torch.device | None" = None):
        if not 0.0 <= beta < 1.0:
            raise EMAError(f"EMA beta must satisfy 0 <= beta < 1, got {beta!r}")
        self.beta = float(beta)
        self.include = include
        self.device = device
        self.shadow: dict[str, "torch.Tensor"] = {}
        self.num_updates = 0

    def _params(self, model):
        for name, p in model.named_parameters():
            if p.requires_grad and (self.include is None or self.include(name)):
                yield name, p

    def start(self, model) -> None:
        """Take the model's current trainable weights as ``theta_ema`` (step 0)."""
        import torch

        with torch.no_grad():
            self.shadow = {n: p.detach().to(self.device or p.device, torch.float32, copy=True)
                           for n, p in self._params(model)}
        self.num_updates = 0
        if not self.shadow:
            raise EMAError("the model has no trainable parameters to average")

    @property
    def started(self) -> bool:
        return bool(self.shadow)

    def update(self, model) -> None:
        """One EMA step from the model's current weights (call after each optimizer step)."""
        import torch

        if not self.started:
            raise EMAError("ParameterEMA.update() before start(): call start(model) first")
        with torch.no_grad():
            for name, p in self._params(model):
                s = self.shadow.get(name)
                if s is None:
                    raise EMAError(f"parameter '{name}' was not trainable when the EMA started")
                s.mul_(self.beta).add_(p.detach().to(s.device, torch.float32),
                                       alpha=1.0 - self.beta)
        self.num_updates += 1

    def copy_to(self, model) -> None:
        """Write ``theta_ema`` into the model's parameters (cast to their dtype)."""
        import torch

        if not self.started:
            raise EMAError("no EMA state to copy: the EMA was never started")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, s in self.shadow.items():
                if name not in params:
                    raise EMAError(f"EMA parameter '{name}' is not in the model")
                params[name].copy_(s.to(params[name].device, params[name].dtype))

    def state_dict(self) -> dict[str, "torch.Tensor"]:
        return dict(self.shadow)

    def save(self, path: str | Path) -> Path:
        """Save the average as safetensors (``beta`` and step count in the metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / EMA_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.shadow.items()}, str(path),
                  metadata={"beta": repr(self.beta), "num_updates": str(self.num_updates)})
        return path

    def load(self, path: str | Path) -> None:
        """Load an average saved by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / EMA_FILE
        if not path.is_file():
            raise EMAError(f"no EMA state at '{path}'")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            self.shadow = {k: f.get_tensor(k) for k in f.keys()}
        self.num_updates = int(meta.get("num_updates", 0))


class EMACallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` keeping the parameter-space EMA (Kim et al. 2025).

    The average starts from the weights at ``on_train_begin`` (the aligned model), is updated in
    ``on_step_end`` (once per optimizer step, after gradient accumulation) and, with
    ``swap_at_end=True``, written into the model at ``on_train_end`` so that whatever is saved
    afterwards is ``theta_ema``. With ``save_with_checkpoints=True`` every Trainer checkpoint gets
    an ``ema.safetensors`` beside it.

    Args:
        beta: EMA decay (``0 <= beta < 1``); 0.99 by default.
        swap_at_end: copy the average into the model when training ends.
        save_with_checkpoints: also write the average into each ``checkpoint-N`` directory.
        include: optional predicate on parameter names (default: all trainable parameters).
        device: where the float32 average lives (``"cpu"`` saves accelerator memory).
    """

    def __init__(self, beta: float = 0.99, *, swap_at_end: bool = True,
                 save_with_checkpoints: bool = False,
                 include: Callable[[str], bool] | None = None,
                 device: "str | torch.device | None" = None):
        self.ema = ParameterEMA(beta, include=include, device=device)
        self.swap_at_end = swap_at_end
        self.save_with_checkpoints = save_with_checkpoints

    @property
    def beta(self) -> float:
        return self.ema.beta

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise EMAError("EMACallback needs the model (use it inside transformers.Trainer)")
        self.ema.start(model)
        logger.info("EMA started (beta=%s) over %d tensors", self.ema.beta, len(self.ema.shadow))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.ema.update(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.save_with_checkpoints and self.ema.started:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.ema.save(ckpt / EMA_FILE)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.swap_at_end and model is not None and self.ema.started:
            self.ema.copy_to(model)
            logger.info("EMA weights (beta=%s, %d updates) swapped into the model",
                        self.ema.beta, self.ema.num_updates)

    def save(self, path: str | Path) -> Path:
        """Save the average (see :meth:`ParameterEMA.save`)."""
        return self.ema.save(path)
