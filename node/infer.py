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
            hint = manifest.directory / "build.py"
            raise ConfigError(f"model {manifest.name}: {manifest.onnx_path} is missing"
                              + (f" (build it: python {hint})" if hint.is_file() else ""))
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
        """Run the model on a series, batch by batch, and bring the output back to its grid.

        Raises:
            InputError: the series does not fit the model (modality, size).
        """
        m = self.manifest
        if m.input.modalities and volume.modality not in m.input.modalities:
            raise InputError(f"model {m.name} takes {', '.join(m.input.modalities)}, "
                             f"series is {volume.modality or 'without Modality'}")
        n, rows, cols = volume.pixels.shape
        if m.input.kind == "image" and n != 1:
            raise InputError(f"model {m.name} takes one image, series has {n}")
        if m.input.kind == "volume":
            raise InputError(f"model {m.name}: input kind 'volume' is not supported by this node version yet")
        pred = Prediction(provider=self.provider)
        timings = dict.fromkeys(("preprocess", "run", "postprocess"), 0.0)
        t = time.perf_counter()
        stats = self._intensity_stats(volume)
        timings["preprocess"] += time.perf_counter() - t
        if m.task == "segmentation":
            # (segments, slices, rows, cols): each batch's masks land in place, each segment
            # contiguous, which is the layout the SEG encoder works in; it receives the
            # (slices, rows, cols, segments) view of it without a copy.
            masks = np.empty((len(m.segments), n, rows, cols), dtype=bool)
        scores = []
        step = m.input.batch_size
        for start in range(0, n, step):
            t0 = time.perf_counter()
            x = self.preprocess(volume, start, start + step, stats)
            t1 = time.perf_counter()
            y = self.session.run([self.output_name], {self.input_name: x})[0]
            t2 = time.perf_counter()
            if m.task == "segmentation":
                self._segment(y, rows, cols, out=masks[:, start:start + step])
            else:
                scores.append(y.reshape(y.shape[0], -1).astype(np.float32))
            t3 = time.perf_counter()
            timings["preprocess"] += t1 - t0
            timings["run"] += t2 - t1
            timings["postprocess"] += t3 - t2
        t = time.perf_counter()
        if m.task == "segmentation":
            pred.masks = np.moveaxis(masks, 0, 3)
        else:
            pred.scores = _activate(np.concatenate(scores), m.output.activation, axis=1).mean(axis=0)
        timings["postprocess"] += time.perf_counter() - t
        pred.timings = timings
        return pred

    def _intensity_stats(self, volume: SeriesVolume) -> tuple[float, float]:
        """Whole-series figures that batch preprocessing needs: (mean, std) or (min, max)."""
        spec = self.manifest.input
        if spec.normalisation not in ("zscore", "minmax") and not (volume.monochrome1 and spec.invert_monochrome1):
            return (0.0, 1.0)
        x = volume.pixels
        if spec.window:
            x = np.clip(x, spec.window[0], spec.window[1])
        if spec.normalisation == "zscore":
            return (float(x.mean()), max(float(x.std()), 1e-6))
        return (float(x.min()), float(x.max()))

    def preprocess(self, volume: SeriesVolume, start: int = 0, stop: int | None = None,
                   stats: tuple[float, float] | None = None) -> np.ndarray:
        """The exact tensor the graph receives for slices ``start:stop``."""
        spec = self.manifest.input
        stats = stats if stats is not None else self._intensity_stats(volume)
        x = volume.pixels[start:stop]
        if volume.monochrome1 and spec.invert_monochrome1:
            lo, hi = (float(volume.pixels.min()), float(volume.pixels.max()))
            x = (hi + lo) - x
        if spec.size:
            x = _resize_stack(x, (int(spec.size[-2]), int(spec.size[-1])))
        if spec.window:
            x = np.clip(x, spec.window[0], spec.window[1])
        if spec.normalisation == "zscore":
            x = (x - stats[0]) / stats[1]
        elif spec.normalisation == "minmax":
            x = (x - stats[0]) / max(stats[1] - stats[0], 1e-6)
        elif spec.normalisation == "scale":
            x = x * spec.scale + spec.offset
        x = x[:, None, :, :] if spec.layout == "NCHW" else x[:, :, :, None]
        return np.ascontiguousarray(x, dtype=np.float16 if spec.dtype == "float16" else np.float32)

    def _segment(self, y: np.ndarray, rows: int, cols: int, out: np.ndarray) -> None:
        """One batch of model output -> ``out``, bool (segments, batch, rows, cols), source grid."""
        m = self.manifest
        if m.output.kind == "labelmap" or m.output.decision == "argmax":
            if m.output.kind == "labelmap":
                labels = y.reshape(y.shape[0], *y.shape[-2:]) if y.ndim == 4 else y
            else:  # softmax and sigmoid are monotonic: the argmax needs no activation
                labels = np.argmax(np.moveaxis(y, -1, 1) if m.input.layout == "NHWC" else y, axis=1)
            labels = _fit(labels.astype(np.int32, copy=False), rows, cols)
            for k, segment in enumerate(m.segments):
                np.equal(labels, segment.label, out=out[k])
            return
        if m.input.layout == "NHWC":
            y = np.moveaxis(y, -1, 1)
        y = _activate(y.astype(np.float32, copy=False), m.output.activation, axis=1)
        for k, segment in enumerate(m.segments):
            channel = y[:, segment.label]
            if channel.shape[-2:] == (rows, cols):
                np.greater_equal(channel, m.output.threshold, out=out[k])
            else:
                out[k] = _fit(channel >= m.output.threshold, rows, cols)


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
