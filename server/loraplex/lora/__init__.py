"""The PEFT LoRA adapter format: files, config, tensors and their validation; a leaf every layer may import."""
