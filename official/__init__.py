"""The paper's released checkpoints (kakaobrain/rq-vae-transformer): their layout mapped to ours
(`layout`), and `python -m official.convert`, which writes a pipeline folder with outputs equal to the
official code's."""
