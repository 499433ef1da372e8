"""Model packages: ``models/<name>/model.toml`` beside ``model.onnx``.

The manifest says what a model takes (modality, image / slice stack / volume, tensor layout,
intensity handling), what it gives (label map, per-class probabilities or class scores), and
what its output means (segments and findings with SNOMED CT codes). The node serves any
model described this way without code changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom.uid

from node.errors import ConfigError
from node.config.toml import Table, load_toml

TASKS = ("segmentation", "classification")
INPUT_KINDS = ("image", "slices", "volume")
LAYOUTS = ("NCHW", "NHWC", "NCDHW", "NDHWC")
NORMALISATIONS = ("none", "zscore", "minmax", "scale")
OUTPUT_KINDS = ("labelmap", "probabilities", "scores")
ACTIVATIONS = ("none", "sigmoid", "softmax")
DECISIONS = ("argmax", "threshold")
PRIORITIES = ("stat", "urgent", "routine")
RESIZES = ("stretch", "pad")
BLENDS = ("gaussian", "constant")
DTYPES = ("float32", "float16")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class Code:
    """A coded concept (SNOMED CT unless said otherwise)."""

    value: str
    meaning: str
    scheme: str = "SCT"


@dataclass(frozen=True)
class Algorithm:
    """Algorithm identification written into SEG and SR."""

    name: str
    version: str
    family: str = "Artificial Intelligence"
    manufacturer: str = "pacs-ai-node"


@dataclass(frozen=True)
class InputSpec:
    """What the model takes and how a series becomes its input tensor.

    Sizes and spacings are in array order: ``(rows, cols)`` for 2D, ``(slices, rows, cols)``
    for 3D; spacings in mm.
    """

    modalities: tuple[str, ...]
    kind: str = "slices"
    layout: str = "NCHW"
    dtype: str = "float32"
    tensor: str = ""                      # empty: the graph's first input
    sop_classes: tuple[str, ...] = ()     # UIDs; empty: any image SOP class
    size: tuple[float, ...] = ()          # target (rows, cols), or (slices, rows, cols) for volumes
    resize: str = "stretch"               # 2D: stretch to size, or keep the aspect ratio and pad
    pad_value: float = 0.0                # value of padding, in model-input units
    spacing: tuple[float, ...] = ()       # target (slice, row, col) spacing in mm, volumes only
    window: tuple[float, ...] = ()        # clip to (low, high) after rescale
    normalisation: str = "none"
    scale: float = 1.0                    # for normalisation = "scale": x * scale + offset
    offset: float = 0.0
    mean: float | None = None             # zscore with fixed figures; None: the series' own
    std: float | None = None
    invert_monochrome1: bool = True
    batch_size: int = 1
    patch_size: tuple[float, ...] = ()    # volume: sliding-window patch (slices, rows, cols)
    overlap: float = 0.5                  # volume: overlap of neighbouring patches, [0, 1)
    blend: str = "gaussian"               # volume: weighting of overlapping patch outputs
    fp16: bool = False                    # allow FP16 kernels where the provider offers them

    @property
    def spatial_rank(self) -> int:
        return 3 if self.kind == "volume" else 2


@dataclass(frozen=True)
class OutputSpec:
    kind: str = "labelmap"
    tensor: str = ""                      # empty: the graph's first output
    activation: str = "none"
    decision: str = "argmax"              # for probabilities: argmax (exclusive) or threshold (overlapping)
    threshold: float = 0.5


@dataclass(frozen=True)
class Segment:
    """One segment of a segmentation: ``label`` is the label value or the channel index."""

    label: int
    name: str
    category: Code
    type: Code
    color: tuple[int, int, int] = (255, 0, 0)


@dataclass(frozen=True)
class Finding:
    """One finding of a classification: ``index`` is its position in the score vector."""

    index: int
    name: str
    code: Code
    threshold: float = 0.5
    priority: str = "urgent"


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    task: str
    algorithm: Algorithm
    input: InputSpec
    output: OutputSpec
    description: str = ""
    demonstration: bool = False
    segments: tuple[Segment, ...] = ()
    findings: tuple[Finding, ...] = ()
    directory: Path = field(default=Path("."), compare=False)

    @property
    def onnx_path(self) -> Path:
        return self.directory / "model.onnx"


def _code(value: Any, where: str) -> Code:
    t = Table(value, where)
    code = Code(value=t.require("code", str), meaning=t.require("meaning", str),
                scheme=t.get("scheme", str, "SCT"))
    t.done()
    return code


def _color(value: Any, where: str) -> tuple[int, int, int]:
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, int) and 0 <= v <= 255 for v in value)):
        raise ConfigError(f"{where}: expected three integers 0-255 (RGB), got {value!r}")
    return (value[0], value[1], value[2])


def load_manifest(directory: Path) -> ModelManifest:
    """Read and validate ``directory/model.toml``.

    Raises:
        ConfigError: naming the file and the key that is wrong.
    """
    path = directory / "model.toml"
    top = Table(load_toml(path), "")
    try:
        manifest = _parse(top, directory)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return manifest


def _parse(top: Table, directory: Path) -> ModelManifest:
    name = top.require("name", str)
    version = top.require("version", str)
    task = top.choice("task", TASKS, "segmentation")
    description = top.get("description", str, "")
    demonstration = top.get("demonstration", bool, False)

    a = top.table("algorithm")
    algorithm = Algorithm(
        name=a.get("name", str, name), version=a.get("version", str, version),
        family=a.get("family", str, "Artificial Intelligence"),
        manufacturer=a.get("manufacturer", str, "pacs-ai-node"))
    a.done()

    i = top.table("input")
    spec_in = _input(i)
    i.done()
    _check_input(spec_in)

    o = top.table("output")
    spec_out = OutputSpec(
        kind=o.choice("kind", OUTPUT_KINDS, "labelmap" if task == "segmentation" else "scores"),
        tensor=o.get("tensor", str, ""),
        activation=o.choice("activation", ACTIVATIONS, "none"),
        decision=o.choice("decision", DECISIONS, "argmax"),
        threshold=o.get("threshold", float, 0.5),
    )
    o.done()

    segments = []
    for s in top.tables("segments"):
        segments.append(Segment(
            label=s.require("label", int), name=s.require("name", str),
            category=s.parse("category", None, _code) or _missing(s, "category"),
            type=s.parse("type", None, _code) or _missing(s, "type"),
            color=s.parse("color", (255, 0, 0), _color)))
        s.done()
    findings = []
    for f in top.tables("findings"):
        findings.append(Finding(
            index=f.get("index", int, len(findings)), name=f.require("name", str),
            code=f.parse("code", None, _code) or _missing(f, "code"),
            threshold=f.get("threshold", float, 0.5),
            priority=f.choice("priority", PRIORITIES, "urgent")))
        f.done()
    top.done()

    if task == "segmentation":
        if not segments:
            raise ConfigError("segments: a segmentation model needs at least one [[segments]]")
        if spec_out.kind == "scores":
            raise ConfigError("output.kind: a segmentation model gives a labelmap or probabilities")
        labels = [s.label for s in segments]
        if len(set(labels)) != len(labels):
            raise ConfigError("segments: label values must be unique")
        if spec_out.kind == "labelmap" and min(labels) < 1:
            raise ConfigError("segments.label: label 0 is background in a label map")
    else:
        if not findings:
            raise ConfigError("findings: a classification model needs at least one [[findings]]")
        if spec_in.patch_size:
            raise ConfigError("input.patch_size: a classification model sees the whole volume "
                              "at once; give input.size or input.spacing")
        if spec_out.kind != "scores":
            raise ConfigError("output.kind: a classification model gives scores")

    return ModelManifest(
        name=name, version=version, task=task, algorithm=algorithm, input=spec_in,
        output=spec_out, description=description, demonstration=demonstration,
        segments=tuple(segments), findings=tuple(findings), directory=directory)


def _input(i: Table) -> InputSpec:
    kind = i.choice("kind", INPUT_KINDS, "slices")
    rank = 3 if kind == "volume" else 2
    return InputSpec(
        modalities=i.str_list("modalities"),
        kind=kind,
        layout=i.choice("layout", LAYOUTS, "NCDHW" if kind == "volume" else "NCHW"),
        dtype=i.choice("dtype", DTYPES, "float32"),
        tensor=i.get("tensor", str, ""),
        sop_classes=i.parse("sop_classes", (), _sop_classes),
        size=i.num_list("size", rank),
        resize=i.choice("resize", RESIZES, "stretch"),
        pad_value=i.get("pad_value", float, 0.0),
        spacing=i.num_list("spacing", 3),
        window=i.num_list("window", 2),
        normalisation=i.choice("normalisation", NORMALISATIONS, "none"),
        scale=i.get("scale", float, 1.0),
        offset=i.get("offset", float, 0.0),
        mean=i.get("mean", float, None),
        std=i.get("std", float, None),
        invert_monochrome1=i.get("invert_monochrome1", bool, True),
        batch_size=i.positive("batch_size", int, 1),
        patch_size=i.num_list("patch_size", 3),
        overlap=i.get("overlap", float, 0.5),
        blend=i.choice("blend", BLENDS, "gaussian"),
        fp16=i.get("fp16", bool, False),
    )


def _check_input(spec: InputSpec) -> None:
    """Rules between input keys; raises ConfigError naming the key."""
    if spec.window and spec.window[0] >= spec.window[1]:
        raise ConfigError("input.window: low must be below high")
    if spec.kind == "volume" and spec.layout not in ("NCDHW", "NDHWC"):
        raise ConfigError(f"input.layout: a volume needs NCDHW or NDHWC, got {spec.layout}")
    if spec.kind != "volume" and spec.layout not in ("NCHW", "NHWC"):
        raise ConfigError(f"input.layout: kind {spec.kind} needs NCHW or NHWC, got {spec.layout}")
    if not 0 <= spec.overlap < 1:
        raise ConfigError("input.overlap: must be in [0, 1)")
    for key in ("size", "spacing", "patch_size"):
        values = getattr(spec, key)
        if any(v <= 0 for v in values):
            raise ConfigError(f"input.{key}: every value must be positive, got {list(values)}")
    for key in ("size", "patch_size"):
        values = getattr(spec, key)
        if any(v != int(v) for v in values):
            raise ConfigError(f"input.{key}: expected whole numbers of pixels, got {list(values)}")
    if spec.kind != "volume":
        for key in ("spacing", "patch_size"):
            if getattr(spec, key):
                raise ConfigError(f"input.{key}: only for kind = \"volume\" (kind is {spec.kind!r})")
    elif spec.size and spec.spacing:
        raise ConfigError("input.size, input.spacing: give a target size or a target spacing, not both")
    elif spec.resize != "stretch":
        raise ConfigError("input.resize: \"pad\" is for kind image or slices; a volume is resampled")
    if (spec.mean is not None or spec.std is not None) and spec.normalisation != "zscore":
        raise ConfigError("input.mean, input.std: only with normalisation = \"zscore\"")
    if (spec.mean is None) != (spec.std is None):
        raise ConfigError("input.mean, input.std: give both or neither")
    if spec.std is not None and spec.std <= 0:
        raise ConfigError(f"input.std: must be positive; got {spec.std}")


def _sop_classes(value: Any, where: str) -> tuple[str, ...]:
    """SOP class UIDs from UIDs or pydicom keywords (``DigitalXRayImageStorageForPresentation``)."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of SOP class UIDs or keywords")
    out = []
    for k, item in enumerate(value):
        uid = None
        if isinstance(item, str) and _UID.match(item):
            uid = pydicom.uid.UID(item)
        elif isinstance(item, str) and item.isidentifier():
            found = getattr(pydicom.uid, item, None)
            uid = found if isinstance(found, pydicom.uid.UID) else None
        if uid is None or not uid.is_valid or (uid.type and uid.type != "SOP Class"):
            raise ConfigError(f"{where}[{k}]: {item!r} is not a SOP class UID or keyword "
                              "(e.g. \"1.2.840.10008.5.1.4.1.1.1.1\" or "
                              "\"DigitalXRayImageStorageForPresentation\")")
        out.append(str(uid))
    return tuple(out)


def _missing(t: Table, key: str) -> Any:
    raise ConfigError(f"{t.where}.{key}: required key is missing")


def discover(models_dir: Path) -> dict[str, Path]:
    """Map model name (folder name) to package folder for every ``*/model.toml``."""
    if not models_dir.is_dir():
        return {}
    return {p.parent.name: p.parent for p in sorted(models_dir.glob("*/model.toml"))}
