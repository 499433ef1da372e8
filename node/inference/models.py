"""What a running node holds and a reload replaces: the configuration and the loaded models.

:func:`load_models` loads every model the routes name (reusing the warm sessions of unchanged
packages on a reload) and checks the ``on_result`` actions against the models' findings and
segments.
"""

from __future__ import annotations

import dataclasses
import logging
import runpy
import time
from pathlib import Path
from typing import Any, Mapping

from node.config.schema import Config
from node.errors import ConfigError
from node.inference.runtime import ModelRuntime
from node.inference.manifest import ModelManifest, discover, load_manifest

log = logging.getLogger(__name__)

#: In a shipped reference model's folder: the script that writes its model.onnx.
BUILD_SCRIPT = "build.py"


def build_reference_model(manifest: ModelManifest) -> Path:
    """Write a shipped reference model's ``model.onnx`` with its own build script, run by
    this interpreter (the scripts are deterministic: the same bytes every time).

    Raises:
        ConfigError: the package is not a reference model with a build script.
    """
    script = manifest.directory / BUILD_SCRIPT
    if not manifest.demonstration or not script.is_file():
        raise ConfigError(f"model {manifest.name}: not a shipped reference model (no {BUILD_SCRIPT}); "
                          f"export its model.onnx yourself")
    t = time.perf_counter()
    runpy.run_path(str(script), run_name="build_reference_model")["build"](manifest.onnx_path)
    log.info("model %s: built the reference model %s in %.1f s", manifest.name, manifest.onnx_path,
             time.perf_counter() - t)
    return manifest.onnx_path


@dataclasses.dataclass(frozen=True)
class NodeState:
    """What a reload replaces at once: the configuration and the models it names.

    ``stamps`` remembers each model's manifest and ONNX file time, so a reload reuses a
    loaded session unless its package changed.
    """

    config: Config
    models: Mapping[str, ModelRuntime]
    stamps: Mapping[str, tuple[ModelManifest, int]] = dataclasses.field(default_factory=dict)


#: TensorRT engines, under data_dir: built once per model, GPU and TensorRT version.
TRT_CACHE = "trt-cache"


def load_models(config: Config, previous: NodeState | None = None
                ) -> tuple[dict[str, ModelRuntime], dict[str, tuple[ModelManifest, int]]]:
    """Load every model that a route names, once, and keep it warm (reusing unchanged ones).

    Raises:
        ConfigError: a route names a missing model, a package is invalid, or an
            ``on_result`` names a finding or segment its models do not have.
    """
    packages = discover(config.inference.models_dir)
    load = config.node.infers           # an ingest node checks the packages, a worker loads them
    manifests: dict[str, ModelManifest] = {}
    runtimes: dict[str, ModelRuntime] = {}
    stamps: dict[str, tuple[ModelManifest, int]] = {}
    for k, route in enumerate(config.routes):
        for name in route.models:
            if name in manifests:
                continue
            if name not in packages:
                raise ConfigError(f"routes[{k}].models: model {name!r} (route {route.name}) not found in "
                                  f"{config.inference.models_dir} (have: {', '.join(packages) or 'none'})")
            manifest = manifests[name] = load_manifest(packages[name])
            if not load:
                continue
            if not manifest.onnx_path.is_file() and (manifest.directory / BUILD_SCRIPT).is_file() \
                    and manifest.demonstration:
                log.info("model %s: %s is missing; building the reference model (deterministic)",
                         name, manifest.onnx_path)
                build_reference_model(manifest)
            stamp = (manifest, _mtime(manifest.onnx_path))
            if previous is not None and previous.stamps.get(name) == stamp:
                runtimes[name] = previous.models[name]
            else:
                runtimes[name] = runtime_for(manifest, config)
            stamps[name] = stamp
        _check_on_result(k, route.on_result, [manifests[m] for m in route.models])
    return runtimes, stamps


def runtime_for(manifest: ModelManifest, config: Config) -> ModelRuntime:
    """The model's runtime as the configuration sets it up: providers, GPU, CPU threads, and
    TensorRT's engine cache under ``data_dir`` (``trt-cache/<node name>``), so that a restart,
    or ``ainode models check``, does not rebuild the engines.

    Raises:
        ConfigError: the model cannot be loaded (see :class:`ModelRuntime`).
    """
    return ModelRuntime(manifest, config.inference.providers, device_id=config.inference.device_id,
                        trt_cache=config.node.data_dir / TRT_CACHE / config.node.name,
                        cpu_threads=config.inference.cpu_threads)


def _check_on_result(k: int, actions: Any, manifests: list[ModelManifest]) -> None:
    for i, action in enumerate(actions):
        scope = [m for m in manifests if not action.model or m.name == action.model]
        if action.finding:
            known = [f.name for m in scope for f in m.findings]
            key, name = "finding", action.finding
        else:
            known = [s.name for m in scope for s in m.segments]
            key, name = "segment", action.segment
        if name not in known:
            raise ConfigError(f"routes[{k}].on_result[{i}].{key}: no model of the route has a {key} "
                              f"{name!r} (have: {', '.join(known) or 'none'})")


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0
