"""``bench eval``: evaluate a checkpoint, or features computed elsewhere, on any protocol.

Models trained outside FaceBench are compared on the same code as ``bench run``'s: the same readers,
alignment, pooling, read-off rules and recorded conventions. Prints one JSON object (protocol -> metrics)
on stdout; ``--out FILE`` also writes it atomically.

- ``--checkpoint backbone.pth --backbone r50 --embedding-size 512 --input-size 112``: a backbone state
  dict (insightface's model-zoo ``backbone.pth`` loads with ``strict=True``), loaded with
  ``torch.load(weights_only=True)``, so a checkpoint cannot run code either.
- ``--features PATH`` (one protocol): for ``.bin`` protocols a ``.npy`` ``[2P, D]`` in pack order; for IJB a
  ``.npy`` ``[N, D]`` in the order of ``*_name_5pts_score.txt`` (eval_ijbc's ``img_feats``; the detector
  score and normalisation options still apply); for MegaFace a folder with ``facescrub/<path><ending>`` and
  ``megaface/<path><ending>`` devkit feature files (``gen_megaface.py``'s output).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from bench.cli.common import DataRootOption, DeviceOption, ProgressOption, err, one_line_errors, parse_sets


@one_line_errors
def eval_command(
    protocol: str = typer.Option(..., "--protocol", "-p", help="Comma-separated protocols (`bench list protocols`)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Backbone state dict (.pt/.pth) to evaluate."),
    backbone: str = typer.Option("r50", help="Backbone of the checkpoint (`bench list backbones`)."),
    embedding_size: int = typer.Option(512, "--embedding-size", help="Embedding size of the checkpoint."),
    input_size: int = typer.Option(112, "--input-size",
                                   help="The model's input size: every protocol resizes its images to it "
                                        "(synthetic benchmarks are rendered at it)."),
    features: Optional[Path] = typer.Option(None, "--features",
                                            help="Precomputed features for one protocol instead of a checkpoint "
                                                 "(.npy, or a MegaFace devkit feature folder)."),
    device: DeviceOption = "auto",
    batch_size: int = typer.Option(512, "--batch-size", help="Images per forward pass."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Flip test: f(x) + f(flip x)."),
    data_root: DataRootOption = None,
    set_: list[str] = typer.Option([], "--set", help="Evaluation options, e.g. --set eval.ijb_detector_score=false "
                                                     "--set eval.tar_read_off=at_most (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the metrics JSON to this file."),
    progress: ProgressOption = True,
) -> None:
    """Evaluate a checkpoint, or precomputed features, on any protocol; prints metrics JSON on stdout."""
    from bench.config import load_config
    from bench.eval import PROTOCOLS, build_protocol
    from bench.records import atomic_write_json
    from bench.errors import ConfigError

    if (checkpoint is None) == (features is None):
        raise ConfigError("give exactly one of --checkpoint (a model to run) or --features (precomputed features)")
    sets = parse_sets(set_)
    bad = [key for key in sets if not key.startswith(("eval.", "data."))]
    if bad:
        raise ConfigError(f"--set {bad[0]}: bench eval takes only eval.* and data.* keys")
    overrides: dict[str, Any] = {"eval.protocols": protocol, "eval.batch_size": batch_size, "eval.flip": flip,
                                 "data.synthface.image_size": input_size, "train.device": device, **sets}
    if data_root is not None:
        overrides["data.root"] = str(data_root)
    cfg = load_config(None, overrides)
    names = [PROTOCOLS.canonical(name) for name in cfg.eval.protocols]
    if features is not None and len(names) != 1:
        raise ConfigError(f"--features holds the features of one protocol; got {len(names)}: {', '.join(names)}")
    encoder = _load_checkpoint(checkpoint, backbone, embedding_size, input_size) if checkpoint is not None else None
    metrics: dict[str, Any] = {}
    for name in names:
        protocol = build_protocol(name, cfg.data, progress, cfg.eval, input_size=input_size)
        if encoder is None:
            metrics[name] = protocol.score_features(features, flip=f"precomputed, {features}")
        else:
            from bench.distributed import resolve_device

            target = resolve_device(cfg.train.device)
            metrics[name] = protocol.evaluate(encoder.to(target), target, cfg.eval.batch_size)
        metrics[name]["model"] = {"checkpoint": str(checkpoint), "backbone": backbone,
                                  "embedding_size": embedding_size, "input_size": input_size} \
            if checkpoint is not None else {"features": str(features)}
        err.print(f"evaluated {name}")
    if out is not None:
        atomic_write_json(out, metrics)
    typer.echo(json.dumps(metrics, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _load_checkpoint(path: Path, backbone: str, embedding_size: int, input_size: int):
    """The backbone with the checkpoint's weights (``weights_only`` loading, ``strict=True``)."""
    import pickle

    import torch

    from bench.backbones import build_backbone
    from bench.checkpoint import bare_state_dict
    from bench.errors import DataError

    model = build_backbone(backbone, embedding_size=embedding_size, input_size=input_size)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: not a weights-only torch checkpoint ({str(exc).strip().splitlines()[0]})") from None
    state = bare_state_dict(state, path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ (another embedding size or input size)
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise DataError(f"{path}: does not match backbone '{backbone}' (embedding {embedding_size}, input "
                        f"{input_size}): {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        first = (result.missing_keys or result.unexpected_keys)[0]
        raise DataError(f"{path}: does not match backbone '{backbone}' (embedding {embedding_size}, input "
                        f"{input_size}): {len(result.missing_keys)} missing and {len(result.unexpected_keys)} "
                        f"unexpected keys, e.g. '{first}'")
    return model
