"""Scale and speed of the RecordIO path.

1. Labels and splits at MS1MV2 scale. A generated ``.rec``/``.idx`` with one tiny record per image (a real
   IRHeader, 4 payload bytes) in both layouts: opening it (parsing the ``.idx``; the insightface layout's
   identity records, or the im2rec layout's one pass over all headers) and computing a ``shallow`` and a
   ``longtail`` split, in a fresh process that reports wall time and peak RSS. Target (issue 5): 5.8M
   images / 86k identities in under 60 s and 2 GB on the 2-core CI machine. The memory bound is asserted
   (a property); the time is reported, never asserted (it depends on the machine), next to its target.

   CI runs a small index (200,000 images / 3,000 identities). The full size is opt-in, because generating
   the 5.8M-record files takes about a minute and 500 MB of disk::

       FACEBENCH_BENCH_FULL=1 python -m pytest tests/benchmarks/test_bench_recordio.py -s -k scale

   The files are in the page cache when measured; on a cold disk the im2rec pass reads one page per record.

2. Loader throughput: 112 x 112 SynthFace JPEGs (quality 95, as RecBuilder) in an im2rec ``.rec``, decoded
   by 2 DataLoader workers through :class:`bench.data.loader.BatchLoader` (decode, flip, normalise), batch
   128. Reported in images/s (target: at least 1,500 on the 2-core machine), not asserted. Asserted: every
   image of the last timed batch is, pixel for pixel, one of the JPEGs written for its label, decoded
   independently with Pillow and normalised, mirrored exactly where the run's flip mask says::

       python -m pytest tests/benchmarks/test_bench_recordio.py -s -k loader

Both print their figures (``-s``) and store them in the benchmark's ``extra_info``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data.loader import BatchLoader, flip_mask
from bench.data.real import EncodedTrainSet
from bench.data.recordio import RecordDataset, RecordFile, RecordWriter, pack_payload, write_property
from bench.data.sampler import RandomBatchSampler
from bench.data.synthface import SynthFace, SynthFaceConfig

FULL = os.environ.get("FACEBENCH_BENCH_FULL") == "1"
IMAGES, IDENTITIES = (5_822_653, 85_742) if FULL else (200_000, 3_000)
#: Issue 5's targets: the time is reported beside the measurement, the memory bound asserted.
TARGET_TIME_S, MEMORY_LIMIT_MB = 60.0, 2048.0
TINY_IMAGE = b"\xff\xd8\xff\xd9"  # 4 bytes: JPEG start and end markers
MAGIC = 0xCED7230A


def identity_counts(images: int, identities: int, seed: int = 0) -> np.ndarray:
    """Per-identity image counts summing to ``images``: at least 1 each, log-normal shares (MS1M-like spread)."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 0.6, identities)
    return 1 + rng.multinomial(images - identities, weights / weights.sum())


def _frame(payload_length: int, count: int, extra: list[tuple[str, str]]) -> np.ndarray:
    dtype = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                      ("id2", "<u8"), *extra])
    assert dtype.itemsize == 8 + payload_length and payload_length % 4 == 0
    records = np.zeros(count, dtype=dtype)
    records["magic"], records["lrec"] = MAGIC, payload_length
    return records


def _write_idx(path: Path, keys: np.ndarray, offsets: np.ndarray) -> None:
    import pandas as pd

    pd.DataFrame({"k": keys, "o": offsets}).to_csv(path, sep="\t", header=False, index=False)


