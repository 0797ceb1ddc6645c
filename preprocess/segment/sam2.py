"""Streaming SAM2.1 video tracker over transformers' ``Sam2VideoModel`` (spec B.2).

Frames are streamed one at a time (no preloaded video); objects start from person boxes,
at frame 0 or at any later frame. After every frame the inference session is pruned to
what the model can still read, so memory stays flat however long the clip is: the caller
keeps the masks, the session keeps a fixed window.

What ``Sam2VideoModel.forward`` reads for frame t (transformers 5.x, modeling_sam2_video.py),
which is what the pruning relies on:

* ``_prepare_vision_features``: the frame's pixels (``session.processed_frames[t]``, via
  ``get_frame``) or its cached features (``session.cache``), for frame t only; the batched
  memory encoder (``_batch_encode_memories``) reads the same frame-t features.
* ``_gather_memory_frame_outputs``: ALL conditioning outputs of the object
  (``max_cond_frame_num`` = -1) and the non-conditioning outputs at t-1 ... t-(num_maskmem-1),
  their ``maskmem_features`` and ``maskmem_pos_enc`` only.
* ``_get_object_pointers`` (streaming): the ``object_pointer`` of conditioning outputs at
  frames <= t and of non-conditioning outputs at t-1 ... t-(max_object_pointers_in_encoder-1).
* ``pred_masks`` / ``object_score_logits`` of a stored output are read back only when the
  SAME frame is run again without new inputs (never, when streaming); ``high_res_masks`` is
  only consumed inside the forward call that produced it (batched memory encoding).
* ``frames_tracked_per_obj[obj][t]`` is only looked up for the current frame (to decide
  whether a prompted frame is an initial conditioning frame).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.models.sam2 import Sam2ImageProcessor
from transformers.models.sam2_video import Sam2VideoConfig, Sam2VideoModel, Sam2VideoProcessor
from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

from data_schemas.config import SAM2_HOWTO

__all__ = ["SAM2_HOWTO", "Sam2Tracker", "build_tiny_sam2", "default_keep_frames", "load_sam2"]

# Files a transformers-format SAM2 folder needs (what save_pretrained writes): one of each group.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def build_tiny_sam2(seed: int = 0, image_size: int = 128) -> tuple[Sam2VideoModel, Sam2VideoProcessor]:
    """A small random-weight SAM2 video model and its processor, built offline (CPU-fast).

    Shapes follow the real model's ratios (features at image_size/4, /8, /16). Two constraints
    of the modeling code fix some sizes: the memory cross-attention takes 64-d keys
    (``kv_in_dim=64`` is hard-coded), so ``memory_encoder_output_channels`` must be 64, and
    object pointers are only split into memory tokens when the hidden size exceeds it, so the
    hidden size is 128 (two 64-d tokens per pointer, as 256 -> 4 in the real model).
    """
    if image_size % 64:
        raise ValueError(f"image_size must be a multiple of 64, got {image_size}")
    size, hidden = image_size, 128
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 16,
        "num_attention_heads": 1,
        "image_size": [size, size],
        "blocks_per_stage": [1, 1, 2, 1],
        "embed_dim_per_stage": [16, 32, 64, 128],
        "num_attention_heads_per_stage": [1, 1, 2, 2],
        "window_size_per_stage": [4, 4, 4, 4],
        # a global block must not be a stage's first (query-pooling) block: window 0 is divided
        "global_attention_blocks": [3],
        "window_positional_embedding_background_size": [4, 4],
    }
    vision = {
        "model_type": "sam2_vision_model",
        "backbone_config": backbone,
        "backbone_channel_list": [128, 64, 32, 16],
        "backbone_feature_sizes": [[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
        "fpn_hidden_size": hidden,
    }
    config = Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": hidden, "image_size": size, "patch_size": 16, "mask_input_channels": 8},
        mask_decoder_config={
            "hidden_size": hidden,
            "mlp_dim": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 64,
        },
        image_size=size,
        memory_attention_hidden_size=hidden,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=128,
        memory_attention_rope_feat_sizes=[size // 16, size // 16],
        memory_encoder_hidden_size=hidden,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=hidden,
        memory_fuser_embed_dim=hidden,
        memory_fuser_intermediate_dim=128,
        memory_fuser_num_layers=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2VideoModel(config).eval()
        _liven(model)
    processor = Sam2VideoProcessor(
        image_processor=Sam2ImageProcessor(
            size={"height": size, "width": size}, mask_size={"height": size // 4, "width": size // 4}
        ),
        video_processor=Sam2VideoVideoProcessor(size={"height": size, "width": size}),
        target_size=size,
    )
    return model, processor


@torch.no_grad()
def _liven(model: Sam2VideoModel) -> None:
    """Make random weights produce masks that depend on the prompts and the memory.

    With transformers' init (std 0.02, zero embeddings and layer scales) the object-score head
    says "no object", so every mask is the constant NO_OBJ_SCORE (-1024) and memory never
    matters; a tiny model like that exercises nothing. Instead: PyTorch's fan-in init for
    linear/conv layers (keeps activations O(1)), small random values for the embeddings
    transformers zeroes (temporal memory positions, no-object pointer, occlusion embedding),
    a non-zero memory-fuser layer scale, and an object-score bias so objects count as present.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            module.reset_parameters()
    for name in ("memory_temporal_positional_encoding", "no_object_pointer", "occlusion_spatial_embedding_parameter"):
        getattr(model, name).normal_(0.0, 0.1)
    for block in model.memory_encoder.memory_fuser.layers:
        block.scale.fill_(0.1)
    model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(5.0)


