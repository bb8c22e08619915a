"""colab/quickstart.ipynb runs top to bottom (its code cells, in one namespace) on CPU, tiny; the
comparison plot of launch/compare.py."""

import json
import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "..", "colab", "quickstart.ipynb")

TINY = ("model.d_model=32;model.layer_pattern=rat,local;model.num_heads=2;model.num_kv_heads=2;"
        "model.head_dim=16;model.mlp_hidden=64;model.window=8;model.rat_chunk_size=8;"
        "data.seq_len=32;data.global_batch_size=8;run.steps=2;run.eval_every=2;"
        "run.eval_batches=1;run.checkpoint_every=2;run.log_every=1;run.sample_len=8")


def code_cells(path):
  with open(path) as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4
  return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_notebook_trains_plots_and_samples(tmp_path, monkeypatch):
  monkeypatch.chdir(os.path.dirname(NOTEBOOK))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("JAXCHUNK_NOTEBOOK_SET", TINY)
  monkeypatch.setenv("JAXCHUNK_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  namespace = {"__name__": "__notebook__"}
  for source in code_cells(NOTEBOOK):
    exec(compile(source, NOTEBOOK, "exec"), namespace)
  assert namespace["summary"]["step"] == 2
  assert namespace["sample"].startswith("def ")
  assert len(namespace["val"]) == 1


def test_notebook_cells_are_plain_python():
  for source in code_cells(NOTEBOOK):
    assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines())
    compile(source, NOTEBOOK, "exec")


@pytest.fixture(autouse=True)
def close_figures():
  yield
  import matplotlib.pyplot as plt
  plt.close("all")


def test_compare_plot_has_both_panels(compare_module, tmp_path):
  curves = {name: [{"tokens": 100 * i, "wall_s": 2.0 * i + offset, "val_bits_per_byte": 5.0 / i}
                   for i in range(1, 4)] for name, offset in (("a", 0.0), ("b", 1.0))}
  path = str(tmp_path / "compare.png")
  compare_module.plot_comparison(curves, path)
  assert os.path.getsize(path) > 1000
