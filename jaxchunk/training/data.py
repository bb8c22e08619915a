"""Byte-level data: corpora, packing documents into fixed-length rows, grain pipelines.

Tokens are bytes (vocabulary 256). Documents come from a source (`load_documents`): the
interpreter's standard library, text files, ArrayRecord records or a Parquet string/binary column.
Documents are split into train/validation by a seeded
permutation, each is followed by the separator byte `eos_id`, and the stream of documents is cut
into rows of `seq_len` inputs (plus one target). A row is a dict of int32 [seq_len] arrays:
"inputs", "targets", "positions", "segment_ids" and float32 "loss_mask".

With `segment_ids=True` positions restart at every document, `segment_ids` number the documents of
a row from 1 and the loss skips the target that crosses into the next document; without, a row is
one stream: positions 0..seq_len-1, a single segment and every target counts.

The training pipeline is a grain `MapDataset`: rows shuffled per epoch with a seed, repeated
forever, sharded across hosts (host i takes global rows i, i + n, ...) and batched, so the
iterator's state (a grain checkpointable `DatasetIterator`) resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from typing import Sequence

import grain
import numpy as np

# Directories of the interpreter's library that hold third-party or compiled files, not stdlib source.
_SKIPPED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_documents() -> list[bytes]:
  """The running interpreter's standard-library .py files as bytes, in sorted path order."""
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
    paths.extend(os.path.join(directory, f) for f in files if f.endswith(".py"))
  return [_read(p) for p in sorted(paths)]


