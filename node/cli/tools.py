"""The commands that work without a running node: echo, send, routes test, models, demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from node.cli.common import load
from node.config.schema import Config
from node.errors import ConfigError


def cmd_echo(args: argparse.Namespace) -> int:
    from node.dicom.deliver import echo, parse_peer

    peer = parse_peer(args.peer)
    t = time.perf_counter()
    status = echo(peer, args.aet, args.timeout)
    print(f"C-ECHO {peer}: status 0x{status:04X} in {1000 * (time.perf_counter() - t):.0f} ms")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from node.dicom.deliver import parse_peer, send_files

    peer = parse_peer(args.to)
    files: list[Path] = []
    for item in args.paths:
        p = Path(item)
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    if not files:
        print("no files to send", file=sys.stderr)
        return 2
    t = time.perf_counter()
    report = send_files(files, peer, args.aet, args.timeout)
    dt = time.perf_counter() - t
    for what, rows in (("refused", report.refused), ("skipped", report.skipped)):
        for path, why in rows:
            print(f"  {what}: {path}: {why}", file=sys.stderr)
    print(f"{peer}: {len(files)} files: sent {report.sent}, refused {len(report.refused)}, "
          f"skipped {len(report.skipped)} (unreadable), in {dt:.2f} s")
    return 0 if report.ok else 1


def cmd_routes_test(args: argparse.Namespace) -> int:
    from node.routing.explain import explain_paths

    config = load(args.config)
    association = {"CallingAETitle": args.calling_aet, "CalledAETitle": args.called_aet or config.node.ae_title,
                   "CallerAddress": args.address}
    lines = explain_paths(config, [Path(p) for p in args.paths], association)
    print("\n".join(lines))
    return 0 if lines and not lines[0].startswith("no DICOM") else 1


def cmd_models(args: argparse.Namespace) -> int:
    from node.inference.manifest import discover

    config = load(args.config)
    packages = discover(config.inference.models_dir)
    if args.action == "list":
        return _models_list(config, packages)
    if args.action == "build":
        return _models_build(config, packages)
    return _models_check(args, config, packages)


def _models_build(config: Config, packages: dict[str, Path]) -> int:
    """Build every shipped reference model (a package with a build script) with this interpreter."""
    from node.inference.manifest import load_manifest
    from node.inference.models import BUILD_SCRIPT, build_reference_model

    built = 0
    for name, folder in packages.items():
        if not (folder / BUILD_SCRIPT).is_file():
            continue
        manifest = load_manifest(folder)
        t = time.perf_counter()
        build_reference_model(manifest)
        print(f"built {name} {manifest.version}: {manifest.onnx_path} "
              f"({manifest.onnx_path.stat().st_size} bytes, {time.perf_counter() - t:.1f} s)")
        built += 1
    if not built:
        print(f"no reference models (packages with {BUILD_SCRIPT}) in {config.inference.models_dir}")
    return 0


def _models_list(config: Config, packages: dict[str, Path]) -> int:
    from node.inference.manifest import load_manifest

    if not packages:
        print(f"no model packages in {config.inference.models_dir}")
    for name, folder in packages.items():
        routes = [r.name for r in config.routes if name in r.models]
        routed = f"routes: {', '.join(routes)}" if routes else "no route"
        try:
            m = load_manifest(folder)
        except ConfigError as exc:
            print(f"{name:20s} INVALID: {exc}")
            continue
        status = "ok" if m.onnx_path.is_file() else "model.onnx MISSING"
        demo = " DEMONSTRATION" if m.demonstration else ""
        print(f"{name:20s} {m.version:8s} {m.task:14s} {m.input.kind:7s} {status:18s} {routed}{demo}")
    return 0


def _models_check(args: argparse.Namespace, config: Config, packages: dict[str, Path]) -> int:
    import numpy as np

    from node.inference.manifest import load_manifest
    from node.inference.models import TRT_CACHE, runtime_for
    from node.inference.volume import SeriesVolume

    if args.name not in packages:
        print(f"no model {args.name!r} in {config.inference.models_dir}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    runtime = runtime_for(load_manifest(packages[args.name]), config)
    load_s = time.perf_counter() - t
    m = runtime.manifest
    spec = m.input
    if spec.kind == "volume":
        shape = tuple(int(1.5 * p) for p in spec.patch_size) or tuple(int(v) for v in spec.size) or (48, 48, 48)
        spacing = tuple(spec.spacing) or (1.0, 1.0, 1.0)
    else:
        plane = tuple(int(v) for v in spec.size) or (128, 128)
        if spec.kind == "image":                 # a larger, non-square image: resized on the way
            plane = (2 * plane[0], 3 * plane[1] // 2)
        shape = (1 if spec.kind == "image" else max(2, spec.batch_size), *plane)
        spacing = (1.0, 1.0, 1.0)
    pixels = np.random.default_rng(0).normal(0, 100, shape).astype(np.float32)
    volume = SeriesVolume(pixels=pixels, headers=(), spacing=spacing,  # type: ignore[arg-type]
                          modality=(spec.modalities or ("OT",))[0], monochrome1=False,
                          orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                          positions=tuple((0.0, 0.0, spacing[0] * k) for k in range(shape[0])))
    pred = runtime.run(volume)
    out = pred.masks.shape if pred.masks is not None else pred.scores.shape  # type: ignore[union-attr]
    binding = f", IOBinding on {runtime.bind_device}" if runtime.bind_device else ""
    print(f"{m.name} {m.version}: OK on {runtime.provider}{binding}")
    print(f"  graph: {runtime.graph.describe()}")
    print(f"  loaded and checked in {1000 * load_s:.0f} ms (warm-up run {1000 * runtime.warmup_s:.0f} ms)")
    if runtime.provider == "TensorrtExecutionProvider":
        cache = config.node.data_dir / TRT_CACHE / config.node.name
        print(f"  TensorRT engine cache: {cache} ({sum(1 for _ in cache.glob('*'))} files; "
              "a later start reuses them)")
    print(f"  synthetic {spec.kind} input {shape} -> {'masks' if pred.masks is not None else 'scores'} "
          f"{out}: " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in pred.timings.items())
          + f", total {1000 * sum(pred.timings.values()):.0f} ms")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(slices=args.slices, size=args.size, keep=args.keep)
