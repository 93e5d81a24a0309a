"""``moewire eval``: what quantized dispatch and combine do to a trained model's outputs."""
