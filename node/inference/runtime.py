"""Infer: run a model package on a series with ONNX Runtime.

One :class:`ModelRuntime` per model, created once, checked against its graph
(:mod:`node.inference.graph`) and warmed up with one run on a synthetic input. Execution providers are
taken in the configured order among those this ONNX Runtime build offers; the provider that
really runs is logged once. Without a usable GPU the node says so in one line and runs on
the CPU. On CUDA and TensorRT, inputs and outputs go through an IOBinding.

By input kind:

* ``image`` — one 2D image, resized (stretched or aspect kept and padded), one run;
* ``slices`` — the planes of a stack in batches of ``batch_size``, output restacked;
* ``volume`` — resampled to the target grid, sliding-window patches blended with a Gaussian
  importance map (:mod:`node.inference.sliding`), output resampled back to the source grid.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
from pydicom.uid import UID

from node.errors import ConfigError, InputError
from node.inference.graph import GraphIO, channel_axis, check_graph, check_output, spatial_axes, warmup_shape
from node.inference.manifest import ModelManifest
from node.inference.preprocess import (
    Intensity, Placement, apply_intensity, from_model_plane, intensity_for, model_input, model_planes,
    needs_statistics, placement, resample, resample_chunks, target_shape,
)
from node.inference.sliding import sliding_window
from node.inference.volume import SeriesVolume

log = logging.getLogger("node.inference.runtime")

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                  "DmlExecutionProvider", "CoreMLExecutionProvider")
#: Providers whose inputs and outputs are bound on the device, and the device's name.
_BOUND_PROVIDERS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
#: A volume model needs at least this many slices.
MIN_VOLUME_SLICES = 2


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


def _provider_options(provider: str, manifest: ModelManifest, device_id: int,
                      trt_cache: Path | None) -> dict[str, Any]:
    """The GPU (``inference.device_id``); for TensorRT also fp16 when the manifest allows it
    and an engine cache, so that a restart does not rebuild the engines (minutes each)."""
    options: dict[str, Any] = {}
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"):
        options["device_id"] = device_id
    if provider == "TensorrtExecutionProvider":
        if manifest.input.fp16:
            options["trt_fp16_enable"] = True
        if trt_cache is not None:
            trt_cache.mkdir(parents=True, exist_ok=True)
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache),
                           trt_timing_cache_enable=True, trt_timing_cache_path=str(trt_cache))
    return options


class ModelRuntime:
    """A loaded model package: ONNX Runtime session plus the manifest's pre/post-processing.

    Raises (at construction):
        ConfigError: the package is missing, cannot be loaded, does not fit its manifest, or
            fails its warm-up run; the message names the model and the mismatch.
    """

    def __init__(self, manifest: ModelManifest, providers: Sequence[str], *,
                 warm_up: bool = True, device_id: int = 0, trt_cache: Path | None = None,
                 cpu_threads: int = 0) -> None:
        self.manifest = manifest
        if not manifest.onnx_path.is_file():
            hint = manifest.directory / "build.py"
            raise ConfigError(f"model {manifest.name}: {manifest.onnx_path} is missing"
                              + (" (a shipped reference model: `ainode models build` builds it)"
                                 if hint.is_file() else " (export it from your framework to ONNX)"))
        chosen = choose_providers(providers)
        options = ort.SessionOptions()
        options.log_severity_level = 3   # errors only: a missing GPU is reported by us, once
        # ONNX Runtime's CPU threads otherwise spin for a while after each run, on the cores
        # that the batch's threshold, the next batch's decoding and the rest of the node need
        # (300-slice CT on 2 cores: preprocess, run and postprocess 1.05 s spinning, 0.89 s not).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if cpu_threads:
            options.intra_op_num_threads = cpu_threads
        try:
            self.session = ort.InferenceSession(
                str(manifest.onnx_path), sess_options=options, providers=chosen,
                provider_options=[_provider_options(p, manifest, device_id, trt_cache) for p in chosen])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ConfigError(f"model {manifest.name}: ONNX Runtime cannot load {manifest.onnx_path}: {exc}") from None
        self.provider = self.session.get_providers()[0]
        wanted_gpu = [p for p in providers if p in _GPU_PROVIDERS]
        if wanted_gpu and self.provider not in _GPU_PROVIDERS:
            log.warning("model %s: no usable GPU (%s not available); running on the CPU",
                        manifest.name, ", ".join(wanted_gpu))
        self.graph: GraphIO = check_graph(manifest, self.session.get_inputs(), self.session.get_outputs())
        #: Device the IOBinding path binds to; ``None``: plain ``session.run``.
        self.bind_device: str | None = _BOUND_PROVIDERS.get(self.provider)
        self.device_id = device_id
        self.warmup_s = self.warm_up() if warm_up else 0.0
        log.info("model %s %s runs on %s (%s); warm-up %.2f s", manifest.name, manifest.version,
                 self.provider, self.graph.describe(), self.warmup_s,
                 extra={"model": manifest.name, "provider": self.provider})

    @property
    def input_name(self) -> str:
        return self.graph.input_name

    @property
    def output_name(self) -> str:
        return self.graph.output_name

    @property
    def _np_dtype(self) -> type:
        return np.float16 if self.manifest.input.dtype == "float16" else np.float32

    def describe(self) -> dict[str, Any]:
        """What runs where, for ``ainode status``."""
        m = self.manifest
        return {"version": m.version, "task": m.task, "kind": m.input.kind,
                "demonstration": m.demonstration, "provider": self.provider,
                "providers": list(self.session.get_providers()),
                "io_binding": self.bind_device or "", "warmup_s": round(self.warmup_s, 4),
                "graph": self.graph.describe()}

    def warm_up(self) -> float:
        """One run on a zero input of the model's shape; returns its seconds.

        Raises:
            ConfigError: the run fails or its output does not fit the manifest.
        """
        shape = warmup_shape(self.manifest, self.graph)
        t = time.perf_counter()
        try:
            y = self.infer(np.zeros(shape, dtype=self._np_dtype))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ConfigError(f"model {self.manifest.name}: warm-up run on a {list(shape)} input "
                              f"failed: {exc}") from None
        check_output(self.manifest, tuple(y.shape), self.output_name)
        return time.perf_counter() - t

    def infer(self, x: np.ndarray) -> np.ndarray:
        """One forward pass of the graph on the model-input tensor ``x``."""
        n = x.shape[0]
        fixed = self.graph.input_shape[0]
        if fixed is not None and n < fixed:       # a fixed batch: fill the last one up
            x = np.concatenate([x, np.zeros((fixed - n, *x.shape[1:]), dtype=x.dtype)])
        if self.bind_device is None:
            y = self.session.run([self.output_name], {self.input_name: x})[0]
        else:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, np.ascontiguousarray(x))
            binding.bind_output(self.output_name, self.bind_device, self.device_id)
            self.session.run_with_iobinding(binding)
            y = binding.copy_outputs_to_cpu()[0]
        return y[:n]

    # ---------------------------------------------------------------- checks
    def check_headers(self, modality: str, sop_class: str, images: int) -> None:
        """Refuse, from the headers alone and before any pixel is decoded, a series this model
        cannot take, so that the reason given is the real one.

        Raises:
            InputError: wrong modality or SOP class, or a number of images the kind cannot take.
        """
        m = self.manifest
        spec = m.input
        if spec.modalities and modality not in spec.modalities:
            raise InputError(f"model {m.name} takes {', '.join(spec.modalities)}, "
                             f"series is {modality or 'without Modality'}")
        if spec.sop_classes and sop_class not in spec.sop_classes:
            names = ", ".join(_uid_name(u) for u in spec.sop_classes)
            raise InputError(f"model {m.name} takes {names}; series is "
                             f"{_uid_name(sop_class) if sop_class else 'without SOPClassUID'}")

    def check_series(self, volume: SeriesVolume) -> None:
        """Refuse a series this model cannot take.

        Raises:
            InputError: wrong modality or SOP class, wrong number of images, missing geometry.
        """
        m = self.manifest
        spec = m.input
        if spec.modalities and volume.modality not in spec.modalities:
            raise InputError(f"model {m.name} takes {', '.join(spec.modalities)}, "
                             f"series is {volume.modality or 'without Modality'}")
        if spec.sop_classes and volume.headers:
            sop_class = str(volume.headers[0].get("SOPClassUID", ""))
            if sop_class not in spec.sop_classes:
                names = ", ".join(_uid_name(u) for u in spec.sop_classes)
                raise InputError(f"model {m.name} takes {names}; series is "
                                 f"{_uid_name(sop_class) if sop_class else 'without SOPClassUID'}")
        n = volume.shape[0]
        if spec.kind == "image" and n != 1:
            raise InputError(f"model {m.name} takes one 2D image, series has {n}")
        if spec.kind == "volume":
            if n < MIN_VOLUME_SLICES:
                raise InputError(f"model {m.name} takes a 3D volume, series has {n} image "
                                 f"(at least {MIN_VOLUME_SLICES} slices needed)")
            if not volume.has_geometry:
                raise InputError(f"model {m.name} takes a 3D volume, series has no geometry "
                                 "(ImagePositionPatient, ImageOrientationPatient)")

    # ---------------------------------------------------------------- run
    def run(self, volume: SeriesVolume) -> Prediction:
        """Run the model on a series and bring the output back to its grid.

        Raises:
            InputError: the series does not fit the model (see :meth:`check_series`).
        """
        self.check_series(volume)
        if self.manifest.input.kind == "volume":
            return self._run_volume(volume)
        return self._run_planes(volume)

    def _run_planes(self, volume: SeriesVolume) -> Prediction:
        """``image`` and ``slices``: planes in batches, each batch's output in place."""
        m = self.manifest
        n, rows, cols = volume.shape
        timings = dict.fromkeys(("decode", "preprocess", "run", "postprocess"), 0.0)
        if volume.pixels is None and needs_statistics(m.input):
            # The whole series' statistics come before the first batch: decode it once, here.
            t = time.perf_counter()
            volume = volume.loaded()
            timings["decode"] = time.perf_counter() - t
        t = time.perf_counter()
        intensity = intensity_for(volume, m.input)
        where = placement((rows, cols), m.input)
        timings["preprocess"] += time.perf_counter() - t
        if m.task == "segmentation":
            # (segments, slices, rows, cols): each batch's masks land in place, each segment
            # contiguous, which is the layout the SEG encoder works in; it receives the
            # (slices, rows, cols, segments) view of it without a copy.
            masks = np.empty((len(m.segments), n, rows, cols), dtype=bool)
        scores = []
        step = m.input.batch_size
        # A lazy volume's next batch is decoded while the model runs on this one.
        with ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder:
            pending = decoder.submit(volume.planes, 0, step)
            for start in range(0, n, step):
                t0 = time.perf_counter()
                planes = pending.result()
                if start + step < n:
                    pending = decoder.submit(volume.planes, start + step, start + 2 * step)
                t1 = time.perf_counter()
                x = model_input(planes, m.input, intensity, where)
                del planes
                t2 = time.perf_counter()
                y = self.infer(x)
                t3 = time.perf_counter()
                if m.task == "segmentation":
                    self._segment(y, where, out=masks[:, start:start + step])
                else:
                    scores.append(y.reshape(y.shape[0], -1).astype(np.float32))
                timings["decode"] += t1 - t0
                timings["preprocess"] += t2 - t1
                timings["run"] += t3 - t2
                timings["postprocess"] += time.perf_counter() - t3
        t = time.perf_counter()
        pred = Prediction(provider=self.provider)
        if m.task == "segmentation":
            pred.masks = np.moveaxis(masks, 0, 3)
        else:
            pred.scores = _activate(np.concatenate(scores), m.output.activation, axis=1).mean(axis=0)
        timings["postprocess"] += time.perf_counter() - t
        pred.timings = timings
        return pred

    def preprocess(self, volume: SeriesVolume, start: int = 0, stop: int | None = None,
                   intensity: Intensity | None = None, where: Placement | None = None) -> np.ndarray:
        """The exact tensor the graph receives for planes ``start:stop`` (image, slices)."""
        return model_planes(volume, self.manifest.input, start, stop, intensity, where)

    def _segment(self, y: np.ndarray, where: Placement, out: np.ndarray) -> None:
        """One batch of plane output -> ``out``, bool (segments, batch, rows, cols), source grid."""
        m = self.manifest
        axis = channel_axis(m.input.layout)
        if m.output.kind == "labelmap" or m.output.decision == "argmax":
            if m.output.kind == "labelmap":
                labels = np.squeeze(y, axis=axis) if y.ndim == 4 else y
            else:  # softmax and sigmoid are monotonic: the argmax needs no activation
                labels = np.argmax(y, axis=axis)
            labels = from_model_plane(labels.astype(np.int32, copy=False), where)
            for k, segment in enumerate(m.segments):
                np.equal(labels, segment.label, out=out[k])
            return
        if axis != 1:
            y = np.moveaxis(y, axis, 1)
        y, threshold = _thresholdable(y, m.output.activation, m.output.threshold, axis=1)
        for k, segment in enumerate(m.segments):
            channel = y[:, segment.label]
            if channel.shape[-2:] == where.source:
                np.greater_equal(channel, threshold, out=out[k])
            else:
                out[k] = from_model_plane(channel >= threshold, where)

    # ---------------------------------------------------------------- volume
    def _run_volume(self, volume: SeriesVolume) -> Prediction:
        m = self.manifest
        timings = dict.fromkeys(("preprocess", "run", "postprocess"), 0.0)
        t = time.perf_counter()
        x = self.volume_input(volume)
        timings["preprocess"] = time.perf_counter() - t
        if m.task == "classification":            # the whole volume on the model's grid, once
            t = time.perf_counter()
            batch = x[None, None] if m.input.layout == "NCDHW" else x[None, ..., None]
            y = self.infer(np.ascontiguousarray(batch, dtype=self._np_dtype))
            timings["run"] = time.perf_counter() - t
            t = time.perf_counter()
            scores = _activate(y.reshape(1, -1).astype(np.float32), m.output.activation, axis=1)[0]
            timings["postprocess"] = time.perf_counter() - t
            return Prediction(scores=scores, provider=self.provider, timings=timings)
        t = time.perf_counter()
        scores = self.volume_scores(x, timings)
        timings["postprocess"] += time.perf_counter() - t - timings["run"]
        t = time.perf_counter()
        masks = np.empty((len(m.segments), *volume.shape), dtype=bool)
        self._volume_masks(scores, masks)
        timings["postprocess"] += time.perf_counter() - t
        return Prediction(masks=np.moveaxis(masks, 0, 3), provider=self.provider, timings=timings)

    def volume_input(self, volume: SeriesVolume) -> np.ndarray:
        """The volume on the model's grid, intensity handled: ``(D, H, W)`` float32.

        Inversion and window apply on the source grid; the normalisation, linear, on the
        model's grid (the same result, and usually fewer voxels).
        """
        intensity = intensity_for(volume, self.manifest.input)
        x = apply_intensity(volume.planes(), replace(intensity, gain=1.0, bias=0.0))
        x = resample(x, target_shape(volume, self.manifest.input))
        return apply_intensity(x, Intensity(gain=intensity.gain, bias=intensity.bias), out=x)

    def volume_scores(self, x: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        """Sliding-window output over ``x``: ``(channels, D, H, W)`` on the model's grid.

        Channels are the graph's for probabilities; for a label map, channel 0 is everything
        but the segments and channel ``k + 1`` is segment ``k`` (one-hot, then blended).
        """
        m = self.manifest
        spec = m.input
        fixed = [self.graph.input_shape[a] for a in spatial_axes(spec.layout)]
        patch = tuple(int(p) for p in spec.patch_size) or (
            tuple(fixed) if all(fixed) else x.shape)   # type: ignore[arg-type]
        timings = timings if timings is not None else {}
        timings.setdefault("run", 0.0)
        labels = [s.label for s in m.segments]

        def predict(patches: np.ndarray) -> np.ndarray:
            batch = patches[:, None] if spec.layout == "NCDHW" else patches[..., None]
            t = time.perf_counter()
            y = self.infer(np.ascontiguousarray(batch, dtype=self._np_dtype))
            timings["run"] += time.perf_counter() - t
            if m.output.kind == "labelmap":
                y = np.squeeze(y, axis=channel_axis(spec.layout)) if y.ndim == 5 else y
                onehot = np.stack([np.isin(y, labels, invert=True)] + [y == v for v in labels], axis=1)
                return onehot.astype(np.float32)
            y = y.astype(np.float32, copy=False)
            return y if spec.layout == "NCDHW" else np.moveaxis(y, -1, 1)

        return sliding_window(x, patch, spec.overlap, spec.batch_size, predict,  # type: ignore[arg-type]
                              blend=spec.blend, pad_value=spec.pad_value)

    def _volume_masks(self, scores: np.ndarray, out: np.ndarray) -> None:
        """Blended scores on the model's grid -> ``out`` (segments, slices, rows, cols) on the
        source grid: channels resampled linearly, then argmax or threshold."""
        m = self.manifest
        shape = out.shape[1:]
        if m.output.kind == "labelmap" or m.output.decision == "argmax":
            wanted = (range(1, len(m.segments) + 1) if m.output.kind == "labelmap"
                      else [s.label for s in m.segments])
            if len(scores) == 2:             # two channels: the argmax is the sign of the difference
                for z, block in resample_chunks(scores[1] - scores[0], shape):  # type: ignore[arg-type]
                    for k, channel in enumerate(wanted):
                        if channel == 1:
                            np.greater(block, 0, out=out[k, z:z + block.shape[0]])
                        else:
                            np.less_equal(block, 0, out=out[k, z:z + block.shape[0]])
                return
            chunks = zip(*(resample_chunks(c, shape) for c in scores))  # type: ignore[arg-type]
            for blocks in chunks:
                z = blocks[0][0]
                labels = np.argmax(np.stack([b for _, b in blocks]), axis=0)
                for k, channel in enumerate(wanted):
                    np.equal(labels, channel, out=out[k, z:z + labels.shape[0]])
            return
        probabilities = _activate(scores, m.output.activation, axis=0)
        for k, segment in enumerate(m.segments):
            for z, block in resample_chunks(probabilities[segment.label], shape):  # type: ignore[arg-type]
                np.greater_equal(block, m.output.threshold, out=out[k, z:z + block.shape[0]])


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def _thresholdable(y: np.ndarray, activation: str, threshold: float, axis: int) -> tuple[np.ndarray, float]:
    """``(values, t)`` such that ``values >= t`` is ``activation(y) >= threshold``. A sigmoid is
    monotonic, so its threshold moves to the logit, ``log(t / (1 - t))``, and the output is
    compared as it is (no exponential over the whole output, no copy of it); a softmax needs
    the activation. Only where the threshold comes before any interpolation (2D planes: the
    masks go back by nearest neighbour); a 3D output is resampled as probabilities first."""
    y = y.astype(np.float32, copy=False)
    if activation == "sigmoid" and 0.0 < threshold < 1.0:
        return y, float(np.log(threshold / (1.0 - threshold)))
    return _activate(y, activation, axis=axis), threshold


def _activate(y: np.ndarray, activation: str, axis: int) -> np.ndarray:
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-y))
    if activation == "softmax":
        e = np.exp(y - y.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)
    return y
