"""Building and loading models from diffusers config.json files: architectures, the text side (CLIP
tokenizer and text encoder), and LoRA adapters."""
