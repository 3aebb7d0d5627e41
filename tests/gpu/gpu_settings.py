"""Settings shared by the GPU checks in ``tests/gpu`` (issue 19): the device, the sizes, the results file.

The checks run where CUDA is available and are skipped elsewhere (``tests/gpu/conftest.py``), so CI on a
CPU lists them as skipped. ``scripts/gpu_check.sh`` runs them on a GPU machine; ``scripts/gpu_check.sh
--cpu-dry-run`` runs them on CPU at tiny sizes to prove the script before it meets a GPU.

Environment variables:

- ``FACEBENCH_GPU_TESTS_DEVICE=cpu``: run the checks on CPU even without CUDA. Only the dry run sets it;
  there, every "CUDA equals CPU" comparison compares CPU with CPU and passes trivially, and AMP is off
  (``bench.train.Trainer`` uses float16 autocast on CUDA only): the dry run proves the code paths and the
  plumbing, not the numbers. No other value is accepted.
- ``FACEBENCH_GPU_TESTS_OUT=DIR``: write :data:`RESULTS_FILE` (measured values and test outcomes) into
  ``DIR``, rewritten after every test so that a run cut short by a timeout still leaves its results.
- ``FACEBENCH_GPU_<FIELD>`` for each field of :class:`GpuSizes` (e.g. ``FACEBENCH_GPU_PFC_CLASSES=20000``):
  the sizes. Defaults: issue 19's (50 AMP steps, Partial FC at 1M classes, IJB-C's 23,124 templates and
  15,658,489 pairs, MegaFace's 3,530 probes and 1M distractors) and the GPU preset's backbone, input size
  and embedding size (``results/baselines/gpu.yaml``: r50, 112 x 112, 512).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.config import RunConfig, load_config
from bench.records import atomic_write_json

#: The GPU regression preset: the configuration the checks follow (backbone, input size, AMP, SGD).
GPU_PRESET = Path(__file__).resolve().parents[2] / "results" / "baselines" / "gpu.yaml"
DEVICE_ENV = "FACEBENCH_GPU_TESTS_DEVICE"
OUT_ENV = "FACEBENCH_GPU_TESTS_OUT"
SIZE_ENV_PREFIX = "FACEBENCH_GPU_"
RESULTS_FILE = "gpu_tests.json"
SKIP_REASON = "CUDA is not available (the GPU check runs on a GPU machine: scripts/gpu_check.sh)"


@dataclass(frozen=True)
class GpuSizes:
    """Sizes of the GPU checks; each field can be overridden by ``FACEBENCH_GPU_<FIELD>``."""

    #: Backbone, input side and embedding of the AMP training and evaluation checks ("" = the GPU preset's).
    backbone: str = ""
    image_size: int = 0
    embedding_size: int = 0
    #: AMP training: steps (issue 19), batch, and the SynthFace pool it trains on (identities x images).
    train_steps: int = 50
    train_batch: int = 64
    train_identities: int = 64
    train_images_per_identity: int = 4
    #: Losses averaged at each end of the curve, and the fraction by which the mean must fall. On the CPU
    #: (small backbone, 32 px, 32 identities, 50 steps) the means fell by 44-100 % with learning, and moved
    #: by -13 % to +6 % with the learning rate set to 0 (queues filling, batches differing): 20 % separates.
    loss_window: int = 5
    min_loss_fall: float = 0.2
    #: Head equality CUDA vs CPU: classes and batch of the random inputs (of embedding_size dims).
    head_classes: int = 1000
    head_batch: int = 64
    #: Partial FC at scale (C; D, batch and rate are tests/benchmarks/test_bench_partial_fc.py's).
    pfc_classes: int = 1_000_000
    #: Evaluation: encoder features of eval_identities x eval_images_per_identity rendered faces, from
    #: which IJB-C-sized templates and pairs and MegaFace-sized probes and distractors are built.
    eval_identities: int = 32
    eval_images_per_identity: int = 4
    #: insightface's IJB-C meta files: ijbc_face_tid_mid.txt templates, ijbc_template_pair_label.txt pairs.
    ijbc_templates: int = 23_124
    ijbc_pairs: int = 15_658_489
    #: MegaFace Challenge 1: FaceScrub probes (80 people) and the largest distractor set.
    megaface_probes: int = 3_530
    megaface_distractors: int = 1_000_000


def gpu_preset() -> RunConfig:
    """The GPU regression preset, validated (as ``bench run --config results/baselines/gpu.yaml`` reads it)."""
    return load_config(GPU_PRESET)


def read_sizes(environ: dict[str, str] | None = None) -> GpuSizes:
    """:class:`GpuSizes` with ``FACEBENCH_GPU_<FIELD>`` overrides and the preset's model defaults filled in."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for item in dataclasses.fields(GpuSizes):
        name = SIZE_ENV_PREFIX + item.name.upper()
        if name not in environ:
            continue
        kind = type(item.default)  # int, float or str
        try:
            values[item.name] = kind(environ[name].strip())
        except ValueError:
            raise ValueError(f"{name} must be {kind.__name__}, got {environ[name]!r}") from None
    sizes = GpuSizes(**values)
    preset = gpu_preset()
    train, synthface = preset.train, preset.data.synthface
    return dataclasses.replace(sizes, backbone=sizes.backbone or train.backbone,
                               image_size=sizes.image_size or synthface.image_size,
                               embedding_size=sizes.embedding_size or train.embedding_size)


