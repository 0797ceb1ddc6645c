"""The model half: MultiAnimate on diffusers' Wan modules (no Prefect imports).

Filled by the model issue: condition encoders, Identifier Assigner and Adapter, LoRA,
checkpoint conversion, the generation pipeline, the text-embedding cache and training.
"""
