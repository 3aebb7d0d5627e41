"""Benchmark file formats: pure readers and writers, no protocol logic.

- :mod:`bench.eval.formats.images`: image files (decode, encode with Pillow, resize with torch);
- :mod:`bench.eval.formats.bin`: insightface's ``.bin`` verification packs (restricted unpickler, py2 writer);
- :mod:`bench.eval.formats.ijb_meta`: the meta files of insightface's IJB-B / IJB-C package;
- :mod:`bench.eval.formats.megaface_files`: the MegaFace devkit's lists, noise lists and feature files.

Nothing here imports a protocol (:mod:`bench.eval` or its protocol modules) or a synthetic generator: the
protocols and the generators import the formats (ours: issue 14, the .bin codec lived in the LFW protocol
module, which the synth-lfw generator imported while the protocol imported the generator, an import
circle). ``tests/test_architecture.py`` checks that direction.
"""
