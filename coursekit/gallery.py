"""Lecture 2's gallery of class and unit visualisations: long runs, built once, shipped as PNGs.

The feature-visualisation recipe of Olah, Mordvintsev & Schubert (2017) and of their libraries
(Lucid, Lucent): the picture is a 1/f-scaled Fourier spectrum in decorrelated colours, squashed
by a sigmoid (:func:`coursekit.image_params.fourier_image`); before every forward pass it is
padded, jittered, rescaled and rotated by a fresh random draw (transformation robustness); Adam
climbs the objective for 512 steps. That costs minutes on one CPU thread, more than a lecture
notebook may take, so the long runs are an *asset build*:

    python -m coursekit.gallery build          # about 10 minutes on one thread; rewrites data/gallery/
    python -m coursekit.gallery check          # are the shipped pictures what the code makes?

The build writes lossless PNGs and ``gallery.json``: the recipe's parameters, classes and units,
seed, torch version, the time it took, and a hash of the source text of every function that made
the pictures (:func:`code_hashes`), so a test notices a recipe changed without a rebuild. A
notebook shows the shipped pictures with :func:`load_gallery` beside a short live run of the same
code (:data:`LIVE_RECIPE`: same transforms, fewer steps, smaller pictures).

Two galleries:

* classes (:data:`CLASSES`, Fleuret's six): the logit of each class, at the model's 224 px;
* units across the depth (:data:`UNITS`): three channels of an early, a middle and a late block,
  and one neuron (the centre position of the first of those channels) per block, at 128 px,
  as in Distill's per-layer overviews.

References
----------
Olah, Mordvintsev & Schubert (2017), Feature visualization. Distill. https://distill.pub/2017/feature-visualization/
Mordvintsev, Pezzotti, Schubert & Olah (2018), Differentiable image parameterizations. Distill.
Fleuret (2018), AMMI Introduction to Deep Learning, 8.4 "Optimizing inputs".
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import image_params, objectives, optimize
from ._reference import reference_code, reference_key
from .images import to_pil
from .maximize import MaximizationResult, maximize
from .models import load_model

__all__ = [
    "CLASSES",
    "CLASS_RECIPE",
    "GALLERY_DIR",
    "Gallery",
    "LIVE_RECIPE",
    "Recipe",
    "UNITS",
    "UNIT_RECIPE",
    "Unit",
    "build",
    "class_indices",
    "code_hashes",
    "image_stats",
    "load_gallery",
    "main",
    "recipe_transforms",
    "stale_assets",
    "visualize_classes",
    "visualize_units",
]

GALLERY_DIR = Path(__file__).resolve().parent / "data" / "gallery"
RECORD = "gallery.json"
MODEL = "efficientnet_lite0"

# Fleuret's six classes (AMMI 8.4), the ones section 5 of lecture 2 has always shown
CLASSES = ("king crab", "Samoyed", "hourglass", "ping-pong ball", "steel arch bridge", "geyser")


@dataclass(frozen=True)
class Unit:
    """One unit of a layer: a whole channel (mean over positions) or one neuron (the centre position)."""

    layer: str
    channel: int
    kind: str = "channel"  # "channel" or "neuron"

    def __post_init__(self):
        if self.kind not in ("channel", "neuron"):
            raise ValueError(f"a Unit's kind is 'channel' or 'neuron', got {self.kind!r}")
        if isinstance(self.channel, bool) or not isinstance(self.channel, int) or self.channel < 0:
            raise ValueError(f"a Unit's channel is a non-negative int, got {self.channel!r}")

    @property
    def title(self) -> str:
        return f"{self.layer.removeprefix('net.')} {self.kind} {self.channel}"


def _units_of(layer: str, channels: Sequence[int]) -> tuple[Unit, ...]:
    """The channels of ``layer``, then the neuron at the centre of its first channel."""
    return tuple(Unit(layer, c) for c in channels) + (Unit(layer, channels[0], "neuron"),)


# early (24 channels, stride 4), middle (80, stride 16), late (192, stride 32) blocks of
# efficientnet_lite0; the first channel of each is the one section 3 of lecture 2 maximises; the
# others are spread over the block's channels, not picked for looking good
UNITS = (_units_of("net.blocks.1", (3, 10, 20)) + _units_of("net.blocks.3", (5, 30, 60))
         + _units_of("net.blocks.5", (10, 100, 150)))


@dataclass(frozen=True)
class Recipe:
    """The parameters of one gallery run (Lucid's ``standard_transforms`` and ``render_vis`` defaults).

    Attributes
    ----------
    size : int
        Side of the square picture, pixels.
    steps : int
        Adam steps.
    lr : float
        Adam's learning rate on the Fourier coefficients.
    seed : int
        Seeds the random start and every random transform.
    pad : int
        Grey border added before the other transforms (so that jitter does not always see the same edge).
    jitter, fine_jitter : int
        Random shifts in pixels before and after scaling and rotating.
    scales : tuple of float
        Rescaling factors, one drawn per step (0.9 to 1.1).
    degrees : tuple of float
        Rotation angles, one drawn per step (-10 to 10, 0 five times more often).
    decay_power : float
        Fourier coefficients are scaled by ``1 / f**decay_power`` (1: natural images' spectrum).
    decorrelate : bool
        Optimise decorrelated colour channels (ImageNet's colour covariance), not RGB.
    """

    size: int = 224
    steps: int = 512
    lr: float = 0.05
    seed: int = 0
    pad: int = 12
    jitter: int = 8
    scales: tuple[float, ...] = tuple(round(1 + (i - 5) / 50, 2) for i in range(11))
    degrees: tuple[float, ...] = tuple(range(-10, 11)) + (0,) * 5
    fine_jitter: int = 4
    decay_power: float = 1.0
    decorrelate: bool = True


CLASS_RECIPE = Recipe()
UNIT_RECIPE = Recipe(size=128)
LIVE_RECIPE = Recipe(size=128, steps=48)  # the notebook's live run: same code, seconds instead of minutes


def recipe_transforms(recipe: Recipe) -> list[Callable]:
    """The random transforms of ``recipe``, in order: pad, jitter, scale, rotate, jitter."""
    return [
        image_params.pad(recipe.pad),
        image_params.jitter(recipe.jitter),
        image_params.random_scale(recipe.scales),
        image_params.random_rotate(recipe.degrees),
        image_params.jitter(recipe.fine_jitter),
    ]


def _run(model: nn.Module, objective, n: int, recipe: Recipe, progress: bool) -> MaximizationResult:
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a coursekit.gallery.Recipe, got {type(recipe).__name__}")
    param = image_params.fourier_image((n, 3, recipe.size, recipe.size), decay_power=recipe.decay_power,
                                       decorrelate=recipe.decorrelate, seed=recipe.seed)
    return maximize(model, objective, param=param, steps=recipe.steps, lr=recipe.lr, optimizer="adam",
                    transforms=recipe_transforms(recipe), seed=recipe.seed, progress=progress)


def class_indices(model: nn.Module, classes: Sequence) -> list[int]:
    """Class names (or indices) -> indices of ``model``'s classes; a clear error for an unknown name."""
    if isinstance(classes, (str, int)) or not len(classes):
        raise TypeError(f"classes is a non-empty list of class names or indices, got {classes!r}")
    names = getattr(model, "classes", None)
    out = []
    for c in classes:
        if isinstance(c, str):
            if names is None:
                raise TypeError(f"{type(model).__name__} has no class names; give class indices instead of {c!r}")
            out.append(model.class_index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            out.append(int(c))
        else:
            raise TypeError(f"a class is a name or an int index, got {c!r}")
    return out


def visualize_classes(model: nn.Module, classes: Sequence = CLASSES, recipe: Recipe = CLASS_RECIPE,
                      progress: bool = True) -> MaximizationResult:
    """Maximise each class's logit, one picture per class in one batch.

    Returns :func:`coursekit.maximize.maximize`'s result: ``image`` (N, 3, size, size),
    ``final_probabilities`` (N,) for the untransformed pictures.
    """
    idx = class_indices(model, classes)
    return _run(model, objectives.class_logit(idx), len(idx), recipe, progress)


def _unit_objective(unit: Unit) -> objectives.Objective:
    if not isinstance(unit, Unit):
        raise TypeError(f"units are coursekit.gallery.Unit(layer, channel, kind), got {unit!r}")
    if unit.kind == "neuron":
        return objectives.neuron(unit.layer, unit.channel)
    return objectives.channel(unit.layer, unit.channel)


def visualize_units(model: nn.Module, units: Sequence[Unit] = UNITS, recipe: Recipe = UNIT_RECIPE,
                    progress: bool = True) -> MaximizationResult:
    """Maximise each unit (a channel's mean, or a neuron at the centre), one picture per unit in one batch."""
    units = list(units)
    if not units:
        raise ValueError("visualize_units needs at least one Unit")
    objective = objectives.per_image([_unit_objective(u) for u in units])
    return _run(model, objective, len(units), recipe, progress)


def image_stats(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, standard deviation and mean HSV saturation of each picture (N, 3, H, W) in [0, 1].

    Saturation is ``(max - min) / max`` over the three channels of a pixel (0 for black), averaged
    over the pixels: 0 for greys, 1 for pure colours. Returns tensors of shape (N,).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"image_stats needs RGB pictures (N, 3, H, W), got {getattr(images, 'shape', type(images))}")
    x = images.detach().float().cpu()
    hi, lo = x.amax(1), x.amin(1)  # (N, H, W)
    saturation = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-12), torch.zeros_like(hi))
    return {"mean": x.flatten(1).mean(1), "std": x.flatten(1).std(1), "saturation": saturation.flatten(1).mean(1)}


# ----------------------------------------------------------------------------------------------
# the code that makes the pictures, hashed


def _source(fn) -> str:
    key = getattr(fn, "__reference_key__", None)
    target = reference_code(reference_key(fn)) if key is not None else fn  # @reference hides the original
    return inspect.getsource(target).replace("\r\n", "\n")


def _made_by() -> dict[str, object]:
    """Every function and class whose code decides the gallery's pixels (besides the model's weights)."""
    ip, ob, op = image_params, objectives, optimize
    pieces = [Recipe, recipe_transforms, _run, class_indices, visualize_classes, _unit_objective, visualize_units,
              ip.FourierImage, ip.fourier_image, ip.pad, ip.jitter, ip.random_scale, ip.random_rotate, ip._rotate,
              ob.class_logit, ob.channel, ob.neuron, ob.per_image, maximize, op.ascend, op.Adam]
    return {f"{p.__module__}.{p.__qualname__}": p for p in pieces}


def code_hashes(pieces: dict[str, object] | None = None) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of the source text of every piece that makes the pictures.

    Any edit of these functions, comments and docstrings included, changes the hash: the test
    then asks for a rebuild (``python -m coursekit.gallery build``). ``pieces`` (name -> object)
    defaults to the gallery's own list.
    """
    pieces = _made_by() if pieces is None else pieces
    return {name: hashlib.sha256(_source(obj).encode()).hexdigest()[:16] for name, obj in pieces.items()}


# ----------------------------------------------------------------------------------------------
# the build and the shipped assets


def _save_pngs(images: torch.Tensor, directory: Path, stem: str) -> list[str]:
    names = []
    for i, picture in enumerate(images):  # (3, H, W) each
        name = f"{stem}_{i:02d}.png"
        to_pil(picture).save(directory / name, optimize=True)
        names.append(name)
    return names


def _describe(recipe: Recipe, result: MaximizationResult, files: list[str], seconds: float) -> dict:
    stats = image_stats(result.image)
    return {
        "recipe": asdict(recipe),
        "transforms": [t.__name__ for t in recipe_transforms(recipe)],
        "files": files,
        "final_objective": [round(float(v), 4) for v in result.history[-1]],
        "stats": {k: [round(float(v), 4) for v in vals] for k, vals in stats.items()},
        "seconds": round(seconds, 1),
    }


def build(out_dir: str | Path = GALLERY_DIR, *, model: nn.Module | None = None, classes: Sequence = CLASSES,
          units: Sequence[Unit] = UNITS, class_recipe: Recipe = CLASS_RECIPE, unit_recipe: Recipe = UNIT_RECIPE,
          progress: bool = True) -> dict:
    """Run both galleries and write ``classes_NN.png``, ``units_NN.png`` and ``gallery.json`` into ``out_dir``.

    ``model`` defaults to ``load_model("efficientnet_lite0")`` on the CPU. Returns the record
    written to ``gallery.json``. Old PNGs of the same names are overwritten; others are removed,
    so the folder holds exactly one build.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # hashed before the long runs: inspect reads the files again, and an edit during the build
    # (line numbers moved) would otherwise hash text that is not the code that ran
    hashes = code_hashes()
    model = load_model(MODEL) if model is None else model
    start, cpu_start = time.perf_counter(), time.process_time()
    tick = time.perf_counter()
    made_classes = visualize_classes(model, classes, class_recipe, progress)
    class_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    made_units = visualize_units(model, units, unit_recipe, progress)
    unit_seconds = time.perf_counter() - tick
    for old in list(out.glob("classes_*.png")) + list(out.glob("units_*.png")):
        old.unlink()
    idx = class_indices(model, classes)
    record = {
        "command": "python -m coursekit.gallery build",
        "model": getattr(model, "name", type(model).__name__),
        "classes": {"names": [model.classes[i] if hasattr(model, "classes") else str(i) for i in idx], "indices": idx,
                    "final_probabilities": [round(float(p), 4) for p in made_classes.final_probabilities],
                    **_describe(class_recipe, made_classes, _save_pngs(made_classes.image, out, "classes"), class_seconds)},
        "units": {"units": [asdict(u) for u in units],
                  **_describe(unit_recipe, made_units, _save_pngs(made_units.image, out, "units"), unit_seconds)},
        "build_seconds": round(time.perf_counter() - start, 1),  # wall clock: longer on a busy machine
        "build_cpu_seconds": round(time.process_time() - cpu_start, 1),  # CPU time of this process, all threads
        "threads": torch.get_num_threads(),
        "device": str(next(model.parameters()).device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "code_hashes": hashes,
    }
    text = json.dumps(record, indent=1) + "\n"
    (out / RECORD).write_text(text)
    return json.loads(text)  # what load_gallery will read: lists, not tuples


@dataclass
class Gallery:
    """The shipped pictures and their record (from :func:`load_gallery`).

    Attributes
    ----------
    classes : Tensor (N, 3, H, W)
        One picture per class of ``record["classes"]["names"]``, in [0, 1].
    units : Tensor (M, 3, h, w)
        One picture per unit of ``record["units"]["units"]``.
    record : dict
        The parsed ``gallery.json``.
    """

    classes: torch.Tensor
    units: torch.Tensor
    record: dict = field(repr=False)

    @property
    def class_titles(self) -> list[str]:
        return list(self.record["classes"]["names"])

    @property
    def unit_titles(self) -> list[str]:
        return [Unit(**u).title for u in self.record["units"]["units"]]


def _read_png(path: Path) -> torch.Tensor:  # -> (3, H, W) in [0, 1]
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def load_gallery(directory: str | Path = GALLERY_DIR) -> Gallery:
    """The pictures written by :func:`build` (the shipped ones by default) and their record."""
    directory = Path(directory)
    if not (directory / RECORD).is_file():
        raise FileNotFoundError(f"no {RECORD} in {directory}: build the gallery with "
                                f"`python -m coursekit.gallery build --out {directory}`")
    record = json.loads((directory / RECORD).read_text())
    pictures = {part: torch.stack([_read_png(directory / f) for f in record[part]["files"]]) for part in ("classes", "units")}
    return Gallery(classes=pictures["classes"], units=pictures["units"], record=record)


def stale_assets(record: dict) -> list[str]:
    """What in a gallery record no longer matches the code: names of changed pieces or defaults ([] if current)."""
    problems = []
    recorded = record.get("code_hashes", {})
    for name, digest in code_hashes().items():
        if recorded.get(name) != digest:
            problems.append(f"source of {name} changed" if name in recorded else f"{name} is new")
    problems += [f"{name} is gone" for name in set(recorded) - set(code_hashes())]
    expected = {"classes": (CLASS_RECIPE, list(CLASSES)), "units": (UNIT_RECIPE, [asdict(u) for u in UNITS])}
    for part, (recipe, wanted) in expected.items():
        if record[part]["recipe"] != json.loads(json.dumps(asdict(recipe))):
            problems.append(f"{part}: recorded recipe {record[part]['recipe']} differs from the default {asdict(recipe)}")
        got = record[part]["names"] if part == "classes" else record[part]["units"]
        if got != wanted:
            problems.append(f"{part}: recorded {got} differ from the defaults {wanted}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m coursekit.gallery build [--out DIR]`` or ``check [--dir DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m coursekit.gallery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run the long optimisations and write PNGs + gallery.json (minutes)")
    b.add_argument("--out", default=str(GALLERY_DIR), help="folder to write (default: the package's data/gallery)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    c = sub.add_parser("check", help="do the shipped pictures' recipe and code hash match the code?")
    c.add_argument("--dir", default=str(GALLERY_DIR))
    args = parser.parse_args(argv)
    if args.command == "build":
        record = build(args.out, progress=not args.quiet)
        print(f"wrote {len(record['classes']['files']) + len(record['units']['files'])} PNGs and {RECORD} "
              f"to {args.out} in {record['build_seconds']:.0f} s ({record['build_cpu_seconds']:.0f} s of CPU) on {record['threads']} thread(s)")
        return 0
    problems = stale_assets(load_gallery(args.dir).record)
    print("\n".join(problems) if problems else "the gallery is current")
    return 1 if problems else 0


if __name__ == "__main__":  # run the module's imported copy, so the hashed names are coursekit.gallery.*
    from coursekit.gallery import main as _main

    sys.exit(_main())
