"""theory.ipynb runs top to bottom without a Jupyter kernel, and its saved outputs are not stale.

The notebook's own asserts are the checks (each derivation against autograd and losses.py); this test only executes
its code cells in order, in one namespace, as a script would. Its real-data cells (sections 5.1, 5.2, 7.1, 8.2) look
for CIFAR-100 in $CIFAR100_DATA_DIR when set, else in ./data, and print why they skip when there is none; 8.2 also
needs the ablations' teacher, experiments/teacher-resnet20.pt.
"""
import json
import pathlib

import matplotlib
import torch

NOTEBOOK = pathlib.Path(__file__).resolve().parent / "theory.ipynb"


def code_cells():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return [cell for cell in cells if cell["cell_type"] == "code"]


def source(cell):
    text = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    # IPython magics and shell escapes are not Python
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("%", "!")))


def test_notebook_has_saved_outputs():
    cells = code_cells()
    counts = [cell["execution_count"] for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), f"re-run the notebook top to bottom and save it: {counts}"
    assert all(cell["outputs"] for cell in cells), "every code cell should have a saved output"
    assert not any(output["output_type"] == "error" for cell in cells for output in cell["outputs"])
    figures = sum("image/png" in output.get("data", {}) for cell in cells for output in cell["outputs"])
    assert figures >= 6, f"expected the saved figures of sections 5.2, 5.3, 6, 7.1, 7.2 and 8.1, found {figures}"


def test_notebook_runs_top_to_bottom(monkeypatch):
    matplotlib.use("Agg")  # headless: figures render to memory
    import matplotlib.pyplot as plt
    monkeypatch.chdir(NOTEBOOK.parent)  # `import losses` resolves to this project's file
    threads = torch.get_num_threads()  # the notebook sets 1 thread; give the other tests theirs back
    namespace = {"__name__": "__main__"}
    try:
        for index, cell in enumerate(code_cells()):
            try:
                exec(compile(source(cell), f"theory.ipynb code cell {index + 1}", "exec"), namespace)
            finally:
                plt.close("all")
    finally:
        torch.set_num_threads(threads)
    # section 8.1's closed form met autograd for every alpha the ablations use, and for MSE
    assert {key for key, n, sigma in namespace["deviations"]} == {1, 2, 3, 4, 5, "mse"}