def check_device(environ: dict[str, str] | None = None) -> torch.device | None:
    """The device the checks run on: CUDA when available, CPU under the dry run's override, else None."""
    environ = os.environ if environ is None else environ
    override = environ.get(DEVICE_ENV, "")
    if override not in ("", "cpu"):
        raise ValueError(f"{DEVICE_ENV} accepts only 'cpu' (the dry run of scripts/gpu_check.sh), got {override!r}")
    if override == "cpu":
        return torch.device("cpu")
    return torch.device("cuda") if torch.cuda.is_available() else None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings and memory readings must see it done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ResultsLog:
    """Measured values and test outcomes of one session, written to ``$FACEBENCH_GPU_TESTS_OUT`` as JSON."""

    def __init__(self, device: torch.device | None, sizes: GpuSizes | None, out_dir: str | None) -> None:
        self.path = Path(out_dir) / RESULTS_FILE if out_dir else None
        self.document: dict[str, Any] = {
            "format": 1, "dry_run": device is not None and device.type == "cpu",
            "device": str(device), "environment": _environment(device),
            "sizes": dataclasses.asdict(sizes) if sizes else None, "outcomes": {}, "results": {}}

    def record(self, name: str, values: dict[str, Any]) -> None:
        """Store the values measured by one check (and print them, for the log)."""
        self.document["results"][name] = values
        print(f"\n[gpu-check] {name}: {values}", file=sys.stderr)
        self.write()

    def outcome(self, nodeid: str, outcome: str) -> None:
        self.document["outcomes"][nodeid] = outcome
        self.write()

    def write(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.document)


def _environment(device: torch.device | None) -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "machine": platform.machine(), "cpu_count": os.cpu_count()}
    if device is not None and device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=properties.name,
                    gpu_memory_bytes=properties.total_memory,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def render_faces(identities: int, images_per_identity: int, image_size: int, namespace: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 SynthFace images ``[N, 3, S, S]`` of the GPU preset's world, and their identity labels ``[N]``:
    ``images_per_identity`` images of each of ``identities`` identities of ``namespace``, identity-major."""
    from bench.data.synth_trainset import synthface_config
    from bench.data.synthface import SynthFace

    config = dataclasses.replace(synthface_config(gpu_preset().data.synthface), image_size=image_size)
    labels = torch.arange(identities).repeat_interleave(images_per_identity)
    samples = torch.arange(images_per_identity).repeat(identities)
    return SynthFace(config).render(labels, samples, namespace).images, labels
