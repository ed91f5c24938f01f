"""Tests of smine_jax.models.convert: torchvision state dicts -> the project's weight files.

The synthetic state dicts carry torchvision's real key names and shapes, enumerated from
torchvision's constructors in test_models.py (independently of the package's mapping), plus
GoogLeNet's auxiliary classifiers (torchvision's InceptionAux) and the 1000-way fc. The optional
tests build torchvision's own googlenet / resnet50 with random weights (nothing downloaded) and
compare features and logits with the converted Flax backbones.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file
from test_models import _tv_conv_bn, tv_googlenet_shapes, tv_resnet50_shapes

from smine_jax import models
from smine_jax.data.pipeline import normalise
from smine_jax.models import convert
from smine_jax.models.googlenet import GoogLeNet
from smine_jax.models.resnet import ResNet50

NUM_CLASSES = 1000
# Backbone parameters without fc (torchvision's counts minus fc; see test_models).
BACKBONE_PARAMS = {"googlenet": 5_599_904, "resnet50": 23_508_032}
FEATURE_DIMS = {"googlenet": 1024, "resnet50": 2048}


def tv_aux_shapes(num_classes=NUM_CLASSES) -> dict[str, tuple]:
    """torchvision's InceptionAux heads of GoogLeNet(aux_logits=True): conv 1×1 → 128, fc1
    2048 → 1024, fc2 1024 → classes; aux1 reads inception4a (512), aux2 inception4d (528)."""
    state = {}
    for name, channels in (("aux1", 512), ("aux2", 528)):
        _tv_conv_bn(state, f"{name}.conv", 128, channels, 1)
        state[f"{name}.fc1.weight"], state[f"{name}.fc1.bias"] = (1024, 2048), (1024,)
        state[f"{name}.fc2.weight"], state[f"{name}.fc2.bias"] = (num_classes, 1024), \
            (num_classes,)
    return state


def torchvision_shapes(arch: str) -> dict[str, tuple]:
    """Every key of torchvision's `arch` state dict (aux_logits=True for GoogLeNet)."""
    if arch == "googlenet":
        return {**tv_googlenet_shapes(NUM_CLASSES), **tv_aux_shapes()}
    return tv_resnet50_shapes(NUM_CLASSES)


def synthetic_state(shapes, seed=0) -> dict[str, np.ndarray]:
    """Distinct random float32 arrays (so every array is identifiable by its bytes) and int64
    step counters, as in a real state dict."""
    rng = np.random.default_rng(seed)
    return {key: (np.array(7, np.int64) if key.endswith("num_batches_tracked")
                  else rng.standard_normal(shape, dtype=np.float32))
            for key, shape in shapes.items()}


