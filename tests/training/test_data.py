"""Byte corpora, packing into rows, the train/validation split and the grain pipeline."""

import numpy as np
import pytest

from jaxchunk.training import data as data_lib


def _documents(rng, count=12):
  """Random printable documents of varied lengths (never empty)."""
  return [bytes(rng.integers(32, 127, size=int(rng.integers(5, 60))).astype(np.uint8))
          for _ in range(count)]


def _oracle_rows(documents, seq_len, eos_id):
  """Token-by-token packing: (tokens, document index, offset in document) of the stream."""
  tokens, doc_index, offset = [], [], []
  for d, document in enumerate(documents):
    for i, byte in enumerate(document + bytes([eos_id])):
      tokens.append(byte)
      doc_index.append(d)
      offset.append(i)
  return np.array(tokens), np.array(doc_index), np.array(offset)


@pytest.mark.parametrize("segment_ids", [True, False])
def test_packed_rows_match_token_by_token_oracle(rng, segment_ids):
  documents = _documents(rng)
  seq_len, eos = 16, 0
  rows = data_lib.pack_documents(documents, seq_len=seq_len, eos_id=eos, segment_ids=segment_ids)
  tokens, doc_index, offset = _oracle_rows(documents, seq_len, eos)
  assert len(rows) == (len(tokens) - 1) // seq_len
  for r in range(len(rows)):
    row = rows[r]
    span = slice(r * seq_len, (r + 1) * seq_len)
    np.testing.assert_array_equal(row["inputs"], tokens[span])
    np.testing.assert_array_equal(row["targets"], tokens[r * seq_len + 1:(r + 1) * seq_len + 1])
    docs = doc_index[r * seq_len:(r + 1) * seq_len + 1]
    if segment_ids:
      np.testing.assert_array_equal(row["positions"], offset[span])
      np.testing.assert_array_equal(row["segment_ids"], docs[:-1] - docs[0] + 1)
      np.testing.assert_array_equal(row["loss_mask"], (docs[1:] == docs[:-1]).astype(np.float32))
    else:
      np.testing.assert_array_equal(row["positions"], np.arange(seq_len))
      np.testing.assert_array_equal(row["segment_ids"], np.ones(seq_len))
      np.testing.assert_array_equal(row["loss_mask"], np.ones(seq_len))
    for key in ("inputs", "targets", "positions", "segment_ids"):
      assert row[key].dtype == np.int32, key


def test_pack_rejects_bad_arguments(rng):
  with pytest.raises(ValueError, match="eos_id"):
    data_lib.pack_documents(_documents(rng), seq_len=8, eos_id=256, segment_ids=True)
  with pytest.raises(ValueError, match="cannot fill one row"):
    data_lib.pack_documents([b"ab"], seq_len=8, eos_id=0, segment_ids=True)
  with pytest.raises(IndexError):
    data_lib.pack_documents(_documents(rng), seq_len=8, eos_id=0, segment_ids=True)[10**6]


def test_split_is_deterministic_disjoint_and_complete(rng):
  documents = [b"doc%d" % i for i in range(40)]
  train, val = data_lib.split_documents(documents, 0.1, seed=3)
  again_train, again_val = data_lib.split_documents(documents, 0.1, seed=3)
  assert (train, val) == (again_train, again_val)
  assert len(val) == 4 and sorted(train + val) == sorted(documents)
  assert data_lib.split_documents(documents, 0.1, seed=4)[1] != val
  with pytest.raises(ValueError, match="validation_fraction"):
    data_lib.split_documents(documents, 1.5, seed=0)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_batches_deterministic_reshuffled_per_epoch(rng):
  rows = data_lib.pack_documents(_documents(rng, 30), seq_len=8, eos_id=0, segment_ids=True)
  n = len(rows)
  first = _take(iter(data_lib.train_dataset(rows, batch_size=1, seed=5)), 2 * n)
  second = _take(iter(data_lib.train_dataset(rows, batch_size=1, seed=5)), 2 * n)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  stream = np.stack([b["inputs"][0] for b in first])
  all_rows = np.stack([rows[i]["inputs"] for i in range(n)])
  for epoch in (stream[:n], stream[n:]):   # each epoch is a permutation of all rows
    assert sorted(map(bytes, epoch.astype(np.uint8))) == sorted(map(bytes, all_rows.astype(np.uint8)))
  assert not np.array_equal(stream[:n], stream[n:])
  assert not np.array_equal(stream[:n], all_rows)
  other = _take(iter(data_lib.train_dataset(rows, batch_size=1, seed=6)), n)
  assert not np.array_equal(np.stack([b["inputs"][0] for b in other]), stream[:n])


def test_hosts_share_each_global_batch(rng):
  rows = data_lib.pack_documents(_documents(rng, 30), seq_len=8, eos_id=0, segment_ids=True)
  single = _take(iter(data_lib.train_dataset(rows, batch_size=4, seed=1)), 3)
  hosts = [_take(iter(data_lib.train_dataset(rows, batch_size=2, seed=1, process_index=i,
                                             process_count=2)), 3) for i in range(2)]
  for step in range(3):
    rebuilt = np.empty_like(single[step]["inputs"])
    rebuilt[0::2] = hosts[0][step]["inputs"]
    rebuilt[1::2] = hosts[1][step]["inputs"]
    np.testing.assert_array_equal(rebuilt, single[step]["inputs"])
  with pytest.raises(ValueError, match="process_index"):
    data_lib.train_dataset(rows, batch_size=2, seed=1, process_index=2, process_count=2)


