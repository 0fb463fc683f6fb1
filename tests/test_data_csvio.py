"""csvio: gzip-aware tables and their one-line errors."""

import gzip
import os

import numpy as np
import pytest

from medbridge_jax.data import csvio
from medbridge_jax.errors import UserError


def _put(tmp_path, name, text, gz=False):
  path = os.path.join(tmp_path, name)
  data = text.encode("utf-8")
  with open(path, "wb") as f:
    f.write(gzip.compress(data) if gz else data)
  return path


def test_find_plain_then_gz(tmp_path):
  _put(tmp_path, "b.csv.gz", "x\n1\n", gz=True)
  assert csvio.find(tmp_path, "a.csv", "b.csv").endswith("b.csv.gz")
  _put(tmp_path, "b.csv", "x\n1\n")
  assert csvio.find(tmp_path, "b.csv").endswith("b.csv")
  with pytest.raises(UserError, match=r"no c.csv\[.gz\] in this folder"):
    csvio.find(tmp_path, "c.csv")


def test_gzip_bom_quoted_newlines_and_blank_lines(tmp_path):
  text = '\ufeffid,note,v\r\na,"two\r\nlines",1\r\n\r\nb,x,-1.0\r\n'
  t = csvio.read_table(_put(tmp_path, "t.csv.gz", text, gz=True), ["id"])
  assert t.header == ("id", "note", "v")
  np.testing.assert_array_equal(t["id"], ["a", "b"])
  np.testing.assert_array_equal(t.lines, [2, 5])
  np.testing.assert_array_equal(csvio.codes(t, ["v"])[:, 0], [1.0, -1.0])


def test_only_required_keeps_fewer_columns(tmp_path):
  t = csvio.read_table(_put(tmp_path, "t.csv", "a,b,c\n1,2,3\n"), ["b"],
                       only_required=True)
  assert list(t.columns) == ["b"] and t.header == ("a", "b", "c")


def test_errors_name_file_line_and_value(tmp_path):
  path = _put(tmp_path, "t.csv", "id,v\na,1.0\nb,yes\n")
  t = csvio.read_table(path)
  with pytest.raises(UserError, match=r"t.csv: line 3: v is 'yes'; expected "
                     r"1, 0, -1 or blank"):
    csvio.codes(t, ["v"])
  with pytest.raises(UserError, match=r"t.csv: missing column 'w'"):
    csvio.read_table(path, ["w"])
  with pytest.raises(UserError, match=r"r.csv: line 3: 3 fields; the header"):
    csvio.read_table(_put(tmp_path, "r.csv", "a,b\n1,2\n1,2,3\n"))
  t = csvio.read_table(_put(tmp_path, "n.csv", "id\n12\n1e3\n"))
  with pytest.raises(UserError, match=r"line 3: id is '1e3'"):
    csvio.integers(t, "id")
  for bad in ("../x", "a/b", "c:\\x", "..", ""):
    t = csvio.read_table(_put(tmp_path, "p.csv", f"id,k\nok,1\n{bad},2\n"))
    with pytest.raises(UserError, match=r"p.csv: line 3: id is .*plain"):
      csvio.names(t, "id")


def test_codes_blank_and_allowed(tmp_path):
  t = csvio.read_table(_put(tmp_path, "t.csv", "v\n1\n0\n\n 0.0 \n"))
  # The empty line is skipped as blank; " 0.0 " is accepted.
  np.testing.assert_array_equal(csvio.codes(t, ["v"], (0.0, 1.0), False)[:, 0],
                                [1.0, 0.0, 0.0])
  t = csvio.read_table(_put(tmp_path, "u.csv", "v,w\n1,\n"))
  with pytest.raises(UserError, match=r"line 2: w is ''; expected 0, 1$"):
    csvio.codes(t, ["w"], (0.0, 1.0), blank=False)


def test_first_duplicate_and_positions():
  assert csvio.first_duplicate(np.array(["a", "b", "c"])) is None
  assert csvio.first_duplicate(np.array(["a", "b", "a", "b"])) == 2
  np.testing.assert_array_equal(
      csvio.positions(np.array(["x", "y"]), np.array(["y", "z", "x"])),
      [1, -1, 0])