def _list_files(paths: Sequence[str], suffix: str = "") -> list[str]:
  """The files named in `paths`, and the files under its folders ending in `suffix` (sorted)."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names
               if f.endswith(suffix)]
      files.extend(sorted(found))
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise ValueError(f"data.paths: {path!r} is neither a file nor a folder")
  return files


def text_documents(paths: Sequence[str]) -> list[bytes]:
  """Every file named in `paths`, and every file under the folders in `paths` (sorted), as bytes."""
  return [_read(f) for f in _list_files(paths)]


def array_record_documents(paths: Sequence[str]) -> list[bytes]:
  """The records (one document each, bytes) of the ArrayRecord files `paths`, in order."""
  source = grain.sources.ArrayRecordDataSource(list(paths))
  return [bytes(source[i]) for i in range(len(source))]


def parquet_documents(paths: Sequence[str], column: str = "text") -> list[bytes]:
  """One document per row: the values of `column` in the Parquet files `paths`, in order.

  Folders in `paths` contribute their files ending in ".parquet" (sorted). The column must hold
  strings (encoded as UTF-8) or binary values; null values are skipped.
  """
  import pyarrow as pa          # lazy: only Parquet sources pay for the import
  import pyarrow.parquet as pq

  documents = []
  for path in _list_files(paths, ".parquet"):
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    if column not in schema.names:
      raise ValueError(f"data.column {column!r} is not a column of {path}; its columns are "
                       f"{schema.names}")
    kind = schema.field(column).type
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if not (text or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
      raise ValueError(f"data.column {column!r} of {path} must hold strings or binary values, "
                       f"got {kind}")
    for batch in parquet.iter_batches(columns=[column]):
      values = batch.column(0).to_pylist()
      documents.extend(v.encode("utf-8") if text else v for v in values if v is not None)
  return documents


SOURCES = ("stdlib", "text", "array_record", "parquet")


def load_documents(source: str, paths: Sequence[str] = (), *, column: str = "text") -> list[bytes]:
  """Documents of a `DataConfig.source` (one of `SOURCES`); `column` is the Parquet text column."""
  if source not in SOURCES:
    raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
  if source == "stdlib":
    return stdlib_documents()
  if not paths:
    raise ValueError(f"data.paths must name files or folders for data.source={source!r}")
  if source == "text":
    return text_documents(paths)
  if source == "array_record":
    return array_record_documents(paths)
  return parquet_documents(paths, column)


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def split_documents(documents: Sequence[bytes], validation_fraction: float, seed: int):
  """Seeded split into (train, validation) document lists, each in a shuffled order.

  The validation set gets round(fraction * n) documents but at least one (and the train set at
  least one), so both are non-empty for two or more documents.
  """
  if len(documents) < 2:
    raise ValueError(f"need at least 2 documents for a train/validation split, got {len(documents)}")
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"data.validation_fraction must be in (0, 1), got {validation_fraction}")
  order = np.random.default_rng(seed).permutation(len(documents))
  n_val = min(max(1, round(validation_fraction * len(documents))), len(documents) - 1)
  return ([documents[i] for i in order[n_val:]], [documents[i] for i in order[:n_val]])


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """A token stream cut into rows; random access `rows[i]` gives row i (see the module docstring).

  tokens: uint8 [N], each document followed by `eos_id`; doc_starts: int64 [D] offsets of the
  documents in `tokens`. Row i covers tokens[i*seq_len : (i+1)*seq_len + 1].
  """

  tokens: np.ndarray
  doc_starts: np.ndarray
  seq_len: int
  segment_ids: bool

  def __len__(self) -> int:
    return (len(self.tokens) - 1) // self.seq_len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(f"row {index} out of range for {len(self)} rows")
    start = index * self.seq_len
    window = self.tokens[start:start + self.seq_len + 1].astype(np.int32)
    inputs, targets = window[:-1], window[1:]
    if self.segment_ids:
      offsets = np.arange(start, start + self.seq_len + 1)
      doc = np.searchsorted(self.doc_starts, offsets, side="right") - 1
      positions = (offsets - self.doc_starts[doc])[:-1].astype(np.int32)
      segment_ids = (doc - doc[0] + 1).astype(np.int32)
      loss_mask = (segment_ids[1:] == segment_ids[:-1]).astype(np.float32)
      segment_ids = segment_ids[:-1]
    else:
      positions = np.arange(self.seq_len, dtype=np.int32)
      segment_ids = np.ones(self.seq_len, np.int32)
      loss_mask = np.ones(self.seq_len, np.float32)
    return {"inputs": inputs, "targets": targets, "positions": positions,
            "segment_ids": segment_ids, "loss_mask": loss_mask}


def pack_documents(documents: Sequence[bytes], *, seq_len: int, eos_id: int,
                   segment_ids: bool) -> PackedRows:
  """Concatenates `documents` (each followed by `eos_id`) into `PackedRows` of `seq_len` inputs."""
  if not 0 <= eos_id < 256:
    raise ValueError(f"data.eos_id must be a byte (0..255), got {eos_id}")
  lengths = np.array([len(d) + 1 for d in documents], np.int64)
  if lengths.sum() < seq_len + 1:
    raise ValueError(f"{lengths.sum()} tokens cannot fill one row of seq_len={seq_len} (+1 target)")
  stream = b"".join(d + bytes([eos_id]) for d in documents)
  doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  return PackedRows(np.frombuffer(stream, np.uint8), doc_starts, seq_len, segment_ids)


def unigram_entropy_bits(tokens: np.ndarray) -> float:
  """Entropy in bits per token of the empirical byte distribution of `tokens`."""
  counts = np.bincount(np.asarray(tokens, np.int64), minlength=256).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def train_dataset(rows: PackedRows, *, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Infinite, per-epoch shuffled batches of this host's share of `rows`.

  `batch_size` is the per-host batch; host `process_index` of `process_count` takes the global
  rows process_index, process_index + process_count, ... of the shuffled repeated stream.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
  ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
  ds = ds[process_index::process_count]
  return ds.batch(batch_size, drop_remainder=True)


def validation_batches(rows: PackedRows, *, batch_size: int, num_batches: int,
                       process_index: int = 0, process_count: int = 1) -> list[dict]:
  """`num_batches` global batches of validation rows spread evenly over the whole validation set
  (so a few batches sample many documents, not just the first ones), this host's share of each.

  Fewer batches are returned when the validation set is small; at least one row is required.
  """
  global_batch = batch_size * process_count
  available = len(rows) // global_batch
  if available == 0:
    raise ValueError(f"the validation set has {len(rows)} rows, fewer than one global batch "
                     f"of {global_batch}; lower the batch size or raise data.validation_fraction")
  num_batches = min(num_batches, available)
  picks = np.linspace(0, len(rows) - 1, num_batches * global_batch).round().astype(int)
  batches = []
  for b in range(num_batches):
    indices = picks[b * global_batch + process_index:(b + 1) * global_batch:process_count]
    items = [rows[i] for i in indices]
    batches.append({key: np.stack([item[key] for item in items]) for key in items[0]})
  return batches