def load_sam2(
    folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Sam2VideoModel, Sam2VideoProcessor]:
    """A transformers-format SAM2(.1) video model and processor from a local folder (never the hub).

    Raises ValueError naming the folder, the files expected there and how to get them when the
    folder or any of its files is missing.
    """
    folder = Path(folder)
    expected = f"config.json, one of {' / '.join(_WEIGHT_FILES)}, one of {' / '.join(_PROCESSOR_FILES)}"
    if not folder.is_dir():
        raise ValueError(f"SAM2 model folder {folder} does not exist (expected {expected}). {SAM2_HOWTO}")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    for group in (_WEIGHT_FILES, _PROCESSOR_FILES):
        if not any((folder / name).is_file() for name in group):
            missing.append(" / ".join(group))
    if missing:
        raise ValueError(f"SAM2 model folder {folder} lacks {', '.join(missing)} (expected {expected}). {SAM2_HOWTO}")
    model = Sam2VideoModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
    processor = Sam2VideoProcessor.from_pretrained(folder, local_files_only=True)
    return model.to(device=device, dtype=dtype).eval(), processor


def default_keep_frames(config: Sam2VideoConfig) -> int:
    """Past non-conditioning frames the model reads for the next frame: the spatial memories
    (t-1 ... t-(num_maskmem-1)) and the object pointers (t-1 ... t-(max_object_pointers_in_encoder-1));
    15 for SAM2.1 (num_maskmem 7, 16 pointers)."""
    return max(0, config.num_maskmem - 1, config.max_object_pointers_in_encoder - 1)


