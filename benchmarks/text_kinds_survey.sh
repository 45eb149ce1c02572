#!/usr/bin/env bash
# How much more than the held-out KL does a profile's loss rise on kinds of text its calibration lacked?
# (issue 21: the evidence behind minicache-calibrate --kl-guard 4)
#
# Scores four of the promise profiles (benchmarks/results/promise-cpu: licences at 0.5 %, KL 0.003 nats,
# the main job, the cut data at 2 %) on four kinds of text no calibration saw, other than the promise
# table's code and release notes, 32 windows x (512 prefix + 256 scored tokens) = 8,192 scored tokens each:
#   manual:     GNU coreutils' info manual          perldiag:  Perl's diagnostics manual (POD)
#   gnutls:     GnuTLS' release notes (NEWS)        changelog: dpkg's Debian changelog
# then benchmarks/kl_ratio_table.py over these and the promise table's results. About 25 minutes on 2 cores.
#
#   bash benchmarks/text_kinds_survey.sh      # -> benchmarks/results/promise-cpu/text-kinds/
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUT=benchmarks/results/promise-cpu/text-kinds
P=benchmarks/results/promise-cpu
mkdir -p "$OUT"
zcat /usr/share/info/coreutils.info.gz >"$WORK/manual.txt"
cp /usr/share/perl/5.36.0/pod/perldiag.pod "$WORK/perldiag.txt"
zcat /usr/share/doc/libgnutls30/NEWS.gz >"$WORK/gnutls.txt"
zcat /usr/share/doc/dpkg/changelog.gz >"$WORK/changelog.txt"
{
  machine_line
  for text in manual perldiag gnutls changelog; do
    echo "== minicache-eval on $text"
    "$PY" -m minicache.evaluate.cli --compare "full,$P/full-0.005,$P/kl/full-kl-0.003,$P/main-job,$P/cut-0.02" \
      --data "$WORK/$text.txt" --prefix-length 512 --continuation-length 256 --num-windows 32 \
      --json-out "$OUT/$text.json" --markdown-out "$OUT/$text.md" --force
  done
  echo "== ratio table"
  "$PY" benchmarks/kl_ratio_table.py --results "$OUT"/{manual,perldiag,gnutls,changelog}.json \
    "$P/unseen-code.json" "$P/unseen-notes.json" "$P/kl/unseen-code.json" "$P/kl/unseen-notes.json" \
    --names manual perldiag gnutls changelog code notes code notes --markdown-out "$OUT/kl-ratio.md"
} 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/log.txt"