def write_generated_index(directory: Path, layout: str, counts: np.ndarray, seed: int = 0) -> None:
    """``train.rec``/``.idx``/``property`` with one tiny record per image, vectorised (no per-record Python)."""
    directory.mkdir(parents=True, exist_ok=True)
    n, c = int(counts.sum()), counts.shape[0]
    labels = np.repeat(np.arange(c), counts)
    if layout == "insightface":
        images = _frame(36, n, [("l0", "<f4"), ("l1", "<f4"), ("image", "V4")])
        images["flag"], images["id"] = 2, np.arange(1, n + 1)
        images["l0"], images["l1"], images["image"] = labels, 1.0, np.void(TINY_IMAGE)
        ids = _frame(32, c + 1, [("l0", "<f4"), ("l1", "<f4")])
        ends = np.cumsum(counts) + 1
        ids["flag"], ids["id"] = 2, np.r_[np.arange(n + 1, n + 1 + c), 0]
        ids["l0"], ids["l1"] = np.r_[ends - counts, n + 1], np.r_[ends, n + 1 + c]
        with open(directory / "train.rec", "wb") as handle:
            handle.write(images.tobytes())
            handle.write(ids.tobytes())
        keys = np.r_[np.arange(1, n + 1 + c), 0]
        image_bytes, id_bytes = images.dtype.itemsize, ids.dtype.itemsize
        offsets = np.r_[np.arange(n) * image_bytes, n * image_bytes + np.arange(c + 1) * id_bytes]
    else:
        order = np.random.default_rng(seed).permutation(n)  # shuffled write order, keys = ids = positions
        records = _frame(28, n, [("image", "V4")])
        records["id"], records["label"], records["image"] = order, labels[order], np.void(TINY_IMAGE)
        (directory / "train.rec").write_bytes(records.tobytes())
        keys, offsets = order, np.arange(n) * records.dtype.itemsize
    _write_idx(directory / "train.idx", keys, offsets)
    (directory / "property").write_text(f"{c},112,112\n")


MEASURE = textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    import torch
    from bench.config import SplitSettings
    from bench.profiling import PeakMemory
    from bench.data.recordio import RecordDataset
    from bench.data.splits import make_split
    imported = time.perf_counter()
    dataset = RecordDataset(sys.argv[1])
    labelled = time.perf_counter()
    shallow = make_split(dataset.labels, SplitSettings(name="shallow"))
    longtail = make_split(dataset.labels, SplitSettings(name="longtail"))
    done = time.perf_counter()
    print(json.dumps({"layout": dataset.layout, "images": len(dataset), "identities": shallow.stats["identities"],
                      "shallow_images": shallow.stats["images"], "longtail_images": longtail.stats["images"],
                      "import_s": imported - start, "labels_s": labelled - imported, "splits_s": done - labelled,
                      "total_s": done - imported,
                      # VmHWM, not getrusage: ru_maxrss survives exec on Linux, so a child of a big
                      # pytest process would report its parent's peak.
                      "peak_rss_mb": PeakMemory(torch.device("cpu")).peak_bytes() / 2**20}))