def to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Flax -> torch layout, written out: conv HWIO -> OIHW, dense [in, out] -> [out, in]."""
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array.T if array.ndim == 2 else array


def flat(variables) -> dict:
    """{"<collection>/<path>": leaf}; array leaves as numpy arrays."""
    return {f"{collection}/{key}": value if isinstance(value, jax.ShapeDtypeStruct)
            else np.asarray(value)
            for collection in ("params", "batch_stats") if collection in variables
            for key, value in traverse_util.flatten_dict(variables[collection],
                                                         sep="/").items()}


@pytest.fixture(scope="module")
def states():
    """{arch: synthetic torchvision state dict}, built once (ResNet-50: 25M floats)."""
    return {arch: synthetic_state(torchvision_shapes(arch), seed)
            for seed, arch in enumerate(convert.ARCHS)}


# ----------------------------------------------------------------------------------------------
# The mapping: complete and bijective.


@pytest.mark.parametrize("keep_classifier", [False, True])
@pytest.mark.parametrize("arch", convert.ARCHS)
def test_mapping_is_complete_and_bijective(states, arch, keep_classifier):
    state = states[arch]
    variables, report = convert.convert_state_dict(arch, state, keep_classifier=keep_classifier)
    assert report.ok and not (report.missing or report.unexpected or report.misshaped)

    # Every state-dict key in exactly one of converted / dropped / ignored.
    parts = [set(report.converted), set(report.dropped), set(report.ignored)]
    assert sum(map(len, parts)) == len(state) and set.union(*parts) == set(state)
    classifier = ("aux1.", "aux2.") + (() if keep_classifier else ("fc.",))
    assert set(report.dropped) == {key for key in state if key.startswith(classifier)}
    assert set(report.ignored) == {key for key in state if key.endswith("num_batches_tracked")
                                   and not key.startswith(classifier)}

    # Every model leaf filled exactly once: the tree is the backbone's, leaf for leaf.
    num_classes = NUM_CLASSES if keep_classifier else None
    backbone = {"googlenet": GoogLeNet, "resnet50": ResNet50}[arch](num_classes=num_classes)
    expected = flat(jax.eval_shape(
        lambda: backbone.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))))
    leaves = flat(variables)
    assert {key: leaf.shape for key, leaf in leaves.items()} == \
        {key: leaf.shape for key, leaf in expected.items()}
    assert all(leaf.dtype == np.float32 and leaf.flags.c_contiguous for leaf in leaves.values())
    fc_params = (FEATURE_DIMS[arch] + 1) * NUM_CLASSES if keep_classifier else 0
    assert sum(value.size for key, value in leaves.items() if key.startswith("params/")) == \
        BACKBONE_PARAMS[arch] + fc_params

    # ... each by a different converted key, identified by its bytes in torch's layout.
    key_of_bytes = {state[key].tobytes(): key for key in report.converted}
    assert len(key_of_bytes) == len(report.converted)
    sources = [key_of_bytes[to_torch_layout(leaf).tobytes()] for leaf in leaves.values()]
    assert sorted(sources) == sorted(report.converted)

    # Literal examples of the correspondence (module docstrings of googlenet.py / resnet.py).
    examples = {
        "googlenet": {
            "params/inception3a/branch2_0/conv/kernel": "inception3a.branch2.0.conv.weight",
            "params/conv1/bn/scale": "conv1.bn.weight",
            "params/inception5b/branch4_1/bn/bias": "inception5b.branch4.1.bn.bias",
            "batch_stats/inception4e/branch4_1/bn/var": "inception4e.branch4.1.bn.running_var",
            "batch_stats/conv3/bn/mean": "conv3.bn.running_mean"},
        "resnet50": {
            "params/layer2_0/downsample_0/kernel": "layer2.0.downsample.0.weight",
            "params/layer2_0/downsample_1/scale": "layer2.0.downsample.1.weight",
            "batch_stats/layer3_5/bn3/mean": "layer3.5.bn3.running_mean",
            "params/bn1/bias": "bn1.bias",
            "params/conv1/kernel": "conv1.weight"},
    }[arch]
    if keep_classifier:
        examples = {**examples, "params/fc/kernel": "fc.weight", "params/fc/bias": "fc.bias"}
    for flax_key, torch_key in examples.items():
        np.testing.assert_array_equal(to_torch_layout(leaves[flax_key]), state[torch_key])


def test_a_wrong_state_dict_reports_every_key_by_name(states):
    state = dict(states["googlenet"])
    for key in ("conv1.conv.weight", "inception4b.branch3.1.bn.running_var"):
        del state[key]
    state["inception9a.branch1.conv.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    state["conv1.bn.extra"] = np.zeros(3, np.float32)
    state["stray.num_batches_tracked"] = np.array(1)
    state["conv2.bn.bias"] = np.zeros(3, np.float32)
    state["conv3.conv.weight"] = state["conv3.conv.weight"].transpose(2, 3, 1, 0)  # Flax's
    state["inception3b.branch1.bn.weight"] = np.full(128, np.nan, np.float32)
    state["inception3a.branch1.bn.weight"] = np.array(["a"] * 64)
    state[3] = np.zeros(1, np.float32)  # not even a string

    with pytest.raises(ValueError) as error:
        convert.convert_state_dict("googlenet", state)
    message = str(error.value)
    assert message.startswith("state_dict: does not match torchvision's googlenet")
    assert "\n" not in message
    assert "2 missing" in message and "4 unexpected" in message and "4 mis-shaped" in message
    for text in ("conv1.conv.weight", "inception4b.branch3.1.bn.running_var",
                 "inception9a.branch1.conv.weight", "conv1.bn.extra",
                 "stray.num_batches_tracked", ", 3,",
                 "conv2.bn.bias: file (3,) float32, expected (64,)",
                 "conv3.conv.weight: file (3, 3, 64, 192) float32, expected (192, 64, 3, 3)",
                 "inception3b.branch1.bn.weight: file (128,) float32 contains NaN or inf",
                 "inception3a.branch1.bn.weight: file (64,) <U1, expected (64,)"):
        assert text in message, text

    # Not strict: what converts is returned, the rest is in the report.
    variables, report = convert.convert_state_dict("googlenet", state, strict=False)
    assert not report.ok
    assert report.missing == ("conv1.conv.weight", "inception4b.branch3.1.bn.running_var")
    assert report.unexpected == ("3", "conv1.bn.extra", "inception9a.branch1.conv.weight",
                                 "stray.num_batches_tracked")
    assert len(report.misshaped) == 4 and all(": file " in line for line in report.misshaped)
    leaves = flat(variables)
    assert "params/conv1/conv/kernel" not in leaves and "params/conv2/bn/bias" not in leaves
    assert "batch_stats/inception4b/branch3_1/bn/var" not in leaves
    np.testing.assert_array_equal(leaves["params/conv2/conv/kernel"],
                                  state["conv2.conv.weight"].transpose(2, 3, 1, 0))
    assert "2 missing" in report.summary() and "conv1.conv.weight" in report.summary()


def test_argument_errors(states):
    with pytest.raises(ValueError, match=r"arch='small_conv': expected one of \('googlenet'"):
        convert.convert_state_dict("small_conv", states["resnet50"])
    with pytest.raises(ValueError, match="state_dict: expected a mapping"):
        convert.convert_state_dict("resnet50", [1, 2])
    without_fc = {k: v for k, v in states["resnet50"].items() if not k.startswith("fc.")}
    with pytest.raises(ValueError, match=r"keep_classifier needs a 1-D fc.bias"):
        convert.convert_state_dict("resnet50", without_fc, keep_classifier=True)
    # Upper-case names and float64 / float16 values are fine; without fc nothing is dropped.
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v
            for k, v in without_fc.items()}
    variables, report = convert.convert_state_dict("ResNet50", half)
    assert report.arch == "resnet50" and report.dropped == () and report.ok
    assert variables["params"]["conv1"]["kernel"].dtype == np.float32


# ----------------------------------------------------------------------------------------------
# Reading files.


def test_safetensors_read_without_torch(tmp_path, states, monkeypatch):
    state = {key: value for key, value in states["googlenet"].items() if "inception" not in key}
    path = tmp_path / "googlenet.safetensors"
    save_file({f"module.{key}": value for key, value in state.items()}, str(path))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    read = convert.read_state_dict(path)
    assert set(read) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(read[key], value)
        assert read[key].dtype == value.dtype


def test_pth_without_torch_gives_an_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "googlenet.pth"
    path.write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"needs torch \(pip install torch.*safetensors"):
        convert.read_state_dict(path)


def test_pth_files_plain_wrapped_and_prefixed(tmp_path):
    torch = pytest.importorskip("torch")
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    plain = {"fc.weight": weight, "bn.num_batches_tracked": torch.tensor(3),
             "half": weight.to(torch.bfloat16)}
    torch.save(plain, tmp_path / "plain.pth")
    read = convert.read_state_dict(tmp_path / "plain.pth")
    np.testing.assert_array_equal(read["fc.weight"], weight.numpy())
    assert read["bn.num_batches_tracked"].dtype == np.int64
    assert read["half"].dtype == np.float32  # bfloat16 has no numpy dtype: widened
    for wrapper in ("state_dict", "model"):
        checkpoint = {"epoch": 3, wrapper: {f"module.{k}": v for k, v in plain.items()}}
        torch.save(checkpoint, tmp_path / "checkpoint.pt")
        assert set(convert.read_state_dict(tmp_path / "checkpoint.pt")) == set(plain)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(ValueError, match=r"module.pth' is not a readable torch state dict"):
        convert.read_state_dict(tmp_path / "module.pth")
    torch.save({"epoch": 3, "weights": weight}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd.pth': entry 'epoch' is a int, not a tensor"):
        convert.read_state_dict(tmp_path / "odd.pth")
    torch.save({"module.w": weight, "w": weight}, tmp_path / "twice.pth")
    with pytest.raises(ValueError, match=r"key 'w' appears both with and without"):
        convert.read_state_dict(tmp_path / "twice.pth")
    torch.save([weight], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list.pth' holds a list, not a state dict"):
        convert.read_state_dict(tmp_path / "list.pth")


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"path: file '.*absent.safetensors' does not exist"):
        convert.read_state_dict(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match=r"expected a .safetensors, .pth or .pt file, got "
                                         r"'.*weights.bin'"):
        convert.read_state_dict(tmp_path / "weights.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.safetensors' is not a readable .safetensors"):
        convert.read_state_dict(tmp_path / "junk.safetensors")
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match=r"empty.safetensors' holds no tensors"):
        convert.read_state_dict(tmp_path / "empty.safetensors")


# ----------------------------------------------------------------------------------------------
# Against torchvision itself (optional: torch and torchvision; random weights, no download).


def _randomise(torch, model, seed):
    """Weights with O(1) activations through the whole net (He-scaled convs / linears) and
    batch norms that are not the identity (random scale, shift and running statistics)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * (2 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, torch.nn.BatchNorm2d):
                channels = module.num_features
                module.weight.copy_(0.5 + torch.rand(channels, generator=generator))
                module.bias.copy_(0.1 * torch.randn(channels, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))


