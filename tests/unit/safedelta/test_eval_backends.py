"""Generation backends are registered objects: a new one is one class and one registration."""

from __future__ import annotations

import pytest

from safedelta.eval.generation import (GenerationBackend, GenerationError, GenerationSettings,
                                       backend_names, generate, make_backend,
                                       register_generation_backend, resolve_backend,
                                       unregister_generation_backend)


class Echo(GenerationBackend):
    """Answers each prompt with itself reversed."""

    name = "echo"
    auto_rank = 100

    def generate(self, prompts, settings, *, progress=True, desc="generate"):
        return [p[::-1] for p in prompts]


def test_a_registered_backend_is_chosen_by_name_and_by_auto():
    assert resolve_backend("auto") == "hf"  # no vLLM on the test machine
    with pytest.raises(GenerationError, match="unknown backend 'echo'; known: auto, hf, vllm"):
        GenerationSettings(backend="echo")
    register_generation_backend(Echo)
    try:
        assert backend_names() == ["hf", "vllm", "echo"]
        settings = GenerationSettings(backend="echo")
        assert isinstance(make_backend("unused-dir", settings), Echo)
        assert generate("unused-dir", ["abc", "xy"], settings, use_cache=False,
                        progress=False) == ["cba", "yx"]
        assert resolve_backend("auto") == "echo"  # available and ranked above hf
        Echo.available = classmethod(lambda cls: False)
        assert resolve_backend("auto") == "hf"
    finally:
        unregister_generation_backend("echo")
        if "available" in Echo.__dict__:
            del Echo.available
    assert "echo" not in backend_names()


@pytest.mark.parametrize("name", ["auto", "HF", "my_", "", "hf"])
def test_register_refuses_a_bad_reserved_or_taken_name(name):
    with pytest.raises(GenerationError, match="not usable|already registered"):
        register_generation_backend(type("Bad", (Echo,), {"name": name}))
    with pytest.raises(GenerationError, match="GenerationBackend subclass"):
        register_generation_backend(object)
    assert backend_names() == ["hf", "vllm"]
