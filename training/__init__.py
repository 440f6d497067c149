"""Training both stages: the shared accelerate trainer (`trainer`, `cli`), data sets (`data`, `hf_data`,
`captions`, `encoding`) and the two entry points `python -m training.train_rqvae` and
`python -m training.train_rqtransformer`."""
