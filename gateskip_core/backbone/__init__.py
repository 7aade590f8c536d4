"""Where a model is loaded: the pretrained network the gates sit on.

- `registry`: model names, converting GGUF weights once into the local safetensors cache, loading;
- `architecture`: one `ArchSpec` per supported family (the layer's projections, norms, rotary, attention
  kind) read from a Hugging Face model, so the gated forward needs no per-family code of its own;
- `tiny_models`: small random models of every family, for fast tests.
"""
