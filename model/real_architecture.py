"""Random weights in the REAL Wan2.1-I2V-14B-720P + MultiAnimate layout, for CI on a CPU.

``write_random_real_architecture(FOLDER)`` (CLI: ``multianimate weights
--random-real-architecture FOLDER``) writes::

    FOLDER/Wan2.1-I2V-14B-720P-Diffusers/     diffusers layout, as Wan-AI/...-Diffusers on the Hub
        model_index.json                      WanImageToVideoPipeline and its components
        transformer/   WanTransformer3DModel, bf16, sharded (diffusion_pytorch_model-0000K-of-0000N
                       .safetensors + diffusion_pytorch_model.safetensors.index.json)
        vae/           AutoencoderKLWan, float32 (one file, as on the Hub)
        image_encoder/ CLIPVisionModelWithProjection (ViT-H/14), bf16 (one file, as on the Hub: its
                       1.26 GB for 632M parameters are 2 bytes each; the diffusers conversion
                       loads it in bf16)
        image_processor/preprocessor_config.json   laion CLIP-ViT-H-14's CLIPImageProcessor
        text_encoder/  UMT5EncoderModel (UMT5-XXL), bf16, sharded (model-0000K-of-0000N.safetensors
                       + model.safetensors.index.json)
        tokenizer/     a STAND-IN: the project's tiny tokenizer (see below)
        scheduler/     scheduler_config.json (UniPCMultistepScheduler, flow sigmas)
    FOLDER/MultiAnimate/epoch=39-step=7000.ckpt/output_dir/
        model-0000K-of-00008.safetensors + model.safetensors.index.json: the released layout
        (spec D.4), float32, rank-128 LoRA and the three condition encoders, 4-channel labels
    FOLDER/profile.yaml                 a profile whose weight paths point into FOLDER (absolute)
    FOLDER/random-real-architecture.json   written last: the parameters; marks a complete output

What is REAL: every config (widths, heads, FFN, patch, channels, eps, norms, RoPE length,
the VAE and its published latent statistics, the CLIP ViT-H/14 tower, UMT5-XXL with its
256384-token vocabulary), the folder and file layouts, the key names, the sharding with
index files, the MultiAnimate tensor shapes, and the dtypes of the CLIP (bf16), VAE and
MultiAnimate (fp32) files. So loading, dtype casts and sharding run the real code path.

What is NOT: the weights are seeded random numbers (norm weights 1; LoRA B small but
nonzero, so the adapter changes the output); the depth is cut (transformer blocks, CLIP
layers, UMT5 layers; the real counts are 40, 32 and 24); the transformer and the text
encoder are stored in bf16, the dtype the project runs them in, where the Hub stores fp32
(twice the bytes); the tokenizer is the tiny one of ``model.text_encoder.build_tiny_tokenizer``
(UMT5's SentencePiece model cannot be made offline), saved so that
``AutoTokenizer.from_pretrained`` loads it, right-padded: its ids are valid UMT5 ids but mean
nothing to the model. No DWPose or SAM2 files are written: the profile keeps the tiny pose
and segment models.

The same arguments write the same bytes: each network has its own seeded random stream, so
cutting one's depth leaves the others unchanged. The folder is built as a temporary sibling
and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from data_schemas.atomic import fsync_file, temp_path_for
from data_schemas.model import ENCODER_WIDTH, WAN_REPO

WAN_FOLDER = "Wan2.1-I2V-14B-720P-Diffusers"
MULTIANIMATE_FOLDER = Path("MultiAnimate") / "epoch=39-step=7000.ckpt" / "output_dir"
PROFILE_FILE = "profile.yaml"
MARKER_FILE = "random-real-architecture.json"
MARKER_FORMAT = "multianimate-random-real-architecture"
MARKER_VERSION = 1

# --- the real configs ---------------------------------------------------------------------

# diffusers' config of Wan-AI/Wan2.1-I2V-14B-720P-Diffusers/transformer (spec C.5), num_layers 40.
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=36,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=1280,
    added_kv_proj_dim=5120,
    rope_max_seq_len=1024,
)
# Wan2.1_VAE's per-channel latent statistics (spec C.1); diffusers' defaults are the same.
VAE_LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
VAE_LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)
VAE_CONFIG = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=list(VAE_LATENTS_MEAN),
    latents_std=list(VAE_LATENTS_STD),
)
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K's vision tower, which the Hub folder ships (32 layers).
CLIP_CONFIG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_channels=3,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
)
# ...and its image processor (shortest side 224, centre crop 224, bicubic, CLIP mean/std).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_PROCESSOR_CONFIG = dict(
    do_resize=True,
    size={"shortest_edge": 224},
    resample=3,
    do_center_crop=True,
    crop_size={"height": 224, "width": 224},
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
    do_convert_rgb=True,
)
# google/umt5-xxl (Wan's models_t5_umt5-xxl-enc-bf16.pth), 24 layers.
UMT5_CONFIG = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    initializer_factor=1.0,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    is_encoder_decoder=True,
    scalable_attention=True,
    tie_word_embeddings=False,
    use_cache=True,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    classifier_dropout=0.0,
)
# The conversion's I2V scheduler; 720P uses shift 5 (480P 3) [the Hub file was not read].
SCHEDULER_CONFIG = dict(
    prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
)
# The Hub's model_index.json components.
MODEL_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}

# MultiAnimate's standard release (spec D.1, D.4): rank-128 LoRA, 4 label channels (3 persons + bg).
LORA_RANK = 128
STANDARD_LABEL_CHANNELS = 4
RELEASED_SHARDS = 8

# Shard sizes: several shards at the cut depth, as the Hub's folders have at full depth.
TRANSFORMER_SHARD_SIZE = "500MB"
TEXT_ENCODER_SHARD_SIZE = "1GB"

_CHUNK = 1 << 24  # elements filled per call: bounds the temporaries of a 1e9-element tensor

Progress = Callable[[str], None]


# --- random weights ---------------------------------------------------------------------


def _generator(seed: int, component: str) -> torch.Generator:
    """A stream per component: one network's weights do not depend on another's depth."""
    digest = hashlib.sha256(f"{seed}:{component}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _random_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """Uniform with the given std, as PyTorch's default init of linear and conv layers (and
    twice as fast to draw as a normal, which counts for 2e9 numbers on two cores)."""
    bound = std * 3**0.5
    flat = t.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        flat[start : start + _CHUNK].uniform_(-bound, bound, generator=gen)


@torch.no_grad()
def _fill_random(model: nn.Module, gen: torch.Generator) -> None:
    """Seeded weights of a sane scale (std): norm scales 1, biases 0.02, other vectors 1/sqrt(n),
    matrices and kernels 1/sqrt(fan_in) (unit-scale activations stay unit-scale)."""
    for name, p in model.named_parameters():  # tied parameters come once
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" or (leaf == "weight" and p.ndim == 1):
            p.fill_(1.0)
        elif leaf == "bias":
            _random_(p, 0.02, gen)
        elif p.ndim == 1 or name.endswith("scale_shift_table"):
            _random_(p, p.shape[-1] ** -0.5, gen)
        else:
            _random_(p, (p.numel() // p.shape[0]) ** -0.5, gen)


def _materialize(build: Callable[[], nn.Module], dtype: torch.dtype, gen: torch.Generator) -> nn.Module:
    """Build on the meta device (no memory, no init), allocate in ``dtype``, fill."""
    with torch.device("meta"):
        model = build()
    # nn.Module.to: diffusers' own warns about its fp32 modules, which matter when computing only
    model = nn.Module.to(model, dtype).to_empty(device="cpu")
    tie = getattr(model, "tie_weights", None)
    if tie is not None:  # transformers: to_empty allocates tied parameters separately
        tie()
    _fill_random(model, gen)
    return model.eval()


# --- the parts ----------------------------------------------------------------------------


def write_transformer(folder: Path, num_layers: int, seed: int) -> None:
    from diffusers import WanTransformer3DModel

    config = {**TRANSFORMER_CONFIG, "num_layers": num_layers}
    model = _materialize(lambda: WanTransformer3DModel(**config), torch.bfloat16, _generator(seed, "transformer"))
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=TRANSFORMER_SHARD_SIZE)


def write_vae(folder: Path, seed: int) -> None:
    from diffusers import AutoencoderKLWan

    model = _materialize(lambda: AutoencoderKLWan(**VAE_CONFIG), torch.float32, _generator(seed, "vae"))
    model.save_pretrained(folder, safe_serialization=True)


def write_image_encoder(folder: Path, num_layers: int, seed: int) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**{**CLIP_CONFIG, "num_hidden_layers": num_layers})
    gen = _generator(seed, "image_encoder")
    model = _materialize(lambda: CLIPVisionModelWithProjection(config), torch.bfloat16, gen)
    model.save_pretrained(folder)


def write_image_processor(folder: Path) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(**IMAGE_PROCESSOR_CONFIG).save_pretrained(folder)


def write_text_encoder(folder: Path, num_layers: int, seed: int) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(**{**UMT5_CONFIG, "num_layers": num_layers, "num_decoder_layers": num_layers})
    model = _materialize(lambda: UMT5EncoderModel(config), torch.bfloat16, _generator(seed, "text_encoder"))
    assert model.shared.weight is model.encoder.embed_tokens.weight
    model.save_pretrained(folder, max_shard_size=TEXT_ENCODER_SHARD_SIZE)


def write_tokenizer(folder: Path) -> None:
    """The tiny tokenizer as a stand-in for UMT5's SentencePiece model (see the module doc)."""
    from model.text_encoder import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(folder)


