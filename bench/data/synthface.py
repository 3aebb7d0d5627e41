"""SynthFace: procedurally rendered, face-like identities for offline face-recognition benchmarks.

Generative model
----------------
Every image is a pure function of ``(seed, namespace, identity, sample)``. Nothing is downloaded and no
stateful generator is used: all randomness comes from a counter-based hash (two 32-bit ``lowbias32``
lanes, Chris Wellons' hash-prospector) over those integers, so any identity of a world of millions exists
on demand, and an image does not depend on the batch it is rendered in or on its position there.

* **Identity** = a parameter vector (:attr:`SynthFace.PARAM_NAMES`), drawn per ``(seed, namespace,
  identity)``. Continuous entries lie in [0, 1] and are mapped to ranges (named constants below) by the
  renderer; categorical entries (hair style, facial hair, mark count, mark kinds) hold the category
  index. It covers head shape (width, height, chin length, jaw taper), skin tone and warmth, hair (style
  bald / short / fringe / long / parted, colour, volume, hairline, parting side), eyes (spacing, height,
  size, aspect, iris colour), brows (thickness, angle, height, colour), nose (length, width), mouth
  (width, height, lip thickness, lip colour), ears (size, protrusion), facial hair (none / moustache /
  beard, density) and up to three marks (moles or scars: position, size, angle).
* **Twins**: identities ``2k`` and ``2k + 1`` form a look-alike pair with probability ``twin_fraction``
  (a hash of the pair): ``2k + 1`` gets the parameters of ``2k`` plus a small uniform perturbation of
  every continuous entry, categories unchanged. :meth:`SynthFace.twin_of` reports the partner for both
  members, so about ``twin_fraction`` of all identities have a look-alike.
* **Canonical layout and alignment**: faces are drawn in the 112 x 112 frame of insightface's ArcFace
  template (:data:`ARCFACE_TEMPLATE_112`). The mean identity puts its 5 landmarks (eye centres, nose
  tip, mouth corners) exactly on the template; each identity moves them (eye spacing and height, nose
  length, mouth width and height). The closed-form least-squares similarity (Umeyama, in complex form)
  from the identity's landmarks to the template is applied to the whole face, as an aligner would, so a
  clean image has its landmarks on the template up to the identity's shape residual (1.4 px on average
  at 112 px).
* **Nuisance** (per image, drawn per ``(seed, namespace, identity, sample)``, every magnitude and every
  probability multiplied by ``nuisance``; 0 gives the clean, frontal, neutral, aligned face):
  pose (yaw / pitch as pseudo-3-D parallax: each layer has a depth, nose tip > eyes and mouth > face
  outline > ears > back hair, and shifts by ``depth * sin(angle)`` while flat layers compress by
  ``cos(angle)``; roll as an in-plane rotation), expression (smile, open mouth, blink, brow raise),
  Lambertian illumination over an ellipsoidal head normal (direction, ambient level, colour and gain),
  occlusion (glasses, sometimes tinted; surgical mask), background (two colours and a gradient
  direction), gaussian blur, sensor noise, JPEG (random quality) and misalignment (a small similarity:
  scale, shift, rotation). :meth:`SynthFace.sample_nuisance` returns it as a :class:`Nuisance` that
  callers (and tests) may edit before :meth:`SynthFace.render_with`.

Rendering
---------
Vectorised over images and pixels with torch (no per-image Python loop except JPEG, which torchvision
codes image by image). Each output pixel is mapped back into canonical coordinates by the inverse of an
affine per depth group (output scale, misalignment, alignment similarity, pose); each shape is an
ellipse, a lens (``|v| < 1 - u^2``: eyes, lips, brows, scars) or a box in its own local frame (rotation
and scale folded into that affine, optionally bent into an arc) whose approximate signed distance is
turned into coverage by a 1-output-pixel linear ramp, which anti-aliases without supersampling and is
exactly 0 outside a computable support. Layers are composited back to front (background, long hair,
neck, ears, head, marks, beard, nose, mouth, moustache, eyes, hair, brows, glasses, mask), multiplied by
the illumination, then blurred, noised (a window of the world's noise tile at a random offset),
quantised and JPEG-coded. Small layers are drawn only inside the window of the image that their support
can reach in any image of the batch, and rare layers (glasses, masks, beards...) only on the images that
have them: both skip work without changing a pixel.

Determinism: per-image parameters are computed in float64 (2 x 2 products written out rather than
``@``, whose kernel may change with the batch size) and rounded to float32, and per-pixel maths uses
only correctly rounded float32 operations (add, mul, div, sqrt, min / max, clamp; no fused multiply-add
such as ``torch.lerp`` and no transcendental kernels, whose vector and scalar paths may round
differently), so a pixel's value does not depend on its batch, its position there or the thread count:
rendering ``[a, b, c]`` together equals rendering each alone, bit for bit (tested). (The float64
per-image sines, exponentials and logarithms could in principle differ in their last bit between a
kernel's vector and scalar paths; rounding to float32 makes a visible effect of that vanishingly rare.)

Speed (2-core CPU, 2 threads, nuisance 1, JPEG included): about 7,000 images/s at 32 px and 700 at
112 px (4,500 and 440 with one thread).

Landmark pixel convention: output coordinate = 112-frame coordinate x ``S / 112``; pixel ``(row i,
column j)`` is sampled at ``(x=j, y=i)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from methods.registry import ConfigError

# ----------------------------------------------------------------------------------------------------
# Canonical frame
# ----------------------------------------------------------------------------------------------------

#: insightface's ArcFace 5-point template for 112 x 112 crops (``arcface_dst`` in insightface's
#: ``utils/face_align.py``): left eye, right eye, nose tip, left mouth corner, right mouth corner.
ARCFACE_TEMPLATE_112 = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=torch.float32,
)
TEMPLATE_SIZE = 112
NUM_LANDMARKS = 5

# Config limits (the harness validates the same ranges in bench.config).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 512
MAX_NUISANCE = 3.0
MAX_SEED = 2**63 - 1

# ----------------------------------------------------------------------------------------------------
# Counter-based hash RNG
# ----------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
#: ``lowbias32`` multipliers (Chris Wellons, hash-prospector): a 32-bit bijective integer hash.
_LOWBIAS32_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
#: Starting states of the two hash lanes (arbitrary distinct odd constants: the 32-bit golden ratio and
#: the xorshift64* multiplier's high word). Two lanes make the key 64 bits, so a world of millions of
#: identities has no colliding (identical) people.
_LANE_STARTS = (0x9E3779B9, 0x2545F491)
#: Streams separate independent draws made from the same key.
_STREAM_IDENTITY, _STREAM_TWIN_SELECT, _STREAM_TWIN_PERTURB, _STREAM_NUISANCE, _STREAM_PIXEL_NOISE = range(1, 6)
_STREAM_STRIDE = 1 << 16
#: Uniforms drawn per image for its nuisance (more than used, so adding a draw keeps the others' streams).
_NUISANCE_DRAWS = 80


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``x * constant mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow.

    The constant is split into 16-bit halves so every partial product stays below 2**48: signed overflow
    is undefined behaviour in the C++ kernels, and we want the same bits everywhere.
    """
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def hash32(x: Tensor) -> Tensor:
    """The ``lowbias32`` integer hash of int64 values in [0, 2**32); vectorised, exact, bijective."""
    x = x ^ (x >> 16)
    x = _mul32(x, _LOWBIAS32_MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _LOWBIAS32_MULTIPLIERS[1])
    return x ^ (x >> 16)


@dataclass(frozen=True)
class HashKey:
    """A 64-bit counter-based RNG key per element (two 32-bit lanes), built by absorbing integers."""

    lane_a: Tensor
    lane_b: Tensor

    @staticmethod
    def start(shape: tuple[int, ...], device: torch.device | str = "cpu") -> HashKey:
        return HashKey(torch.full(shape, _LANE_STARTS[0], dtype=torch.int64, device=device),
                       torch.full(shape, _LANE_STARTS[1], dtype=torch.int64, device=device))

    def absorb(self, value: Tensor | int) -> HashKey:
        """The key of ``(self, value)`` for any int64 value (negative ones included, as two's complement)."""
        value = torch.as_tensor(value, dtype=torch.int64, device=self.lane_a.device)
        low, high = value & _MASK32, (value >> 32) & _MASK32
        return HashKey(hash32(hash32(self.lane_a ^ low) ^ high), hash32(hash32(self.lane_b ^ low) ^ high))

    def bits(self, stream: int, count: int) -> Tensor:
        """``count`` independent 32-bit values per element of stream ``stream``: int64 ``[..., count]``."""
        counter = torch.arange(count, dtype=torch.int64, device=self.lane_a.device) + stream * _STREAM_STRIDE
        return hash32(hash32(self.lane_a[..., None] ^ counter) ^ self.lane_b[..., None])

    def uniforms(self, stream: int, count: int) -> Tensor:
        """``count`` uniforms in the open interval (0, 1) per element: float64 ``[..., count]``."""
        return (self.bits(stream, count).double() + 0.5) / float(1 << 32)


def _normal(uniform_a: Tensor, uniform_b: Tensor, clip: float) -> Tensor:
    """Standard normal draws from two uniforms (Box-Muller), clipped to ``[-clip, clip]`` standard deviations."""
    return (torch.sqrt(-2.0 * torch.log(uniform_a)) * torch.cos(2.0 * math.pi * uniform_b)).clamp(-clip, clip)


def _categorical(uniform: Tensor, probabilities: tuple[float, ...]) -> Tensor:
    """Category index (as float64) of each uniform under the given probabilities."""
    cumulative = torch.tensor(probabilities, dtype=torch.float64, device=uniform.device).cumsum(0)[:-1]
    return (uniform[..., None] > cumulative).sum(-1).double()


# ----------------------------------------------------------------------------------------------------
# Identity parameters
# ----------------------------------------------------------------------------------------------------

HAIR_STYLES = ("bald", "short", "fringe", "long", "parted")
HAIR_STYLE_PROBABILITIES = (0.06, 0.32, 0.22, 0.25, 0.15)
FACIAL_HAIR_TYPES = ("none", "moustache", "beard")
FACIAL_HAIR_PROBABILITIES = (0.60, 0.15, 0.25)
MAX_MARKS = 3
MARK_COUNT_PROBABILITIES = (0.45, 0.30, 0.15, 0.10)
MARK_KINDS = ("mole", "scar")
MARK_KIND_PROBABILITIES = (0.70, 0.30)

_CONTINUOUS_PARAMS = (
    "head_width", "head_height", "chin_length", "jaw_taper",
    "skin_tone", "skin_warmth",
    "hair_colour", "hair_volume", "hairline_height", "hair_parting_side",
    "eye_spacing", "eye_height", "eye_size", "eye_aspect", "iris_colour",
    "brow_thickness", "brow_angle", "brow_height", "brow_colour",
    "nose_length", "nose_width",
    "mouth_width", "mouth_height", "lip_thickness", "lip_colour",
    "ear_size", "ear_protrusion",
    "facial_hair_density",
    *(f"mark{k}_{field}" for k in range(MAX_MARKS) for field in ("x", "y", "size", "angle")),
)
#: Categorical parameters and the probabilities they are drawn with; twins copy them unchanged.
_CATEGORICAL_PARAMS: dict[str, tuple[float, ...]] = {
    "hair_style": HAIR_STYLE_PROBABILITIES,
    "facial_hair_type": FACIAL_HAIR_PROBABILITIES,
    **{f"mark{k}_kind": MARK_KIND_PROBABILITIES for k in range(MAX_MARKS)},
    "mark_count": MARK_COUNT_PROBABILITIES,
}
PARAM_NAMES: tuple[str, ...] = (*_CONTINUOUS_PARAMS, *_CATEGORICAL_PARAMS)
_PARAM_INDEX = {name: i for i, name in enumerate(PARAM_NAMES)}
_NUM_CONTINUOUS = len(_CONTINUOUS_PARAMS)

