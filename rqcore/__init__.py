"""Ground floor shared by both models, the pipeline and training: config.json + safetensors save/load
(`pretrained`), the shared type checks (`checks`), model cards (`cards`), Hub downloads and uploads
(`hub_transfer`), image conversion, limits and the mask rule (`images`), metrics (`metrics`) and the CPU's
name and flags (`machine`)."""