def write_scheduler(folder: Path) -> None:
    from diffusers import UniPCMultistepScheduler

    UniPCMultistepScheduler(**SCHEDULER_CONFIG).save_pretrained(folder)


def write_model_index(folder: Path) -> None:
    import diffusers

    index = {"_class_name": MODEL_INDEX["_class_name"], "_diffusers_version": diffusers.__version__}
    index.update({k: v for k, v in sorted(MODEL_INDEX.items()) if not k.startswith("_")})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def released_tensors(num_layers: int, seed: int) -> dict[str, torch.Tensor]:
    """The standard release's tensors (spec D.1, D.4) at the real sizes, float32, in the
    release's names; ``num_layers`` blocks of LoRA."""
    gen = _generator(seed, "multianimate")
    dim = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
    ffn = TRANSFORMER_CONFIG["ffn_dim"]
    y_channels = TRANSFORMER_CONFIG["in_channels"] - TRANSFORMER_CONFIG["out_channels"]
    width = ENCODER_WIDTH

    def rnd(std: float, *shape: int) -> torch.Tensor:
        t = torch.empty(shape)
        _random_(t, std, gen)
        return t

    def kernel(*shape: int) -> torch.Tensor:
        return rnd((2 / (torch.Size(shape).numel() // shape[0])) ** 0.5, *shape)  # He: a SiLU follows

    t: dict[str, torch.Tensor] = {}
    lora = [(f"{attn}.{proj}", dim, dim) for attn in ("self_attn", "cross_attn") for proj in "qkvo"]
    lora += [("ffn.0", dim, ffn), ("ffn.2", ffn, dim)]
    for i in range(num_layers):
        for target, fan_in, fan_out in lora:
            # A as PEFT's kaiming init roughly scales it; B small but nonzero (a trained adapter)
            t[f"pipe.dit.blocks.{i}.{target}.lora_A.default.weight"] = rnd(fan_in**-0.5, LORA_RANK, fan_in)
            t[f"pipe.dit.blocks.{i}.{target}.lora_B.default.weight"] = rnd(0.01, fan_out, LORA_RANK)
    for name, cin in (("dwpose_embedding", 3), ("label_embedding", STANDARD_LABEL_CHANNELS)):
        for idx in range(0, 12, 2):
            t[f"{name}.{idx}.weight"] = kernel(width, cin if idx == 0 else width, 3, 3, 3)
            t[f"{name}.{idx}.bias"] = rnd(0.02, width)
        t[f"{name}.12.weight"] = rnd((width * 4) ** -0.5, dim, width, 1, 2, 2)
        t[f"{name}.12.bias"] = rnd(0.02, dim)
    for idx in range(0, 12, 2):
        cout = y_channels if idx == 10 else width
        t[f"randomref_embedding_pose.{idx}.weight"] = kernel(cout, 3 if idx == 0 else width, 3, 3)
        t[f"randomref_embedding_pose.{idx}.bias"] = rnd(0.02, cout)
    return t


def write_released(folder: Path, tensors: dict[str, torch.Tensor], num_shards: int = RELEASED_SHARDS) -> None:
    """``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json`` as DeepSpeed's
    zero_to_fp32 --safe_serialization writes them: the keys in order, cut into ``num_shards``
    shards of about equal bytes."""
    keys = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[]]
    done = 0
    for i, key in enumerate(keys):
        groups[-1].append(key)
        done += tensors[key].numel() * tensors[key].element_size()
        left_keys, left_groups = len(keys) - i - 1, num_shards - len(groups)
        if left_groups and left_keys and (done >= total * len(groups) / num_shards or left_keys == left_groups):
            groups.append([])
    assert len(groups) == num_shards and all(groups), [len(g) for g in groups]
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({key: tensors[key].contiguous() for key in group}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def profile_text(root: Path, num_layers: int) -> str:
    """The profile YAML with absolute paths into ``root`` (JSON strings are YAML scalars)."""
    wan, ma = root / WAN_FOLDER, root / MULTIANIMATE_FOLDER
    return (
        f"# Written by `multianimate weights --random-real-architecture`: the REAL {WAN_REPO}\n"
        f"# architecture and MultiAnimate layout with RANDOM weights and {num_layers} of 40 transformer\n"
        "# blocks. For CI of the real code path (loading, bf16, sharding), not for videos.\n"
        "pose:\n"
        "  models: tiny   # no real-architecture DWPose files are written: the tiny models stay\n"
        "segment:\n"
        "  models: tiny   # no real-architecture SAM2 files are written either\n"
        "model:\n"
        "  profile: wan-i2v-14b-720p\n"
        f"  wan_folder: {json.dumps(str(wan))}\n"
        f"  multianimate: {json.dumps(str(ma))}\n"
        "  dtype: bfloat16\n"
    )


# --- the folder ---------------------------------------------------------------------------


def _parameters(folder: Path, num_layers: int, clip_layers: int, text_layers: int, seed: int) -> dict:
    return {
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "folder": str(folder),
        "num_layers": num_layers,
        "clip_layers": clip_layers,
        "text_layers": text_layers,
        "seed": seed,
    }


def read_marker(folder: Path) -> dict | None:
    """The parameters of a complete output in ``folder``; None when it holds none."""
    try:
        marker = json.loads((Path(folder) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def part_sizes(folder: Path) -> dict[str, int]:
    """Bytes on disk of each part of an output (the Wan subfolders, the checkpoint, the rest)."""
    folder = Path(folder)
    parts = {f"{WAN_FOLDER}/{p.name}": p for p in sorted((folder / WAN_FOLDER).iterdir()) if p.is_dir()}
    parts["MultiAnimate"] = folder / "MultiAnimate"
    sizes = {name: sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) for name, path in parts.items()}
    counted = set(parts.values())
    sizes["other files"] = sum(
        f.stat().st_size
        for f in folder.rglob("*")
        if f.is_file() and not any(parent in counted for parent in f.parents)
    )
    return sizes


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _remove_dead_siblings(folder: Path) -> None:
    """Temporary siblings of ``folder`` left by killed writers on this host."""
    pattern = re.compile(rf"^\.{re.escape(folder.name)}\.tmp-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+")
    for entry in folder.parent.iterdir():
        m = pattern.match(entry.name)
        if not m or m["host"] != _host() or int(m["pid"]) == os.getpid():
            continue
        try:
            os.kill(int(m["pid"]), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass


@contextlib.contextmanager
def _building(folder: Path) -> Iterator[Path]:
    """A temporary sibling to build in; fsynced and renamed onto ``folder`` on success."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_siblings(folder)
    tmp = temp_path_for(folder)
    tmp.mkdir()
    try:
        yield tmp
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                fsync_file(path)
        if folder.exists():
            folder.rmdir()  # empty (checked before): rename needs the name free
        os.rename(tmp, folder)
        fsync_file(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_random_real_architecture(
    folder: Path,
    num_layers: int = 2,
    clip_layers: int = 2,
    text_layers: int = 1,
    seed: int = 0,
    *,
    progress: Progress | None = None,
) -> Path:
    """Write the folder described in the module doc; returns its ``profile.yaml``.

    A complete earlier output with the same parameters is kept as it is. Raises
    ``ValueError`` when ``folder`` holds anything else.
    """
    depths = (("num_layers", num_layers, 40), ("clip_layers", clip_layers, 32), ("text_layers", text_layers, 24))
    for name, value, real in depths:
        if not 1 <= value <= real:
            raise ValueError(f"{name}={value}: must be between 1 and {real} (the real depth)")
    folder = Path(folder).expanduser().absolute()
    params = _parameters(folder, num_layers, clip_layers, text_layers, seed)
    say = progress or (lambda message: None)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        marker = read_marker(folder)
        if marker is None:
            raise ValueError(f"{folder}: exists, is not empty and holds no complete random-real-architecture output")
        differ = {k: (marker.get(k), v) for k, v in params.items() if marker.get(k) != v}
        if differ:
            detail = ", ".join(f"{k} {old!r} (wanted {new!r})" for k, (old, new) in differ.items())
            raise ValueError(f"{folder}: holds a random-real-architecture output with other parameters: {detail}")
        say(f"{folder}: already complete (same parameters); nothing written")
        return folder / PROFILE_FILE

    with _building(folder) as tmp:
        wan = tmp / WAN_FOLDER
        steps: list[tuple[str, Callable[[], None]]] = [
            ("transformer", lambda: write_transformer(wan / "transformer", num_layers, seed)),
            ("text_encoder", lambda: write_text_encoder(wan / "text_encoder", text_layers, seed)),
            ("vae", lambda: write_vae(wan / "vae", seed)),
            ("image_encoder", lambda: write_image_encoder(wan / "image_encoder", clip_layers, seed)),
            ("image_processor", lambda: write_image_processor(wan / "image_processor")),
            ("tokenizer", lambda: write_tokenizer(wan / "tokenizer")),
            ("scheduler", lambda: write_scheduler(wan / "scheduler")),
            ("model_index.json", lambda: write_model_index(wan)),
        ]
        for name, step in steps:
            say(f"writing {WAN_FOLDER}/{name}")
            step()  # each network is built, saved and freed before the next
        say(f"writing {MULTIANIMATE_FOLDER}")
        out = tmp / MULTIANIMATE_FOLDER
        out.mkdir(parents=True)
        write_released(out, released_tensors(num_layers, seed))
        (tmp / PROFILE_FILE).write_text(profile_text(folder, num_layers))
        (tmp / MARKER_FILE).write_text(json.dumps(params, indent=2) + "\n")  # last: marks completion
    return folder / PROFILE_FILE
