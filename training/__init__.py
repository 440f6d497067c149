"""Everything above the models and the pipeline: the shared accelerate trainer (`trainer`, `cli`), data
sets (`data`), the emoji data builder (`emoji`), evaluation (`evaluate`, `figures`) and the two entry
points `python -m training.train_rqvae` and `python -m training.train_rqtransformer`."""
