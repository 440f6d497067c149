"""Evaluation of trained pipelines: reconstruction, likelihood, samples judged by a small classifier and
retrieval of the trained images. Entry point `python -m evaluation.evaluate`; `python -m evaluation.figures`
draws the README's pictures and `python -m evaluation.choose_examples` picks the app's examples."""
