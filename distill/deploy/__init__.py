"""Deployment's model side: loading an export for inference and checking it (`inference.py`), INT8 quantization
with ONNX Runtime (`quantize.py`), inference throughput (`throughput.py`), and what `distill serve` runs beside
LitServe (`request_gate.py`, `serving_host.py`). The commands (export, predict, serve) are in distill/commands/."""
