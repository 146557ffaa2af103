"""Serving and scoring never load the torch side, plotting or progress bars (issue 10).

The service must fit a 256 MB container on onnxruntime, numpy and Pillow. The static half of
the rule is ruff's TID251 in pyproject.toml (every import statement, lazy ones included). This
file is the run-time half: the real ``pneumonia serve``, ``predict`` and ``score`` in a fresh
interpreter, under a ``sitecustomize`` that blocks and records every attempt to import a banned
module, in the command's process and in every process it spawns (the scoring pool).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.common import dicom_bytes
from conftest import jpeg_bytes, synthetic_xray
from serve_util import running_server, serve_command

REPO = Path(__file__).resolve().parents[1]
BANNED = ("torch", "matplotlib", "tqdm", "pneumonia.training", "onnxruntime.quantization")

#: Runs first in every interpreter started with the guard on PYTHONPATH (spawned workers too).
#: An attempt is written down at once: pool workers leave by os._exit, without atexit.
GUARD = f"""
import importlib.abc, os, sys

_BANNED = {BANNED!r}


def _importer():
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "?") if frame is not None else "?"


class _BoundaryGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in _BANNED):
            with open(os.environ["BOUNDARY_REPORT"], "a") as f:
                f.write(f"{{os.getpid()}} {{name}} {{_importer()}}\\n")
            raise ModuleNotFoundError(f"{{name}} is banned here (tests/test_boundaries.py)", name=name)
        return None


sys.meta_path.insert(0, _BoundaryGuard())
"""


def guard_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Environment that loads the guard first, and the file it reports attempts to."""
    folder = tmp_path / "guard"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(GUARD)
    report = tmp_path / "banned-imports.txt"
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "BOUNDARY_REPORT": str(report)}, report


#: Optional probes by libraries that work without the module (the guard still blocks them, so
#: the commands below prove they do): pydicom.data.download tries tqdm for its download bar
#: and is imported with pydicom's pixel processing, i.e. on every DICOM upload.
TOLERATED = {("tqdm", "pydicom.data.download")}


def attempts(report: Path) -> list[str]:
    """``module importer`` for each blocked import of a banned module, less the tolerated."""
    lines = report.read_text().splitlines() if report.exists() else []
    found = [line.split()[1:] for line in lines]
    return [" ".join(f) for f in found if tuple(f) not in TOLERATED]


def pneumonia_command(*args: str) -> list[str]:
    return [*serve_command()[:-1], *args]  # serve_command ends with "serve"


