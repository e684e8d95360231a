"""Test helpers shared across test packages (tiny models, tiny tokenizer)."""
