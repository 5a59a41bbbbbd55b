"""Typed configuration: strict from_dict, lossless to_dict round trip, file loading."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vtfuse.config import (
    ConfigError,
    FusionConfig,
    ModelConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
    from_dict,
    load_run_config,
    save_json,
    to_dict,
)


def test_unknown_fields_are_refused_by_name():
    with pytest.raises(ConfigError) as info:
        from_dict(TrainConfig, {"epochs": 2, "learning_rate": 0.1, "zzz": 1})
    message = str(info.value)
    assert message.startswith("TrainConfig: unknown field(s) learning_rate, zzz")
    assert "known:" in message and "lr" in message


def test_unknown_nested_field_names_its_path():
    with pytest.raises(ConfigError, match=r"^RunConfig\.model\.vision: unknown field\(s\) width"):
        from_dict(RunConfig, {"model": {"vision": {"width": 3}}})


@pytest.mark.parametrize(
    "data,path,expected",
    [
        ({"train": {"epochs": "3"}}, "RunConfig.train.epochs", "expected int, got '3'"),
        ({"train": {"epochs": 2.5}}, "RunConfig.train.epochs", "expected int, got 2.5"),
        ({"train": {"epochs": True}}, "RunConfig.train.epochs", "expected int, got True"),
        ({"train": {"lr": "fast"}}, "RunConfig.train.lr", "expected float, got 'fast'"),
        ({"train": {"skip_bad": 1}}, "RunConfig.train.skip_bad", "expected bool, got 1"),
        ({"model": {"task": 5}}, "RunConfig.model.task", "expected str, got 5"),
        (
            {"model": {"vision": {"channels": 8}}},
            "RunConfig.model.vision.channels",
            "expected a list, got 8",
        ),
        (
            {"model": {"vision": {"channels": [8, "x"]}}},
            "RunConfig.model.vision.channels",
            "expected int",
        ),
        ({"model": {"text": 3}}, "RunConfig.model.text", "expected an object, got int"),
    ],
)
def test_wrong_types_name_the_field_path(data, path, expected):
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, data)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_ints_are_accepted_for_floats_and_lists_for_tuples():
    config = from_dict(RunConfig, {"train": {"lr": 1}, "model": {"vision": {"channels": [4, 8]}}})
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.model.vision.channels == (4, 8)
    assert from_dict(RunConfig, {}) == RunConfig()


def test_where_prefix_is_used():
    with pytest.raises(ConfigError, match=r"^file\.json: model\.text\.dim: expected int"):
        from_dict(ModelConfig, {"text": {"dim": "wide"}}, where="file.json: model")


def test_round_trip():
    config = RunConfig(
        model=ModelConfig(
            task="vqa",
            vision=VisionConfig(
                name="vit", image_size=32, patch_size=4, channels=(8, 16), dim=48, depth=2
            ),
            text=TextConfig(vocab_size=77, dim=64, depth=1, heads=8, max_length=20, dropout=0.1),
            fusion=FusionConfig(score="neg_distance"),
            num_answers=13,
        ),
        train=TrainConfig(epochs=3, lr=3e-4, skip_bad=True, device="cpu", precision="bf16"),
    )
    data = to_dict(config)
    assert data["model"]["vision"]["channels"] == [8, 16]  # JSON-ready
    assert json.loads(json.dumps(data)) == data
    restored = from_dict(RunConfig, data)
    assert restored == config
    assert isinstance(restored.model.vision.channels, tuple)
    assert to_dict(restored) == data
    assert from_dict(RunConfig, to_dict(RunConfig())) == RunConfig()


def test_configs_are_frozen():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]


def test_load_run_config(tmp_path):
    path = tmp_path / "run.json"
    save_json(path, {"model": {"fusion": {"score": "cosine"}}, "train": {"epochs": 4}})
    config = load_run_config(path)
    assert config.model.fusion.score == "cosine"
    assert config.train.epochs == 4
    assert config.model.vision == VisionConfig()

    partial = tmp_path / "partial.json"
    save_json(partial, {"train": {"seed": 9}})
    assert load_run_config(partial) == RunConfig(train=TrainConfig(seed=9))


def test_load_run_config_bad_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"train": {"epochs": 3,}}')
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(info.value).startswith(f"{path}: not valid JSON")


def test_load_run_config_bad_field_names_file_and_field(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"train": {"epoch": 3}}))
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(info.value).startswith(f"{path}.train: unknown field(s) epoch")
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected an object, got list"):
        load_run_config(path)


def test_importing_the_package_loads_its_parts_only_when_used():
    """`import vtfuse` imports no torch; a public name brings its own module on first use."""
    import subprocess
    import sys

    script = (
        "import sys, vtfuse\n"
        "print('torch' in sys.modules, 'vtfuse.training' in sys.modules)\n"
        "vtfuse.TrainConfig\n"
        "print('vtfuse.config' in sys.modules, 'vtfuse.training' in sys.modules)\n"
        "print(vtfuse.train.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True", "False", "vtfuse.training.trainer"]
    import vtfuse

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vtfuse.nope  # noqa: B018
    assert set(vtfuse.__all__) <= set(dir(vtfuse))


def _module_imports() -> dict[str, set[str]]:
    """Each vtfuse module → the vtfuse modules it imports when it is loaded (module-level
    imports; those under `if TYPE_CHECKING:` and inside functions run later, if at all)."""
    import ast
    from pathlib import Path

    import vtfuse

    root = Path(vtfuse.__file__).parent.parent
    files = {}
    for path in root.joinpath("vtfuse").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path

    def module_of(name: str) -> str:
        while name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in files.items():
        imported = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vtfuse"):
                imported |= {module_of(f"{node.module}.{alias.name}") for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {module_of(a.name) for a in node.names if a.name.startswith("vtfuse")}
        graph[name] = imported - {name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    """Imports run downwards only: no cycle among vtfuse's modules, however long."""
    graph = _module_imports()
    assert "vtfuse.tasks.caption" in graph["vtfuse.tasks"]  # the graph is read, not empty
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            pytest.fail("import cycle: " + " → ".join(cycle))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_no_test_module_imports_another():
    """What several test modules share lives in tests/helpers.py: a test module imported by
    another runs its fixtures and module-level set-up twice, and ties the two together."""
    import ast
    from pathlib import Path

    tests = Path(__file__).parent
    modules = sorted(tests.rglob("test_*.py"))
    names = {path.stem for path in modules}
    shared = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            imported = []
            if isinstance(node, ast.ImportFrom):
                imported = [node.module or ""]
            elif isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            shared += [f"{path.name}: {m}" for m in imported if m.rpartition(".")[2] in names]
    assert shared == []
    assert "helpers" not in names and (tests / "helpers.py").is_file()


def test_the_tests_mirror_the_package():
    """tests/<package>/test_<module>.py: each test folder is named for a vtfuse package."""
    from pathlib import Path

    import vtfuse

    package = Path(vtfuse.__file__).parent
    folders = [path.parent for path in Path(__file__).parent.glob("*/test_*.py")]
    assert folders and all((package / folder.name / "__init__.py").is_file() for folder in folders)