@pytest.mark.parametrize("arch", convert.ARCHS)
def test_converted_backbone_matches_torchvision(tmp_path, arch):
    """torchvision's model on torchvision's preprocessing (ToTensor + Normalize) and the
    converted backbone, as ``build_model`` configures it, on the data pipeline's ``normalise``
    with ``model_spec``'s mean / std: same pooled features and logits to 1e-4."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    if arch == "googlenet":  # transform_input=True: what torchvision sets for its weights
        tv_model = torchvision.models.googlenet(weights=None, aux_logits=True,
                                                transform_input=True, init_weights=False)
    else:
        tv_model = torchvision.models.resnet50(weights=None)
    _randomise(torch, tv_model, seed=1)
    tv_model.eval()
    state_dict = tv_model.state_dict()
    # The enumerated shapes of the synthetic tests are torchvision's.
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == torchvision_shapes(arch)

    if arch == "googlenet":  # both file formats
        torch.save(state_dict, tmp_path / "weights.pth")
        src = tmp_path / "weights.pth"
    else:
        from safetensors.torch import save_file as save_torch_file
        save_torch_file(state_dict, str(tmp_path / "weights.safetensors"))
        src = tmp_path / "weights.safetensors"
    variables, report = convert.convert_state_dict(arch, convert.read_state_dict(src),
                                                   keep_classifier=True)
    assert report.ok
    fc = variables["params"].pop("fc")

    spec = models.model_spec(arch)
    images = np.random.default_rng(2).integers(0, 256, (2, 65, 65, 3), dtype=np.uint8)
    tv_input = torchvision.transforms.functional.normalize(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, spec.mean, spec.std)
    captured = {}
    tv_model.fc.register_forward_hook(lambda _, inputs, __: captured.update(x=inputs[0]))
    with torch.no_grad():
        tv_logits = tv_model(tv_input).numpy()
    tv_features = captured["x"].numpy()

    backbone = models.build_model(models.default_config(arch)).backbone
    inputs = normalise(images, mean=spec.mean, std=spec.std)
    # Compiled once, without LLVM optimisation: a few seconds less for a single call.
    forward = jax.jit(backbone.apply).lower(variables, inputs).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    features = np.asarray(forward(variables, inputs))
    assert features.shape == (2, FEATURE_DIMS[arch])
    scale = np.abs(tv_features).max()
    assert scale > 1e-2 and np.abs(features - tv_features).max() <= 1e-4 * scale
    logits = features @ fc["kernel"] + fc["bias"]
    assert np.abs(logits - tv_logits).max() <= 1e-4 * np.abs(tv_logits).max()


# ----------------------------------------------------------------------------------------------
# Command line.


def run_main(capsys, *args) -> tuple[int, str, str]:
    status = convert.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.slow  # init_variables compiles GoogLeNet's init: ~5-15 s on 2 CPU cores
def test_cli_writes_a_file_that_init_from_loads(tmp_path, states, capsys):
    state = states["googlenet"]
    src, dst = tmp_path / "googlenet.safetensors", tmp_path / "out" / "googlenet.npz"
    save_file(state, str(src))
    status, out, err = run_main(capsys, "--arch", "googlenet", "--src", src, "--dst", dst)
    assert (status, err) == (0, "")
    assert "googlenet: converted 285 tensors; dropped 22 classifier keys; ignored 57" in out
    assert f"--config.model.init_from={dst}" in out
    assert sorted(p.name for p in dst.parent.iterdir()) == ["googlenet.npz"]  # atomic write
    with np.load(dst) as archive:
        assert not any(key.split("/")[1] in ("fc", "aux1", "head") for key in archive.files)

    config = ml_collections.ConfigDict({"name": "googlenet", "init_from": str(dst)})
    model = models.build_model(config)
    variables = models.init_variables(model, jax.random.key(0), (1, 64, 64, 3), config)
    loaded = flat(variables)
    converted, _ = convert.convert_state_dict("googlenet", state)
    for key, value in flat(converted).items():
        collection, rest = key.split("/", 1)
        np.testing.assert_array_equal(loaded[f"{collection}/backbone/{rest}"], value)
    assert loaded["params/head/kernel"].shape == (1024, 64)


def test_cli_not_strict_writes_what_converts(tmp_path, states, capsys):
    state = {k: v for k, v in states["resnet50"].items() if not k.startswith("layer4.")}
    src, dst = tmp_path / "partial.safetensors", tmp_path / "partial.npz"
    save_file(state, str(src))
    status, _, err = run_main(capsys, "--arch", "resnet50", "--src", src, "--dst", dst)
    assert status == 2 and "layer4.2.bn3.running_var" in err and not dst.exists()
    status, out, err = run_main(capsys, "--arch", "resnet50", "--src", src, "--dst", dst,
                                "--no-strict", "--keep-classifier")
    assert (status, err) == (0, "") and "missing" in out and "layer4.0.conv1.weight" in out
    with np.load(dst) as archive:
        assert "params/fc/kernel" in archive.files
        assert "params/layer3_5/conv3/kernel" in archive.files
        assert not any("layer4" in key for key in archive.files)


@pytest.mark.parametrize("args, expected", [
    ([], "the following arguments are required: --arch, --src, --dst"),
    (["--arch", "vgg", "--src", "a.pth", "--dst", "b.npz"], "argument --arch: invalid choice"),
    (["--arch", "googlenet", "--src", "{tmp}/absent.pth", "--dst", "b.npz"],
     "--src: file '{tmp}/absent.pth' does not exist"),
    (["--arch", "googlenet", "--src", "{tmp}/w.bin", "--dst", "b.npz"],
     "--src: expected a .safetensors, .pth or .pt file, got '{tmp}/w.bin'"),
    (["--arch", "googlenet", "--src", "{tmp}/small.safetensors", "--dst", "b.npz"],
     "--src: does not match torchvision's googlenet (no key converts: is it a googlenet state "
     "dict?): 285 missing (the model has them, the file does not): conv1.bn.bias"),
    (["--arch", "googlenet", "--src", "{tmp}/small.safetensors", "--dst", "b.npz",
      "--no-strict"], "--src: nothing in '{tmp}/small.safetensors' converts to googlenet"),
    (["--arch", "resnet50", "--src", "{tmp}/resnet.safetensors", "--dst", "{tmp}",
      "--no-strict"], "--dst: '{tmp}' is a directory"),
    (["--arch", "resnet50", "--src", "{tmp}/resnet.safetensors", "--dst",
      "{tmp}/resnet.safetensors", "--no-strict"],
     "--dst: '{tmp}/resnet.safetensors' is the --src file"),
    (["--arch", "resnet50", "--src", "{tmp}/resnet.safetensors", "--strict=no"],
     "argument --strict/--no-strict: ignored explicit argument 'no'"),
])
def test_cli_bad_input_is_one_line_naming_the_flag(tmp_path, states, capsys, args, expected):
    save_file({"unrelated.weight": np.zeros(2, np.float32)}, str(tmp_path / "small.safetensors"))
    resnet = {k: v for k, v in states["resnet50"].items() if not k.startswith("layer")}
    save_file(resnet, str(tmp_path / "resnet.safetensors"))
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    status, out, err = run_main(capsys, *args)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected.replace("{tmp}", str(tmp_path)) in err, err


def test_python_dash_m_exits_with_status_2_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "smine_jax.models.convert", "--arch", "resnet50", "--src",
         str(tmp_path / "absent.safetensors"), "--dst", str(tmp_path / "x.npz")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --src: file '{tmp_path}/absent.safetensors' does not exist"]
