# Sourced by the benchmark scripts: text no shipped profile was calibrated on, written into a folder.
#
#   source benchmarks/unseen_text.sh && write_unseen_text "$WORK"
#
# Writes, from files every Debian/Ubuntu machine with Python 3.11 has:
#   licences.txt  Debian's Apache-2.0 + GPL-2 + LGPL-2.1 (the README's held-out licences)
#   code.txt      Python source: /usr/lib/python3.11/{argparse,dataclasses,textwrap,...}.py
#   notes.txt     release notes: the first 400 kB of Python 3.11's NEWS
#   unseen.txt    the three, in that order
write_unseen_text() {
  local dir=$1 licences=/usr/share/common-licenses
  cat "$licences/Apache-2.0" "$licences/GPL-2" "$licences/LGPL-2.1" >"$dir/licences.txt"
  (cd /usr/lib/python3.11 && cat argparse.py dataclasses.py textwrap.py difflib.py csv.py json/decoder.py \
    pathlib.py shutil.py tempfile.py inspect.py) >"$dir/code.txt"
  zcat /usr/share/doc/python3.11/NEWS.gz >"$dir/news.txt"  # whole, then cut: head closing a pipe fails pipefail
  head -c 400000 "$dir/news.txt" >"$dir/notes.txt"
  rm "$dir/news.txt"
  cat "$dir/licences.txt" "$dir/code.txt" "$dir/notes.txt" >"$dir/unseen.txt"
}
