"""Benchmarks: training throughput (`bench.bench`, `make bench`) against transformers + peft (`bench.hf_baseline`),
rendered by `bench.tables`, and decoding (`bench.decode_bench`). They run as modules from the repository root
(`python -m bench.bench`), so the project's packages import as they do for `train.py`; transformers and peft
are optional here."""
