"""``bench invert``: ArcFace's feature inversion (:mod:`bench.invert`) on a trained backbone.

Loads the backbone of a run directory's newest checkpoint (``--run results/<run-id>``) or of a checkpoint
file (``--checkpoint``: a FaceBench checkpoint, or a bare backbone state dict as ``bench eval`` reads), takes
as targets the normalised mean embeddings of held-out SynthFace identities (evaluation namespace, ids from
700,000), generates one image per identity from its target with the network gradient and the BN prior, and
writes ``OUT/inversion.png`` (each real face beside its generated one) and ``OUT/inversion.json`` (rank-1 of
the generated images against a gallery of other real images of the same and of distractor identities,
cosine of each generated embedding to its target, settings, time; with ``--verifier <run>``, the same rank-1
under that second run's independently trained model). Prints one summary line on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from bench.cli.common import DeviceOption, err, one_line_errors

if TYPE_CHECKING:
    from bench.invert import InversionSettings


def _setting(flag: str, text: str) -> Any:
    """An optional flag of :class:`bench.invert.InversionSettings` (None: the dataclass's default, which
    ``text`` states; ``tests/test_invert.py`` checks that it does)."""
    return typer.Option(None, flag, help=text, show_default=False)


@one_line_errors
def invert_command(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="A checkpoint file: a run's results/<run-id>/checkpoints/step*-rank0.pt, or a "
                                   "bare backbone state dict (then give --backbone, --embedding-size, --input-size)."),
    run: Optional[Path] = typer.Option(None, "--run", help="A run directory results/<run-id>: its newest "
                                                             "checkpoint, backbone and input size."),
    identities: int = typer.Option(8, "--identities", help="Held-out SynthFace identities to invert."),
    steps: Optional[int] = _setting("--steps", "Adam steps on the images (default 1000)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise and of the random views."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder. Default: <run>/inversion, or "
                                                           "./inversion for a checkpoint outside a run.",
                                       show_default=False),
    device: DeviceOption = None,
    lr: Optional[float] = _setting("--lr", "Peak Adam learning rate (default 0.05)."),
    bn_weight: Optional[float] = _setting("--bn-weight", "Weight of the BN-statistics prior (default 0.01)."),
    first_bn_multiplier: Optional[float] = _setting("--first-bn-multiplier",
                                                    "Extra factor on the first BN layer's term (default 10)."),
    tv_weight: Optional[float] = _setting("--tv-weight", "Weight of the total-variation prior (default 0.01)."),
    jitter: Optional[int] = _setting("--jitter", "Random shift by up to this many pixels per step (default 2)."),
    flip: Optional[bool] = _setting("--flip/--no-flip", "Random horizontal flips (default on)."),
    scale: Optional[float] = _setting("--scale", "Random zoom by up to this fraction per step (default 0.1)."),
    rotate: Optional[float] = _setting("--rotate", "Random rotation by up to this many degrees per step "
                                                   "(default 10)."),
    verifier: Optional[Path] = typer.Option(
        None, "--verifier", help="A second run directory whose model also scores the generated images' identity "
                                 "(an independent check: the inversion optimises the first model's embedding).",
        show_default=False),
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
    for name, value, low in (("--identities", identities, 1), ("--distractors", distractors, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    settings = _settings(steps=steps, lr=lr, bn_weight=bn_weight, first_bn_multiplier=first_bn_multiplier,
                         tv_weight=tv_weight, jitter=jitter, flip=flip, scale=scale, rotate_deg=rotate)
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
    checker = None
    if verifier is not None:
        verifier_dir = _run_dir(verifier, None)
        assert verifier_dir is not None
        verifier_cfg = load_config(verifier_dir / "config.yaml")
        checker = inv.load_backbone(inv.newest_checkpoint_file(verifier_dir)[0], verifier_cfg.train.backbone,
                                    verifier_cfg.train.embedding_size, input_size)
    err.print(f"inverting {identities} held-out identities with {backbone} ({checkpoint}) on {target}")
    record, real, generated = inv.run_inversion(loaded, cfg.data.synthface, identities, settings, seed, target,
                                                distractors=distractors, verifier=checker)
    try:
        out.mkdir(parents=True, exist_ok=True)
        inv.save_grid(real, generated, out / "inversion.png")
        atomic_write_json(out / "inversion.json", record)
    except OSError as exc:
        raise BenchError(f"{out}: cannot write the inversion ({exc.strerror or exc})") from None
    ref = record["reference"]
    checked = ""
    if "verifier" in record:
        checked = (f"; verifier {record['verifier']['model']['backbone']}: rank-1 "
                   f"{record['verifier']['identity_rank1']:.3f} (real images {record['verifier']['real_image_rank1']:.3f})")
    typer.echo(f"inversion: {identities} identities, {settings.steps} steps: rank-1 {record['identity_rank1']:.3f} "
               f"(real images {ref['real_image_rank1']:.3f}, initial noise {ref['noise_rank1']:.3f}, chance "
               f"{ref['chance_rank1']:.3f}), mean cosine to target {record['mean_cosine_to_target']:.3f}{checked}; "
               f"{record['time_s']['total']:.1f} s; wrote {out / 'inversion.png'} and {out / 'inversion.json'}")


def _settings(**overrides: object) -> InversionSettings:
    """:class:`bench.invert.InversionSettings` with the options given (None: the default); an option out of
    range is one ConfigError line naming it."""
    from bench.errors import ConfigError
    from bench.invert import InversionSettings

    flags = {"steps": "--steps", "lr": "--lr", "bn_weight": "--bn-weight", "first_bn_multiplier":
             "--first-bn-multiplier", "tv_weight": "--tv-weight", "jitter": "--jitter", "scale": "--scale",
             "rotate_deg": "--rotate"}
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return InversionSettings(**given)
    except ValueError as exc:
        field = next((key for key in flags if f"setting {key} " in str(exc)), None)
        raise ConfigError(f"{flags.get(field, field)}: out of range ({given.get(field)})") from None


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
