"""Benchmarks: training throughput (`bench.bench`, `make bench`) against transformers + peft (`bench.hf_baseline`),
and decoding (`bench.decode_bench`). They run from the source tree; transformers and peft are optional here."""