""")


@pytest.mark.parametrize("layout", ["insightface", "im2rec"])
def test_scale_labels_and_splits(tmp_path, layout, benchmark) -> None:
    counts = identity_counts(IMAGES, IDENTITIES)
    write_generated_index(tmp_path, layout, counts)
    # The generated file parses: its first record through the library's reader.
    header, image = RecordFile(tmp_path / "train.rec").header(1)
    assert image == TINY_IMAGE and header.id == 1

    def measure() -> dict:
        out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        return json.loads(out.stdout.strip().splitlines()[-1])

    # Fresh process and no labels cache: the cold-start cost (labels are cached after the first open).
    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    assert result["layout"] == layout and result["images"] == IMAGES and result["identities"] == IDENTITIES
    assert result["shallow_images"] == int(np.minimum(counts, 2).sum())
    print(f"\n[{layout}] {IMAGES:,} images / {IDENTITIES:,} identities: labels {result['labels_s']:.1f} s, "
          f"shallow + longtail {result['splits_s']:.1f} s, total {result['total_s']:.1f} s (target "
          f"{TARGET_TIME_S:.0f} s; imports {result['import_s']:.1f} s), peak RSS {result['peak_rss_mb']:.0f} MB")
    benchmark.extra_info.update(result, target_total_s=TARGET_TIME_S)
    assert result["peak_rss_mb"] < MEMORY_LIMIT_MB


LOADER_IMAGES, UNIQUE_FACES, BATCH, WORKERS, TIMED_STEPS = 1024, 256, 128, 2, 48


def _reference_faces(jpegs: list[bytes]) -> torch.Tensor:
    """Each written JPEG decoded by Pillow directly and normalised as ``(x / 255 - 0.5) / 0.5`` (the
    insightface convention), ``[faces, 3, S, S]`` float32."""
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs])
    return torch.from_numpy(decoded).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _assert_batch_is_written_faces(images: torch.Tensor, labels: torch.Tensor, faces: torch.Tensor,
                                   flipped: np.ndarray) -> None:
    """Image ``j`` equals one of the faces stored under label ``labels[j]`` (keys ``8 L .. 8 L + 7`` hold
    faces ``key % UNIQUE_FACES``), mirrored exactly where ``flipped[j]``."""
    for j in range(images.shape[0]):
        label = int(labels[j])
        candidates = faces[[(8 * label + k) % UNIQUE_FACES for k in range(8)]]
        if flipped[j]:
            candidates = candidates.flip(-1)
        assert any(torch.equal(images[j], face) for face in candidates), (j, label, bool(flipped[j]))


def test_loader_throughput(tmp_path, benchmark) -> None:
    """Catches a loader that serves wrong pixels (a decode, channel order or normalisation error), images
    under the wrong labels, or flips other than the seeded mask, while it is being timed."""
    # 256 rendered faces (rendering at 112 px takes ~30 ms each here), each stored 4 times under its own key.
    synth = SynthFace(SynthFaceConfig(seed=0, image_size=112, nuisance=1.0, twin_fraction=0.1))
    identities = torch.arange(LOADER_IMAGES) // 8
    faces = synth.render(identities[:UNIQUE_FACES], torch.arange(UNIQUE_FACES) % 8).images.permute(0, 2, 3, 1).numpy()
    jpegs = []
    for face in faces:
        buffer = io.BytesIO()
        Image.fromarray(face).save(buffer, format="JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key in np.random.default_rng(0).permutation(LOADER_IMAGES):
            writer.write(int(key), pack_payload(float(identities[key]), jpegs[key % UNIQUE_FACES], id=int(key)))
    write_property(tmp_path / "property", int(identities.max()) + 1, 112, 112)
    dataset = RecordDataset(tmp_path)
    trainset = EncodedTrainSet(dataset, np.arange(len(dataset)), info={}, workers=WORKERS)
    mean_jpeg_bytes = (tmp_path / "train.rec").stat().st_size / LOADER_IMAGES

    def run() -> dict:
        loader = BatchLoader(trainset, RandomBatchSampler(len(trainset), BATCH, seed=0), torch.device("cpu"), seed=0)
        for _ in range(2 * WORKERS):  # workers started and the prefetch queue primed
            next(loader)
        start = time.perf_counter()
        for _ in range(TIMED_STEPS):
            images, labels = next(loader)
        elapsed = time.perf_counter() - start
        loader.close()
        last_batch.update(images=images, labels=labels)
        return {"images_per_second": TIMED_STEPS * BATCH / elapsed, "workers": WORKERS, "batch_size": BATCH,
                "mean_record_bytes": mean_jpeg_bytes}

    last_batch: dict[str, torch.Tensor] = {}
    result = benchmark.pedantic(run, rounds=1, iterations=1)
    print(f"\nloader: {result['images_per_second']:.0f} img/s decoding 112x112 JPEGs (q95, "
          f"{mean_jpeg_bytes / 1024:.1f} KiB/record) with {WORKERS} workers, batch {BATCH}")
    benchmark.extra_info.update(result)
    images, labels = last_batch["images"], last_batch["labels"]
    assert images.shape == (BATCH, 3, 112, 112) and images.dtype == torch.float32
    # Batches are numbered from 0 (the primed ones included); the loader's seed is 0.
    number = 2 * WORKERS + TIMED_STEPS - 1
    _assert_batch_is_written_faces(images, labels, _reference_faces(jpegs), flip_mask(0, number, BATCH))
