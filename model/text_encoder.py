"""The UMT5 text encoder of Wan2.1 I2V: prompt -> [N, 512, dim] embeddings, as diffusers makes them.

Two sources, one interface (``TextEncoder``):
- ``build_tiny_text_encoder``: a 2-layer random-weight UMT5 and a tokenizer assembled in code
  from a fixed corpus (no file, no download), identical in every process for a given seed.
- ``load_text_encoder``: the real UMT5-XXL encoder and tokenizer from a local
  diffusers-layout Wan folder; missing files raise ``MissingWeightsError`` saying how to get them.

``TextEncoder.encode`` follows diffusers' ``WanImageToVideoPipeline._get_t5_prompt_embeds``:
prompt_clean, padding to exactly 512 tokens (Wan's I2V cross-attention takes the first 512
context tokens as text and the rest as image tokens, so any other length silently mixes
them up), truncation, attention mask, and rows past each text's real length set to zero.

Legend: N texts, L = TEXT_LEN tokens, D = encoder width.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from data_schemas.embedding import TEXT_LEN
from data_schemas.model import MissingWeightsError, Profile

WAN_REPO = "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"
REAL_DTYPE = torch.bfloat16  # Wan ships the UMT5-XXL encoder in bf16 (models_t5_umt5-xxl-enc-bf16.pth)


# The shortened negative prompt of the UniAnimate-DiT and MultiAnimate example scripts (spec C.4).
WAN_NEGATIVE_PROMPT = (
    "细节模糊不清，字幕，作品，画作，画面，静止，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，杂乱的背景，三条腿，背景人很多，倒着走"
)
# Wan's shared default negative prompt with the I2V prefix (spec C.4): only part of the tiny
# tokenizer's corpus, so that either prompt tokenizes without unknown characters.
_WAN_FULL_NEGATIVE_PROMPT = (
    "镜头晃动，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
_TINY_CORPUS = (
    "no one two three four five six seven eight nine ten person persons people are is dancing dance dances",
    "a man and a woman are dancing together on a stage; the camera is still, the background is plain.",
    "they walk, jump, turn, wave their hands and cross in front of each other in a video.",
    WAN_NEGATIVE_PROMPT,
    _WAN_FULL_NEGATIVE_PROMPT,
)
# T5's special-token layout: the encoder never sees another pad or eos id.
_PAD, _EOS, _UNK = "<pad>", "</s>", "<unk>"


@dataclass(frozen=True)
class TextEncoder:
    """A tokenizer and a UMT5 encoder that together turn prompts into Wan's text context."""

    tokenizer: PreTrainedTokenizerBase
    model: UMT5EncoderModel
    encoder_id: str  # names weights + tokenizer + dtype, never a path: it keys the embedding cache

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def encode(self, texts: list[str]) -> torch.Tensor:
        """float32 [N, 512, D] on the CPU; rows past each text's real length are zero."""
        return self.encode_with_lengths(texts)[0]

    def encode_with_lengths(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings float32 [N, 512, D], real token lengths int64 [N], end-of-sequence included)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a list of strings, got {texts!r:.80}")
        if not texts:
            return torch.zeros(0, TEXT_LEN, self.dim), torch.zeros(0, dtype=torch.int64)
        clean = _prompt_clean()
        inputs = self.tokenizer(
            [clean(t) for t in texts],
            padding="max_length",
            max_length=TEXT_LEN,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids_NL, mask_NL = inputs.input_ids, inputs.attention_mask
        lengths_N = mask_NL.gt(0).sum(dim=1).long()
        device = next(self.model.parameters()).device
        # no_grad, not inference_mode: the embeddings feed layers that train, and inference
        # tensors cannot be saved for their backward pass.
        with torch.no_grad():
            hidden_NLD = self.model(ids_NL.to(device), mask_NL.to(device)).last_hidden_state
        # diffusers casts to the encoder's dtype, then zeroes past the length; bf16 -> fp32 is exact.
        hidden_NLD = hidden_NLD.to(dtype=self.dtype).to(device="cpu", dtype=torch.float32)
        past_end_NL = torch.arange(TEXT_LEN)[None, :] >= lengths_N[:, None]
        return hidden_NLD.masked_fill(past_end_NL[..., None], 0.0), lengths_N


@functools.cache
def _prompt_clean() -> Callable[[str], str]:
    # diffusers' own function (ftfy, double HTML unescape, whitespace), so the cleaning can
    # never drift from the pipeline's. Imported on first use: the pipeline module takes seconds.
    from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean

    return prompt_clean


def default_caption(num_persons: int) -> str:
    """The caption the shard stage gives a clip of ``num_persons``, e.g. "two person are dancing"."""
    if num_persons < 0:
        raise ValueError(f"num_persons must be >= 0, got {num_persons}")
    # The shard stage owns the wording (ShardConfig.caption); imported here, not at the top,
    # because preprocess.shards pulls in OpenCV and the pose and segment stages.
    from data_schemas.config import ShardConfig
    from preprocess.shards import caption_for

    return caption_for(num_persons, ShardConfig())


# --- the tiny encoder -------------------------------------------------------------------


def tiny_encoder_id(seed: int = 0, dim: int = 32) -> str:
    return f"tiny-umt5-d{dim}-s{seed}"


def _tiny_vocab() -> list[tuple[str, float]]:
    """A Unigram vocabulary made by rule, not trained, so it is the same in every process:
    T5's specials first, then single characters, then the corpus's ASCII words."""
    text = unicodedata.normalize("NFKC", "\n".join(_TINY_CORPUS))
    chars = {chr(c) for c in range(0x21, 0x7F)} | {chr(c) for c in range(0xA1, 0x100)} | set(text)
    chars -= set(" \n\t")
    words = set(re.findall(r"[A-Za-z]{2,}", text))
    # Viterbi maximises the summed scores: a whole word (-5) beats its characters (-10 each).
    vocab = [(_PAD, 0.0), (_EOS, 0.0), (_UNK, 0.0), ("▁", -8.0)]
    vocab += [(c, -10.0) for c in sorted(chars)]
    vocab += [("▁" + w, -5.0) for w in sorted(words)] + [(w, -6.0) for w in sorted(words)]
    return vocab


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-like tokenizer (NFKC, metaspace, Unigram, eos appended) built offline."""
    tokenizer = Tokenizer(models.Unigram(_tiny_vocab(), unk_id=2))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {_EOS}", pair=f"$A {_EOS} $B {_EOS}", special_tokens=[(_EOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=_PAD,
        eos_token=_EOS,
        unk_token=_UNK,
        model_max_length=TEXT_LEN,
        padding_side="right",
    )


def build_tiny_text_encoder(seed: int = 0, dim: int = 32) -> TextEncoder:
    """A 2-layer, 2-head UMT5 encoder with seeded random weights (float32, CPU) and the tiny tokenizer."""
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even number >= 2, got {dim}")
    tokenizer = build_tiny_tokenizer()
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=dim,
        d_kv=dim // 2,
        d_ff=2 * dim,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        use_cache=False,
    )
    # A private RNG stream: the weights depend on the seed only, and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    return TextEncoder(tokenizer=tokenizer, model=model.eval(), encoder_id=tiny_encoder_id(seed, dim))


# --- the real encoder -------------------------------------------------------------------


def _missing_files(folder: Path) -> list[str]:
    """Files of a diffusers-layout text encoder + tokenizer that are absent (relative to folder)."""
    missing = []
    encoder, tokenizer = folder / "text_encoder", folder / "tokenizer"
    if not (encoder / "config.json").is_file():
        missing.append("text_encoder/config.json")
    index = encoder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise MissingWeightsError(f"{index}: unreadable weight index ({exc}); download it again") from exc
        missing += [f"text_encoder/{name}" for name in shards if not (encoder / name).is_file()]
    elif not (encoder / "model.safetensors").is_file():
        missing.append(
            "text_encoder/model.safetensors.index.json and its model-*-of-*.safetensors shards (or text_encoder/model.safetensors)"
        )
    if not (tokenizer / "tokenizer_config.json").is_file():
        missing.append("tokenizer/tokenizer_config.json")
    if not ((tokenizer / "tokenizer.json").is_file() or (tokenizer / "spiece.model").is_file()):
        missing.append("tokenizer/tokenizer.json (or tokenizer/spiece.model)")
    return missing


def require_text_encoder_files(folder: Path) -> Path:
    """``folder``, or one ``MissingWeightsError`` naming every missing file and the download line."""
    folder = Path(folder)
    missing = _missing_files(folder)
    if missing:
        raise MissingWeightsError(
            f"UMT5 text encoder missing in {folder} (expected its text_encoder/ and tokenizer/ subfolders):\n  "
            + "\n  ".join(str(folder / name) for name in missing)
            + "\nGet them with (nothing is downloaded at run time):\n"
            f"  huggingface-cli download {WAN_REPO} --include 'text_encoder/*' 'tokenizer/*' --local-dir {folder}"
        )
    return folder


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def wan_encoder_id(folder: Path, dtype: torch.dtype = REAL_DTYPE) -> str:
    """A stable id of the real encoder: its config and index files, its weight file names and
    sizes (hashing 22 GB would take minutes), the tokenizer files' content, and the dtype it
    computes in. Moving the folder keeps the id; another download or dtype changes it."""
    folder = require_text_encoder_files(folder)
    digest = hashlib.sha256()
    for sub in ("text_encoder", "tokenizer"):
        for path in sorted(p for p in (folder / sub).iterdir() if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{sub}/{path.name}\0".encode())
            if sub == "text_encoder" and path.suffix == ".safetensors":
                digest.update(str(path.stat().st_size).encode())
            else:
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return f"umt5-{digest.hexdigest()[:16]}-{_dtype_name(dtype)}"


def load_text_encoder(
    folder: Path, dtype: torch.dtype = REAL_DTYPE, device: str | torch.device | None = None
) -> TextEncoder:
    """UMT5-XXL and its tokenizer from a local diffusers-layout Wan folder (never the hub)."""
    folder = require_text_encoder_files(folder)
    encoder_id = wan_encoder_id(folder, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    # encode() zeroes rows past the length, which is right only for right padding.
    if tokenizer.padding_side != "right":
        raise ValueError(
            f"{folder / 'tokenizer'}: padding_side is {tokenizer.padding_side!r}, Wan's prompts are right-padded"
        )
    model = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype, local_files_only=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return TextEncoder(tokenizer=tokenizer, model=model.eval().to(device), encoder_id=encoder_id)


# --- profiles ---------------------------------------------------------------------------


def _check_profile(profile: Profile, weights: Path | None) -> None:
    if profile == "tiny":
        if weights is not None:
            warnings.warn(f"profile 'tiny' builds its weights in code: weights={weights} has no effect", stacklevel=3)
    elif profile == "wan-i2v-14b-720p":
        if weights is None:
            raise ValueError(f"profile {profile!r} needs weights: a diffusers-layout {WAN_REPO} folder")
    else:
        raise ValueError(f"profile must be 'tiny' or 'wan-i2v-14b-720p', got {profile!r}")


def profile_encoder_id(profile: Profile, weights: Path | None = None) -> str:
    """The encoder id of a profile without loading any weights (cheap: for cache keys)."""
    _check_profile(profile, weights)
    return tiny_encoder_id() if profile == "tiny" else wan_encoder_id(Path(weights))


def load_profile_encoder(profile: Profile, weights: Path | None = None) -> TextEncoder:
    """The text encoder of a profile: tiny (seed 0, dim 32) or the real one in bf16."""
    _check_profile(profile, weights)
    return build_tiny_text_encoder() if profile == "tiny" else load_text_encoder(Path(weights))
