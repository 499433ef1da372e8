"""Model packages: manifest validation, and manifests that do not fit their ONNX graph."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

import onnxmodels as om
from conftest import free_port
from nodeproc import REPO, write_config
from node.errors import ConfigError
from node.inference.runtime import ModelRuntime
from node.inference.manifest import load_manifest

CPU = ["CPUExecutionProvider"]
W3 = np.ones((3, 1, 3, 3), np.float32)

SEG_BODY = """
    [input]
    modalities = ["CT"]
    {input}
    [output]
    kind = "probabilities"
    decision = "threshold"
    {output}
"""


def _seg(tmp_path, input_lines="", output_lines="", segments=((0, "a"),), model=None) -> Path:
    model = model or om.conv2d(W3, np.zeros(3), "NCHW")
    return om.package(tmp_path, "m", model, SEG_BODY.format(input=input_lines, output=output_lines),
                      segments=segments)


def test_shipped_manifest_reads_with_defaults():
    m = load_manifest(REPO / "models" / "ct-tissue")
    assert (m.input.kind, m.input.layout, m.input.resize, m.input.blend) == ("slices", "NCHW", "stretch", "gaussian")
    assert m.demonstration and m.algorithm.name.startswith("ct-tissue DEMO")


@pytest.mark.parametrize("lines, message", [
    ('resize = "fit"', "input.resize: must be one of stretch, pad"),
    ("size = [32, 32, 32]", "input.size: expected 2 numbers, got 3"),
    ("size = [32.5, 32]", "input.size: expected whole numbers"),
    ("spacing = [1, 1, 1]", 'input.spacing: only for kind = "volume"'),
    ("patch_size = [8, 8, 8]", 'input.patch_size: only for kind = "volume"'),
    ('kind = "volume"\nlayout = "NCDHW"\nsize = [8, 8, 8]\nspacing = [1, 1, 1]',
     "give a target size or a target spacing, not both"),
    ('kind = "volume"\nresize = "pad"', 'input.resize: "pad" is for kind image or slices'),
    ('kind = "volume"\nlayout = "NCHW"', "input.layout: a volume needs NCDHW or NDHWC"),
    ('kind = "image"\nlayout = "NDHWC"', "input.layout: kind image needs NCHW or NHWC"),
    ("mean = 1.0\nstd = 2.0", 'input.mean, input.std: only with normalisation = "zscore"'),
    ('normalisation = "zscore"\nmean = 1.0', "give both or neither"),
    ('normalisation = "zscore"\nmean = 1.0\nstd = 0.0', "input.std: must be positive"),
    ("overlap = 1.0", "input.overlap: must be in [0, 1)"),
    ('sop_classes = ["CTImage"]', "input.sop_classes[0]: 'CTImage' is not a SOP class"),
    ('sop_classes = ["1.2.840.10008.1.2"]', "input.sop_classes[0]"),       # a transfer syntax
    ('dtype = "int8"', "input.dtype: must be one of float32, float16"),
    ("batch_size = 0", "input.batch_size: must be positive"),
    ("fp16 = 1", "input.fp16: expected true or false"),
    ("windw = [0, 1]", "unknown key(s): input.windw"),
])
def test_bad_input_keys_are_named(tmp_path, lines, message):
    with pytest.raises(ConfigError) as exc:
        load_manifest(_seg(tmp_path, lines))
    assert message in str(exc.value) and "model.toml" in str(exc.value)


def test_a_classifier_takes_no_patches(tmp_path):
    folder = om.package(tmp_path, "c3", om.conv2d(W3, np.zeros(3)), """
        task = "classification"
        [input]
        kind = "volume"
        patch_size = [8, 8, 8]
        """, findings=[(0, "A", 0.5)])
    with pytest.raises(ConfigError, match="input.patch_size: a classification model sees the whole volume"):
        load_manifest(folder)


def test_sop_class_keywords_become_uids(tmp_path):
    m = load_manifest(_seg(tmp_path, 'sop_classes = ["DigitalXRayImageStorageForPresentation", "1.2.3.4"]'))
    assert m.input.sop_classes == ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4")


def _refused(folder: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        ModelRuntime(load_manifest(folder), CPU)
    return str(exc.value)


@pytest.mark.parametrize("case, message", [
    ("input name", "input.tensor 'image' is not a graph input (x)"),
    ("output name", "output.tensor 'masks' is not a graph output (y)"),
    ("rank", "input 'x' has rank 4, but kind volume with input.layout = 'NCDHW' needs rank 5"),
    ("dtype", "input 'x' is tensor(float), manifest says input.dtype = 'float16'"),
    ("channels", "output 'y' [?, 3, ?, ?] has 3 channels, but segments use channel up to 3"),
    ("layout", "input 'x' [?, 1, ?, ?] has a spatial dimension fixed at 1 in layout NHWC"),
    ("warm-up", "warm-up run on a [1, 1, 64, 64] input failed"),
    ("output dtype", "output 'y' is tensor(int64), but output.kind = 'probabilities' needs floating-point values"),
])
def test_manifest_that_does_not_fit_its_graph(tmp_path, case, message):
    folder = {
        "input name": lambda: _seg(tmp_path, 'tensor = "image"'),
        "output name": lambda: _seg(tmp_path, "", 'tensor = "masks"'),
        "rank": lambda: _seg(tmp_path, 'kind = "volume"\nlayout = "NCDHW"'),
        "dtype": lambda: _seg(tmp_path, 'dtype = "float16"'),
        "channels": lambda: _seg(tmp_path, segments=((0, "a"), (3, "b"))),
        "layout": lambda: _seg(tmp_path, 'layout = "NHWC"'),    # the graph is NCHW
        "output dtype": lambda: _seg(tmp_path, model=om.labels([0.5], "NCHW")),
        "warm-up": lambda: _seg(tmp_path, model=om.conv2d(np.ones((3, 2, 3, 3), np.float32),
                                                          np.zeros(3), input_shape=["N", "C", "H", "W"])),
    }[case]()
    text = _refused(folder)
    assert f"model m: {message}" in text, text


def _classifier(tmp_path, layout="NHWC", lines="", findings=((0, "A", 0.5),), layout_graph=None):
    model = om.classifier(W3, np.ones((1, 3)), np.zeros(1), layout_graph or layout, size=(32, 32))
    return om.package(tmp_path, "c", model, f"""
        task = "classification"
        [input]
        modalities = ["DX"]
        kind = "image"
        layout = "{layout}"
        {lines}
        """, findings=findings)


@pytest.mark.parametrize("case, message", [
    ("no size", "input 'x' is fixed at 32x32; set input.size = [32, 32]"),
    ("wrong size", "input 'x' is fixed at 32x32, but input.size = [64, 64]"),
    ("layout", "input 'x' takes 32 channels in layout NHWC (is input.layout right?)"),
    ("batch", "input 'x' has a fixed batch of 1; set input.batch_size = 1"),
    ("findings", "output 'scores' [1, 1] gives 1 scores per image, but findings use index up to 1"),
])
def test_classifier_that_does_not_fit_its_graph(tmp_path, case, message):
    folder = {
        "no size": lambda: _classifier(tmp_path),
        "wrong size": lambda: _classifier(tmp_path, lines="size = [64, 64]"),
        "layout": lambda: _classifier(tmp_path, "NHWC", "size = [32, 32]", layout_graph="NCHW"),
        "batch": lambda: _classifier(tmp_path, lines="size = [32, 32]\nbatch_size = 4"),
        "findings": lambda: _classifier(tmp_path, lines="size = [32, 32]",
                                        findings=((0, "A", 0.5), (1, "B", 0.5))),
    }[case]()
    assert f"model c: {message}" in _refused(folder)


def test_float16_graph_with_float16_manifest_loads(tmp_path):
    model = om.conv2d(W3, np.zeros(3), "NCHW", dtype=TensorProto.FLOAT16)
    runtime = ModelRuntime(load_manifest(_seg(tmp_path, 'dtype = "float16"\nfp16 = true', model=model)), CPU)
    assert runtime.warmup_s > 0 and runtime.describe()["provider"] == "CPUExecutionProvider"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True,
                          text=True, cwd=str(REPO), timeout=60)


def test_node_refuses_to_start_with_a_model_that_does_not_fit(tmp_path):
    _seg(tmp_path / "models", segments=((0, "a"), (5, "b")))
    config = write_config(tmp_path / "node.toml", {
        "node": {"port": free_port(), "data_dir": str(tmp_path / "data")},
        "inference": {"models_dir": str(tmp_path / "models"), "providers": CPU},
        "routes": [{"name": "all", "models": ["m"]}]})
    done = _cli("serve", "--config", str(config))
    assert done.returncode == 2
    assert "model m: output 'y' [?, 3, ?, ?] has 3 channels, but segments use channel up to 5" in done.stderr


def test_models_list_and_check(tmp_path):
    models = tmp_path / "models"
    _seg(models)
    broken = om.package(models, "broken", om.conv2d(W3, np.zeros(3)), "[input]\nmodalites = []\n")
    (models / "absent").mkdir()
    (models / "absent" / "model.toml").write_text((broken / "model.toml").read_text()
                                                  .replace("modalites", "modalities")
                                                  .replace('"broken"', '"absent"')
                                                  + '[[segments]]\nlabel = 1\nname = "x"\n'
                                                  'category = { code = "1", meaning = "x" }\n'
                                                  'type = { code = "2", meaning = "y" }\n')
    config = write_config(tmp_path / "node.toml", {
        "inference": {"models_dir": str(models), "providers": CPU},
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["m"]}]})
    listed = _cli("models", "list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    assert "ok" in lines["m"] and "routes: ct" in lines["m"] and "slices" in lines["m"]
    assert "INVALID" in lines["broken"] and "input.modalites" in lines["broken"]
    assert "model.onnx MISSING" in lines["absent"]
    checked = _cli("models", "check", "m", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "on CPUExecutionProvider" in checked.stdout and "run" in checked.stdout
    assert "input 'x' tensor(float) [?, 1, ?, ?]" in checked.stdout
    bad = _cli("models", "check", "broken", "--config", str(config))
    assert bad.returncode == 2 and "input.modalites" in bad.stderr
