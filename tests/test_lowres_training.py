"""``data.synthface.lowres_fraction``: very-low-resolution training faces (bench/data/synth_trainset.py), and
its fingerprint rule (records made before the key existed keep their fingerprint)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bench.config import load_config
from bench.data.synth_trainset import lower_resolution


def test_lower_resolution_degrades_the_chosen_fraction_by_its_definition():
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    out, sides = lower_resolution(images, 0.25, 8, seed=3)
    touched = np.flatnonzero(sides < 32)
    assert touched.shape[0] == 10 and sides[touched].min() >= 8 and sides[touched].max() < 32
    untouched = torch.from_numpy(np.flatnonzero(sides == 32))
    assert torch.equal(out[untouched], images[untouched])
    i = int(touched[0])
    side = int(sides[i])
    small = F.interpolate(images[i:i + 1].float(), size=(side, side), mode="bilinear", align_corners=False,
                          antialias=True).round().clamp(0, 255)
    back = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False).round().clamp(0, 255)
    assert torch.equal(out[i:i + 1], back.to(torch.uint8))
    again, _ = lower_resolution(images, 0.25, 8, seed=3)
    assert torch.equal(again, out)                         # deterministic per seed
    assert not torch.equal(lower_resolution(images, 0.25, 8, seed=4)[0], out)


def test_lowres_keys_are_fingerprint_neutral_only_when_off():
    base = load_config(None, {}).fingerprint()
    assert load_config(None, {"data.synthface.lowres_min_px": 12}).fingerprint() == base   # no effect when off
    on = load_config(None, {"data.synthface.lowres_fraction": 0.5}).fingerprint()
    assert on != base
    assert load_config(None, {"data.synthface.lowres_fraction": 0.5,
                              "data.synthface.lowres_min_px": 12}).fingerprint() != on
