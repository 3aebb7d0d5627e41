"""``bench invert``: ArcFace's feature inversion (:mod:`bench.invert`) on a trained backbone.

Loads the backbone of a run directory's newest checkpoint (``--run results/<run-id>``) or of a checkpoint
file (``--checkpoint``: a FaceBench checkpoint, or a bare backbone state dict as ``bench eval`` reads), takes
as targets the normalised mean embeddings of held-out SynthFace identities (evaluation namespace, ids from
700,000), generates one image per identity from its target with the network gradient and the BN prior, and
writes ``OUT/inversion.png`` (each real face beside its generated one) and ``OUT/inversion.json`` (rank-1 of
the generated images against a gallery of other real images of the same and of distractor identities,
cosine of each generated embedding to its target, settings, time). Prints one summary line on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli.common import DeviceOption, err, one_line_errors


@one_line_errors
def invert_command(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="A checkpoint file: a run's results/<run-id>/checkpoints/step*-rank0.pt, or a "
                                   "bare backbone state dict (then give --backbone, --embedding-size, --input-size)."),
    run: Optional[Path] = typer.Option(None, "--run", help="A run directory results/<run-id>: its newest "
                                                             "checkpoint, backbone and input size."),
    identities: int = typer.Option(8, "--identities", help="Held-out SynthFace identities to invert."),
    steps: int = typer.Option(300, "--steps", help="Adam steps on the images."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder. Default: <run>/inversion, or "
                                                           "./inversion for a checkpoint outside a run.",
                                       show_default=False),
    device: DeviceOption = None,
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default 0.05).", show_default=False),
    bn_weight: Optional[float] = typer.Option(None, "--bn-weight", help="Weight of the BN-statistics prior "
                                                                         "(default 0.001).", show_default=False),
    tv_weight: Optional[float] = typer.Option(None, "--tv-weight", help="Weight of the total-variation prior "
                                                                         "(default 0.001).", show_default=False),
    jitter: Optional[int] = typer.Option(None, "--jitter", help="Random shift of the images by up to this many "
                                                               "pixels per step (default 2).", show_default=False),
    distractors: int = typer.Option(50, "--distractors", help="Distractor identities in the rank-1 gallery."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone (default: the run's).",
                                           show_default=False),
    embedding_size: Optional[int] = typer.Option(None, "--embedding-size", help="Embedding size (default: the "
                                                                                 "run's).", show_default=False),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Input side in px (default: the run's "
                                                                         "SynthFace image size).",
                                             show_default=False),
) -> None:
    """Generate faces from held-out identities' embeddings with the BN prior (ArcFace's feature inversion)."""
    from bench.errors import BenchError, ConfigError

    if (checkpoint is None) == (run is None):
        raise ConfigError("give exactly one of --checkpoint (a checkpoint file) or --run (a run directory)")
    checks = (("--identities", identities, 1), ("--steps", steps, 0), ("--distractors", distractors, 0),
              ("--jitter", jitter or 0, 0))
    for name, value, low in checks:
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    run_dir = _run_dir(run, checkpoint)
    if checkpoint is not None and not checkpoint.is_file():
        raise BenchError(f"{checkpoint}: checkpoint not found" if not checkpoint.exists()
                         else f"{checkpoint}: not a file (give a run directory with --run)")

    from bench import invert as inv
    from bench.config import load_config
    from bench.distributed import resolve_device
    from bench.records import atomic_write_json

    cfg = load_config(run_dir / "config.yaml" if run_dir is not None else None)
    backbone = backbone or cfg.train.backbone
    embedding_size = embedding_size or cfg.train.embedding_size
    if input_size is None:
        if cfg.data.dataset != "synthface":
            raise ConfigError(f"the run trained on '{cfg.data.dataset}', not SynthFace: give its input size with "
                              "--input-size")
        input_size = cfg.data.synthface.image_size
    target = resolve_device(device or "auto")
    if checkpoint is None:
        checkpoint, _ = inv.newest_checkpoint_file(run_dir)
    loaded = inv.load_backbone(checkpoint, backbone, embedding_size, input_size)
    out = out if out is not None else (run_dir / "inversion" if run_dir is not None else Path("inversion"))
    err.print(f"inverting {identities} held-out identities with {backbone} ({checkpoint}) on {target}")
    record, real, generated = inv.run_inversion(
        loaded, cfg.data.synthface, identities, steps, seed, target,
        lr=inv.DEFAULT_LR if lr is None else lr,
        bn_weight=inv.DEFAULT_BN_WEIGHT if bn_weight is None else bn_weight,
        tv_weight=inv.DEFAULT_TV_WEIGHT if tv_weight is None else tv_weight,
        jitter=inv.DEFAULT_JITTER if jitter is None else jitter,
        distractors=distractors)
    try:
        out.mkdir(parents=True, exist_ok=True)
        inv.save_grid(real, generated, out / "inversion.png")
        atomic_write_json(out / "inversion.json", record)
    except OSError as exc:
        raise BenchError(f"{out}: cannot write the inversion ({exc.strerror or exc})") from None
    ref = record["reference"]
    typer.echo(f"inversion: {identities} identities, {steps} steps: rank-1 {record['identity_rank1']:.3f} "
               f"(real images {ref['real_image_rank1']:.3f}, initial noise {ref['noise_rank1']:.3f}, chance "
               f"{ref['chance_rank1']:.3f}), mean cosine to target {record['mean_cosine_to_target']:.3f}; "
               f"{record['time_s']['total']:.1f} s; wrote {out / 'inversion.png'} and {out / 'inversion.json'}")


def _run_dir(run: Optional[Path], checkpoint: Optional[Path]) -> Optional[Path]:
    """The run directory: ``--run`` (which must hold config.yaml), or the run a checkpoint file lies in
    (``<run>/checkpoints/<file>``), else None."""
    from bench.errors import BenchError

    if run is not None:
        if not run.is_dir():
            raise BenchError(f"{run}: run directory not found")
        if not (run / "config.yaml").is_file():
            raise BenchError(f"{run}: not a run directory (no config.yaml)")
        return run
    assert checkpoint is not None
    parent = checkpoint.parent
    if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file():
        return parent.parent
    return None
