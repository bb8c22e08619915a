"""The README's example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
  code = re.search(r"## Example\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
  namespace = {}
  exec(compile(code, str(README), "exec"), namespace)
  assert namespace["logits"].shape == (2, 1, 256)
  assert namespace["o"].shape == (2, 100, 4, 64)
