"""Video world and video data: deterministic clips whose masks are exactly the arm, objects
that move only when pushed, an arm no pixel-colour rule finds, and the pipeline's video
and segment modes (the noise control included) over the world and BAIR-style folders."""

import dataclasses

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax import cli, train
from mmjax import config as config_lib
from mmjax.data import video
from mmjax.data import video_world as vw
from mmjax.data.pipeline import DataHealth, Dataset, dataset_from_config, make_dataset
from mmjax.data.sequences import CorruptRecord, SequenceSpec

WORLD = vw.VideoWorld(seed=0, frames=8, resolution=48)


def test_clips_are_a_pure_function_of_seed_split_and_index():
  a, b = WORLD.clip("train", 5), vw.VideoWorld(0, 8, 48).clip("train", 5)
  assert a["video"].shape == (8, 48, 48, 3) and a["video"].dtype == np.uint8
  assert a["masks"].shape == (8, 48, 48) and a["masks"].dtype == np.uint8
  assert set(np.unique(a["masks"])) <= {0, 1}
  np.testing.assert_array_equal(a["video"], b["video"])
  np.testing.assert_array_equal(a["masks"], b["masks"])
  assert not np.array_equal(a["video"], vw.VideoWorld(1, 8, 48).clip("train", 5)["video"])
  assert vw.VideoWorld(resolution=80).clip("test", 0)["video"].shape == (16, 80, 80, 3)
  with pytest.raises(ValueError, match="split"):
    WORLD.clip("eval", 0)


def test_splits_are_separate_streams():
  digests = {split: {WORLD.clip(split, i)["video"].tobytes() for i in range(12)}
             for split in vw.SPLITS}
  assert all(len(d) == 12 for d in digests.values())
  assert not (digests["train"] & digests["validation"] or digests["train"] & digests["test"]
              or digests["validation"] & digests["test"])


@pytest.mark.parametrize("index", range(4))
def test_masks_are_the_arm_and_it_moves(index):
  scene = WORLD.scene("train", index)
  motion = WORLD.motion(scene)
  video_, masks = WORLD.render(scene, motion)
  # Recolouring the arm changes exactly the pixels under the mask: nothing occludes it,
  # and nothing else (its shadow included) takes its colour.
  for colour in ((0, 0, 0), (255, 255, 255)):
    other, _ = WORLD.render(dataclasses.replace(scene, arm_colour=np.float32(colour)), motion)
    changed = (other != video_).any(-1)
    assert not (changed & (masks == 0)).any()
  black, _ = WORLD.render(dataclasses.replace(scene, arm_colour=np.zeros(3, np.float32)), motion)
  white, _ = WORLD.render(dataclasses.replace(scene, arm_colour=np.full(3, 255, np.float32)),
                          motion)
  np.testing.assert_array_equal((black != white).any(-1), masks == 1)
  assert 0.02 < masks.mean() < 0.4
  assert (masks[1:] != masks[:-1]).any((1, 2)).mean() > 0.5  # the arm moves between frames


def test_objects_move_only_when_the_arm_touches_them():
  moved_total = touched_total = still = 0
  for index in range(30):
    motion = WORLD.motion(WORLD.scene("validation", index))
    moved = (motion.centres[1:] != motion.centres[:-1]).any(-1)  # "t-1 n"
    assert not (moved & ~motion.touched[1:]).any()
    moved_total += moved.sum()
    touched_total += motion.touched.sum()
    still += (~moved).sum()
  assert moved_total > 20 and touched_total >= moved_total and still > moved_total


