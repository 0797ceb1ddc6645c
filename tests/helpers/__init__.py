"""Helpers shared by several test modules and by bench/: plain functions and constants, no
fixtures (those stay in tests/conftest.py). Grouped by theme:

- ``media``: ffmpeg, test videos, the folder of good and bad inputs with their expected outcomes
- ``workspaces``: synthetic clips with poses and masks, whole workspaces of them, and training
  workspaces (their shards and prompt embeddings too)
- ``cli``: the CLI's environment, temp files left behind, Prefect task states
- ``models``: tiny-model randomisers, the released checkpoint layout, a training config
- ``poses``: crafted persons and pose models, the literal pose-drawing reference, resize and
  tolerance checks, driving files, the expected ONNX provider
- ``shard_load_worker``: a script run under torchrun by tests/model/test_real_path.py
"""
