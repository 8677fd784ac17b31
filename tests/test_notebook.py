"""Execute the Colab notebook on CPU with TINY = True, so it cannot drift from the package.

Cells tagged `gpu-only` (install, GPU check, Drive, dataset download) are removed; a cell injected after
the `parameters` cell sets TINY = True, a local OUTPUT_DIR and the repository's recipe. The kernel is this
test's own Python: a temporary kernelspec named `python3` pointing at `sys.executable` is put first on
JUPYTER_PATH, so no kernelspec has to be installed by hand and a system-wide `python3` kernel is never used.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "echoink_lite_avqa_grpo.ipynb"


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _source(cell) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def _text(cells) -> str:
    """Everything the cells printed: streams, and rich's display outputs (rich renders to Jupyter displays)."""
    parts = []
    for c in cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            parts.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_notebook_structure():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    params = [c for c in nb.cells if "parameters" in _tags(c)]
    assert len(params) == 1
    src = _source(params[0])
    for name in ("KIT_SOURCE", "RECIPE", "STEPS", "OUTPUT_DIR", "TINY"):
        assert f"\n{name} = " in "\n" + src, name
    assert 'KIT_SOURCE = "git+https://github.com/OWNER/echoink-lite"' in src
    assert "TINY = False" in src and "/content/drive/MyDrive/" in src
    gpu_only = [_source(c) for c in nb.cells if "gpu-only" in _tags(c)]
    joined = "\n".join(gpu_only)
    for marker in ("pip", "is_bf16_supported", "estimate_memory", "drive.mount", 'snapshot_download("harryhsing/AVQA-R1-6K"',
                   'local_dir=DATA_DIR'):
        assert marker in joined, marker
    code = "\n".join(_source(c) for c in nb.cells if c.cell_type == "code" and "gpu-only" not in _tags(c))
    for call in ('train(recipe, resume="auto")', "run_eval(", "merge_adapter(", "infer(", "load_model(",
                 "max_memory_allocated", 'protocol="echoink-base"', 'protocol="echoink-rl"', 'protocol="kit"',
                 '"harryhsing/EchoInk-R1-7B"', '"Qwen/Qwen2.5-Omni-7B"', "side_by_side("):
        assert call in code, call
    # the install cell comes before any cell that imports the package
    first_import = next(i for i, c in enumerate(nb.cells) if "from echoink_lite" in _source(c))
    install = next(i for i, c in enumerate(nb.cells) if "pip" in _source(c) and "gpu-only" in _tags(c))
    assert install < first_import


@pytest.fixture()
def venv_kernel(tmp_path, monkeypatch):
    """A kernelspec `python3` that runs this interpreter, first on JUPYTER_PATH."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (echoink-lite test)", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    return sys.executable


def test_notebook_runs_tiny_on_cpu(tmp_path, venv_kernel):
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if "gpu-only" not in _tags(c)]
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in _tags(c))
    injected = nbformat.v4.new_code_cell(
        "# injected by tests/test_notebook.py\n"
        "TINY = True\n"
        f"RECIPE = {str(ROOT / 'recipes' / 'paper_24gb.yaml')!r}\n"
        "OUTPUT_DIR = 'run'\n"
        "import sys\n"
        "print('kernel python:', sys.executable)\n",
        metadata={"tags": ["injected-parameters"]},
    )
    nb.cells.insert(at + 1, injected)
    # Re-run the train cell at the end, as after a Colab disconnect: it must resume, not start over.
    train_src = next(_source(c) for c in nb.cells if 'train(recipe, resume="auto")' in _source(c))
    nb.cells.append(nbformat.v4.new_code_cell(train_src, metadata={"tags": ["rerun"]}))
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(work)}})
    client.execute()

    outputs = _text(nb.cells)
    assert f"kernel python: {sys.executable}" in outputs
    assert (work / "run" / "adapter" / "adapter_config.json").is_file()
    assert (work / "run" / "metrics.jsonl").is_file()
    assert len((work / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    summary = json.loads((work / "run" / "eval" / "predictions.summary.json").read_text())
    assert summary["rows_evaluated"] == 8 and len(summary["results"]) == 1 and summary["protocol"]["name"] == "kit"
    # The three numbers after training, and the released-weights check (a tiny full Omni checkpoint stands in).
    for name, protocol, label in (("eval/base-echoink-base", "echoink-base", "base"),
                                  ("eval/trained-echoink-rl", "echoink-rl", "adapter"),
                                  ("released-check/echoink-rl", "echoink-rl", "base"),
                                  ("released-check/echoink-base", "echoink-base", "base")):
        other = json.loads((work / "run" / f"{name}.summary.json").read_text())
        assert other["protocol"]["name"] == protocol and other["results"][0]["label"] == label, name
        assert other["rows_evaluated"] == 8 and set(other["results"][0]["breakdowns"]) == {"task_type", "audio_type"}
    assert outputs.count("evaluations side by side") == 2
    assert (work / "merged" / "config.json").is_file()
    assert "gold:" in outputs and "| model:" in outputs
    assert "GPU memory statistics are skipped" in outputs
    rerun = _text(nb.cells[-1:])
    assert "resumed from" in rerun and "steps done: 2" in rerun
    assert len((work / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # nothing trained twice
