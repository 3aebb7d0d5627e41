"""Sub-center ArcFace's purification (methods/subcenter.py) and the harness's curation step (bench/curation.py).

References are independent: dominant sub-centers and kept images from hand-placed vectors, the loss after
purification from ArcFace's closed form over the kept classes written plainly here, precision/recall from
hand counts, and a resumed run against the uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench.cli import app
from bench.curation import Curation, curation_report
from bench.data.sampler import ClassBalancedBatchSampler, CuratedSampler, RandomBatchSampler
from bench.records import iter_records
from methods.base import MethodContext, build_method
from methods.registry import ConfigError
from methods.subcenter import SubCenterArcFace

runner = CliRunner()


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def _head_with_centers(centers_deg: list[list[float]], s: float = 8.0, m: float = 0.3) -> SubCenterArcFace:
    """A 2-D head whose class c has sub-centers at the given angles (degrees)."""
    k = len(centers_deg[0])
    head = SubCenterArcFace(2, len(centers_deg), k=k, s=s, m=m)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([_unit(a) for row in centers_deg for a in row]))
    return head


def test_purify_picks_the_sub_center_most_images_vote_for_and_drops_beyond_the_angle():
    """Class 0's sub-centers at 0, 90 and 180 degrees: three images nearest the 90-degree one, two nearest
    0 degrees. The dominant sub-center is the one with most votes (90), not the one nearest the class mean
    or the first; images more than 75 degrees from it are dropped (one at 10 degrees: 80 away; one at 170:
    80 away), one at exactly 20 degrees is 70 away and kept. Class 1's only images are all beyond 75 degrees
    of its dominant sub-center, so the class is removed. Catches a mean-based or first-index dominant
    choice, a threshold in radians or on the wrong side, and a removed class left in the softmax."""
    head = _head_with_centers([[0.0, 90.0, 180.0], [45.0, 200.0, 300.0]])
    angles = [80.0, 95.0, 100.0, 10.0, 20.0, 170.0,    # class 0 (votes: 90, 90, 90, 0, 0, 180)
              130.0, 131.0]                             # class 1: nearest 200 -> dominant 200, both 69-70 away
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    embeddings = torch.tensor([_unit(a) for a in angles])
    keep = head.purify(embeddings, labels, drop_angle_deg=75.0)
    # class 0: dominant 90 -> kept 80, 95, 100 (10, 5, 10 deg away) and 20 (70); dropped 10 (80) and 170 (80)
    assert keep.tolist() == [True, True, True, False, True, False, True, True]
    assert head.dominant.tolist() == [1, 1]
    assert head.active.tolist() == [True, True]
    keep = head.purify(embeddings, labels, drop_angle_deg=65.0)  # class 1's images are 69-70 deg away
    assert keep[6:].tolist() == [False, False] and head.active.tolist() == [True, False]


def _arcface_loss_float64(x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, classes: list[int],
                          s: float, m: float) -> torch.Tensor:
    """Mean ArcFace loss over the given classes only (ArcFace paper Eq. 3), one sample at a time."""
    losses = []
    for xi, yi in zip(x, labels.tolist()):
        xi = xi / xi.norm()
        logits = []
        for c in classes:
            cos = torch.dot(xi, centers[c] / centers[c].norm()).clamp(-1, 1)
            if c == yi:
                theta = torch.acos(cos)
                cos = torch.cos(theta + m) if theta + m <= math.pi else cos - m * math.sin(m)
            logits.append(s * cos)
        logits = torch.stack(logits)
        losses.append(torch.logsumexp(logits, 0) - logits[classes.index(yi)])
    return torch.stack(losses).mean()


def test_after_purification_the_head_is_arcface_on_dominant_centers_without_removed_classes(float64_default):
    """K = 1 after purification: the loss (and the embeddings' gradient) equals ArcFace's over the dominant
    sub-centers alone, the removed class absent from the softmax. Catches the max over all K still used, a
    non-dominant row used, and a removed class still a negative."""
    torch.manual_seed(0)
    head = SubCenterArcFace(6, 4, k=3, s=16.0, m=0.4)
    head.dominant.copy_(torch.tensor([2, 0, 1, 1]))
    head.active.copy_(torch.tensor([True, True, False, True]))
    x = torch.randn(5, 6, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 0, 3])
    loss = head(x, labels)
    (grad,) = torch.autograd.grad(loss, x)
    centers = head.weight.detach().view(4, 3, 6)[torch.arange(4), head.dominant]
    x_ref = x.detach().clone().requires_grad_(True)
    expected = _arcface_loss_float64(x_ref, centers, labels, [0, 1, 3], 16.0, 0.4)
    (grad_ref,) = torch.autograd.grad(expected, x_ref)
    assert torch.allclose(loss, expected, atol=1e-10)
    assert torch.allclose(grad, grad_ref, atol=1e-10)
    # before purification: the max over the sub-centers (a different loss here)
    fresh = SubCenterArcFace(6, 4, k=3, s=16.0, m=0.4)
    fresh.weight.data.copy_(head.weight.data)
    assert not torch.allclose(fresh(x, labels), loss)


def test_purified_state_is_in_the_state_dict():
    """A checkpoint restores the dominant sub-centers and the removed classes (resume after purification)."""
    head = SubCenterArcFace(4, 3, k=2)
    head.dominant.copy_(torch.tensor([1, 0, 1]))
    head.active.copy_(torch.tensor([True, False, True]))
    other = SubCenterArcFace(4, 3, k=2)
    other.load_state_dict(head.state_dict())
    assert other.dominant.tolist() == [1, 0, 1] and other.active.tolist() == [True, False, True]


def _ctx(steps: int = 100) -> MethodContext:
    return MethodContext(num_classes=10, embedding_size=8, global_batch_size=16, total_steps=steps)


def test_drop_at_sets_the_curation_step_and_bad_values_are_one_line():
    method = build_method("subcenter", torch.nn.Identity(), _ctx(), {"drop_at": 0.6})
    assert method.curation_step == 60
    assert build_method("subcenter", torch.nn.Identity(), _ctx(), {}).curation_step is None
    for cfg, fragment in [({"drop_at": 1.0}, "drop_at must be in [0, 1)"),
                          ({"drop_at": 0.001}, "needs a step in [1, 99]"),
                          ({"drop_angle_deg": 0}, "drop_angle_deg must be in (0, 180)")]:
        with pytest.raises(ConfigError, match=None) as info:
            build_method("subcenter", torch.nn.Identity(), _ctx(), cfg)
        assert fragment in str(info.value) and "\n" not in str(info.value)


def test_curation_report_counts_against_the_flipped_labels():
    """Hand counts: 10 images, 4 dropped of which 3 flipped; 5 flipped in all -> precision 3/4, recall 3/5;
    class 2 (images 8, 9) lost all its images. Catches precision and recall swapped, counts over the kept
    set, and emptied classes not counted."""
    keep = np.array([1, 1, 0, 1, 1, 0, 1, 1, 0, 0], dtype=bool)
    flipped = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0], dtype=bool)
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    report = curation_report(7, keep, labels, flipped)
    assert report["dropped"] == 4 and report["images"] == 10 and report["classes_removed"] == 1
    noise = report["label_noise"]
    assert noise["precision"] == pytest.approx(3 / 4) and noise["recall"] == pytest.approx(3 / 5)
    assert noise["flipped"] == 5 and noise["flipped_kept"] == 2 and noise["flipped_fraction"] == 0.5
    assert "label_noise" not in curation_report(7, keep, labels, None)
    nothing = curation_report(7, np.ones(10, bool), labels, flipped)
    assert nothing["label_noise"]["precision"] is None


def test_curation_state_round_trips_through_weights_only_loading(tmp_path):
    report = curation_report(12, np.array([True, False, True]), np.array([0, 0, 1]), np.array([False, True, False]))
    curation = Curation(step=12, keep=np.array([True, False, True]), report=report)
    torch.save(curation.state(), tmp_path / "c.pt")
    back = Curation.from_state(torch.load(tmp_path / "c.pt", weights_only=True))
    assert back.step == 12 and back.keep.tolist() == [True, False, True] and back.report == report


@pytest.mark.parametrize("inner", ["random", "balanced"])
def test_curated_sampler_serves_only_kept_images_and_numbers_batches_globally(inner):
    labels = np.repeat(np.arange(12), 3)
    kept = np.flatnonzero(np.arange(36) % 4 != 1)
    base = (RandomBatchSampler(len(kept), 6, seed=3) if inner == "random"
            else ClassBalancedBatchSampler(labels[kept], 6, 2, seed=3))
    sampler = CuratedSampler(base, kept, first_batch=20)
    assert sampler.batches_served == 20
    batches = [b for _, b in zip(range(8), sampler)]
    assert all(np.isin(b, kept).all() for b in batches)
    assert sampler.batches_served == 28 and sampler.state_dict()["batches_served"] == 28
    resumed = CuratedSampler(RandomBatchSampler(len(kept), 6, seed=3) if inner == "random"
                             else ClassBalancedBatchSampler(labels[kept], 6, 2, seed=3), kept, first_batch=20)
    resumed.load_state_dict({**resumed.state_dict(), "batches_served": 25})
    assert all(np.array_equal(a, b) for a, b in zip(batches[5:], resumed))
    with pytest.raises(ConfigError, match="before the curation"):
        resumed.load_state_dict({**resumed.state_dict(), "batches_served": 3})


# ---------------------------------------------------------------------------------------- end to end

STEPS, BATCH = 24, 16
RUN = ["--methods", "subcenter", "--budget", str(STEPS * BATCH), "--batch-size", str(BATCH), "--device", "cpu",
       "--no-progress", "--eval", "synth-lfw", "--ckpt-every", "8",
       "--set", "data.synthface.num_identities=24", "--set", "data.synthface.images_per_identity=4",
       "--set", "data.synthface.label_noise=0.25", "--set", "train.embedding_size=32",
       "--set", "train.log_every=4", "--set", "train.deterministic=true", "--set", "train.threads=1",
       "--set", "method_params.subcenter.drop_at=0.5", "--set", "method_params.subcenter.drop_angle_deg=80"]


class _Crash(BaseException):
    pass


def _run(tmp_path, name: str, crash_after: int | None = None, monkeypatch=None):
    from bench.train import Trainer
    args = ["run", *RUN, "--out", str(tmp_path / name), "--data-root", str(tmp_path / "data")]
    if crash_after is None:
        return runner.invoke(app, args)
    update = Trainer.update

    def hooked(self):
        update(self)
        if self.steps_done == crash_after:
            raise _Crash

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "update", hooked)
        with pytest.raises(_Crash):
            runner.invoke(app, args, catch_exceptions=False)
    (run_dir,) = [p for p in (tmp_path / name).iterdir() if p.is_dir()]
    return run_dir


@pytest.mark.slow
def test_bench_run_purifies_records_and_resumes_exactly(tmp_path, tiny_eval, monkeypatch):
    """`bench run` with ``drop_at`` curates once after step 12: curation.json (and perf.json) hold the drop
    counts and precision/recall against SynthFace's flipped labels, recomputed here from the kept mask the
    method returned and the labels SynthFace flipped; every batch after step 12 holds kept images only;
    and runs crashed before the curation (resumed from step 8) and after it (resumed from 16) end with the
    uninterrupted run's train.jsonl and metrics. Catches the curation not run or run twice, the sampler not
    switched (or not restored on resume), the dominant sub-centers not checkpointed, and a report not
    scored against the true flips."""
    import bench.curation
    import bench.runner

    captured, served = [], []
    curate = bench.curation.curate_trainset

    def spy_curate(method, trainset, device, step):
        result = curate(method, trainset, device, step)
        captured.append((result, trainset.labels.numpy().copy(), trainset.label_flipped.copy()))
        return result

    class SpySlice(bench.runner.RankSlice):
        def __iter__(self):
            for batch in super().__iter__():
                served.append((self.sampler.batches_served, batch.copy()))
                yield batch

    monkeypatch.setattr(bench.runner, "curate_trainset", spy_curate)
    monkeypatch.setattr(bench.runner, "RankSlice", SpySlice)
    result = _run(tmp_path, "plain")
    assert result.exit_code == 0, result.output
    assert "curated the training data after step 12" in result.output
    (record,) = iter_records(tmp_path / "plain")
    (curation, labels, flipped), = captured
    assert curation.step == 12
    report = json.loads((Path(record["path"]) / "curation.json").read_text())
    assert report == record["perf"]["curation"]
    dropped = ~curation.keep
    assert report["dropped"] == int(dropped.sum()) > 0
    assert report["label_noise"]["flipped"] == int(flipped.sum()) == round(0.25 * len(labels))
    assert report["label_noise"]["precision"] == pytest.approx((dropped & flipped).sum() / dropped.sum())
    assert report["label_noise"]["recall"] == pytest.approx((dropped & flipped).sum() / flipped.sum())
    # the ground truth handed to the report marks exactly the images whose trained label is not their
    # identity's (recomputed from the rendered split's identities)
    assert np.array_equal(flipped, labels != _clean(record))
    after = [batch for number, batch in served if number > 12]
    assert len(after) == STEPS - 12 and all(curation.keep[batch].all() for batch in after)
    assert not all(curation.keep[batch].all() for number, batch in served if number <= 12)

    plain_train = [{k: v for k, v in e.items() if k != "img_s"} for e in record["train"]]
    for name, crash in [("early", 10), ("late", 18)]:
        run_dir = _run(tmp_path, name, crash_after=crash)
        result = runner.invoke(app, ["run", "--resume", str(run_dir), "--no-progress"])
        assert result.exit_code == 0, result.output
        (resumed,) = iter_records(tmp_path / name)
        assert [{k: v for k, v in e.items() if k != "img_s"} for e in resumed["train"]] == plain_train, name
        assert resumed["metrics"] == record["metrics"], name
        assert json.loads((run_dir / "curation.json").read_text()) == report


def _clean(record) -> np.ndarray:
    """The clean class of every training image, from the split SynthFace trained (data.json's recipe is not
    enough; the trainset is rebuilt from the run's own configuration)."""
    from bench.config import load_config
    from bench.data.catalog import build_trainset
    cfg = load_config(Path(record["path"]) / "config.yaml")
    trainset = build_trainset(cfg.data, False)
    return np.unique(trainset.identities, return_inverse=True)[1]
