"""recforge: deep recommender training on TorchRec-sharded embeddings, served from ONNX."""

__version__ = "0.1.0"
