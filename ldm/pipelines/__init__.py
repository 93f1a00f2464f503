"""LatentDiffusionPipeline and its parts (input checks, editing, fast mode, guidance), the ONNX
pipeline, and the invisible watermark."""
