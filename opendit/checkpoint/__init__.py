"""Checkpoints: the folder layout (layout.py), sharded DCP save/resume (dcp.py), weights from every accepted format
(weights.py) and export to safetensors + Meta's layout (export.py)."""
