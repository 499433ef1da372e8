"""What a model's ONNX graph takes and gives, checked against its manifest.

A mismatch raises :class:`~node.errors.ConfigError` naming the manifest key and the graph's
tensor, so a package that cannot work is refused when the node starts, not when the first
study arrives. Dimensions the graph leaves open (``None`` here) are checked again on the
concrete output of the warm-up run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.errors import ConfigError
from node.inference.manifest import ModelManifest

_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)")
#: Spatial size of the synthetic warm-up input where neither graph nor manifest fixes one.
DEFAULT_WARMUP_SIZE = 64
DEFAULT_WARMUP_PATCH = 32

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class GraphIO:
    """The graph input and output the node uses, with their (partly open) shapes."""

    input_name: str
    output_name: str
    input_shape: Shape
    output_shape: Shape
    input_type: str
    output_type: str

    def describe(self) -> str:
        return (f"input {self.input_name!r} {self.input_type} {_brackets(self.input_shape)}, "
                f"output {self.output_name!r} {self.output_type} {_brackets(self.output_shape)}")


def channel_axis(layout: str) -> int:
    """Axis of the channels in a tensor of ``layout`` (NCHW: 1, NHWC: -1, ...)."""
    return 1 if layout.startswith("NC") else -1


def spatial_axes(layout: str) -> tuple[int, ...]:
    """Axes of the spatial dimensions in a tensor of ``layout``, in (D,) H, W order."""
    rank = len(layout)
    return tuple(range(2, rank)) if layout.startswith("NC") else tuple(range(1, rank - 1))


def _shape(dims: Any) -> Shape:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in dims)


def check_graph(manifest: ModelManifest, inputs: list[Any], outputs: list[Any]) -> GraphIO:
    """Validate the manifest against the graph's inputs and outputs (``NodeArg`` lists).

    Raises:
        ConfigError: a name, rank, dtype, channel count or fixed size does not fit.
    """
    m = manifest
    by_in = {i.name: i for i in inputs}
    by_out = {o.name: o for o in outputs}
    name_in = m.input.tensor or inputs[0].name
    name_out = m.output.tensor or outputs[0].name
    if name_in not in by_in:
        raise ConfigError(f"model {m.name}: input.tensor {name_in!r} is not a graph input "
                          f"({', '.join(by_in)})")
    if name_out not in by_out:
        raise ConfigError(f"model {m.name}: output.tensor {name_out!r} is not a graph output "
                          f"({', '.join(by_out)})")
    others = [n for n, i in by_in.items() if n != name_in]
    if others:
        raise ConfigError(f"model {m.name}: the graph has more inputs than {name_in!r} "
                          f"({', '.join(others)}); the node feeds exactly one")
    io = GraphIO(name_in, name_out, _shape(by_in[name_in].shape), _shape(by_out[name_out].shape),
                 by_in[name_in].type, by_out[name_out].type)
    if m.output.kind != "labelmap" and io.output_type not in _FLOAT_TYPES:
        raise ConfigError(f"model {m.name}: output {name_out!r} is {io.output_type}, but "
                          f"output.kind = {m.output.kind!r} needs floating-point values")
    _check_input(m, io)
    check_output(m, io.output_shape, io.output_name)
    return io


def _check_input(m: ModelManifest, io: GraphIO) -> None:
    spec = m.input
    where = f"model {m.name}: input {io.input_name!r}"
    rank = len(spec.layout)
    if len(io.input_shape) != rank:
        raise ConfigError(f"{where} has rank {len(io.input_shape)}, but kind {spec.kind} with "
                          f"input.layout = {spec.layout!r} needs rank {rank}")
    dtype = _ONNX_DTYPES.get(io.input_type)
    if dtype != spec.dtype:
        raise ConfigError(f"{where} is {io.input_type}, manifest says input.dtype = {spec.dtype!r}")
    channels = io.input_shape[channel_axis(spec.layout)]
    if channels not in (None, 1):
        raise ConfigError(f"{where} takes {channels} channels in layout {spec.layout} "
                          "(is input.layout right?); the node feeds one channel")
    fixed = tuple(io.input_shape[a] for a in spatial_axes(spec.layout))
    if 1 in fixed:
        raise ConfigError(f"{where} {_brackets(io.input_shape)} has a spatial dimension fixed "
                          f"at 1 in layout {spec.layout} (is input.layout right?)")
    batch = io.input_shape[0]
    if batch is not None and batch != spec.batch_size:
        raise ConfigError(f"{where} has a fixed batch of {batch}; set input.batch_size = {batch}")
    if spec.kind == "volume":
        wanted, key = (spec.patch_size or spec.size), ("patch_size" if spec.patch_size else "size")
    else:
        wanted, key = spec.size, "size"
    if all(d is not None for d in fixed) and not wanted:
        raise ConfigError(f"{where} is fixed at {_dims(fixed)}; set input.{key} = "
                          f"[{', '.join(str(d) for d in fixed)}]")
    for d, w in zip(fixed, wanted):
        if d is not None and d != int(w):
            raise ConfigError(f"{where} is fixed at {_dims(fixed)}, but input.{key} = "
                              f"{[int(v) for v in wanted]}")


def check_output(m: ModelManifest, shape: Shape, name: str) -> None:
    """Check an output shape (open dimensions as ``None``) against the manifest's output.

    Raises:
        ConfigError: wrong rank, or fewer channels / scores than segments / findings need.
    """
    where = f"model {m.name}: output {name!r} {_brackets(shape)}"
    spatial = m.input.spatial_rank
    if m.task == "classification":
        if len(shape) < 2:
            raise ConfigError(f"{where}: a classification output needs (batch, scores)")
        needed = max(f.index for f in m.findings) + 1
        known = [d for d in shape[1:]]
        if all(d is not None for d in known) and _prod(known) < needed:  # type: ignore[arg-type]
            raise ConfigError(f"{where} gives {_prod(known)} scores per image, but findings "  # type: ignore[arg-type]
                              f"use index up to {needed - 1}")
        return
    if m.output.kind == "labelmap":
        if len(shape) not in (spatial + 1, spatial + 2):
            raise ConfigError(f"{where}: a label map needs rank {spatial + 1} or {spatial + 2} "
                              f"(batch, [1,] spatial) for kind {m.input.kind}")
        if len(shape) == spatial + 2 and shape[channel_axis(m.input.layout)] not in (None, 1):
            raise ConfigError(f"{where}: a label map has one channel, got "
                              f"{shape[channel_axis(m.input.layout)]} (output.kind = \"labelmap\"?)")
        return
    if len(shape) != spatial + 2:
        raise ConfigError(f"{where}: per-class probabilities need rank {spatial + 2} "
                          f"(layout {m.input.layout}) for kind {m.input.kind}")
    channels = shape[channel_axis(m.input.layout)]
    needed = max(s.label for s in m.segments) + 1
    if channels is not None and channels < needed:
        raise ConfigError(f"{where} has {channels} channels, but segments use channel up to "
                          f"{needed - 1} (segments.label is the channel index)")


def warmup_shape(m: ModelManifest, io: GraphIO) -> tuple[int, ...]:
    """A concrete input shape the model will accept, for the warm-up and the check run."""
    spec = m.input
    fixed = [io.input_shape[a] for a in spatial_axes(spec.layout)]
    wanted = (spec.patch_size or spec.size) if spec.kind == "volume" else spec.size
    default = DEFAULT_WARMUP_PATCH if spec.kind == "volume" else DEFAULT_WARMUP_SIZE
    dims = [int(f or (wanted[k] if wanted else default)) for k, f in enumerate(fixed)]
    batch = io.input_shape[0] or (1 if spec.kind == "image" else spec.batch_size)
    return (batch, 1, *dims) if spec.layout.startswith("NC") else (batch, *dims, 1)


def _brackets(shape: Shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _dims(shape: tuple[int | None, ...]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def _prod(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out
