"""Infer: run a model package on a series with ONNX Runtime.

One :class:`ModelRuntime` per model, created once and kept warm. Execution providers are
taken in the configured order among those this ONNX Runtime build offers; the provider that
really runs is logged once. Without a usable GPU the node says so in one line and runs on
the CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnxruntime as ort

from .errors import ConfigError, InputError
from .manifest import ModelManifest
from .volume import SeriesVolume

log = logging.getLogger("node.infer")

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                  "DmlExecutionProvider", "CoreMLExecutionProvider")
_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


@dataclass
class Prediction:
    """A model's output, back on the source grid."""

    masks: np.ndarray | None = None     # bool (slices, rows, cols, segments) for segmentation
    scores: np.ndarray | None = None    # float (findings,) for classification
    timings: dict[str, float] = field(default_factory=dict)
    provider: str = ""


def choose_providers(wanted: Sequence[str]) -> list[str]:
    """The configured providers this ONNX Runtime offers, in order; CPU always last resort."""
    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class ModelRuntime:
    """A loaded model package: ONNX Runtime session plus the manifest's pre/post-processing."""

    def __init__(self, manifest: ModelManifest, providers: Sequence[str]) -> None:
        self.manifest = manifest
        if not manifest.onnx_path.is_file():
            raise ConfigError(f"model {manifest.name}: {manifest.onnx_path} is missing")
        chosen = choose_providers(providers)
        options = ort.SessionOptions()
        options.log_severity_level = 3   # errors only: a missing GPU is reported by us, once
        try:
            self.session = ort.InferenceSession(str(manifest.onnx_path), sess_options=options, providers=chosen)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ConfigError(f"model {manifest.name}: ONNX Runtime cannot load {manifest.onnx_path}: {exc}") from None
        self.provider = self.session.get_providers()[0]
        wanted_gpu = [p for p in providers if p in _GPU_PROVIDERS]
        if wanted_gpu and self.provider not in _GPU_PROVIDERS:
            log.warning("model %s: no usable GPU (%s not available); running on the CPU",
                        manifest.name, ", ".join(wanted_gpu))
        log.info("model %s %s runs on %s", manifest.name, manifest.version, self.provider,
                 extra={"model": manifest.name, "provider": self.provider})
        self.input_name, self.output_name = self._check_graph()

    def _check_graph(self) -> tuple[str, str]:
        """Validate the manifest against the graph's inputs and outputs; return their names."""
        m = self.manifest
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        name_in = m.input.tensor or next(iter(inputs))
        name_out = m.output.tensor or next(iter(outputs))
        if name_in not in inputs:
            raise ConfigError(f"model {m.name}: input.tensor {name_in!r} is not a graph input ({', '.join(inputs)})")
        if name_out not in outputs:
            raise ConfigError(f"model {m.name}: output.tensor {name_out!r} is not a graph output ({', '.join(outputs)})")
        rank = 5 if m.input.kind == "volume" else 4
        shape = inputs[name_in].shape
        if len(shape) != rank:
            raise ConfigError(f"model {m.name}: input {name_in!r} has rank {len(shape)}, "
                              f"but kind {m.input.kind} with layout {m.input.layout} needs rank {rank}")
        dtype = _ONNX_DTYPES.get(inputs[name_in].type)
        if dtype != m.input.dtype:
            raise ConfigError(f"model {m.name}: input {name_in!r} is {inputs[name_in].type}, "
                              f"manifest says input.dtype = {m.input.dtype!r}")
        return name_in, name_out

    # ---------------------------------------------------------------- run
    def run(self, volume: SeriesVolume) -> Prediction:
        """Run the model on a series.

        Raises:
            InputError: the series does not fit the model (modality, size).
        """
        m = self.manifest
        if m.input.modalities and volume.modality not in m.input.modalities:
            raise InputError(f"model {m.name} takes {', '.join(m.input.modalities)}, "
                             f"series is {volume.modality or 'without Modality'}")
        if m.input.kind == "image" and volume.pixels.shape[0] != 1:
            raise InputError(f"model {m.name} takes one image, series has {volume.pixels.shape[0]}")
        if m.input.kind == "volume":
            raise InputError(f"model {m.name}: input kind 'volume' is not supported by this node version yet")
        pred = Prediction(provider=self.provider)
        t = time.perf_counter()
        x = self.preprocess(volume)
        pred.timings["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        outputs = []
        step = m.input.batch_size
        for start in range(0, x.shape[0], step):
            outputs.append(self.session.run([self.output_name], {self.input_name: x[start:start + step]})[0])
        y = np.concatenate(outputs, axis=0)
        pred.timings["run"] = time.perf_counter() - t

        t = time.perf_counter()
        if m.task == "segmentation":
            pred.masks = self._segment(y, volume.pixels.shape)
        else:
            pred.scores = self._classify(y)
        pred.timings["postprocess"] = time.perf_counter() - t
        return pred

    def preprocess(self, volume: SeriesVolume) -> np.ndarray:
        """Intensity handling and layout: the exact tensor the graph receives."""
        spec = self.manifest.input
        x = volume.pixels
        if volume.monochrome1 and spec.invert_monochrome1:
            x = x.max() + x.min() - x
        if spec.size:
            x = _resize_stack(x, (int(spec.size[-2]), int(spec.size[-1])))
        if spec.window:
            x = np.clip(x, spec.window[0], spec.window[1])
        if spec.normalisation == "zscore":
            x = (x - x.mean()) / max(float(x.std()), 1e-6)
        elif spec.normalisation == "minmax":
            lo, hi = float(x.min()), float(x.max())
            x = (x - lo) / max(hi - lo, 1e-6)
        elif spec.normalisation == "scale":
            x = x * spec.scale + spec.offset
        x = x[:, None, :, :] if spec.layout == "NCHW" else x[:, :, :, None]
        return np.ascontiguousarray(x, dtype=np.float16 if spec.dtype == "float16" else np.float32)

    def _segment(self, y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        m = self.manifest
        n, rows, cols = shape
        if m.output.kind == "labelmap":
            labels = y.reshape(y.shape[0], *y.shape[-2:]) if y.ndim == 4 else y
            labels = _fit(labels.astype(np.int32, copy=False), rows, cols)
            return np.stack([labels == s.label for s in m.segments], axis=-1)
        if m.input.layout == "NHWC":
            y = np.moveaxis(y, -1, 1)
        y = _activate(y.astype(np.float32, copy=False), m.output.activation, axis=1)
        if m.output.decision == "argmax":
            labels = _fit(np.argmax(y, axis=1), rows, cols)
            return np.stack([labels == s.label for s in m.segments], axis=-1)
        masks = np.stack([y[:, s.label] >= m.output.threshold for s in m.segments], axis=-1)
        if masks.shape[1:3] != (rows, cols):
            masks = np.stack([_fit(masks[..., k], rows, cols) for k in range(masks.shape[-1])], axis=-1)
        return masks

    def _classify(self, y: np.ndarray) -> np.ndarray:
        y = _activate(y.reshape(y.shape[0], -1).astype(np.float32), self.manifest.output.activation, axis=1)
        return y.mean(axis=0)


def _activate(y: np.ndarray, activation: str, axis: int) -> np.ndarray:
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-y))
    if activation == "softmax":
        e = np.exp(y - y.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)
    return y


def _fit(labels: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Nearest-neighbour resize of a (n, h, w) label or mask stack back to the source grid."""
    if labels.shape[1:] == (rows, cols):
        return labels
    ri = (np.arange(rows) * labels.shape[1] / rows).astype(np.intp)
    ci = (np.arange(cols) * labels.shape[2] / cols).astype(np.intp)
    return labels[:, ri][:, :, ci]


def _resize_stack(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of each slice of a (n, h, w) stack to ``size`` (align-corners=False)."""
    n, h, w = x.shape
    if (h, w) == size:
        return x
    def axis(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (pos - lo).astype(np.float32)
    r0, r1, rf = axis(h, size[0])
    c0, c1, cf = axis(w, size[1])
    rows = x[:, r0] * (1 - rf)[None, :, None] + x[:, r1] * rf[None, :, None]
    return rows[:, :, c0] * (1 - cf) + rows[:, :, c1] * cf
