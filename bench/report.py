"""What every benchmark report carries: the device and package versions, and the written files.

The scripts run as `python bench/<script>.py`, which puts bench/ on sys.path: `from report import
versions, write_report`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import jax


def versions(*packages: str) -> str:
  """"device: N x <kind> (<platform>); jax <version>, ..." for `packages` ("absent" if missing)."""
  device = jax.devices()[0]
  found = []
  for package in packages:
    try:
      found.append(f"{package} {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
      found.append(f"{package} absent")
  return (f"device: {jax.device_count()} x {device.device_kind} ({device.platform}); "
          + ", ".join(found))


def write_report(folder: str, stem: str, markdown: str, data=None) -> str:
  """Writes `folder`/`stem`.md (and `stem`.json with `data`), says so; returns the .md path."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, stem)
  with open(path + ".md", "w") as f:
    f.write(markdown)
  if data is not None:
    with open(path + ".json", "w") as f:
      json.dump(data, f, indent=2)
  print(f"wrote {path}.md" + (f" and {path}.json" if data is not None else ""))
  return path + ".md"
