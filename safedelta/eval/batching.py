"""How many prompts to generate for at once: chosen from the model's size and free memory.

``GenerationSettings(batch_size=None)`` (the default) asks :func:`choose_batch_size` per model.
Generation memory beyond the weights is the KV cache, ``2 x layers x kv_heads x head_dim x
bytes`` per token, over ``prompt + max_new_tokens`` tokens per sequence, plus the last
position's logits (``vocab`` floats per sequence and step). The batch is the largest that keeps
that under a quarter of the available memory (``MemAvailable`` on CPU, free device memory on
CUDA), capped at :data:`CPU_CAP` / :data:`GPU_CAP` and at the number of prompts. The CPU cap is
16: plain ``generate`` at batch 16 is the reference the evaluation is measured against (issue
15: the old default of 8 was 1.27-1.62x slower on the demo's pair); beyond that, a 2-core CPU
gains little and padding grows. Prompts are already generated longest first (less padding) and
returned in the caller's order by :mod:`safedelta.eval.generation`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CPU_CAP = 16
GPU_CAP = 64
#: prompt tokens assumed per sequence when sizing the KV cache (chat-templated prompts)
PROMPT_TOKENS = 256


def _available_bytes(device: str) -> int | None:
    if str(device).startswith("cuda"):
        try:
            import torch

            free, _total = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        except Exception:  # no CUDA, or not initialisable
            return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def bytes_per_sequence(config: dict, *, max_new_tokens: int, dtype_bytes: int = 4) -> int:
    """KV cache and logits of one sequence at full length (see the module docstring)."""
    cfg = config.get("text_config") or config
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 32)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 32)
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 4096)
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = int(cfg.get("vocab_size") or 32000)
    tokens = PROMPT_TOKENS + max_new_tokens
    return 2 * layers * kv * head_dim * dtype_bytes * tokens + vocab * 4


def choose_batch_size(model_dir: str | Path, *, device: str | None, max_new_tokens: int,
                      n_prompts: int | None = None) -> int:
    """The batch size for generating with the model in ``model_dir`` on ``device``."""
    device = device or "cpu"
    cap = GPU_CAP if str(device).startswith("cuda") else CPU_CAP
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    per_seq = bytes_per_sequence(config, max_new_tokens=max_new_tokens,
                                 dtype_bytes=2 if str(device).startswith("cuda") else 4)
    free = _available_bytes(device)
    fits = cap if free is None else max(1, (free // 4) // per_seq)
    size = max(1, min(cap, fits, n_prompts or cap))
    logger.debug("generation batch size %d (cap %d, memory fits %s, %s prompts)", size, cap,
                 fits, n_prompts)
    return int(size)
