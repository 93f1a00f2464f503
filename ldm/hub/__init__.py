"""The Hugging Face Hub: what a folder or repository holds (files), pushing one (push) with its model card (card)."""
