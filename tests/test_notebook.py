"""The Colab notebook, executed headless as a user would run it: clone, install, the main job
with tiny overrides, the results shown."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--config.task.options.num_train=300 --config.task.options.num_test=16 --config.sft.steps=4 "
        "--config.sft.eval_every=0 --config.rl.steps=2 --config.rl.batch_size=8 --config.rl.eval_every=0 "
        "--config.rl.max_new_tokens=16 --config.eval.num_examples=16 --config.eval.batch_size=16 "
        "--config.eval.max_new_tokens=16")


@pytest.mark.slow
def test_colab_notebook_runs_headless(tmp_path, monkeypatch):
    import nbclient
    import nbformat

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("R3JAX_REPO", ROOT)  # the clone gets this checkout's last commit
    monkeypatch.setenv("R3JAX_NOTEBOOK_OVERRIDES", TINY)
    monkeypatch.delenv("XLA_FLAGS")  # one CPU device, as on a CPU runtime
    notebook = nbformat.read(os.path.join(ROOT, "launch", "colab.ipynb"), as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    texts = "".join(o.get("text", "") for o in outputs)
    assert "accelerator: cpu" in texts and "results written to runs/colab" in texts
    shown = [o["data"] for o in outputs if o.get("output_type") == "display_data"]
    assert any("| r3-mixed |" in d.get("text/markdown", "") for d in shown)
    assert sum("image/png" in d for d in shown) == 2
    clone = tmp_path / "r3jax"
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip() == head


def test_the_notebooks_next_commands_name_known_keys():
    """Each command the notebook's last cell suggests loads its config file and sets only keys that
    config has."""
    import json
    import re

    from r3jax import main

    notebook = json.load(open(os.path.join(ROOT, "launch", "colab.ipynb")))
    suggestions = re.findall(r"`(--config=[^`]*)`", "".join(notebook["cells"][-1]["source"]))
    assert len(suggestions) == 3
    for suggestion in suggestions:
        argv = ["r3jax", *suggestion.replace("configs/", f"{ROOT}/configs/").split()]
        assert main._explain_override_failure(argv) is None, suggestion
