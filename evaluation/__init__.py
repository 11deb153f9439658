"""Scoring a model and its adapter on standard benchmarks: `harness.HarnessLM` is this project's model as an
lm-evaluation-harness LM (`pip install -e .[eval]`); `eval.py` is the command. Importing this package does not
import lm_eval: `evaluation.harness` does."""
