"""``medssl prepare`` + ``shards:``: the shards hold exactly the source's tensors, the streaming order is disjoint
across ranks and resumable, and damaged or foreign folders are one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medssl.data.prepare import STATE, prepare
from medssl.data.shards import MANIFEST, stream_order
from medssl.data.specs import open_dataset
from medssl.engine.sampler import StreamingBatchSampler, check_loader_resume
from medssl.errors import ConfigError, DataError

SPEC = "phantom2d:40"
SIZE = 16
CHUNK_MB = 0.004  # a 16x16 float32 item is 1 KB (+ its mask): a few items per chunk, many chunks


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "p"
    res = prepare(SPEC, out, image_size=SIZE, workers=2, chunk_mb=CHUNK_MB, progress=False)
    assert res.num_items == 40 and res.bad == [] and not res.resumed
    return out


def test_shards_give_the_source_tensors_labels_and_metadata(prepared: Path) -> None:
    src = open_dataset(SPEC, image_size=SIZE)
    ds = open_dataset(f"shards:{prepared}")
    assert len(ds) == len(src) and len(ds.chunk_names) > 5
    assert (ds.spatial_dims, ds.in_chans, ds.image_size, ds.has_masks) == (2, 1, SIZE, True)
    assert ds.class_names == src.class_names and ds.task == src.task
    np.testing.assert_array_equal(ds.patient_ids, src.patient_ids)
    np.testing.assert_array_equal(ds.splits, src.splits)
    np.testing.assert_array_equal(ds.labels, src.labels)
    assert ds.origins == src.sources
    for i in range(len(src)):
        a, b = ds[i], src[i]
        assert torch.equal(a["image"], b["image"]), i  # bit-identical: float32 stored losslessly
        assert torch.equal(a["mask"], b["mask"]), i
        assert torch.equal(a["label"], b["label"]), i
        assert a["index"] == i


def test_prepare_again_is_a_no_op_and_other_requests_are_refused(prepared: Path, tmp_path: Path) -> None:
    again = prepare(SPEC, prepared, image_size=SIZE, workers=1, chunk_mb=CHUNK_MB, progress=False)
    assert again.already and again.num_items == 40
    with pytest.raises(DataError, match="another input or preprocessing"):
        prepare(SPEC, prepared, image_size=SIZE + 1, progress=False)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="not a `medssl prepare` folder; medssl never overwrites"):
        prepare(SPEC, user, image_size=SIZE, progress=False)
    assert (user / "notes.txt").read_text() == "precious"
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(DataError, match="is a file"):
        prepare(SPEC, afile, image_size=SIZE, progress=False)


def test_interrupted_prepare_continues(prepared: Path, tmp_path: Path) -> None:
    """A prepare stopped after its workers wrote chunks but before the manifest finishes on the next call."""
    out = tmp_path / "p"
    shutil.copytree(prepared, out)
    (out / MANIFEST).unlink()
    with pytest.raises(DataError, match="unfinished `medssl prepare`"):
        open_dataset(f"shards:{out}")
    res = prepare(SPEC, out, image_size=SIZE, workers=2, chunk_mb=CHUNK_MB, progress=False)
    assert res.resumed and not res.already and res.num_items == 40
    assert json.loads((out / MANIFEST).read_text())["fingerprint"] == json.loads(
        (prepared / MANIFEST).read_text())["fingerprint"]


def _bad_png_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "a" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)  # header says PNG, body is not
    return root


def test_bad_files_are_listed_not_fatal_unless_asked(tmp_path: Path) -> None:
    data = _bad_png_folder(tmp_path / "imgs")
    res = prepare(f"folder:{data}", tmp_path / "out", image_size=8, workers=1, progress=False)
    assert res.num_items == 7 and len(res.bad) == 1 and res.bad[0][0].endswith("2.png")
    assert "2.png" in (tmp_path / "out" / "bad.csv").read_text()
    ds = open_dataset(f"shards:{tmp_path / 'out'}")
    src = open_dataset(f"folder:{data}", image_size=8)
    good = [i for i in range(len(src)) if not src.sources[i].endswith("a/2.png")]
    assert ds.origins == [src.sources[i] for i in good]
    for pos, i in enumerate(good):
        assert torch.equal(ds[pos]["image"], src[i]["image"])
        assert int(ds[pos]["label"]) == int(src.labels[i])
    with pytest.raises(DataError, match=r"2\.png"):
        prepare(f"folder:{data}", tmp_path / "strict", image_size=8, workers=1, fail_on_bad=True, progress=False)


def test_truncated_and_corrupt_shards_are_one_error_naming_the_file(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    shutil.copytree(prepared, out)
    ds = open_dataset(f"shards:{out}")
    victim = out / ds.chunk_names[2]
    first_item = int(ds.chunk_starts[2])
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"shard {victim} is truncated"):
        open_dataset(f"shards:{out}")
    # same size, scrambled bytes: found when the item is read
    rng = np.random.default_rng(1)
    victim.write_bytes(data[:16] + rng.integers(0, 255, len(data) - 16, dtype=np.uint8).tobytes())
    ds = open_dataset(f"shards:{out}")
    with pytest.raises(DataError, match=f"shard {victim} is corrupt"):
        ds[first_item]
    victim.unlink()
    with pytest.raises(DataError, match=f"shard {victim} is missing"):
        open_dataset(f"shards:{out}")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: (d / MANIFEST).write_text("{not json"), "unreadable"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({"format": "other"})), "not a medssl shards manifest"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({"format": "medssl-shards", "version": 99})), "version 99"),
    (lambda d: (d / "index.json").write_text("[]"), "shard index"),
    (lambda d: (d / MANIFEST).unlink() or (d / STATE).unlink(), "has no medssl-shards.json"),
])
def test_damaged_manifest_or_index(prepared: Path, tmp_path: Path, mutate, message: str) -> None:
    out = tmp_path / "p"
    shutil.copytree(prepared, out)
    mutate(out)
    with pytest.raises(DataError, match=message):
        open_dataset(f"shards:{out}")


def test_spec_arguments_the_shards_cannot_honour(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="DIR_OR_URL is missing"):
        open_dataset("shards:")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(f"shards:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="prepare --image-size 32"):
        open_dataset(f"shards:{prepared}", image_size=32)
    with pytest.raises(DataError, match="task 'margin', not 'pathology'"):
        open_dataset(f"shards:{prepared}", task="pathology")
    assert len(open_dataset(f"shards:file://{prepared}", image_size=SIZE, task="margin")) == 40


def test_prepare_argument_checks(tmp_path: Path) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DataError, match="--workers"):
            prepare(SPEC, tmp_path / "o", workers=bad, progress=False)
    for bad in (0, -1, float("nan"), float("inf"), 1e9):
        with pytest.raises(DataError, match="--chunk-mb"):
            prepare(SPEC, tmp_path / "o", chunk_mb=bad, progress=False)
    with pytest.raises(DataError, match="unknown data spec"):
        prepare("nosuch:1", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # nothing written for a refused request


# -- the streaming order -----------------------------------------------------------------------------------------
STARTS = np.array([0, 7, 14, 21, 28, 35, 42, 49, 56, 63, 70, 77, 80])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_stream_order_ranks_are_disjoint_and_cover_the_epoch(world: int) -> None:
    allowed = np.arange(80)
    for epoch in (0, 1):
        parts = [stream_order(STARTS, allowed, seed=3, epoch=epoch, rank=r, world_size=world, buffer=10,
                              drop_last=True) for r in range(world)]
        seen = np.concatenate(parts)
        assert len(seen) == len(np.unique(seen)) == (80 // world) * world  # disjoint; drops < world items
        assert all(len(p) == 80 // world for p in parts)
        padded = [stream_order(STARTS, allowed, seed=3, epoch=epoch, rank=r, world_size=world, buffer=10,
                               drop_last=False) for r in range(world)]
        assert set(np.concatenate(padded)) == set(range(80))  # every item, padded by repeats only
    # pure function of its arguments; another epoch is another order
    a = stream_order(STARTS, allowed, seed=3, epoch=0, rank=0, world_size=world, buffer=10, drop_last=True)
    b = stream_order(STARTS, allowed, seed=3, epoch=0, rank=0, world_size=world, buffer=10, drop_last=True)
    c = stream_order(STARTS, allowed, seed=3, epoch=1, rank=0, world_size=world, buffer=10, drop_last=True)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_each_rank_reads_its_own_chunks() -> None:
    """Rank parts are contiguous runs of the chunk stream: at most one chunk is shared between two ranks."""
    allowed = np.arange(80)
    chunks = [set(np.searchsorted(STARTS, stream_order(STARTS, allowed, seed=0, epoch=0, rank=r, world_size=2,
                                                       buffer=10, drop_last=True), side="right") - 1)
              for r in range(2)]
    assert len(chunks[0] & chunks[1]) <= 1
    assert len(chunks[0]) <= 7 and len(chunks[1]) <= 7  # about half of the 12 chunks each


def test_shuffle_buffer_mixes_within_reach() -> None:
    allowed = np.arange(80)
    order = stream_order(STARTS, allowed, seed=0, epoch=0, rank=0, world_size=1, buffer=1, drop_last=True)
    chunk_seq = np.searchsorted(STARTS, order, side="right") - 1
    assert (np.diff(chunk_seq) != 0).sum() == 11  # buffer 1: chunk after chunk, each read once in one run
    mixed = stream_order(STARTS, allowed, seed=0, epoch=0, rank=0, world_size=1, buffer=20, drop_last=True)
    assert sorted(mixed) == list(range(80)) and not np.array_equal(np.sort(order), order)
    assert (np.diff(np.searchsorted(STARTS, mixed, side="right") - 1) != 0).sum() > 11


def test_streaming_sampler_resumes_mid_epoch_with_the_remaining_batches() -> None:
    allowed = np.flatnonzero(np.arange(80) % 5 != 0)  # e.g. the training split
    full = StreamingBatchSampler(STARTS, allowed, batch_size=6, seed=1, rank=1, world_size=2, buffer=8)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == full.batches_per_epoch() == len(allowed) // 12
    resumed = StreamingBatchSampler(STARTS, allowed, batch_size=6, seed=1, rank=1, world_size=2, buffer=8)
    resumed.set_epoch(2, start_batch=2)
    assert list(resumed) == batches[2:]
    assert len(resumed) == len(batches) - 2


def test_loader_state_checks_on_resume() -> None:
    s = StreamingBatchSampler(STARTS, np.arange(80), batch_size=4, world_size=2, fingerprint="abc")
    saved = s.state_dict(3)
    assert all(isinstance(v, int | str) for v in saved.values())  # weights_only-loadable
    check_loader_resume(saved, dict(saved), "ckpt")
    check_loader_resume(None, saved, "ckpt")  # checkpoints without loader state: nothing to check
    with pytest.raises(ConfigError, match="shards differ"):
        check_loader_resume(saved, {**saved, "fingerprint": "xyz"}, "ckpt")
    with pytest.raises(ConfigError, match="same world_size"):
        check_loader_resume(saved, {**saved, "world_size": 1}, "ckpt")
    check_loader_resume(saved, {**saved, "world_size": 1, "batch": 0}, "ckpt")  # at an epoch boundary it may
    with pytest.raises(ConfigError, match="reading shards data"):
        check_loader_resume(saved, {**saved, "kind": "map"}, "ckpt")


def test_high_resolution_copies_are_refused_in_one_line(prepared: Path) -> None:
    from medssl.data.highres import HighResDataset

    hr = HighResDataset(open_dataset(f"shards:{prepared}"), (2,))
    with pytest.raises(DataError, match="hold 16-pixel items, 32-pixel copies were asked for"):
        hr[0]


def test_the_remote_path_through_litdatas_downloader(prepared: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``local:DIR`` goes the way of ``s3://``: manifest and index downloaded, chunks staged into the local cache."""
    monkeypatch.setenv("MEDSSL_CACHE_DIR", str(tmp_path / "cache" / "items"))
    remote = open_dataset(f"shards:local:{prepared}")
    local = open_dataset(f"shards:{prepared}")
    assert remote.remote and str(remote.folder).startswith(str(tmp_path / "cache" / "shards"))
    for i in range(0, 40, 3):
        assert torch.equal(remote[i]["image"], local[i]["image"])
    assert list((tmp_path / "cache" / "shards").rglob("chunk-*.bin"))  # staged copies, read from the cache
