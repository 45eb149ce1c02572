# Sourced by the benchmark scripts: text no shipped profile was calibrated on, written into a folder,
# and score_promises (below), which scores profiles on it.
#
#   source benchmarks/unseen_text.sh && write_unseen_text "$WORK"
#
# Writes, from files every Debian/Ubuntu machine with Python 3.11 has:
#   licences.txt  Debian's Apache-2.0 + GPL-2 + LGPL-2.1 (the README's held-out licences)
#   code.txt      Python source: /usr/lib/python3.11/{argparse,dataclasses,textwrap,...}.py
#   notes.txt     release notes: the first 400 kB of Python 3.11's NEWS
#   manual.txt    a technical manual: GNU coreutils' info manual
#   unseen.txt    the three, in that order
write_unseen_text() {
  local dir=$1 licences=/usr/share/common-licenses
  cat "$licences/Apache-2.0" "$licences/GPL-2" "$licences/LGPL-2.1" >"$dir/licences.txt"
  (cd /usr/lib/python3.11 && cat argparse.py dataclasses.py textwrap.py difflib.py csv.py json/decoder.py \
    pathlib.py shutil.py tempfile.py inspect.py) >"$dir/code.txt"
  zcat /usr/share/doc/python3.11/NEWS.gz >"$dir/news.txt"  # whole, then cut: head closing a pipe fails pipefail
  head -c 400000 "$dir/news.txt" >"$dir/notes.txt"
  zcat /usr/share/info/coreutils.info.gz >"$dir/manual.txt"
  rm "$dir/news.txt"
  cat "$dir/licences.txt" "$dir/code.txt" "$dir/notes.txt" >"$dir/unseen.txt"
}

# Score calibrated profiles on code.txt and notes.txt of a folder written by write_unseen_text (64 windows
# of 512 + 256 scored tokens each; PROMISE_TEXTS="code notes manual" adds the manual) and write the promise
# table (benchmarks/promise_table.py); needs $PY.
#
#   score_promises "$WORK" "$OUT" profile-dir...   # writes $OUT/unseen-{code,notes}.{json,md}, $OUT/promise.md
score_promises() {
  local text_dir=$1 out=$2 texts=(${PROMISE_TEXTS:-code notes})
  shift 2
  local profiles
  profiles=$(IFS=,; echo "$*")
  for text in "${texts[@]}"; do
    echo "== minicache-eval --compare full,$profiles --data $text.txt --num-windows 64"
    "$PY" -m minicache.evaluate.cli --compare "full,$profiles" --data "$text_dir/$text.txt" \
      --prefix-length 512 --continuation-length 256 --num-windows 64 \
      --json-out "$out/unseen-$text.json" --markdown-out "$out/unseen-$text.md" --force
  done
  echo "== promise table"
  local results=()
  for text in "${texts[@]}"; do results+=("$out/unseen-$text.json"); done
  "$PY" benchmarks/promise_table.py --results "${results[@]}" --names "${texts[@]}" \
    --markdown-out "$out/promise.md" || echo "(a promise is broken: see the table)"
}
