"""Deployment: `distill export` (timm folder, ONNX, TorchScript, each verified), loading an export for inference,
INT8 quantization with ONNX Runtime, `distill predict --export` and `distill serve` (LitServe) with its host."""