def test_iterator_state_resumes_exactly(rng):
  rows = data_lib.pack_documents(_documents(rng, 30), seq_len=8, eos_id=0, segment_ids=False)
  dataset = data_lib.train_dataset(rows, batch_size=3, seed=2)
  iterator = iter(dataset)
  _take(iterator, 5)
  state = iterator.get_state()
  expected = _take(iterator, 4)
  resumed = iter(dataset)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 4)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_validation_batches_split_across_hosts(rng):
  rows = data_lib.pack_documents(_documents(rng, 30), seq_len=8, eos_id=0, segment_ids=True)
  whole = data_lib.validation_batches(rows, batch_size=4, num_batches=2)
  halves = [data_lib.validation_batches(rows, batch_size=2, num_batches=2, process_index=i,
                                        process_count=2) for i in range(2)]
  assert len(whole) == 2 and whole[0]["inputs"].shape == (4, 8)
  np.testing.assert_array_equal(whole[1]["inputs"][1::2], halves[1][1]["inputs"])
  np.testing.assert_array_equal(whole[0]["inputs"][0], rows[0]["inputs"])
  with pytest.raises(ValueError, match="fewer than one global batch"):
    data_lib.validation_batches(rows, batch_size=len(rows) + 1, num_batches=1)


def test_stdlib_corpus_and_entropy():
  documents = data_lib.stdlib_documents()
  assert len(documents) > 100
  assert any(b"def " in d for d in documents[:50])
  assert data_lib.unigram_entropy_bits(np.arange(256).repeat(3)) == pytest.approx(8.0)
  assert data_lib.unigram_entropy_bits(np.full(100, 7)) == 0.0
  assert data_lib.unigram_entropy_bits(np.array([1, 2, 1, 2])) == pytest.approx(1.0)


def test_text_and_array_record_sources(tmp_path, rng):
  from array_record.python.array_record_module import ArrayRecordWriter

  documents = _documents(rng, 5)
  folder = tmp_path / "texts"
  (folder / "sub").mkdir(parents=True)
  for i, document in enumerate(documents[:4]):
    (folder / ("sub" if i % 2 else "") / f"{i}.txt").write_bytes(document)
  single = tmp_path / "single.txt"
  single.write_bytes(documents[4])
  loaded = data_lib.load_documents("text", [str(folder), str(single)])
  assert sorted(loaded) == sorted(documents)
  record_path = str(tmp_path / "docs.array_record")
  writer = ArrayRecordWriter(record_path, "group_size:1")
  for document in documents:
    writer.write(document)
  writer.close()
  assert data_lib.load_documents("array_record", [record_path]) == documents
  with pytest.raises(ValueError, match="neither a file nor a folder"):
    data_lib.load_documents("text", [str(tmp_path / "missing")])
  with pytest.raises(ValueError, match="data.paths must name"):
    data_lib.load_documents("text", [])
  with pytest.raises(ValueError, match="data.source must be one of"):
    data_lib.load_documents("csv", ["x"])


def test_parquet_source_loads_and_packs_column(tmp_path, rng):
  import pyarrow as pa
  import pyarrow.parquet as pq

  documents = _documents(rng, 7)
  texts = [d.decode("ascii") + "\u00e9" for d in documents]       # non-ASCII: UTF-8 encoded
  folder = tmp_path / "shards"
  folder.mkdir()
  pq.write_table(pa.table({"id": list(range(4)), "text": texts[:4]}), folder / "b.parquet")
  pq.write_table(pa.table({"id": [4, 5, 6], "text": [texts[4], None, texts[5]]}),
                 folder / "a.parquet", row_group_size=1)
  (folder / "notes.txt").write_text("not parquet")                   # ignored inside folders
  binary = tmp_path / "binary.parquet"
  pq.write_table(pa.table({"body": pa.array([documents[6]], pa.binary())}), binary)

  loaded = data_lib.load_documents("parquet", [str(folder)])
  expected = [t.encode("utf-8") for t in [texts[4], texts[5]] + texts[:4]]   # a.parquet first
  assert loaded == expected                                         # the null row is skipped
  assert data_lib.load_documents("parquet", [str(binary)], column="body") == [documents[6]]
  rows = data_lib.pack_documents(loaded, seq_len=16, eos_id=0, segment_ids=True)
  stream = b"".join(d + b"\0" for d in expected)
  assert len(rows) == (len(stream) - 1) // 16
  for r in range(len(rows)):
    np.testing.assert_array_equal(rows[r]["inputs"],
                                  np.frombuffer(stream[16 * r:16 * (r + 1)], np.uint8))
  with pytest.raises(ValueError, match="data.column 'content' is not a column"):
    data_lib.load_documents("parquet", [str(folder)], column="content")
  with pytest.raises(ValueError, match="data.column 'id' .* must hold strings or binary"):
    data_lib.load_documents("parquet", [str(folder)], column="id")
  with pytest.raises(ValueError, match="data.paths must name"):
    data_lib.load_documents("parquet", [])
