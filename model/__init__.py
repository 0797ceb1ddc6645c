"""The model half: MultiAnimate on diffusers' Wan modules, as plain functions (no Prefect imports).

- ``components``: the networks a profile names (tiny random weights built in code, or the real
  ones from local folders); ``dit`` and ``conditions``: the DiT with LoRA and the three
  condition encoders, the Identifier Assigner;
- ``checkpoint``: our safetensors format and the released checkpoint's converter;
  ``loading``: the real DiT read per rank; ``real_architecture``: random weights in the real layout;
- ``data``: the streaming training loader over the shards; ``text_encoder`` and ``text_cache``:
  prompt embeddings and their cache;
- ``train`` (with ``run_folder``) and ``pretrain``: LoRA fine-tuning under torchrun, the tiny base's
  pretraining; ``pipeline``: generation; ``evaluate``: held-out evaluation in latent space.

Configs and records live in ``data_schemas/``; the Prefect tasks that wrap these in ``tasks/``.
"""
