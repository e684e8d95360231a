"""Benchmarks (not tests): each ``bench_*.py`` module has ``run() -> str`` returning a Markdown
section; ``python -m benchmarks.run [NAME ...]`` regenerates those sections of BENCHMARKS.md."""