def _colour_bins(clip_video: np.ndarray) -> np.ndarray:
  q = (clip_video // 16).astype(np.int64)
  return (q[..., 0] * 16 + q[..., 1]) * 16 + q[..., 2]


def test_no_pixel_colour_rule_segments_the_arm():
  world = vw.VideoWorld()
  arm, total = np.zeros(4096), np.zeros(4096)
  for i in range(24):  # the best colour -> arm rule on training pixels (4096 colour bins)
    clip = world.clip("train", i)
    bins = _colour_bins(clip["video"]).ravel()
    total += np.bincount(bins, minlength=4096)
    arm += np.bincount(bins, weights=clip["masks"].ravel(), minlength=4096)
  rule = arm / np.maximum(total, 1) > 0.5
  intersection = union = 0
  oracle = []
  colourings = set()
  for i in range(16):
    clip = world.clip("validation", i)
    truth = clip["masks"] > 0
    predicted = rule[_colour_bins(clip["video"])]
    intersection += (predicted & truth).sum()
    union += (predicted | truth).sum()
    # Even knowing this clip's arm colour, a colour threshold mixes the arm up.
    pixels = clip["video"].astype(np.float32)
    far = np.abs(pixels - pixels[truth].mean(0)).max(-1)
    oracle.append(max(((far < d) & truth).sum() / ((far < d) | truth).sum()
                      for d in (8, 16, 24, 32, 48, 64)))
    colourings.add(world.scene("validation", i).arm_colouring)
  assert intersection / union < 0.8
  assert np.mean(oracle) < 0.85 and min(oracle) < 0.5
  assert {"object", "table"} <= colourings


def test_frames_are_frames_of_the_clips():
  frames = video.VideoWorldFrames(split="test", size=10, frames=8, resolution=48)
  clips = video.VideoWorldClips(split="test", size=10, frames=8, resolution=48)
  picked = set()
  for i in range(10):
    t = WORLD.frame_index("test", i)
    picked.add(t)
    np.testing.assert_array_equal(frames[i]["image"], clips[i]["video"][t])
    np.testing.assert_array_equal(frames[i]["mask"], clips[i]["masks"][t])
  assert len(picked) > 3
  with pytest.raises(IndexError):
    frames[10]


def test_benchmark_runs():
  assert 0 < vw.benchmark(vw.VideoWorld(), clips=2) < 1.0


# ---------------------------------------------------------------------------- BAIR folders

def _png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture
def bair(tmp_path):
  """Two trajectories of 80x96 frames: "a" 0-5 with 0-255 masks for 0-4 (mask 3 the wrong
  size), "b" 0-2 with frame 1 broken and 0/1 masks for 0-2."""
  rng = np.random.default_rng(0)
  root, masks = tmp_path / "frames", tmp_path / "masks"
  for trajectory, count in (("a", 6), ("b", 3)):
    for i in range(count):
      _png(root / trajectory / f"{i}.png", rng.integers(0, 256, (80, 96, 3), np.uint8))
  (root / "b" / "1.png").write_bytes(b"not an image")
  (root / "a" / "notes.txt").write_text("ignored")
  block = np.zeros((80, 96), np.uint8)
  block[20:60, 28:68] = 1
  for i in range(5):
    _png(masks / "a" / f"{i}.png", block * 255 if i != 3 else np.zeros((10, 10), np.uint8))
  for i in range(3):
    _png(masks / "b" / f"{i}.png", block)
  return str(root), str(masks)


def test_bair_folder_reads_clips_and_labelled_frames(bair):
  root, masks = bair
  clips = video.BairFolder(root, masks, frames=3, resolution=32)
  assert len(clips) == 3  # a/0, a/3, b/0
  first = clips[0]
  assert first["video"].shape == (3, 32, 32, 3) and first["id"] == "a/0"
  assert first["masks"].shape == (3, 32, 32) and set(np.unique(first["masks"])) == {0, 1}
  assert "masks" not in clips[1]  # a/5 has no mask
  with pytest.raises(CorruptRecord) as error:
    clips[2]
  assert error.value.reason == "bad_image"
  frames = video.BairFolder(root, masks, records="frames", resolution=32)
  assert len(frames) == 8
  by_id = {}
  for i in range(len(frames)):
    try:
      record = frames[i]
    except CorruptRecord as e:
      by_id[i] = e.reason
      continue
    by_id[record["id"]] = record
  assert sorted(r for r in by_id.values() if isinstance(r, str)) == ["bad_image", "mask_size"]
  a0, b0 = by_id["a/0"], by_id["b/0"]
  assert a0["image"].shape == (32, 32, 3) and a0["mask"].dtype == np.uint8
  np.testing.assert_array_equal(a0["mask"], b0["mask"])  # 0-255 and 0/1 masks alike
  # The mask is cropped and resized as its frame: the block's share survives.
  assert abs(a0["mask"].mean() - 40 * 40 / (80 * 80)) < 0.05
  resized = np.asarray(Image.open(f"{root}/a/0.png").resize(
      (32, 32), Image.Resampling.BICUBIC, box=(8, 0, 88, 80)))
  np.testing.assert_array_equal(a0["image"], resized)


def test_bair_folder_refuses_empty_and_unlabelled_folders(bair, tmp_path):
  root, _ = bair
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"empty.*<root>/<trajectory>/<i>\.png"):
    video.BairFolder(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="none were found under mask_root="):
    video.BairFolder(root, str(tmp_path / "empty"), records="frames")
  with pytest.raises(ValueError, match="has 7 frames"):
    video.BairFolder(root, frames=7)


def test_bair_folder_skips_are_counted_by_the_pipeline(bair):
  root, masks = bair
  dataset = dataset_from_config({"name": "bair", "source": {
      "kind": "bair_folder", "root": root, "mask_root": masks, "records": "frames",
      "resolution": 32}})
  health = DataHealth()
  spec = SequenceSpec(seq_len=1, mode="segment", video=video.VideoSpec(resolution=32))
  batches = iter(make_dataset([dataset], None, spec, batch_size=3, seed=0, health=health))
  for _ in range(4):  # 12 usable frames: two passes over 8 records, 2 of them skipped
    batch = next(batches)
    assert batch["image"].shape == (3, 32, 32, 3) and batch["mask"].dtype == np.float32
  counts = health.counts()
  assert counts["bair/bad_image"] >= 2 and counts["bair/mask_size"] >= 2
  assert set(counts) == {"bair/bad_image", "bair/mask_size"}


