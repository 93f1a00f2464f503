"""Stage 1, data: image-caption datasets (a Hub id, an imagefolder, the built-in OpenMoji), their
captions, streaming, and the latent and text caches with their chunk store."""
