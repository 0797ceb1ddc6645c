"""The streaming SAM2 tracker with the tiny random-weight model on the CPU (no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from preprocess.segment.sam2 import SAM2_HOWTO, Sam2Tracker, build_tiny_sam2, default_keep_frames, load_sam2
from preprocess.synthetic import SyntheticSpec, render_clip

W, H = 160, 96


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sam2(seed=0)


@pytest.fixture(scope="module")
def clip():
    return render_clip(SyntheticSpec(width=W, height=H, num_frames=12, num_persons=2, seed=3))


def box_of(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def count_calls(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]

    def hook(module, args, kwargs):
        calls[0] += 1

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_tiny_model_is_small_and_seeded(tiny):
    model, processor = tiny
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert processor.image_processor.size["height"] == model.config.image_size
    again, _ = build_tiny_sam2(seed=0)
    other, _ = build_tiny_sam2(seed=1)
    weights = [(a, b, c) for a, b, c in zip(model.parameters(), again.parameters(), other.parameters())]
    assert all(torch.equal(a, b) for a, b, _ in weights)
    assert not all(torch.equal(a, c) for a, _, c in weights)


def test_clip_with_late_object(tiny, clip):
    model, processor = tiny
    tracker = Sam2Tracker(model, processor)
    boxes = [box_of(clip.masks[0, p]) for p in range(2)]
    late_box = np.array([5, 10, 60, 90], np.float32)
    for t, frame in enumerate(clip.frames):
        new = {10: boxes[0], 11: boxes[1]} if t == 0 else {42: late_box} if t == 5 else {}
        ids, logits = tracker.step(frame, new)
        expected = [10, 11] if t < 5 else [10, 11, 42]
        assert ids == expected, t
        assert logits.shape == (len(expected), H, W) and logits.dtype == np.float32
        assert np.isfinite(logits).all()
    sizes = tracker.state_sizes()
    # each object keeps exactly one conditioning frame: the one it was prompted on
    assert sizes["cond_outputs"] == [1, 1, 1]
    assert 0 in tracker.session.output_dict_per_obj[0]["cond_frame_outputs"]
    assert 5 in tracker.session.output_dict_per_obj[2]["cond_frame_outputs"]
    assert 5 not in tracker.session.output_dict_per_obj[0]["cond_frame_outputs"]  # others just tracked on


def test_no_object_no_model_call(tiny, clip):
    model, processor = tiny
    calls, handle = count_calls(model)
    try:
        tracker = Sam2Tracker(model, processor)
        for frame in clip.frames[:3]:
            ids, logits = tracker.step(frame, {})
            assert ids == [] and logits.shape == (0, H, W) and logits.dtype == np.float32
        assert calls[0] == 0
        ids, logits = tracker.step(clip.frames[3], {0: box_of(clip.masks[3, 0])})  # first object at frame 3
        assert ids == [0] and logits.shape == (1, H, W) and calls[0] == 1
        tracker.step(clip.frames[4], {})
        assert calls[0] == 2
        assert 3 in tracker.session.output_dict_per_obj[0]["cond_frame_outputs"]
    finally:
        handle.remove()


def test_memory_stays_bounded(tiny):
    model, processor = tiny
    keep = default_keep_frames(model.config)
    assert keep == max(model.config.num_maskmem, model.config.max_object_pointers_in_encoder) - 1 == 15
    tracker = Sam2Tracker(model, processor)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    for t in range(60):
        new = {0: np.array([2, 2, 30, 45]), 1: np.array([30, 5, 62, 40])} if t == 0 else {}
        ids, logits = tracker.step(np.roll(frame, t, axis=1), new)
    assert ids == [0, 1] and logits.shape == (2, 48, 64)
    sizes = tracker.state_sizes()
    assert sizes["processed_frames"] <= 1 and sizes["cached_features"] <= 1
    assert sizes["cond_outputs"] == [1, 1]
    assert all(n <= keep for n in sizes["non_cond_outputs"]), sizes
    assert all(n <= 1 for n in sizes["tracked_frames"]), sizes
    non_cond = tracker.session.output_dict_per_obj[0]["non_cond_frame_outputs"]
    assert sorted(non_cond) == list(range(60 - keep, 60))  # exactly the window the next frame reads
    with_maskmem = [f for f, out in non_cond.items() if "maskmem_features" in out]
    assert sorted(with_maskmem) == list(range(60 - (model.config.num_maskmem - 1), 60))
    assert all("object_pointer" in out and "high_res_masks" not in out for out in non_cond.values())


def test_pruning_does_not_change_masks(tiny, clip):
    """Pruning drops only what the model never reads again: masks equal an unpruned run's,
    while a window one frame shorter does change them (so the comparison can see a loss)."""
    model, processor = tiny
    keep = default_keep_frames(model.config)
    pruned = Sam2Tracker(model, processor)
    shorter = Sam2Tracker(model, processor, keep_frames=keep - 1)
    unpruned = Sam2Tracker(model, processor)
    unpruned._prune = lambda t: None  # the session as transformers keeps it: everything
    frames = np.concatenate([clip.frames, clip.frames[::-1], clip.frames])  # 36 frames > window
    boxes = {p: box_of(clip.masks[0, p]) for p in range(2)}
    shorter_diff = 0.0
    for t, frame in enumerate(frames):
        new = boxes if t == 0 else {}
        ids_a, a = pruned.step(frame, new)
        ids_b, b = unpruned.step(frame, new)
        shorter_diff = max(shorter_diff, float(np.abs(shorter.step(frame, new)[1] - b).max()))
        assert ids_a == ids_b
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=f"frame {t}")
    assert len(unpruned.session.output_dict_per_obj[0]["non_cond_frame_outputs"]) == len(frames) - 1
    assert shorter_diff > 1e-5
    assert (b > 0).any() and (b != b[:1]).any()  # live masks, not the constant no-object score


def test_bad_inputs(tiny, clip):
    model, processor = tiny
    tracker = Sam2Tracker(model, processor)
    with pytest.raises(ValueError, match="uint8"):
        tracker.step(clip.frames[0].astype(np.float32), {})
    with pytest.raises(ValueError, match="4 finite"):
        tracker.step(clip.frames[0], {0: np.array([1.0, 2.0, 3.0])})
    tracker = Sam2Tracker(model, processor)
    tracker.step(clip.frames[0], {})
    with pytest.raises(ValueError, match="96x160"):
        tracker.step(clip.frames[1][:50], {})


def test_load_missing_folder(tmp_path):
    folder = tmp_path / "sam2.1-hiera-large"
    with pytest.raises(ValueError) as err:
        load_sam2(folder)
    assert str(folder) in str(err.value) and SAM2_HOWTO in str(err.value)
    assert "config.json" in str(err.value) and "facebook/sam2.1-hiera-large" in str(err.value)
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model.safetensors") as err:
        load_sam2(folder)
    assert str(folder) in str(err.value)


def test_save_load_round_trip(tiny, clip, tmp_path: Path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_sam2(tmp_path)
    assert loaded.config.image_size == model.config.image_size
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys() and all(
        torch.equal(saved[k], reloaded[k]) for k in saved
    )  # byte copies: exact
    box = {0: box_of(clip.masks[0, 0])}
    ids_a, a = Sam2Tracker(model, processor).step(clip.frames[0], box)
    ids_b, b = Sam2Tracker(loaded, loaded_processor).step(clip.frames[0], box)
    assert ids_a == ids_b == [0]
    # two model instances' floats are not bit-equal on the CPU (seen: 7e-8 apart)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