def test_the_guard_catches_a_banned_import(tmp_path: Path) -> None:
    """Without this, a broken guard would let every test below pass."""
    env, report = guard_env(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", "import tqdm"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "banned here" in out.stderr
    assert attempts(report) == ["tqdm __main__"]


@pytest.mark.slow
def test_serve_loads_no_training_plotting_or_progress(tiny_model: Path, tmp_path: Path) -> None:
    env, report = guard_env(tmp_path)
    dcm = dicom_bytes(np.full((64, 64), 7, np.uint16))
    # The constant DICOM exercises the DICOM path; the input check would refuse it as blank,
    # so here it only flags it (tests/test_guard.py covers refusal).
    with running_server(tiny_model, tmp_path, INPUT_CHECK="flag", **env) as server:
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
        jpeg = {"file": ("a.jpeg", jpeg_bytes())}
        resp = httpx.post(server.url + "/predict?heatmap=true", files=jpeg, timeout=60)
        assert resp.status_code == 200 and "heatmap_png" in resp.json()
        resp = httpx.post(server.url + "/predict", files={"file": ("a.dcm", dcm)}, timeout=60)
        assert resp.status_code == 200
        assert httpx.post(server.url + "/predict", files={"file": ("e", b"")}).status_code == 400
        for path in ("/metrics", "/model", "/docs", "/openapi.json", "/"):
            assert httpx.get(server.url + path).status_code == 200, path
    assert attempts(report) == []


def test_predict_loads_no_training_plotting_or_progress(tiny_model: Path, tmp_path: Path) -> None:
    env, report = guard_env(tmp_path)
    image = tmp_path / "x.jpeg"
    image.write_bytes(jpeg_bytes())
    out = subprocess.run(
        pneumonia_command("predict", str(image), "--model", str(tiny_model)),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert '"prediction"' in out.stdout
    assert attempts(report) == []


def test_score_loads_no_training_plotting_or_progress(tiny_model: Path, tmp_path: Path) -> None:
    """With --no-progress; with progress on, `score` draws its bar with tqdm when installed."""
    env, report = guard_env(tmp_path)
    folder = tmp_path / "archive"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpeg").write_bytes(jpeg_bytes(seed=i))
    (folder / "scan.dcm").write_bytes(dicom_bytes(synthetic_xray(0, 6).astype(np.uint16) * 16))
    args = ("score", str(folder), "--out", str(tmp_path / "out.csv"), "--model", str(tiny_model))
    out = subprocess.run(
        pneumonia_command(*args, "--workers", "2", "--no-progress"),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert '"rows": 4' in out.stdout
    assert attempts(report) == []


def test_serving_path_imports_no_training_or_plotting_stack(tiny_model: Path) -> None:
    """The service must fit 256 MB: no torch, matplotlib, pandas, scikit-learn, the onnx
    package (onnxruntime reads the model; onnx is for export and site models: issue 23) or int8
    quantization (the train extra's), even after handling requests (import at start-up and
    lazily on the request path are both checked).
    (No tqdm here: pydicom loads it when installed; the guarded tests above block it.)"""
    script = f"""
import sys, warnings
warnings.simplefilter("ignore")
from pneumonia.cli import build_parser
from pneumonia.serve.app import create_app
from pneumonia.serve.settings import Settings
from fastapi.testclient import TestClient
sys.path.insert(0, {str(Path(__file__).parent)!r})
sys.path.insert(0, {str(REPO)!r})
from conftest import jpeg_bytes
from benchmarks.common import dicom_bytes
import numpy as np
with TestClient(create_app(Settings(model_path={str(tiny_model)!r}, input_check="flag"))) as c:
    r = c.post("/predict?heatmap=true", files={{"file": ("a.jpeg", jpeg_bytes())}})
    assert r.status_code == 200
    dcm = dicom_bytes(np.full((64, 64), 7, np.uint16))
    assert c.post("/predict", files={{"file": ("a.dcm", dcm)}}).status_code == 200
    c.get("/metrics"); c.get("/docs"); c.get("/")
heavy = (
    "torch", "matplotlib", "pandas", "sklearn", "scipy", "tensorflow", "onnx",
    "pneumonia.training", "onnxruntime.quantization",
)
print(",".join(sorted(m for m in heavy if m in sys.modules)))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


def test_the_lint_rule_bans_them_everywhere_but_their_homes() -> None:
    """The static rule: ruff TID251 bans all five, and only their homes are exempt."""
    lint = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "TID251" in lint["extend-select"]
    assert set(BANNED) <= set(lint["flake8-tidy-imports"]["banned-api"])
    exempt = {k for k, v in lint["per-file-ignores"].items() if "TID251" in v}
    assert exempt == {
        "src/pneumonia/training/**",
        "src/pneumonia/cli.py",
        "src/pneumonia/plots.py",
        "src/pneumonia/progress.py",
        "tests/**",
        "benchmarks/**",
    }


def test_the_lean_install_carries_neither_plotting_nor_progress_bars() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    for name in ("torch", "matplotlib", "tqdm", "onnx>", "scikit-learn"):
        assert name not in base
    extras = project["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["plots"])
    assert any(d.startswith("tqdm") for d in extras["train"])
    assert any(d.startswith("tqdm") for d in extras["progress"])


@pytest.mark.parametrize(
    ("module", "extra"), [("torch", "train"), ("matplotlib", "plots"), ("tqdm", "progress")]
)
def test_a_command_missing_an_extra_names_it(
    module: str, extra: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumonia import cli

    def needs(a: object) -> int:
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setattr(cli, "cmd_card", needs)
    assert cli.main(["card", "--model", "m.onnx", "--out", "x.md"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"`{extra}` extra" in err and f"pip install 'pneumonia-detection[{extra}]'" in err


def test_evaluate_without_plotting_says_so_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env, report = guard_env(tmp_path)
    out = subprocess.run(
        pneumonia_command(
            "evaluate",
            "--data",
            str(tmp_path / "nowhere"),
            "--json",
            str(tmp_path / "r.json"),
            "--plots",
            str(tmp_path / "plots"),
            "--model",
            str(tmp_path / "absent.onnx"),
        ),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "`plots` extra" in out.stderr and "Traceback" not in out.stderr
    assert attempts(report) == ["matplotlib pneumonia.plots"]


def test_serving_commands_run_numpy_on_one_blas_thread(tiny_model: Path, tmp_path: Path) -> None:
    """A BLAS thread per core spins on the input check's small products and takes CPU from
    onnxruntime; `predict` (like `serve` and `score`) starts numpy with one, unless told."""
    pytest.importorskip("threadpoolctl")
    image = tmp_path / "x.jpeg"
    image.write_bytes(jpeg_bytes())
    script = f"""
import json, threadpoolctl
from pneumonia.cli import main
assert main(["predict", {str(image)!r}, "--model", {str(tiny_model)!r}]) == 0
print(json.dumps([i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]))
"""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    for extra, want in (({}, 1), ({"OPENBLAS_NUM_THREADS": "2"}, 2)):
        out = subprocess.run(
            [sys.executable, "-c", script],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        threads = json.loads(out.stdout.strip().splitlines()[-1])
        assert threads and all(t == want for t in threads), (extra, threads)


def test_card_renders_without_torch(tiny_model: Path, tmp_path: Path) -> None:
    """`pneumonia card` is lean (issue 19): it once failed without torch (cli -> training.export
    -> config -> model)."""
    env, report = guard_env(tmp_path)
    out = subprocess.run(
        pneumonia_command("card", "--model", str(tiny_model), "--out", str(tmp_path / "c.md")),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c.md").read_text().startswith("# Model card: pneumonia-tiny-test")
    assert attempts(report) == []


def test_onnxruntime_sessions_open_in_one_place() -> None:
    """Issue 23: a session option measured in docs/benchmarks.md (bench_session.py) holds for
    every session only if every session opens through ``predictor.open_session``: no other
    function in src/ builds an ``InferenceSession`` or ``SessionOptions``."""
    import ast

    found = set()
    for path in sorted((REPO / "src").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        owner = {}  # each node's innermost enclosing function
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(func):
                    owner[id(node)] = func.name  # inner functions are walked later and win
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in ("InferenceSession", "SessionOptions"):
                    where = owner.get(id(node), "<module>")
                    found.add((path.relative_to(REPO).as_posix(), where, name))
    assert found == {
        ("src/pneumonia/predictor.py", "open_session", "InferenceSession"),
        ("src/pneumonia/predictor.py", "open_session", "SessionOptions"),
    }