#: Twins: half-width of the uniform perturbation added to each continuous parameter (in [0, 1] units).
#: 0.12 moves features by a few pixels at 112 px: hard negatives that a CNN can still separate.
TWIN_PERTURBATION = 0.12


class _Params:
    """Named float64 columns of an identity parameter matrix ``[N, NUM_PARAMS]`` (``p.eye_size``)."""

    def __init__(self, matrix: Tensor) -> None:
        self._matrix = matrix.double()

    def __getattr__(self, name: str) -> Tensor:
        if name not in _PARAM_INDEX:
            raise AttributeError(name)
        return self._matrix[:, _PARAM_INDEX[name]]

    def take(self, index: Tensor) -> _Params:
        return _Params(self._matrix[index])


def _draw_identity_params(key: HashKey) -> Tensor:
    """Fresh (non-twin) parameters for each key: float64 ``[N, NUM_PARAMS]``."""
    uniforms = key.uniforms(_STREAM_IDENTITY, len(PARAM_NAMES))
    categorical = [_categorical(uniforms[:, _NUM_CONTINUOUS + i], probabilities)
                   for i, probabilities in enumerate(_CATEGORICAL_PARAMS.values())]
    return torch.cat([uniforms[:, :_NUM_CONTINUOUS], torch.stack(categorical, 1)], 1)


# ----------------------------------------------------------------------------------------------------
# Renderer constants (112-frame pixels unless stated; a range is (value at 0, value at 1))
# ----------------------------------------------------------------------------------------------------

# Head: the crop of an aligned face shows it from the crown (just above the crop) to the chin.
HEAD_CENTRE = (56.0, 46.0)                # at brow level, where the head is widest
HEAD_HALF_WIDTH = (37.0, 45.0)
HEAD_HALF_HEIGHT_UP = (52.0, 60.0)        # centre to crown (above the crop)
HEAD_HALF_HEIGHT_DOWN = (58.0, 68.0)      # centre to chin ("chin_length")
JAW_TAPER = (-0.2, 0.4)                   # relative narrowing at the chin: < 0 square jaw, > 0 pointed chin
# Landmark offsets from the template (the mean identity sits exactly on it).
EYE_SPACING_DELTA = (-4.0, 4.0)           # change of the inter-ocular distance
EYE_HEIGHT_DELTA = (-3.0, 3.0)
NOSE_LENGTH_DELTA = (-4.0, 4.0)
MOUTH_WIDTH_DELTA = (-5.0, 5.0)
MOUTH_HEIGHT_DELTA = (-3.0, 3.0)
# Eyes are lenses (|v| < 1 - u^2: almond-shaped, pointed corners) around the eye landmark.
EYE_HALF_WIDTH = (5.5, 7.5)
EYE_ASPECT = (0.36, 0.56)                 # half-height / half-width
IRIS_TO_EYE_HEIGHT = 1.1                  # iris radius / eye half-height (the lids cover its top and bottom)
PUPIL_TO_IRIS = 0.45
LASH_HALF_THICKNESS = 0.22                # eye half-height units
SOCKET_SCALE, SOCKET_RAISE = 1.7, 1.5     # the soft shadow around the eye: size / eye size, shift up
BROW_HEIGHT = (8.0, 12.5)                 # above the eye centre
BROW_HALF_THICKNESS = (1.2, 2.8)
BROW_ANGLE_RAD = (-0.3, 0.25)             # lateral end up (< 0) or down (> 0)
BROW_HALF_LENGTH_TO_EYE = 1.5
BROW_ARCH = 0.3                           # rise of the brow's middle above its ends, brow half-lengths x 1/4
NOSE_HALF_WIDTH = (6.0, 10.0)
NOSE_BASE_HALF_HEIGHT = 2.6               # the shadow under the tip
NOSTRIL_HALF_SIZE_TO_NOSE = (0.28, 0.16)  # nostril half-width, half-height / nose half-width
LIP_HALF_THICKNESS = (1.8, 3.8)           # upper lip; the lower lip is LOWER_LIP_RATIO thicker
LOWER_LIP_RATIO = 1.3
MOUTH_SLIT_HALF_HEIGHT = 0.5
EAR_HALF_HEIGHT = (7.0, 11.0)
EAR_ASPECT = 0.5
EAR_PROTRUSION = (0.0, 5.0)
EAR_INSET = 0.96                          # ear centre / head half-width (before protrusion)
EAR_HEIGHT_BELOW_EYES = 9.0
HAIR_VOLUME = (2.0, 10.0)
HAIRLINE_Y = (6.0, 20.0)                  # hairline height at the midline (short, long and parted styles)
FRINGE_ABOVE_BROWS = (2.0, 6.0)
TEMPLE_DROP = 34.0                        # the hairline comes down by this much at the sides of the head
FRINGE_TEMPLE_DROP = 10.0
PART_OFFSET = (-14.0, 14.0)
PART_DEPTH, PART_HALF_WIDTH = 9.0, 7.0
LONG_HAIR_DROP = 40.0                     # long hair hangs this far below the crown of the head cap
LONG_HAIR_WIDEN = 4.0
LONG_HAIR_SHADE = 0.85                    # the back of the hair gets less light
NECK_HALF_WIDTH_TO_HEAD = 0.55
NECK_TOP_TO_CHIN = 0.75                   # neck centre: this fraction of the chin distance, plus its half-height
NECK_HALF_HEIGHT = 30.0
FACIAL_HAIR_DENSITY = (0.55, 1.0)
BEARD_TOP_ABOVE_MOUTH = 7.0
BEARD_SIDE_TOP_BELOW_EYES = 6.0
BEARD_SHADE = 0.9
MOUSTACHE_HALF_HEIGHT = 3.2
MOUSTACHE_WIDEN = 1.2                     # moustache half-width / mouth half-width
MOUSTACHE_DROOP = 0.6                     # ends hang this many half-heights below the middle
MARK_X_SPREAD = 0.65                      # fraction of the head half-width
MARK_Y_RANGE_FROM_EYES = (-16.0, 44.0)
MOLE_RADIUS = (1.0, 2.0)
SCAR_HALF_LENGTH = (3.0, 7.0)
SCAR_HALF_WIDTH = 0.7

#: Depth (towards the camera, canonical px) of each layer group, for pseudo-3-D parallax under yaw/pitch.
#: Back hair and neck, ears, face outline (head, hair, beard, mask), cheeks (marks), features (eyes, brows,
#: mouth, glasses), nose.
_GROUP_DEPTHS = (-14.0, -6.0, 0.0, 14.0, 22.0, 34.0)
GROUP_BACK, GROUP_EARS, GROUP_OUTLINE, GROUP_CHEEKS, GROUP_FEATURES, GROUP_NOSE = range(len(_GROUP_DEPTHS))

# Colours: palettes interpolated piecewise-linearly by a [0, 1] parameter (linear RGB in [0, 1]).
SKIN_PALETTE = ((0.30, 0.19, 0.13), (0.52, 0.35, 0.24), (0.72, 0.54, 0.41), (0.88, 0.72, 0.60),
                (0.97, 0.84, 0.75))
SKIN_WARMTH_GAIN = (0.06, 0.0, -0.08)     # per-channel gain at warmth +1 (and its negative at -1)
HAIR_PALETTE = ((0.04, 0.035, 0.03), (0.17, 0.10, 0.06), (0.36, 0.22, 0.12), (0.52, 0.24, 0.11),
                (0.80, 0.64, 0.38), (0.66, 0.64, 0.62))
IRIS_PALETTE = ((0.16, 0.08, 0.04), (0.34, 0.19, 0.08), (0.45, 0.36, 0.17), (0.28, 0.42, 0.22),
                (0.24, 0.42, 0.66), (0.46, 0.54, 0.62))
BROW_DARKENING = 0.8
LIP_RED = (0.66, 0.24, 0.26)
LIP_REDNESS = (0.25, 0.7)
LIP_SKIN_SHADE = 0.8
SCLERA_COLOUR = (0.93, 0.91, 0.88)
PUPIL_COLOUR = (0.02, 0.02, 0.02)
LASH_COLOUR = (0.06, 0.04, 0.04)
MOUTH_INTERIOR_COLOUR = (0.22, 0.06, 0.06)
MOLE_COLOUR_TO_SKIN = 0.45
SCAR_COLOUR = (0.85, 0.6, 0.6)
BACKGROUND_NEUTRAL = (0.5, 0.5, 0.5)
EAR_SHADE, NECK_SHADE, SOCKET_SHADE, NOSE_SHADE, NOSTRIL_SHADE = 0.9, 0.78, 0.78, 0.86, 0.35
SOCKET_OPACITY, NOSE_RIDGE_OPACITY, NOSE_BASE_OPACITY = 0.35, 0.45, 0.55
SOFT_EDGE_PX = 2.5                        # edge width of the shading blobs (output px)

# ----------------------------------------------------------------------------------------------------
# Nuisance magnitudes at nuisance = 1 (scaled by the nuisance strength)
# ----------------------------------------------------------------------------------------------------

NORMAL_CLIP = 2.5                         # pose, light and misalignment draws are clipped at 2.5 sigma
YAW_STD_RAD = math.radians(15.0)
PITCH_STD_RAD = math.radians(8.0)
ROLL_STD_RAD = math.radians(8.0)
#: Yaw and pitch stay below this even at the strongest nuisance (beyond 90 degrees the flat layers would mirror).
OUT_OF_PLANE_MAX_RAD = math.radians(75.0)
SMILE_LIFT, SMILE_WIDEN = 3.5, 2.5        # mouth-corner displacement at full smile
MOUTH_OPEN_PROBABILITY, MOUTH_OPEN_MAX = 0.3, 5.0
BLINK_PROBABILITY = 0.1
BROW_RAISE_MAX = 4.0
LIGHT_NEUTRAL_DIRECTION = (0.0, -0.3, 0.954)  # frontal, slightly from above
LIGHT_ANGLE_STD_RAD = math.radians(35.0)
AMBIENT_NEUTRAL, AMBIENT_SPREAD, AMBIENT_RANGE = 0.45, 0.2, (0.15, 0.9)
LIGHT_GAIN_LOG_STD = 0.25
LIGHT_TINT = (0.12, 0.0, -0.12)           # per-channel gain at colour temperature +1 (warm)
BACKGROUND_GAIN = 0.9                     # the background is lit, but not shaded by the head normal
BACKGROUND_SATURATION = 0.5               # background colours are pulled half-way to grey
GLASSES_PROBABILITY, SUNGLASSES_FRACTION, SUNGLASSES_TINT = 0.15, 0.3, (0.6, 0.95)
GLASSES_RIM_SCALE = (1.7, 1.05)           # rim half-width / eye half-width, rim half-height / eye half-width
GLASSES_RIM_HALF_THICKNESS = 0.9
GLASSES_LENS_SHADE = 0.3
MASK_PROBABILITY = 0.07
MASK_TOP_ABOVE_NOSE = 7.0
MASK_TOP_CURVE = 6.0                      # the top edge drops by this much towards the cheeks
BLUR_PROBABILITY, BLUR_SIGMA_112 = 0.3, (0.6, 2.8)
BLUR_RADIUS_SIGMAS = 3.0
NOISE_STD_MAX = 6.0                       # grey levels
NOISE_TILE_SIDE = 256                     # side of the world's sensor-noise tile (pixels)
JPEG_PROBABILITY, JPEG_QUALITY_RANGE, JPEG_MIN_QUALITY = 0.5, (50, 95), 20
JPEG_QUALITY_STEP = 5                     # qualities are rounded to steps so images share one encode call
MISALIGN_SCALE_LOG_STD = 0.05
MISALIGN_SHIFT_STD = 3.0
MISALIGN_ROTATION_STD_RAD = math.radians(3.0)


def _lerp(bounds: tuple[float, float], t: Tensor) -> Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * t


def _palette(colours: tuple[tuple[float, float, float], ...], t: Tensor) -> Tensor:
    """Piecewise-linear interpolation of a colour palette at ``t`` in [0, 1]: ``[N, 3]``."""
    table = torch.tensor(colours, dtype=torch.float64, device=t.device)
    position = t.clamp(0, 1) * (len(colours) - 1)
    lower = position.floor().clamp(max=len(colours) - 2).long()
    fraction = (position - lower)[:, None]
    return table[lower] * (1 - fraction) + table[lower + 1] * fraction


