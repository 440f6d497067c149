"""The paper's released checkpoints (kakaobrain/rq-vae-transformer): their layout mapped to ours
(`layout`), `python -m official.convert`, which writes a pipeline folder with outputs equal to the
official code's, and `python -m official.fetch_official NAME`, which downloads a release by name, converts
it and caches the folder (`download` holds its HTTP and safe-unpacking parts)."""
