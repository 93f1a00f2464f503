"""generate.py's machinery, shared with the web UI and the ONNX export: its settings, loading the
pipeline a model name asks for, the image to edit, and the images and PNG files of a run."""