def _const(values: tuple[float, ...], like: Tensor) -> Tensor:
    """A constant colour (or vector) repeated for every image of ``like``: float64 ``[N, len(values)]``."""
    return torch.tensor(values, dtype=torch.float64, device=like.device).expand(like.shape[0], len(values))


# ----------------------------------------------------------------------------------------------------
# Public data types
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthFaceConfig:
    """Which synthetic world (``seed``), its image size, its nuisance strength and look-alike rate."""

    seed: int = 0
    image_size: int = 32
    nuisance: float = 1.0
    twin_fraction: float = 0.0

    def __post_init__(self) -> None:
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        _check_float("nuisance", self.nuisance, 0.0, MAX_NUISANCE)
        _check_float("twin_fraction", self.twin_fraction, 0.0, 1.0)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"SynthFaceConfig.{name}={value!r} is invalid; allowed: an integer in [{low}, {high}]")


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"SynthFaceConfig.{name}={value!r} is invalid; allowed: a number in [{low}, {high}]")


@dataclass
class Rendered:
    """Rendered images (uint8 ``[N, 3, S, S]``, RGB) and their 5 landmarks (float32 ``[N, 5, 2]``, x, y)."""

    images: Tensor
    landmarks: Tensor


@dataclass(frozen=True)
class Nuisance:
    """Per-image nuisance of a batch; every field has the batch size as its first dimension.

    Angles are radians; lengths are 112-frame pixels; ``noise_std`` is in grey levels; a
    ``jpeg_quality`` of 0 means no JPEG. Build one with :meth:`SynthFace.sample_nuisance` or
    :meth:`neutral`, and edit it with :func:`dataclasses.replace`.
    """

    yaw: Tensor
    pitch: Tensor
    roll: Tensor
    smile: Tensor              # 0..1
    mouth_open: Tensor         # 0..1
    blink: Tensor              # 0 (open) .. 1 (closed)
    brow_raise: Tensor         # 0..1
    light_direction: Tensor    # [N, 3] unit vector (x right, y down, z towards the camera)
    ambient: Tensor            # share of light that ignores the surface normal
    light_gain: Tensor         # [N, 3] colour and intensity multiplier
    background: Tensor         # [N, 2, 3] gradient end colours
    background_direction: Tensor  # [N, 2] gradient direction (unit vector, or zero for a flat background)
    glasses: Tensor            # 0 / 1
    glasses_tint: Tensor       # lens opacity 0..1
    glasses_colour: Tensor     # [N, 3]
    mask: Tensor               # 0 / 1
    mask_colour: Tensor        # [N, 3]
    blur_sigma: Tensor         # gaussian sigma in 112-frame pixels (0: sharp)
    noise_std: Tensor          # grey levels (0: none)
    jpeg_quality: Tensor       # int64, 0: no JPEG
    misalign_scale_log: Tensor
    misalign_shift: Tensor     # [N, 2]
    misalign_rotation: Tensor
    pixel_noise_key: Tensor    # int64 hash: where the image reads the sensor-noise tile

    @staticmethod
    def neutral(count: int, device: torch.device | str = "cpu") -> Nuisance:
        """The clean condition (what ``nuisance=0`` draws): frontal, neutral, plain grey, sharp, aligned."""
        zeros = torch.zeros(count, dtype=torch.float64, device=device)
        like = zeros
        direction = _const(LIGHT_NEUTRAL_DIRECTION, like)
        return Nuisance(
            yaw=zeros, pitch=zeros, roll=zeros, smile=zeros, mouth_open=zeros, blink=zeros, brow_raise=zeros,
            light_direction=direction / direction.norm(dim=1, keepdim=True), ambient=zeros + AMBIENT_NEUTRAL,
            light_gain=_const((1.0, 1.0, 1.0), like),
            background=_const(BACKGROUND_NEUTRAL, like)[:, None].expand(count, 2, 3).clone(),
            background_direction=torch.zeros(count, 2, dtype=torch.float64, device=device),
            glasses=zeros, glasses_tint=zeros, glasses_colour=_const((0.1, 0.1, 0.1), like), mask=zeros,
            mask_colour=_const((0.85, 0.9, 0.95), like), blur_sigma=zeros, noise_std=zeros,
            jpeg_quality=torch.zeros(count, dtype=torch.int64, device=device), misalign_scale_log=zeros,
            misalign_shift=torch.zeros(count, 2, dtype=torch.float64, device=device), misalign_rotation=zeros,
            pixel_noise_key=torch.zeros(count, dtype=torch.int64, device=device),
        )

    def take(self, index: Tensor) -> Nuisance:
        """The nuisance of the images at ``index``."""
        return Nuisance(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _draw_nuisance(key: HashKey, strength: float) -> Nuisance:
    """Per-image nuisance from each image's key, every magnitude and probability scaled by ``strength``."""
    count = key.lane_a.shape[0]
    u = iter(key.uniforms(_STREAM_NUISANCE, _NUISANCE_DRAWS).unbind(1))
    base = Nuisance.neutral(count, key.lane_a.device)
    mix = min(strength, 1.0)  # for colour draws that interpolate from neutral (cannot exceed the draw)

    def normal(std: float) -> Tensor:
        return strength * std * _normal(next(u), next(u), NORMAL_CLIP)

    def happens(probability: float) -> Tensor:
        return (next(u) < min(1.0, strength * probability)).double()

    def colour() -> Tensor:
        return torch.stack([next(u), next(u), next(u)], 1)

    def muted_colour() -> Tensor:
        rgb = colour()
        grey = rgb.mean(1, keepdim=True)
        return grey + BACKGROUND_SATURATION * (rgb - grey)

    yaw, pitch = normal(YAW_STD_RAD).clamp(-OUT_OF_PLANE_MAX_RAD, OUT_OF_PLANE_MAX_RAD), normal(PITCH_STD_RAD)
    pitch, roll = pitch.clamp(-OUT_OF_PLANE_MAX_RAD, OUT_OF_PLANE_MAX_RAD), normal(ROLL_STD_RAD)
    smile = (strength * next(u) ** 2).clamp(max=1.0)
    mouth_open = happens(MOUTH_OPEN_PROBABILITY) * next(u)
    blink = happens(BLINK_PROBABILITY) * (0.5 + 0.5 * next(u))
    brow_raise = (strength * next(u) ** 2).clamp(max=1.0)
    light_azimuth, light_elevation = normal(LIGHT_ANGLE_STD_RAD), normal(LIGHT_ANGLE_STD_RAD)
    neutral_direction = base.light_direction
    direction = _rotate_direction(neutral_direction, light_azimuth, light_elevation)
    ambient = (AMBIENT_NEUTRAL + strength * AMBIENT_SPREAD * (2 * next(u) - 1)).clamp(*AMBIENT_RANGE)
    tint = strength * (2 * next(u) - 1)
    gain = torch.exp(normal(LIGHT_GAIN_LOG_STD))
    light_gain = gain[:, None] * (1 + tint[:, None] * _const(LIGHT_TINT, yaw))
    background = base.background + mix * (torch.stack([muted_colour(), muted_colour()], 1) - base.background)
    angle = 2 * math.pi * next(u)
    background_direction = mix * next(u)[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    glasses = happens(GLASSES_PROBABILITY)
    glasses_tint = (next(u) < SUNGLASSES_FRACTION).double() * _lerp(SUNGLASSES_TINT, next(u))
    glasses_colour = 0.05 + 0.5 * colour() * next(u)[:, None]
    mask = happens(MASK_PROBABILITY)
    mask_colour = 0.75 + 0.2 * colour()
    blur_sigma = happens(BLUR_PROBABILITY) * _lerp(BLUR_SIGMA_112, next(u)) * max(strength, 1.0)
    noise_std = strength * NOISE_STD_MAX * next(u)
    quality_span = JPEG_QUALITY_RANGE[1] - JPEG_QUALITY_RANGE[0]
    quality = (JPEG_QUALITY_RANGE[1] - max(strength, 1.0) * quality_span * next(u)).clamp(min=JPEG_MIN_QUALITY)
    quality = (torch.round(quality / JPEG_QUALITY_STEP) * JPEG_QUALITY_STEP).long()
    jpeg_quality = happens(JPEG_PROBABILITY).long() * quality
    shift = torch.stack([normal(MISALIGN_SHIFT_STD), normal(MISALIGN_SHIFT_STD)], 1)
    return Nuisance(
        yaw=yaw, pitch=pitch, roll=roll, smile=smile, mouth_open=mouth_open, blink=blink, brow_raise=brow_raise,
        light_direction=direction, ambient=ambient, light_gain=light_gain, background=background,
        background_direction=background_direction, glasses=glasses, glasses_tint=glasses_tint,
        glasses_colour=glasses_colour, mask=mask, mask_colour=mask_colour, blur_sigma=blur_sigma,
        noise_std=noise_std, jpeg_quality=jpeg_quality, misalign_scale_log=normal(MISALIGN_SCALE_LOG_STD),
        misalign_shift=shift, misalign_rotation=normal(MISALIGN_ROTATION_STD_RAD),
        pixel_noise_key=key.bits(_STREAM_PIXEL_NOISE, 1)[:, 0],
    )


def _rotate_direction(direction: Tensor, azimuth: Tensor, elevation: Tensor) -> Tensor:
    """``direction`` [N, 3] turned by ``azimuth`` about the y axis then ``elevation`` about the x axis."""
    x, y, z = direction.unbind(1)
    x, z = x * torch.cos(azimuth) + z * torch.sin(azimuth), -x * torch.sin(azimuth) + z * torch.cos(azimuth)
    y, z = y * torch.cos(elevation) - z * torch.sin(elevation), y * torch.sin(elevation) + z * torch.cos(elevation)
    return torch.stack([x, y, z], 1)


# ----------------------------------------------------------------------------------------------------
# Geometry: canonical layout, alignment similarity, pose and misalignment affines
# ----------------------------------------------------------------------------------------------------


def similarity_to_template(points: Tensor, template: Tensor) -> Tensor:
    """Least-squares similarity (rotation, uniform scale, shift) mapping ``points`` [N, K, 2] onto
    ``template`` [K, 2], as ``[N, 2, 3]`` affines (float64).

    Closed form (Umeyama 1991 for 2-D, written with complex numbers): the rotation-scale ``a + ib`` is
    ``sum(conj(p) t) / sum(|p|^2)`` over centred points. Sums are explicit additions so the result does
    not depend on how a reduction kernel splits the batch.
    """
    points, template = points.double(), template.double().to(points.device)
    mean_p = _sum_points(points) / points.shape[1]
    mean_t = _sum_points(template[None]) / template.shape[0]
    p, t = points - mean_p[:, None], template[None] - mean_t[:, None]
    squared = _sum_points(p * p)
    norm = squared[:, 0] + squared[:, 1]
    a = _sum_points((p[..., 0] * t[..., 0] + p[..., 1] * t[..., 1])[..., None])[:, 0] / norm
    b = _sum_points((p[..., 0] * t[..., 1] - p[..., 1] * t[..., 0])[..., None])[:, 0] / norm
    linear = torch.stack([torch.stack([a, -b], 1), torch.stack([b, a], 1)], 1)
    shift = mean_t - _transform(linear, mean_p)
    return torch.cat([linear, shift[..., None]], 2)


def _sum_points(points: Tensor) -> Tensor:
    """Sum over dim 1 of ``[N, K, C]`` by explicit additions (batch-invariant rounding)."""
    total = points[:, 0]
    for k in range(1, points.shape[1]):
        total = total + points[:, k]
    return total


def _matmul2(a: Tensor, b: Tensor) -> Tensor:
    """``a [..., I, 2] @ b [..., 2, J]`` as explicit products and one sum: ``@`` may pick a different
    kernel (and rounding) for a different batch size."""
    return a[..., :, 0:1] * b[..., 0:1, :] + a[..., :, 1:2] * b[..., 1:2, :]


def _transform(linear: Tensor, points: Tensor) -> Tensor:
    """``linear [..., 2, 2]`` applied to points ``[..., 2]`` (broadcasting), by explicit products."""
    return linear[..., 0] * points[..., 0:1] + linear[..., 1] * points[..., 1:2]


def _rotation_scale(angle: Tensor, scale: Tensor) -> Tensor:
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def _affine(linear: Tensor, shift: Tensor) -> Tensor:
    return torch.cat([linear, shift[..., None]], -1)


def _compose(outer: Tensor, inner: Tensor) -> Tensor:
    """``outer o inner`` for ``[..., 2, 3]`` affines."""
    linear = _matmul2(outer[..., :2], inner[..., :2])
    shift = _transform(outer[..., :2], inner[..., 2]) + outer[..., 2]
    return _affine(linear, shift)


def _invert(affine: Tensor) -> Tensor:
    """Inverse of ``[..., 2, 3]`` affines (explicit 2 x 2 formula)."""
    a, b, tx = affine[..., 0, 0], affine[..., 0, 1], affine[..., 0, 2]
    c, d, ty = affine[..., 1, 0], affine[..., 1, 1], affine[..., 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    return torch.stack([torch.stack([ia, ib, -(ia * tx + ib * ty)], -1),
                        torch.stack([ic, id_, -(ic * tx + id_ * ty)], -1)], -2)


def _apply(affine: Tensor, points: Tensor) -> Tensor:
    """Apply ``[N, 2, 3]`` affines to points ``[N, K, 2]``."""
    return _transform(affine[:, None, :, :2], points) + affine[:, None, :, 2]


def pose_affines(yaw: Tensor, pitch: Tensor, roll: Tensor, pivot: Tensor) -> Tensor:
    """Pseudo-3-D head pose as one affine per depth group: ``[N, G, 2, 3]`` in canonical coordinates.

    A point at depth ``z`` moves to ``pivot + R_roll (diag(cos yaw, cos pitch) (p - pivot) + z (sin yaw,
    sin pitch))``: flat layers compress by the cosine, and deeper layers (the nose tip) shift further
    than shallow ones (the outline, the ears behind it): the parallax that makes a turned head look
    turned without a 3-D mesh.
    """
    depths = torch.tensor(_GROUP_DEPTHS, dtype=torch.float64, device=yaw.device)
    compress = torch.diag_embed(torch.stack([torch.cos(yaw), torch.cos(pitch)], 1))          # [N, 2, 2]
    rotation = _rotation_scale(roll, torch.ones_like(roll))
    linear = _matmul2(rotation, compress)
    parallax = depths[None, :, None] * torch.stack([torch.sin(yaw), torch.sin(pitch)], 1)[:, None]  # [N, G, 2]
    shift = (pivot - _transform(linear, pivot))[:, None] + _transform(rotation[:, None], parallax)
    return _affine(linear[:, None].expand(-1, len(_GROUP_DEPTHS), 2, 2), shift)


def misalignment_affine(scale_log: Tensor, rotation: Tensor, shift: Tensor) -> Tensor:
    """A small similarity about the crop centre: what a noisy detector and aligner leave behind."""
    centre = torch.full_like(shift, TEMPLATE_SIZE / 2)
    linear = _rotation_scale(rotation, torch.exp(scale_log))
    return _affine(linear, centre + shift - _transform(linear, centre))


@dataclass(frozen=True)
class _Layout:
    """Canonical (112-frame, pre-alignment) geometry of each face under its expression; float64 ``[N]``."""

    params: _Params
    landmarks: Tensor          # [N, 5, 2] neutral-expression landmarks (alignment input)
    mouth_corners: Tensor      # [N, 2, 2] with the expression
    head_centre: Tensor        # [N, 2]
    head_half_width: Tensor
    head_half_up: Tensor
    head_half_down: Tensor
    eye_half_width: Tensor
    eye_half_height: Tensor
    brow_y: Tensor             # [N] brow centre line (above both eyes)


def canonical_landmarks(params: Tensor) -> Tensor:
    """The 5 landmarks of each identity (neutral expression) in the canonical 112 frame, before alignment:
    the template moved by the identity's eye spacing and height, nose length, mouth width and height.
    float64 ``[N, 5, 2]``; the mean identity (all those parameters 0.5) gives the template exactly."""
    p = params if isinstance(params, _Params) else _Params(params)
    template = ARCFACE_TEMPLATE_112.double().to(p.eye_spacing.device)
    eye_dx = _lerp(EYE_SPACING_DELTA, p.eye_spacing) / 2
    eye_dy = _lerp(EYE_HEIGHT_DELTA, p.eye_height)
    nose_dy = _lerp(NOSE_LENGTH_DELTA, p.nose_length)
    mouth_dx = _lerp(MOUTH_WIDTH_DELTA, p.mouth_width) / 2
    mouth_dy = _lerp(MOUTH_HEIGHT_DELTA, p.mouth_height)
    zero = torch.zeros_like(eye_dx)
    offsets = torch.stack([torch.stack([-eye_dx, eye_dy], 1), torch.stack([eye_dx, eye_dy], 1),
                           torch.stack([zero, nose_dy], 1),
                           torch.stack([-mouth_dx, mouth_dy], 1), torch.stack([mouth_dx, mouth_dy], 1)], 1)
    return template[None] + offsets


def _layout(params: _Params, nuisance: Nuisance) -> _Layout:
    """Landmarks and the main proportions of each face from its parameters and expression."""
    landmarks = canonical_landmarks(params)
    zero = torch.zeros_like(params.eye_size)
    smile = nuisance.smile
    corner_shift = torch.stack([torch.stack([-SMILE_WIDEN * smile, -SMILE_LIFT * smile], 1),
                                torch.stack([SMILE_WIDEN * smile, -SMILE_LIFT * smile], 1)], 1)
    eye_half_width = _lerp(EYE_HALF_WIDTH, params.eye_size)
    eye_y = (landmarks[:, 0, 1] + landmarks[:, 1, 1]) / 2
    brow_y = eye_y - _lerp(BROW_HEIGHT, params.brow_height) - BROW_RAISE_MAX * nuisance.brow_raise
    return _Layout(
        params=params, landmarks=landmarks, mouth_corners=landmarks[:, 3:] + corner_shift,
        head_centre=torch.tensor(HEAD_CENTRE, dtype=torch.float64, device=zero.device).expand(len(zero), 2),
        head_half_width=_lerp(HEAD_HALF_WIDTH, params.head_width),
        head_half_up=_lerp(HEAD_HALF_HEIGHT_UP, params.head_height),
        head_half_down=_lerp(HEAD_HALF_HEIGHT_DOWN, params.chin_length),
        eye_half_width=eye_half_width, eye_half_height=eye_half_width * _lerp(EYE_ASPECT, params.eye_aspect),
        brow_y=brow_y,
    )


#: Depth group of each landmark: eyes and mouth corners on the feature plane, the nose tip on its own.
_LANDMARK_GROUPS = (GROUP_FEATURES, GROUP_FEATURES, GROUP_NOSE, GROUP_FEATURES, GROUP_FEATURES)


def _forward_affines(layout: _Layout, nuisance: Nuisance, image_size: int) -> Tensor:
    """Canonical -> output-pixel affine of every depth group: ``[N, G, 2, 3]`` float64.

    Order: pose about the head centre, then the identity's alignment similarity, then misalignment about
    the crop centre, then the 112 -> S scale.
    """
    pose = pose_affines(nuisance.yaw, nuisance.pitch, nuisance.roll, layout.head_centre)
    align = similarity_to_template(layout.landmarks, ARCFACE_TEMPLATE_112)
    misalign = misalignment_affine(nuisance.misalign_scale_log, nuisance.misalign_rotation, nuisance.misalign_shift)
    output_scale = image_size / TEMPLATE_SIZE
    camera = _compose(misalign, align) * output_scale                                        # [N, 2, 3]
    return _compose(camera[:, None], pose)


def _output_landmarks(layout: _Layout, forward: Tensor) -> Tensor:
    """Where the 5 landmarks land in the output image (with the expression's mouth corners)."""
    points = torch.cat([layout.landmarks[:, :3], layout.mouth_corners], 1)
    groups = torch.tensor(_LANDMARK_GROUPS, device=points.device)
    affine = forward[:, groups]                                                               # [N, 5, 2, 3]
    return _transform(affine[..., :2], points) + affine[..., 2]


# ----------------------------------------------------------------------------------------------------
# Rasterisation primitives
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raster:
    """A window of the output pixel grid and, per image, the affines between output and canonical frames."""

    grid_x: Tensor         # float32 [1, 1, 1, W] output pixel x of the window's columns
    grid_y: Tensor         # float32 [1, 1, H, 1]
    forward: Tensor        # float64 [N, G, 2, 3] canonical -> output, per depth group
    inverse: Tensor        # float64 [N, G, 2, 3] output -> canonical
    pixel_scale: Tensor    # float64 [N] output pixels per canonical pixel
    size: int              # side of the full output image

    def take(self, index: Tensor) -> _Raster:
        return replace(self, forward=self.forward[index], inverse=self.inverse[index],
                       pixel_scale=self.pixel_scale[index])

    def crop(self, rows: slice, cols: slice) -> _Raster:
        return replace(self, grid_x=self.grid_x[..., cols], grid_y=self.grid_y[..., rows, :])

    def frame(self, group: int, centre: Tensor, half_axes: Tensor,
              angle: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Local coordinates ``(u, v)`` (float32 ``[N, K, H, W]``) of K shapes per image.

        ``centre`` [N, K, 2] and ``half_axes`` [N, K, 2] are canonical; ``angle`` [N, K] turns the shape
        (image y down, so a positive angle lowers the +u end). The shape's own similarity is folded into
        the group's inverse affine, so each coordinate costs one full-size addition of a row term and a
        column term.
        """
        inverse = self.inverse[:, group][:, None]                                              # [N, 1, 2, 3]
        if angle is None:
            angle = torch.zeros_like(centre[..., 0])
        cos, sin = torch.cos(angle), torch.sin(angle)
        rows = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)   # [N, K, 2, 2]
        rows = rows / half_axes[..., :, None]
        linear = _matmul2(rows, inverse[..., :2])                                              # [N, K, 2, 2]
        shift = _transform(rows, inverse[..., 2] - centre)                                      # [N, K, 2]
        c = torch.cat([linear, shift[..., None]], -1).float()[..., None, None]                 # [N, K, 2, 3, 1, 1]
        u = c[:, :, 0, 0] * self.grid_x + (c[:, :, 0, 1] * self.grid_y + c[:, :, 0, 2])
        v = c[:, :, 1, 0] * self.grid_x + (c[:, :, 1, 1] * self.grid_y + c[:, :, 1, 2])
        return u, v

    def slope(self, half_size: Tensor, edge_px: float = 1.0) -> Tensor:
        """Ramp slope (float64, ``[N, K]``) for a coordinate normalised by ``half_size`` (canonical px,
        ``[N]`` or ``[N, K]``) so that edges are ``edge_px`` output pixels wide: one normalised unit spans
        ``half_size * pixel_scale`` output pixels."""
        half_size = half_size[:, None] if half_size.dim() == 1 else half_size
        return half_size * self.pixel_scale[:, None] / edge_px

    def window(self, group: int, centre: Tensor, reach: Tensor) -> tuple[slice, slice] | None:
        """The output rows and columns that can be covered by shapes around ``centre`` [N, K, 2] reaching
        ``reach`` [N, K, 2] canonical pixels (axis-aligned half extents), over the whole batch; None if
        they are all outside the image.

        Drawing only there is exact: coverage is exactly 0 outside each shape's support, and the window
        (with a pixel of margin for rounding) contains every image's support, so the batch it is computed
        over changes which pixels are visited, never their values.
        """
        signs = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=torch.float64,
                             device=centre.device)
        corners = (centre[:, :, None] + reach[:, :, None] * signs).flatten(1, 2)                # [N, 4K, 2]
        out = _apply(self.forward[:, group], corners)
        low = torch.floor(out.flatten(0, 1).amin(0)) - _WINDOW_MARGIN_PX
        high = torch.ceil(out.flatten(0, 1).amax(0)) + _WINDOW_MARGIN_PX
        x0, y0 = (max(0, int(v)) for v in low.tolist())
        x1, y1 = (min(self.size - 1, int(v)) for v in high.tolist())
        if x0 > x1 or y0 > y1:
            return None
        return slice(y0, y1 + 1), slice(x0, x1 + 1)


#: Extra output pixels around a computed window: float rounding between the window's float64 bounds
#: and the float32 per-pixel coordinates is far below one pixel.
_WINDOW_MARGIN_PX = 1


def _ramp(signed: Tensor, slope: Tensor) -> Tensor:
    """Coverage ``clamp(0.5 + signed * slope, 0, 1)`` of a signed distance, in place.

    A linear edge one pixel wide is the box-filtered step: anti-aliased without supersampling, and
    exactly 0 away from the shape, which lets layers be drawn in windows and rare layers be skipped
    without changing any pixel.
    """
    return signed.mul_(_f32(slope)).add_(0.5).clamp_(0.0, 1.0)


def _ellipse(u: Tensor, v: Tensor, slope: Tensor) -> Tensor:
    """Coverage of the unit disc ``u^2 + v^2 < 1``; near the rim ``1 - q^2 ~ 2 (1 - q)``, hence the half slope.

    For round-ish shapes only: along a long axis the ramp would be as many times too wide as the shape is
    elongated (use :func:`_lens` for thin shapes).
    """
    q2 = u * u
    q2.add_(v * v)
    return _ramp(q2.neg_().add_(1.0), slope * 0.5)


def _lens(u: Tensor, v: Tensor, slope: Tensor) -> Tensor:
    """Coverage of the lens ``|v| < 1 - u^2``: an almond with pointed ends (eyes, lips, brows, scars).

    ``1 - u^2 - |v|`` is the distance across the shape in half-thickness units, so thin shapes get a
    sharp edge along their whole length, unlike an elongated ellipse.
    """
    return _ramp((u * u).neg_().add_(1.0).sub_(v.abs()), slope)


def _box(u: Tensor, v: Tensor, slope_u: Tensor, slope_v: Tensor) -> Tensor:
    """Coverage of the square ``|u| < 1, |v| < 1`` (the bars of glasses)."""
    return torch.minimum(_ramp(1.0 - u.abs(), slope_u), _ramp(1.0 - v.abs(), slope_v))


def _bend(u: Tensor, v: Tensor, bend: Tensor) -> Tensor:
    """``v - bend * u^2``: the shape's centre line becomes the parabola ``v = bend * u^2`` (arcs, smiles)."""
    return v - (u * u).mul_(_f32(bend))


# Supports: how far (in the shape's normalised units, [N, K, 2] for u and v) coverage can be non-zero.


def _ellipse_support(slope: Tensor) -> Tensor:
    """``(1 - q^2) slope / 2 > -1/2`` where ``q^2 < 1 + 1 / slope``."""
    radius = torch.sqrt(1 + 1 / slope)
    return torch.stack([radius, radius], -1)


def _lens_support(slope: Tensor, bend: Tensor | float = 0.0) -> Tensor:
    """``1 - u^2 - |v| > -1 / (2 slope)``, with the centre line bent by up to ``|bend| u^2``."""
    reach_u = torch.sqrt(1 + 0.5 / slope)
    reach_v = 1 + 0.5 / slope + torch.as_tensor(bend, dtype=slope.dtype).abs() * reach_u * reach_u
    return torch.stack([reach_u, reach_v], -1)


def _box_support(slope_u: Tensor, slope_v: Tensor) -> Tensor:
    return torch.stack([1 + 0.5 / slope_u, 1 + 0.5 / slope_v], -1)


def _reach(half_axes: Tensor, support: Tensor, angle: Tensor | None = None) -> Tensor:
    """Canonical axis-aligned half extents ``[N, K, 2]`` of a shape's support, turned by ``angle``."""
    extent = half_axes * support
    if angle is None:
        return extent
    cos, sin = torch.cos(angle).abs(), torch.sin(angle).abs()
    return torch.stack([cos * extent[..., 0] + sin * extent[..., 1], sin * extent[..., 0] + cos * extent[..., 1]], -1)


def _union(alpha: Tensor) -> Tensor:
    """Union of K coverages ``[N, K, H, W] -> [N, H, W]`` (max is exact, hence order-independent)."""
    return alpha.amax(1) if alpha.shape[1] > 1 else alpha[:, 0]


def _f32(x: Tensor) -> Tensor:
    """Per-image float64 values as float32 broadcastable over ``[N, K, H, W]`` (from ``[N]`` or ``[N, K]``)."""
    x = x.float()
    return x.reshape(*x.shape, *([1] * (4 - x.dim())))


@dataclass
class _Canvas:
    """The image being composited (or a window of it) and the maps the lighting stage needs."""

    rgb: Tensor          # float32 [N, 3, H, W]
    cover: Tensor        # float32 [N, H, W] coverage of the person (hair, head, ears, neck): gets shaded
    head: Tensor         # float32 [N, H, W] coverage of the head (skin), for the beard and the mask
    normal_uv: Tensor    # float32 [N, 2, H, W] head-ellipse coordinates, for the shading normal

    def take(self, index: Tensor) -> _Canvas:
        return _Canvas(self.rgb[index], self.cover[index], self.head[index], self.normal_uv[index])

    def put(self, index: Tensor, part: _Canvas) -> None:
        """Write back what layers change (layers drawn on subsets never redraw the head)."""
        self.rgb[index], self.cover[index] = part.rgb, part.cover

    def crop(self, rows: slice, cols: slice) -> _Canvas:
        """A view of a window: painting it paints the canvas."""
        return _Canvas(self.rgb[..., rows, cols], self.cover[..., rows, cols], self.head[..., rows, cols],
                       self.normal_uv[..., rows, cols])

    def paint(self, alpha: Tensor, colour: Tensor, opacity: Tensor | None = None, person: bool = False) -> None:
        """Composite ``colour`` [N, 3] with coverage ``alpha`` [N, H, W] over the image (the "over" operator).

        Written as three plain operations rather than ``torch.lerp``, whose vectorised and scalar paths
        may round differently (fused multiply-add), which would make pixels depend on batch position.
        """
        if opacity is not None:
            alpha = alpha * _f32(opacity)[:, 0]
        if person:
            torch.maximum(self.cover, alpha, out=self.cover)
        delta = colour.float()[:, :, None, None] - self.rgb
        delta.mul_(alpha[:, None])
        self.rgb.add_(delta)


@dataclass(frozen=True)
class _Scene:
    """Everything a layer needs: the layout, nuisance, raster and the identity's colours."""

    layout: _Layout
    nuisance: Nuisance
    raster: _Raster
    colours: dict[str, Tensor]

    @property
    def p(self) -> _Params:
        return self.layout.params

    def take(self, index: Tensor) -> _Scene:
        layout = _Layout(**{f.name: _take_field(getattr(self.layout, f.name), index) for f in fields(_Layout)})
        return _Scene(layout, self.nuisance.take(index), self.raster.take(index),
                      {name: colour[index] for name, colour in self.colours.items()})


def _take_field(value: Tensor | _Params, index: Tensor) -> Tensor | _Params:
    return value.take(index) if isinstance(value, _Params) else value[index]


def _draw_where(present: Tensor, scene: _Scene, canvas: _Canvas, layer: Callable[[_Scene, _Canvas], None]) -> None:
    """Draw ``layer`` only on the images where ``present`` is true (rare layers: glasses, masks, marks...).

    Every operation is elementwise per image, so this gives the same pixels as drawing everywhere with
    zero coverage; it only skips work.
    """
    if bool(present.all()):
        layer(scene, canvas)
        return
    index = present.nonzero()[:, 0]
    if index.numel() == 0:
        return
    part = canvas.take(index)
    layer(scene.take(index), part)
    canvas.put(index, part)


def _windowed(scene: _Scene, canvas: _Canvas, group: int, centre: Tensor,
              reach: Tensor) -> tuple[_Raster, _Canvas] | None:
    """The raster and canvas restricted to the window of :meth:`_Raster.window` (None if off-image)."""
    window = scene.raster.window(group, centre, reach)
    if window is None:
        return None
    return scene.raster.crop(*window), canvas.crop(*window)


def _points(x: Tensor, y: Tensor) -> Tensor:
    """Coordinates ``[N]`` (one shape) or ``[N, K]`` into points ``[N, K, 2]``."""
    if x.dim() == 1:
        x = x[:, None]
    if y.dim() == 1:
        y = y[:, None]
    x, y = torch.broadcast_tensors(x, y)
    return torch.stack([x, y], -1)


def _eye_line(layout: _Layout) -> Tensor:
    """Mean height of the two eyes (canonical y): ``[N]``."""
    return (layout.landmarks[:, 0, 1] + layout.landmarks[:, 1, 1]) / 2


# ----------------------------------------------------------------------------------------------------
# Layers, back to front
# ----------------------------------------------------------------------------------------------------


def _identity_colours(p: _Params) -> dict[str, Tensor]:
    """Albedo of skin, hair, brows, lips and irises per identity: float64 ``[N, 3]`` each."""
    warmth = (2 * p.skin_warmth - 1)[:, None]
    skin = _palette(SKIN_PALETTE, p.skin_tone) * (1 + warmth * _const(SKIN_WARMTH_GAIN, p.skin_tone))
    hair = _palette(HAIR_PALETTE, p.hair_colour)
    brow = 0.5 * (hair + _palette(HAIR_PALETTE, p.brow_colour)) * BROW_DARKENING
    redness = _lerp(LIP_REDNESS, p.lip_colour)[:, None]
    lip = skin * LIP_SKIN_SHADE * (1 - redness) + _const(LIP_RED, skin) * redness
    return {"skin": skin, "hair": hair, "brow": brow, "lip": lip, "iris": _palette(IRIS_PALETTE, p.iris_colour)}


def _draw_background(scene: _Scene, size: int) -> Tensor:
    """A two-colour linear gradient across the image: float32 ``[N, 3, S, S]``."""
    direction = scene.nuisance.background_direction / size
    centre = (size - 1) / 2
    t = (_f32(direction[:, 0]) * (scene.raster.grid_x - centre)
         + (_f32(direction[:, 1]) * (scene.raster.grid_y - centre) + 0.5)).clamp_(0, 1)      # [N, 1, S, S]
    start, end = scene.nuisance.background[:, 0].float(), scene.nuisance.background[:, 1].float()
    return start[:, :, None, None] + (end - start)[:, :, None, None] * t


def _draw_long_hair(scene: _Scene, canvas: _Canvas) -> None:
    """Hair hanging behind the head: from the crown down past the chin, widening below the head centre."""
    layout, p = scene.layout, scene.p
    volume = _lerp(HAIR_VOLUME, p.hair_volume)
    half_width = layout.head_half_width + volume + LONG_HAIR_WIDEN
    half_up = layout.head_half_up + volume
    u, v = scene.raster.frame(GROUP_BACK, layout.head_centre[:, None], _points(half_width, half_up))
    v = torch.where(v > 0, v * _f32(half_up / (half_up + LONG_HAIR_DROP)), v)
    alpha = _union(_ellipse(u, v, scene.raster.slope(torch.minimum(half_width, half_up))))
    canvas.paint(alpha, scene.colours["hair"] * LONG_HAIR_SHADE, person=True)


def _draw_neck(scene: _Scene, canvas: _Canvas) -> None:
    layout = scene.layout
    half_width = layout.head_half_width * NECK_HALF_WIDTH_TO_HEAD
    centre = _points(layout.head_centre[:, 0],
                     layout.head_centre[:, 1] + layout.head_half_down * NECK_TOP_TO_CHIN + NECK_HALF_HEIGHT)
    half_axes = _points(half_width, torch.full_like(half_width, NECK_HALF_HEIGHT))
    slope = scene.raster.slope(half_width)
    sub = _windowed(scene, canvas, GROUP_BACK, centre, _reach(half_axes, _ellipse_support(slope)))
    if sub is None:
        return
    raster, canvas = sub
    u, v = raster.frame(GROUP_BACK, centre, half_axes)
    canvas.paint(_union(_ellipse(u, v, slope)), scene.colours["skin"] * NECK_SHADE, person=True)


def _draw_ears(scene: _Scene, canvas: _Canvas) -> None:
    layout, p = scene.layout, scene.p
    half_height = _lerp(EAR_HALF_HEIGHT, p.ear_size)
    half_axes = _points(half_height * EAR_ASPECT, half_height)
    slope = scene.raster.slope(half_height * EAR_ASPECT)
    offset = layout.head_half_width * EAR_INSET + _lerp(EAR_PROTRUSION, p.ear_protrusion)
    for side in (-1.0, 1.0):
        centre = _points(layout.head_centre[:, 0] + side * offset, _eye_line(layout) + EAR_HEIGHT_BELOW_EYES)
        sub = _windowed(scene, canvas, GROUP_EARS, centre, _reach(half_axes, _ellipse_support(slope)))
        if sub is None:
            continue
        raster, window = sub
        u, v = raster.frame(GROUP_EARS, centre, half_axes)
        window.paint(_union(_ellipse(u, v, slope)), scene.colours["skin"] * EAR_SHADE, person=True)


def _draw_head(scene: _Scene, canvas: _Canvas) -> None:
    """Skin oval: an ellipse with separate crown and chin half-heights whose lower half narrows (jaw taper).

    Its local coordinates are kept as the shading normal's, and its coverage for the beard and the mask.
    """
    layout, p = scene.layout, scene.p
    u, v = scene.raster.frame(GROUP_OUTLINE, layout.head_centre[:, None],
                              _points(layout.head_half_width, layout.head_half_down))
    v = torch.where(v < 0, v * _f32(layout.head_half_down / layout.head_half_up), v)
    below = v.clamp(0.0, 1.0)
    u = u / (1 - (below * below).mul_(_f32(_lerp(JAW_TAPER, p.jaw_taper))))
    slope = scene.raster.slope(torch.minimum(layout.head_half_width, layout.head_half_down))
    alpha = _union(_ellipse(u, v, slope))
    canvas.head = alpha
    canvas.normal_uv = torch.cat([u, v], 1)
    canvas.paint(alpha, scene.colours["skin"], person=True)


def _hairline(scene: _Scene) -> tuple[Tensor, Tensor, Tensor]:
    """Per hair style: hairline height at the midline, its drop at the temples, and the parting depth."""
    layout, p = scene.layout, scene.p
    style = p.hair_style
    fringe = (layout.brow_y + BROW_RAISE_MAX * scene.nuisance.brow_raise) - _lerp(FRINGE_ABOVE_BROWS, p.hairline_height)
    is_fringe = style == HAIR_STYLES.index("fringe")
    top = torch.where(is_fringe, fringe, _lerp(HAIRLINE_Y, p.hairline_height))
    drop = torch.where(is_fringe, torch.full_like(top, FRINGE_TEMPLE_DROP), torch.full_like(top, TEMPLE_DROP))
    part = (style == HAIR_STYLES.index("parted")).double() * PART_DEPTH
    return top, drop, part


def _draw_hair(scene: _Scene, canvas: _Canvas) -> None:
    """Hair cap: an ellipse a little larger than the head, above a hairline that drops at the temples
    (low and straight for a fringe, with a V at the parting for parted hair)."""
    layout, p = scene.layout, scene.p
    volume = _lerp(HAIR_VOLUME, p.hair_volume)
    half_width, half_up = layout.head_half_width + volume, layout.head_half_up + volume
    u, v = scene.raster.frame(GROUP_OUTLINE, layout.head_centre[:, None], _points(half_width, half_up))
    cap = _ellipse(u, v, scene.raster.slope(torch.minimum(half_width, half_up)))
    top, drop, part = _hairline(scene)
    x = u * _f32(half_width)                                              # canonical, from the midline
    y = v * _f32(half_up) + _f32(layout.head_centre[:, 1] - top)          # canonical, below the hairline top
    across = x * _f32(1 / layout.head_half_width)
    line = (across * across).mul_(_f32(drop))                             # the hairline, below its top
    parting = x.sub_(_f32(_lerp(PART_OFFSET, p.hair_parting_side)))
    line.sub_((1 - parting.abs_() * (1 / PART_HALF_WIDTH)).clamp_(0, 1).mul_(_f32(part)))
    above_line = line.sub_(y)
    alpha = torch.minimum(cap, _ramp(above_line, scene.raster.pixel_scale))
    canvas.paint(_union(alpha), scene.colours["hair"], person=True)


def _draw_marks(scene: _Scene, canvas: _Canvas) -> None:
    """Moles (small dark ovals) and scars (thin pale strokes) in the first ``mark_count`` slots."""
    layout, p = scene.layout, scene.p
    for k in range(MAX_MARKS):
        present = p.mark_count > k
        if not bool(present.any()):
            continue
        x = layout.head_centre[:, 0] + (2 * getattr(p, f"mark{k}_x") - 1) * MARK_X_SPREAD * layout.head_half_width
        y = _eye_line(layout) + _lerp(MARK_Y_RANGE_FROM_EYES, getattr(p, f"mark{k}_y"))
        size = getattr(p, f"mark{k}_size")
        is_scar = getattr(p, f"mark{k}_kind") == MARK_KINDS.index("scar")
        radius = _lerp(MOLE_RADIUS, size)
        half_axes = _points(torch.where(is_scar, _lerp(SCAR_HALF_LENGTH, size), radius * 1.3),
                            torch.where(is_scar, torch.full_like(size, SCAR_HALF_WIDTH), radius))
        angle = (math.pi * getattr(p, f"mark{k}_angle"))[:, None]
        slope = scene.raster.slope(half_axes[..., 1])
        colour = torch.where(is_scar[:, None], _const(SCAR_COLOUR, x) * scene.colours["skin"].sqrt(),
                             scene.colours["skin"] * MOLE_COLOUR_TO_SKIN)
        centre = _points(x, y)
        # Images without this mark are moved far off the image so that they do not widen the window.
        centre = torch.where(present[:, None, None], centre, torch.full_like(centre, -1e4))
        sub = _windowed(scene, canvas, GROUP_CHEEKS, centre, _reach(half_axes, _lens_support(slope), angle))
        if sub is None:
            continue
        raster, window = sub
        u, v = raster.frame(GROUP_CHEEKS, centre, half_axes, angle)
        window.paint(_union(_lens(u, v, slope)), colour, present.double())


def _draw_beard(scene: _Scene, canvas: _Canvas) -> None:
    """Beard: the head region below a line from the sideburns down to above the mouth."""
    layout, p = scene.layout, scene.p
    centre_top = layout.mouth_corners[:, :, 1].mean(1) - BEARD_TOP_ABOVE_MOUTH
    side_top = _eye_line(layout) + BEARD_SIDE_TOP_BELOW_EYES
    u, v = scene.raster.frame(GROUP_OUTLINE, _points(layout.head_centre[:, 0], centre_top),
                              _points(layout.head_half_width, torch.ones_like(centre_top)))
    below = _bend(u, v, side_top - centre_top)           # canonical px below the line (u: head half-widths)
    alpha = torch.minimum(canvas.head, _ramp(below, scene.raster.pixel_scale)[:, 0])
    canvas.paint(alpha, scene.colours["hair"] * BEARD_SHADE, _lerp(FACIAL_HAIR_DENSITY, p.facial_hair_density))


def _draw_blob(scene: _Scene, canvas: _Canvas, group: int, centre: Tensor, half_axes: Tensor, slope: Tensor,
               colour: Tensor, opacity: Tensor | None = None) -> None:
    """An ellipse (K shapes of one colour) drawn in its own window."""
    sub = _windowed(scene, canvas, group, centre, _reach(half_axes, _ellipse_support(slope)))
    if sub is None:
        return
    raster, window = sub
    u, v = raster.frame(group, centre, half_axes)
    window.paint(_union(_ellipse(u, v, slope)), colour, opacity)


def _draw_nose(scene: _Scene, canvas: _Canvas) -> None:
    """Nose: a soft shaded ridge from the eyes to the tip, a shadow under the tip and two nostrils."""
    layout, p, raster = scene.layout, scene.p, scene.raster
    tip = layout.landmarks[:, 2]
    half_width = _lerp(NOSE_HALF_WIDTH, p.nose_width)
    skin = scene.colours["skin"]
    ridge_half_length = (tip[:, 1] - _eye_line(layout)) / 2 + 1
    ridge = _points(half_width * 0.55, ridge_half_length)
    _draw_blob(scene, canvas, GROUP_NOSE, _points(tip[:, 0], tip[:, 1] - ridge_half_length + 1), ridge,
               raster.slope(ridge[..., 0], SOFT_EDGE_PX), skin * NOSE_SHADE,
               torch.full_like(half_width, NOSE_RIDGE_OPACITY))
    base = _points(half_width, torch.full_like(half_width, NOSE_BASE_HALF_HEIGHT))
    _draw_blob(scene, canvas, GROUP_NOSE, _points(tip[:, 0], tip[:, 1] + NOSE_BASE_HALF_HEIGHT), base,
               raster.slope(base[..., 1], SOFT_EDGE_PX), skin * NOSE_SHADE ** 2,
               torch.full_like(half_width, NOSE_BASE_OPACITY))
    nostril_x = torch.stack([tip[:, 0] - 0.45 * half_width, tip[:, 0] + 0.45 * half_width], 1)
    nostril = _points(*(s * half_width for s in NOSTRIL_HALF_SIZE_TO_NOSE)).expand(-1, 2, 2)
    _draw_blob(scene, canvas, GROUP_NOSE, _points(nostril_x, tip[:, 1] + NOSE_BASE_HALF_HEIGHT), nostril,
               raster.slope(nostril[..., 1]), skin * NOSTRIL_SHADE)


def _mouth_geometry(scene: _Scene, half_height: Tensor,
                    raise_by: Tensor | float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Frame of the mouth: centre [N, 1, 2], half axes [N, 1, 2], angle [N, 1] and bend [N, 1], so that u
    runs from corner to corner (-1..1) and v (in ``half_height`` units), bent by the smile, keeps the
    lifted corners on ``v = 0`` (``raise_by`` moves the frame up)."""
    corners = scene.layout.mouth_corners
    middle = (corners[:, 0] + corners[:, 1]) / 2
    delta = corners[:, 1] - corners[:, 0]
    lift = SMILE_LIFT * scene.nuisance.smile
    centre = _points(middle[:, 0], middle[:, 1] + lift - raise_by)
    angle = torch.atan2(delta[:, 1], delta[:, 0])[:, None]
    return centre, _points(delta[:, 0] / 2, half_height), angle, (-lift / half_height)[:, None]


def _draw_mouth(scene: _Scene, canvas: _Canvas) -> None:
    """Lips (a lens, thicker below) around a dark slit that opens into the mouth interior."""
    p, nuisance = scene.p, scene.nuisance
    upper = _lerp(LIP_HALF_THICKNESS, p.lip_thickness)
    opening = MOUTH_OPEN_MAX * nuisance.mouth_open
    lower = upper * LOWER_LIP_RATIO + opening
    interior_half = MOUTH_SLIT_HALF_HEIGHT + opening / 2
    centre, half_axes, angle, bend = _mouth_geometry(scene, torch.ones_like(upper))
    slope, interior_slope = scene.raster.slope(upper), scene.raster.slope(interior_half)
    # v is in canonical px here: scale each lens's support by its own half-thickness (and offset).
    lips = _lens_support(slope, bend / lower[:, None]) * _points(torch.ones_like(lower), lower)
    interior = (_lens_support(interior_slope, bend / interior_half[:, None])
                * _points(torch.ones_like(lower), interior_half))
    support = torch.maximum(lips, interior + _points(torch.zeros_like(lower), opening / 2))
    sub = _windowed(scene, canvas, GROUP_FEATURES, centre, _reach(half_axes, support, angle))
    if sub is None:
        return
    raster, window = sub
    u, v = raster.frame(GROUP_FEATURES, centre, half_axes, angle)
    v = _bend(u, v, bend)
    lips_v = torch.where(v < 0, v * _f32(1 / upper), v * _f32(1 / lower))
    window.paint(_union(_lens(u, lips_v, slope)), scene.colours["lip"])
    interior_v = (v - _f32(opening / 2)).mul_(_f32(1 / interior_half))
    window.paint(_union(_lens(u, interior_v, interior_slope)), _const(MOUTH_INTERIOR_COLOUR, upper))


def _draw_moustache(scene: _Scene, canvas: _Canvas) -> None:
    """A lens above the upper lip, a little wider than the mouth, its ends drooping."""
    upper = _lerp(LIP_HALF_THICKNESS, scene.p.lip_thickness)
    half_height = torch.full_like(upper, MOUSTACHE_HALF_HEIGHT)
    centre, half_axes, angle, bend = _mouth_geometry(scene, half_height, raise_by=upper + MOUSTACHE_HALF_HEIGHT * 0.7)
    half_axes = half_axes * torch.tensor([MOUSTACHE_WIDEN, 1.0], dtype=torch.float64, device=upper.device)
    bend = bend / MOUSTACHE_WIDEN ** 2 + MOUSTACHE_DROOP
    slope = scene.raster.slope(half_height)
    sub = _windowed(scene, canvas, GROUP_FEATURES, centre, _reach(half_axes, _lens_support(slope, bend), angle))
    if sub is None:
        return
    raster, window = sub
    u, v = raster.frame(GROUP_FEATURES, centre, half_axes, angle)
    window.paint(_union(_lens(u, _bend(u, v, bend), slope)), scene.colours["hair"],
                 _lerp(FACIAL_HAIR_DENSITY, scene.p.facial_hair_density))


def _draw_eyes(scene: _Scene, canvas: _Canvas) -> None:
    """Per eye: a socket shadow, then sclera, iris and pupil inside the opening left by the upper lid, and
    a dark lash line along the lid. The upper lid is the lens's upper arc, lowered by ``blink`` onto the
    lower arc (a closed eye is just the lash line)."""
    layout = scene.layout
    eye_hh, eye_hw = layout.eye_half_height, layout.eye_half_width
    half_axes = _points(eye_hw, eye_hh)
    slope, slope_u = scene.raster.slope(eye_hh), scene.raster.slope(eye_hw)
    socket_axes = half_axes * SOCKET_SCALE
    socket_slope = scene.raster.slope(eye_hh * SOCKET_SCALE, SOFT_EDGE_PX)
    lash_support = torch.stack([1 + 0.5 / slope_u, 1 + LASH_HALF_THICKNESS + 0.5 / slope], -1)
    raise_socket = torch.tensor([0.0, SOCKET_RAISE], dtype=torch.float64, device=eye_hh.device)
    for side in (0, 1):
        centre = layout.landmarks[:, side:side + 1]
        reach = torch.maximum(_reach(half_axes, lash_support),
                              _reach(socket_axes, _ellipse_support(socket_slope)) + raise_socket)
        sub = _windowed(scene, canvas, GROUP_FEATURES, centre, reach)
        if sub is None:
            continue
        raster, window = sub
        u, v = raster.frame(GROUP_FEATURES, centre - raise_socket, socket_axes)
        window.paint(_union(_ellipse(u, v, socket_slope)), scene.colours["skin"] * SOCKET_SHADE,
                     torch.full_like(eye_hh, SOCKET_OPACITY))
        u, v = raster.frame(GROUP_FEATURES, centre, half_axes)
        _paint_eye(scene, window, u, v, slope, slope_u)


def _paint_eye(scene: _Scene, window: _Canvas, u: Tensor, v: Tensor, slope: Tensor, slope_u: Tensor) -> None:
    """Sclera, iris, pupil and lash line of one eye, in the eye's lens coordinates ``(u, v)``."""
    layout = scene.layout
    eye_hh = layout.eye_half_height
    profile = (u * u).neg_().add_(1.0)                                     # lens half-thickness at u
    lid = profile * _f32(2 * scene.nuisance.blink - 1)
    opening = torch.minimum(_ramp(profile - v.abs(), slope), _ramp(v - lid, slope))
    window.paint(_union(opening), _const(SCLERA_COLOUR, eye_hh))
    iris_radius = eye_hh * IRIS_TO_EYE_HEIGHT
    iris_u, iris_v = u * _f32(layout.eye_half_width / iris_radius), v * (1 / IRIS_TO_EYE_HEIGHT)
    iris = torch.minimum(_ellipse(iris_u, iris_v, scene.raster.slope(iris_radius)), opening)
    window.paint(_union(iris), scene.colours["iris"])
    pupil_u, pupil_v = iris_u.mul_(1 / PUPIL_TO_IRIS), iris_v.mul_(1 / PUPIL_TO_IRIS)
    pupil = torch.minimum(_ellipse(pupil_u, pupil_v, scene.raster.slope(iris_radius * PUPIL_TO_IRIS)), opening)
    window.paint(_union(pupil), _const(PUPIL_COLOUR, eye_hh))
    lash = torch.minimum(_ramp(LASH_HALF_THICKNESS - (v - lid).abs_(), slope), _ramp(1.0 - u.abs(), slope_u))
    window.paint(_union(lash), _const(LASH_COLOUR, eye_hh))


def _draw_brows(scene: _Scene, canvas: _Canvas) -> None:
    """Two arched lenses above the eyes; their lateral ends tilt by ``brow_angle``."""
    layout, p = scene.layout, scene.p
    half_length = layout.eye_half_width * BROW_HALF_LENGTH_TO_EYE
    half_thickness = _lerp(BROW_HALF_THICKNESS, p.brow_thickness)
    half_axes = _points(half_length, half_thickness)
    angle = _lerp(BROW_ANGLE_RAD, p.brow_angle)[:, None]
    arch = ((BROW_ARCH + 0.5 * scene.nuisance.brow_raise) * half_length / 4 / half_thickness)[:, None]
    slope = scene.raster.slope(half_thickness)
    for side, turn in ((0, -1.0), (1, 1.0)):
        centre = _points(layout.landmarks[:, side, 0], layout.brow_y)
        sub = _windowed(scene, canvas, GROUP_FEATURES, centre, _reach(half_axes, _lens_support(slope, arch), angle))
        if sub is None:
            continue
        raster, window = sub
        u, v = raster.frame(GROUP_FEATURES, centre, half_axes, turn * angle)
        window.paint(_union(_lens(u, _bend(u, v, arch), slope)), scene.colours["brow"])


def _draw_glasses(scene: _Scene, canvas: _Canvas) -> None:
    """Two elliptical rims around the eyes (tinted lenses for sunglasses), a bridge and the arms."""
    layout, nuisance = scene.layout, scene.nuisance
    rim_a, rim_b = (layout.eye_half_width * s for s in GLASSES_RIM_SCALE)
    eyes = layout.landmarks[:, :2]
    rim_axes = _points(rim_a, rim_b).expand(-1, 2, 2)
    rim_slope = scene.raster.slope(rim_b[:, None].expand(-1, 2))
    half_gap = (eyes[:, 1, 0] - eyes[:, 0, 0]) / 2 - rim_a
    reach = layout.head_half_width - (eyes[:, 1, 0] - eyes[:, 0, 0]) / 2 - rim_a
    bar_x = torch.stack([layout.head_centre[:, 0], eyes[:, 0, 0] - rim_a - reach / 2,
                         eyes[:, 1, 0] + rim_a + reach / 2], 1)
    bar_lift = torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64, device=eyes.device)
    bar_y = eyes[:, :, 1].mean(1, keepdim=True) - rim_b[:, None] * bar_lift
    bar_axes = _points(torch.stack([half_gap + 1, reach / 2, reach / 2], 1),
                       torch.full_like(bar_x, GLASSES_RIM_HALF_THICKNESS))
    bar_slopes = scene.raster.slope(bar_axes[..., 0]), scene.raster.slope(bar_axes[..., 1])
    rim_support = _ellipse_support(rim_slope) * (1 + 2 * GLASSES_RIM_HALF_THICKNESS / rim_b)[:, None, None]
    centres = torch.cat([eyes, _points(bar_x, bar_y)], 1)
    reaches = torch.cat([_reach(rim_axes, rim_support), _reach(bar_axes, _box_support(*bar_slopes))], 1)
    sub = _windowed(scene, canvas, GROUP_FEATURES, centres, reaches)
    if sub is None:
        return
    raster, window = sub
    u, v = raster.frame(GROUP_FEATURES, eyes, rim_axes)
    q2 = u * u
    q2.add_(v * v)
    rim = _ramp(_f32(2 * GLASSES_RIM_HALF_THICKNESS / rim_b) - (q2 - 1).abs_(), rim_slope * 0.5)
    lens = _ramp(q2.neg_().add_(1.0), rim_slope * 0.5)
    window.paint(_union(lens), nuisance.glasses_colour * GLASSES_LENS_SHADE, nuisance.glasses_tint)
    window.paint(_union(rim), nuisance.glasses_colour)
    u, v = raster.frame(GROUP_FEATURES, _points(bar_x, bar_y), bar_axes)
    window.paint(_union(_box(u, v, *bar_slopes)), nuisance.glasses_colour)


def _draw_mask(scene: _Scene, canvas: _Canvas) -> None:
    """Surgical mask: the head region below a line across the nose bridge that drops towards the cheeks."""
    layout = scene.layout
    top = layout.landmarks[:, 2, 1] - MASK_TOP_ABOVE_NOSE
    u, v = scene.raster.frame(GROUP_OUTLINE, _points(layout.head_centre[:, 0], top),
                              _points(layout.head_half_width, torch.ones_like(top)))
    below = _bend(u, v, torch.full_like(top, MASK_TOP_CURVE))
    alpha = torch.minimum(canvas.head, _ramp(below, scene.raster.pixel_scale)[:, 0])
    canvas.paint(alpha, scene.nuisance.mask_colour)


# ----------------------------------------------------------------------------------------------------
# Illumination and camera effects
# ----------------------------------------------------------------------------------------------------


def _shade(canvas: _Canvas, nuisance: Nuisance) -> None:
    """Lambertian shading over the head ellipsoid normal, applied to the person; the background only gets
    the light's gain. ``n = (u, v, sqrt(1 - u^2 - v^2))`` inside the head ellipse, horizontal outside."""
    u, v = canvas.normal_uv[:, 0], canvas.normal_uv[:, 1]
    q2 = u * u
    q2.add_(v * v)
    inside = (1 - q2).clamp_(min=0).sqrt_()
    outside = q2.clamp_(min=1).sqrt_().reciprocal_()
    light = nuisance.light_direction
    lambert = (u * outside).mul_(_f32(light[:, 0])[:, 0])
    lambert.add_((v * outside).mul_(_f32(light[:, 1])[:, 0])).add_(inside.mul_(_f32(light[:, 2])[:, 0]))
    ambient = _f32(nuisance.ambient)[:, 0]
    shade = lambert.clamp_(min=0).mul_(1 - ambient).add_(ambient)
    shade = (shade - BACKGROUND_GAIN).mul_(canvas.cover).add_(BACKGROUND_GAIN)
    canvas.rgb.mul_(shade[:, None]).mul_(nuisance.light_gain.float()[:, :, None, None])


def _blur(rgb: Tensor, sigma_px: Tensor) -> Tensor:
    """Separable gaussian blur with a per-image sigma (output pixels), replicate borders.

    Each image's taps beyond its own radius are exact zeros, and taps are summed in a fixed order, so
    the result does not depend on the other images' sigmas.
    """
    radius = int(math.ceil(BLUR_RADIUS_SIGMAS * float(sigma_px.max())))
    if radius == 0:
        return rgb
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=rgb.device)
    own_radius = torch.ceil(BLUR_RADIUS_SIGMAS * sigma_px)[:, None]
    weights = torch.exp(-0.5 * (offsets / sigma_px[:, None].clamp(min=1e-6)) ** 2) * (offsets.abs() <= own_radius)
    weights = (weights / weights.sum(1, keepdim=True)).float()                               # [N, 2R+1]
    size = rgb.shape[-1]
    for dim, padding in ((-1, (radius, radius, 0, 0)), (-2, (0, 0, radius, radius))):
        padded = torch.nn.functional.pad(rgb, padding, mode="replicate")
        out = torch.zeros_like(rgb)
        for k in range(2 * radius + 1):
            out.add_(padded.narrow(dim, k, size) * weights[:, k, None, None, None])
        rgb = out
    return rgb


def _noise_tile(seed: int, side: int, device: torch.device | str = "cpu") -> Tensor:
    """A ``side x side`` RGB tile of zero-mean, unit-variance uniform noise (float32 ``[side * side, 3]``)
    from the world seed; images read it at their own random offset (see :func:`_sensor_noise`)."""
    key = HashKey.start((side * side,), device).absorb(seed).absorb(torch.arange(side * side, device=device))
    return ((key.uniforms(_STREAM_PIXEL_NOISE, 3) - 0.5) * math.sqrt(12)).float()


def _sensor_noise(rgb: Tensor, std_levels: Tensor, key: Tensor, tile: Tensor) -> Tensor:
    """Add zero-mean noise of the given standard deviation (grey levels): a window of the noise tile at
    an offset drawn from each image's key.

    Reading a shared tile costs one gather per pixel instead of a per-pixel hash (which took about a
    tenth of the render time at 32 px); with 65536 offsets per world, no CNN can exploit the pattern.
    """
    side = math.isqrt(tile.shape[0])
    _, _, height, width = rgb.shape
    offset_x, offset_y = key % side, (key >> 16) % side
    rows = (offset_y[:, None] + torch.arange(height, device=rgb.device)) % side * side
    cols = (offset_x[:, None] + torch.arange(width, device=rgb.device)) % side
    index = (rows[:, :, None] + cols[:, None, :]).view(-1)
    noise = tile.index_select(0, index).view(-1, height, width, 3).permute(0, 3, 1, 2).contiguous()
    return rgb + noise.mul_(_f32(std_levels / 255))


def _quantise(rgb: Tensor) -> Tensor:
    return (rgb * 255).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def _jpeg(images: Tensor, quality: Tensor) -> Tensor:
    """JPEG-code each image at its own quality (0: untouched); one torchvision call per quality level."""
    from torchvision.io import decode_jpeg, encode_jpeg  # heavy import, only needed here

    out = images.clone()
    for level in torch.unique(quality[quality > 0]).tolist():
        index = (quality == level).nonzero()[:, 0]
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not a dependency);
            # they still work, and the warning would repeat for every chunk rendered.
            warnings.filterwarnings("ignore", _TORCHVISION_CODEC_DEPRECATION, DeprecationWarning)
            decoded = decode_jpeg(encode_jpeg(list(images[index].cpu()), quality=int(level)))
        out[index] = torch.stack(decoded).to(images.device)
    return out


_TORCHVISION_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


# ----------------------------------------------------------------------------------------------------
# The renderer
# ----------------------------------------------------------------------------------------------------


class SynthFace:
    """Deterministic procedural face renderer (see the module docstring for the generative model)."""

    NUM_PARAMS: int = len(PARAM_NAMES)
    PARAM_NAMES: tuple[str, ...] = PARAM_NAMES

    def __init__(self, config: SynthFaceConfig = SynthFaceConfig()) -> None:
        self.config = config
        # Read-only after construction; as large as the image so that no image repeats the pattern.
        self._noise_tile = _noise_tile(config.seed, max(NOISE_TILE_SIDE, config.image_size))

    # -- keys ---------------------------------------------------------------------------------------

    def _identity_key(self, identities: Tensor, namespace: int) -> HashKey:
        start = HashKey.start(tuple(identities.shape), identities.device)
        return start.absorb(self.config.seed).absorb(namespace).absorb(identities)

    # -- identities ---------------------------------------------------------------------------------

    def twin_of(self, identities: Tensor, namespace: int = 0) -> Tensor:
        """The look-alike partner of each identity (``identity ^ 1``), or -1 when it has none: int64 ``[N]``."""
        identities = _as_ids(identities, "identities")
        pair = identities // 2
        key = self._identity_key(pair, namespace)
        is_twin = key.uniforms(_STREAM_TWIN_SELECT, 1)[:, 0] < self.config.twin_fraction
        return torch.where(is_twin, identities ^ 1, torch.full_like(identities, -1))

    def identity_params(self, identities: Tensor, namespace: int = 0) -> Tensor:
        """Parameter vector of each identity (columns :attr:`PARAM_NAMES`): float32 ``[N, NUM_PARAMS]``."""
        identities = _as_ids(identities, "identities")
        twin = self.twin_of(identities, namespace)
        derived = (twin >= 0) & (identities % 2 == 1)
        # The odd member of a pair starts from its partner's draw; the partner is always drawn fresh.
        source = torch.where(derived, twin, identities)
        params = _draw_identity_params(self._identity_key(source, namespace))
        own_key = self._identity_key(identities, namespace)
        perturbation = 2 * own_key.uniforms(_STREAM_TWIN_PERTURB, _NUM_CONTINUOUS) - 1
        continuous = params[:, :_NUM_CONTINUOUS] + TWIN_PERTURBATION * perturbation * derived[:, None].double()
        params = torch.cat([continuous.clamp(0.0, 1.0), params[:, _NUM_CONTINUOUS:]], 1)
        return params.float()

    # -- nuisance -----------------------------------------------------------------------------------

    def sample_nuisance(self, identities: Tensor, samples: Tensor, namespace: int = 0,
                        nuisance: float | None = None) -> Nuisance:
        """The per-image nuisance of each (identity, sample), scaled by ``nuisance`` (default: the config's)."""
        strength = self.config.nuisance if nuisance is None else nuisance
        _check_float("nuisance", strength, 0.0, MAX_NUISANCE)
        identities, samples = _pairs(identities, samples)
        key = self._identity_key(identities, namespace).absorb(samples)
        return _draw_nuisance(key, float(strength))

    # -- rendering ----------------------------------------------------------------------------------

    def render(self, identities: Tensor, samples: Tensor, namespace: int = 0, *,
               nuisance: float | None = None) -> Rendered:
        """Images and landmarks of sample ``samples[i]`` of identity ``identities[i]`` (one batch)."""
        identities, samples = _pairs(identities, samples)
        return self.render_with(self.identity_params(identities, namespace),
                                self.sample_nuisance(identities, samples, namespace, nuisance))

    def render_with(self, params: Tensor, nuisance: Nuisance) -> Rendered:
        """Render explicit identity parameters under an explicit nuisance (for tests and diagnostics)."""
        size = self.config.image_size
        count = params.shape[0]
        if count == 0:
            return Rendered(torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, NUM_LANDMARKS, 2))
        p = _Params(params)
        layout = _layout(p, nuisance)
        forward = _forward_affines(layout, nuisance, size)
        scene = _Scene(layout, nuisance, _make_raster(forward, size), _identity_colours(p))
        rgb = _draw_background(scene, size)
        canvas = _Canvas(rgb, torch.zeros(count, size, size), torch.zeros(count, size, size),
                         torch.zeros(count, 2, size, size))
        _composite_face(scene, canvas)
        _shade(canvas, nuisance)
        images = _camera(canvas.rgb, nuisance, size, self._noise_tile)
        return Rendered(images=images, landmarks=_output_landmarks(layout, forward).float())

    def render_many(self, identities: Tensor, samples: Tensor, namespace: int = 0, *, batch_size: int = 1024,
                    progress: bool = True, description: str = "rendering") -> Rendered:
        """:meth:`render` in chunks of ``batch_size`` (bounded memory), with a rich progress bar on stderr."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        identities, samples = _pairs(identities, samples)
        if batch_size < 1:
            raise ConfigError(f"render_many batch_size={batch_size} is invalid; allowed: an integer >= 1")
        total = identities.shape[0]
        size = self.config.image_size
        images = torch.empty(total, 3, size, size, dtype=torch.uint8)
        landmarks = torch.empty(total, NUM_LANDMARKS, 2)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=False) as bar:
            task = bar.add_task(description, total=total)
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                chunk = self.render(identities[start:stop], samples[start:stop], namespace)
                images[start:stop], landmarks[start:stop] = chunk.images, chunk.landmarks
                bar.advance(task, stop - start)
        return Rendered(images=images, landmarks=landmarks)


def _make_raster(forward: Tensor, size: int) -> _Raster:
    grid = torch.arange(size, dtype=torch.float32, device=forward.device)
    linear = forward[:, GROUP_OUTLINE, :, :2]
    pixel_scale = (linear[:, 0, 0] * linear[:, 1, 1] - linear[:, 0, 1] * linear[:, 1, 0]).abs().sqrt()
    return _Raster(grid.view(1, 1, 1, size), grid.view(1, 1, size, 1), forward, _invert(forward), pixel_scale, size)


def _composite_face(scene: _Scene, canvas: _Canvas) -> None:
    """All layers back to front; rare ones only where present."""
    p, nuisance = scene.p, scene.nuisance
    _draw_where(p.hair_style == HAIR_STYLES.index("long"), scene, canvas, _draw_long_hair)
    _draw_neck(scene, canvas)
    _draw_ears(scene, canvas)
    _draw_head(scene, canvas)
    _draw_where(p.mark_count > 0, scene, canvas, _draw_marks)
    _draw_where(p.facial_hair_type == FACIAL_HAIR_TYPES.index("beard"), scene, canvas, _draw_beard)
    _draw_nose(scene, canvas)
    _draw_mouth(scene, canvas)
    _draw_where(p.facial_hair_type > 0, scene, canvas, _draw_moustache)
    _draw_eyes(scene, canvas)
    _draw_where(p.hair_style != HAIR_STYLES.index("bald"), scene, canvas, _draw_hair)
    _draw_brows(scene, canvas)
    _draw_where(nuisance.glasses > 0, scene, canvas, _draw_glasses)
    _draw_where(nuisance.mask > 0, scene, canvas, _draw_mask)


def _camera(rgb: Tensor, nuisance: Nuisance, size: int, noise_tile: Tensor) -> Tensor:
    """Blur, sensor noise, 8-bit quantisation and JPEG, each only on the images that get it."""
    sigma_px = nuisance.blur_sigma * size / TEMPLATE_SIZE
    blurred = sigma_px > 0
    if bool(blurred.any()):
        index = blurred.nonzero()[:, 0]
        rgb[index] = _blur(rgb[index], sigma_px[index])
    noisy = nuisance.noise_std > 0
    if bool(noisy.any()):
        index = noisy.nonzero()[:, 0]
        key = nuisance.pixel_noise_key[index]
        rgb[index] = _sensor_noise(rgb[index], nuisance.noise_std[index], key, noise_tile)
    images = _quantise(rgb)
    if bool((nuisance.jpeg_quality > 0).any()):
        images = _jpeg(images, nuisance.jpeg_quality)
    return images


def _as_ids(values: Tensor, name: str) -> Tensor:
    values = torch.as_tensor(values)
    if values.dtype.is_floating_point or values.dtype == torch.bool or values.dim() != 1:
        raise ConfigError(f"SynthFace {name} must be a 1-D integer tensor, got dtype {values.dtype} "
                          f"shape {tuple(values.shape)}")
    if values.numel() and int(values.min()) < 0:
        raise ConfigError(f"SynthFace {name} must be >= 0, got {int(values.min())}")
    return values.long()


def _pairs(identities: Tensor, samples: Tensor) -> tuple[Tensor, Tensor]:
    identities, samples = _as_ids(identities, "identities"), _as_ids(samples, "samples")
    if identities.shape != samples.shape:
        raise ConfigError(f"SynthFace identities and samples must have the same length, got "
                          f"{identities.shape[0]} and {samples.shape[0]}")
    return identities, samples
