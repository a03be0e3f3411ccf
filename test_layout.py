"""The shape of the repository: imports run one way, train.py only trains, and the documents' links resolve."""
import ast
import inspect
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent
# bottom to top: a module may import only modules before it (the tests and conftest may import any)
ORDER = ["sipo", "common", "rundir", "models", "data", "evaluate", "online", "train", "launcher", "toy", "bench",
         "study"]


def programs():
    return sorted(p.stem for p in ROOT.glob("*.py") if not p.stem.startswith("test_") and p.stem != "conftest")


def imported(path):
    """Every module name an import statement anywhere in the file names (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_top_level_file_has_its_place_in_the_order():
    assert programs() == sorted(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_imports_run_one_way(name):
    own = imported(ROOT / f"{name}.py") & set(ORDER)
    above = {other for other in own if ORDER.index(other) >= ORDER.index(name)}
    assert not above, f"{name}.py imports {sorted(above)}, which sit above it (or itself)"


def test_sipo_and_common_import_torch_and_the_standard_library_only():
    import sys
    for name in ("sipo", "common", "rundir"):
        third_party = {m for m in imported(ROOT / f"{name}.py") if m not in sys.stdlib_module_names}
        assert third_party <= {"torch"} | ({"common"} if name == "rundir" else set()), (name, third_party)


def test_train_only_trains_and_bench_times_its_step():
    import bench
    import train
    assert not {"launch", "finish", "free_port", "start_server", "start_launcher"} & set(vars(train))
    lines = len(inspect.getsourcelines(train.train)[0])
    assert lines <= 60, f"train() is {lines} lines"
    source = inspect.getsource(bench)
    assert "train.optimizer_step" in inspect.getsource(bench.StepTimer.step)
    assert not re.search(r"preference_loss|optimizer\.step\(|clip_gradients", source)


def tracked_files():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / name for name in listed if (ROOT / name).is_file()] or list(ROOT.glob("*.py"))


def test_no_file_refers_to_a_document_outside_the_repository():
    outside = re.compile(r"\.\./shared|METHOD\.md|BACKBONES\.md|DESIGN\.md|METHOD §")
    for path in tracked_files():
        if path.suffix in (".py", ".md", ".txt", ".json", "") and path.name != "test_layout.py":
            text = path.read_text(errors="replace")
            assert not outside.search(text), f"{path.relative_to(ROOT)} refers to {outside.search(text).group()}"


def links(markdown):
    """Relative link targets of a Markdown file, anchors dropped."""
    targets = re.findall(r"\]\(([^)\s]+)\)", markdown.read_text())
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+://|#|mailto:", t) and t.split("#")[0]]


@pytest.mark.parametrize("markdown", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("docs/*.md")),
                                      "results/RESULTS.md"])
def test_every_relative_link_resolves(markdown):
    path = ROOT / markdown
    missing = [target for target in links(path) if not (path.parent / target).exists()]
    assert not missing, f"{markdown} links to missing {missing}"


def test_readme_is_a_map_with_the_commands_the_files_and_the_equations_first():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md is {len(lines)} lines"
    head = "\n".join(lines[:100])
    for must in ("python toy.py", "python -m pytest -q", "| `sipo.py` |", "| `train.py` |",
                 "| equation | `sipo.py` function |"):
        assert must in head, f"{must!r} is not within README.md's first 100 lines"
