"""Run under torchrun: build a saved transformer on the meta device, shard it with FSDP2 as
training does, fill each rank's rows from the files, and compare every gathered tensor with
diffusers' own ``from_pretrained`` of the same folder. Prints one result line per rank."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel

from model.dit import MultiAnimateDiT
from model.loading import load_sharded, meta_transformer
from model.train import shard_denoiser


def main(folder: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    dit = MultiAnimateDiT(meta_transformer(folder, torch.bfloat16), 8)
    dit.add_lora(4, 4.0)
    dit.set_trainable()
    model = shard_denoiser(dit, torch.bfloat16)
    read = load_sharded(model, folder, "dit.transformer.", torch.device("cpu"))
    reference = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).state_dict()
    mismatched, trained_not_fp32, total = [], [], 0
    for name, param in model.named_parameters():
        full = param.full_tensor()
        if ".lora_" in name or not name.startswith("dit.transformer."):
            if full.dtype != torch.float32:
                trained_not_fp32.append(name)
            continue
        want = reference[name.removeprefix("dit.transformer.").replace(".base_layer.", ".")]
        total += want.numel() * want.element_size()
        if full.dtype != want.dtype or not torch.equal(full, want):
            mismatched.append(name)
    buffers_ok = all(
        torch.equal(b, reference[n.removeprefix("dit.transformer.")])
        for n, b in model.named_buffers()
        if n.removeprefix("dit.transformer.") in reference
    )
    # one write: the ranks share torchrun's stdout, and print's separate newline can interleave
    sys.stdout.write(
        f"rank {dist.get_rank()} read={read} total={total} mismatched={mismatched} "
        f"trained_not_fp32={trained_not_fp32} buffers_ok={buffers_ok}\n"
    )
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)  # gloo workers occasionally abort at interpreter exit after a correct run (model/train.py)
