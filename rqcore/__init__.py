"""Ground floor shared by both models, the pipeline and training: config.json + safetensors
save/load (`pretrained`), image conversion and limits (`images`), metrics (`metrics`)."""