class Sam2Tracker:
    """Streams frames through SAM2, prompted with boxes; one tracker per clip.

    ``step`` is called once per frame, in order (frame index implicit: 0, 1, 2, ...). Objects
    start at the frame where their box is given; each object's prompted frame is kept as its
    conditioning memory, the last ``keep_frames`` tracked frames as its recent memory.
    """

    def __init__(
        self,
        model: Sam2VideoModel,
        processor: Sam2VideoProcessor,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        keep_frames: int | None = None,
        state_on_cpu: bool = False,
    ) -> None:
        """``model`` is moved to ``device``/``dtype`` and put in eval mode (in place).

        keep_frames: past non-conditioning frames of state kept per object; default
        :func:`default_keep_frames` (all the model reads). Fewer saves memory but changes the
        masks (the model then sees fewer memories/pointers than it was trained with).
        """
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device = device
        self.dtype = dtype
        default = default_keep_frames(model.config)
        self.keep_frames = default if keep_frames is None else int(keep_frames)
        if self.keep_frames < 0:
            raise ValueError(f"keep_frames must be >= 0, got {keep_frames}")
        # Spatial memories older than this are never read (only their object pointers are).
        self._keep_maskmem = max(0, model.config.num_maskmem - 1)
        # One cached frame is all a streamed session reads (the current one); processed frames
        # are dropped after each step anyway.
        # state_on_cpu: frames and memories live in host RAM while the model runs on the GPU.
        storage = "cpu" if state_on_cpu else device
        self.session = processor.init_video_session(
            inference_device=device,
            inference_state_device=storage,
            video_storage_device=storage,
            max_vision_features_cache_size=1,
            dtype=dtype,
        )
        self.frame_idx = 0  # index of the next frame
        self.size: tuple[int, int] | None = None  # (H, W) of the clip, fixed by the first frame
        self.model_calls = 0

    @property
    def object_ids(self) -> list[int]:
        """Ids of the objects started so far, in the session's order (the order of ``step``'s masks)."""
        return list(self.session.obj_ids)

    def step(self, frame: np.ndarray, new_boxes: dict[int, np.ndarray]) -> tuple[list[int], np.ndarray]:
        """Track one frame.

        frame: uint8 [H, W, 3] RGB, same size for the whole clip.
        new_boxes: {object id: (x1, y1, x2, y2) pixels} of objects that start at this frame
            (an id already tracked is re-prompted: this frame becomes one more of its
            conditioning frames).
        Returns (object ids in session order, mask logits float32 [K, H, W] at the frame's
        resolution) for every object started so far; ([], [0, H, W]) while there is none,
        without running the model.
        """
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
        height, width = frame.shape[:2]
        if self.size is None:
            self.size = (height, width)
        elif self.size != (height, width):
            raise ValueError(f"frame {self.frame_idx} is {height}x{width}, the clip is {self.size[0]}x{self.size[1]}")
        t = self.frame_idx
        self.frame_idx += 1
        obj_ids, boxes = _check_boxes(new_boxes)
        if not obj_ids and not self.session.obj_ids:
            return [], np.zeros((0, height, width), np.float32)

        with torch.inference_mode():
            pixels = self.processor(images=frame, device=self.device, return_tensors="pt").pixel_values[0]
            if obj_ids:
                # New objects get their box on frame t before it runs: forward() then treats the
                # frame as their initial conditioning frame (t is not in frames_tracked_per_obj),
                # while the other objects are tracked from memory as usual.
                self.processor.add_inputs_to_inference_session(
                    self.session,
                    frame_idx=t,
                    obj_ids=obj_ids,
                    input_boxes=[boxes],
                    original_size=(height, width),
                )
            # frame_idx given explicitly: add_new_frame would otherwise number the frame by the
            # count of stored frames, which pruning keeps at zero.
            out = self.model(inference_session=self.session, frame=pixels, frame_idx=t)
            self.model_calls += 1
            logits = self.processor.post_process_masks(
                [out.pred_masks.float()], original_sizes=[[height, width]], binarize=False
            )[0]
        self._prune(t)
        return list(out.object_ids), logits[:, 0].cpu().numpy().astype(np.float32, copy=False)

    def _prune(self, t: int) -> None:
        """Drop from the session what frames after t can no longer read (module docstring)."""
        session = self.session
        session.processed_frames = {}  # pixels are read for the current frame only
        session.cache.clear_all()  # likewise the cached vision features
        oldest_kept = t - self.keep_frames + 1  # frame t+1 reads t ... t+1-keep_frames
        oldest_maskmem = t - self._keep_maskmem + 1
        for obj_idx, outputs in session.output_dict_per_obj.items():
            for out in outputs["cond_frame_outputs"].values():
                out.pop("high_res_masks", None)  # consumed by the forward call that made it
            non_cond = outputs["non_cond_frame_outputs"]
            for frame_idx in [f for f in non_cond if f < oldest_kept]:
                del non_cond[frame_idx]
            for frame_idx, out in non_cond.items():
                out.pop("high_res_masks", None)
                out.pop("pred_masks", None)  # only re-read when re-running a conditioning frame
                if frame_idx < oldest_maskmem:  # beyond the spatial memory, only the pointer is read
                    out.pop("maskmem_features", None)
                    out.pop("maskmem_pos_enc", None)
            tracked = session.frames_tracked_per_obj[obj_idx]
            for frame_idx in [f for f in tracked if f <= t]:
                del tracked[frame_idx]

    def state_sizes(self) -> dict[str, Any]:
        """Sizes of the session's growing containers (for tests and benchmarks)."""
        session = self.session
        outputs = session.output_dict_per_obj.values()
        return {
            "processed_frames": len(session.processed_frames or {}),
            "cached_features": len(session.cache._vision_features),
            "cond_outputs": [len(o["cond_frame_outputs"]) for o in outputs],
            "non_cond_outputs": [len(o["non_cond_frame_outputs"]) for o in outputs],
            "tracked_frames": [len(f) for f in session.frames_tracked_per_obj.values()],
            "point_inputs": [len(p) for p in session.point_inputs_per_obj.values()],
        }


def _check_boxes(new_boxes: dict[int, np.ndarray]) -> tuple[list[int], list[list[float]]]:
    """Object ids and boxes as plain lists; ValueError on a box that is not 4 finite numbers."""
    obj_ids: list[int] = []
    boxes: list[list[float]] = []
    for obj_id, box in new_boxes.items():
        box = np.asarray(box, dtype=np.float64).reshape(-1)
        if box.shape != (4,) or not np.isfinite(box).all():
            raise ValueError(f"box of object {obj_id} must be 4 finite numbers x1,y1,x2,y2, got {box}")
        obj_ids.append(int(obj_id))
        boxes.append([float(v) for v in box])
    return obj_ids, boxes