# ------------------------------------------------------------------------- pipeline modes

def _batches(kind: str, mode: str, noise: bool = False, count: int = 2, seed: int = 0):
  spec = SequenceSpec(seq_len=1, mode=mode,
                      video=video.VideoSpec(frames=8, resolution=48, noise=noise))
  dataset = dataset_from_config({"name": "world", "source": {
      "kind": kind, "size": 12, "frames": 8, "resolution": 48}, "loss_weight": 0.5})
  batches = iter(make_dataset([dataset], None, spec, batch_size=4, seed=seed))
  return [next(batches) for _ in range(count)]


def test_video_mode_batches_clips():
  first, again = _batches("video_world", "video"), _batches("video_world", "video")
  batch = first[0]
  assert set(batch) == {"video", "loss_weight", "dataset_id"}
  assert batch["video"].shape == (4, 8, 48, 48, 3) and batch["video"].dtype == np.uint8
  np.testing.assert_allclose(batch["loss_weight"], 0.5)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a["video"], b["video"])
  clips = {WORLD.clip("train", i)["video"].tobytes() for i in range(12)}
  assert all(v.tobytes() in clips for v in batch["video"])


def test_segment_mode_and_the_noise_control():
  clean = _batches("video_world_frames", "segment")
  noisy = _batches("video_world_frames", "segment", noise=True)
  again = _batches("video_world_frames", "segment", noise=True)
  for c, n, a in zip(clean, noisy, again, strict=True):
    assert c["image"].shape == (4, 48, 48, 3) and c["image"].dtype == np.uint8
    assert c["mask"].shape == (4, 48, 48) and c["mask"].dtype == np.float32
    assert set(np.unique(c["mask"])) <= {0.0, 1.0} and c["mask"].sum() > 0
    np.testing.assert_array_equal(n["mask"], c["mask"])  # the masks are kept
    np.testing.assert_array_equal(n["image"], a["image"])  # noise drawn from seed and record
    assert (n["image"] != c["image"]).mean() > 0.9
    assert abs(n["image"].mean() - 127.5) < 5
  other_seed = _batches("video_world_frames", "segment", noise=True, seed=1)[0]
  assert not np.array_equal(other_seed["image"], noisy[0]["image"])
  noisy_clips = _batches("video_world", "video", noise=True, count=1)[0]["video"]
  assert abs(noisy_clips.mean() - 127.5) < 3


def test_video_modes_check_their_inputs():
  spec = video.VideoSpec(frames=8, resolution=48)
  clip = WORLD.clip("train", 0)
  with pytest.raises(CorruptRecord, match="bad_video"):
    video.build_video({"video": clip["video"][:4]}, spec, "video", 0, 0)
  example, stats = video.build_video({"video": np.concatenate([clip["video"]] * 2)}, spec,
                                     "video", 0, 0)
  assert example["video"].shape == (8, 48, 48, 3) and stats == {"frames_cut": 8}
  with pytest.raises(CorruptRecord, match="no_mask"):
    video.build_video({"image": clip["video"][0]}, spec, "segment", 0, 0)
  with pytest.raises(ValueError, match="go together"):
    SequenceSpec(seq_len=1, mode="video")
  with pytest.raises(ValueError, match="needs a tokenizer"):
    make_dataset([Dataset("d", video.VideoWorldClips(size=2))], None,
                 SequenceSpec(seq_len=4, mode="text"), batch_size=1, seed=0)


def test_the_trainer_builds_the_video_spec_from_the_config(monkeypatch):
  config = ml_collections.ConfigDict({"data": {
      "seq_len": 1, "batch_size": 2, "mode": "segment",
      "video": {"frames": 4, "resolution": 32, "noise": True},
      "datasets": {"frames": {"source": {"kind": "video_world_frames", "size": 4,
                                         "frames": 4, "resolution": 32}}}}})
  assert train.sequence_spec(config).video == video.VideoSpec(4, 32, True)
  given = {}
  monkeypatch.setattr(train, "make_tokenizer", lambda c: pytest.fail("no tokenizer needed"))
  monkeypatch.setattr(train, "make_dataset", lambda ds, tok, spec, **kw: given.update(
      tokenizer=tok, spec=spec))
  train.make_data(config, seed=0, health=DataHealth())
  assert given["tokenizer"] is None and given["spec"].mode == "segment"
  data_schema = config_lib.SCHEMA.fields["data"].fields
  assert not config_lib._check(data_schema["video"], config.data.video, "v", None)
  assert config_lib._check(data_schema["video"], {"fps": 4}, "v", None)
  config.data.video.frames = 0
  with pytest.raises(cli.UserError, match="config.data.video: .*frames"):
    train.sequence_spec(config)
