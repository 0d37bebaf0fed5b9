#!/usr/bin/env python
"""Build ``probes/data/topics.jsonl``: a small labeled text corpus for sequence classifiers.

What it is
----------
One ``{"text": ..., "label": NAME}`` per line. Each text is the first paragraph of the docstring
of one public function, class or method of the CPython standard library, and its label is the
topic of the module it comes from (``TOPICS`` below: five topics of five to eleven modules each).
It is the labeled data that ``actsparse fit-head`` fits a linear classification head on (linear
probing of a frozen pretrained encoder), so that the analyses that need a classifier's loss
(``flatness``, ``cliff --labels``, ``massive --intervene``) run on a real pretrained encoder.

Source and license: the docstrings are Copyright (c) 2001-present Python Software Foundation,
distributed under the PSF License Agreement (https://docs.python.org/3/license.html), as for
``probes/data/corpus_train.txt`` (see ``scripts/build_corpus.py``).

How
---
- The modules of each topic are imported (standard library only; C functions such as ``math.sqrt``
  have docstrings but no source, so ``ast`` would miss them). Public names are those of the
  module's ``__all__``, else its names without a leading underscore; of those, functions, built-in
  functions and classes whose ``__module__`` is the module itself or its C implementation
  (``_io``, ``posix``, ``_socket``, ...), and the public methods a public class defines itself
  (its own ``__dict__``, no inherited ones, no dunders). Modules that fail to import are skipped
  and printed.
- A docstring gives its first paragraph (up to the first blank line), whitespace-normalised onto
  one line; texts shorter than ``MIN_CHARS`` or longer than ``MAX_CHARS`` characters, and texts
  that start like a call signature or a doctest (``>>>``), are dropped.
- A text that occurs under two topics is dropped from both; repeats within one topic are kept once.
- Classes are balanced by truncation: each topic's texts are shuffled (``random.Random(SEED)``) and
  cut to the smallest topic's count (at most ``MAX_PER_CLASS``); the union is shuffled again.

Output is deterministic for a given CPython version (docstrings change between releases); the
file is committed so that results do not depend on the Python that runs the tool. The version
used is printed. Usage: ``python scripts/make_topics.py [--out probes/data/topics.jsonl]``.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

SEED = 0
MIN_CHARS, MAX_CHARS = 30, 400
MAX_PER_CLASS = 300

TOPICS: dict[str, tuple[str, ...]] = {
    "files_os": ("os", "os.path", "shutil", "pathlib", "io", "tempfile", "glob", "fnmatch", "stat", "filecmp",
                 "zipfile", "tarfile"),
    "text": ("re", "string", "textwrap", "difflib", "codecs", "unicodedata", "stringprep", "html", "html.parser",
             "csv", "shlex", "gettext", "locale", "json", "json.decoder", "json.encoder", "pprint", "reprlib",
             "tokenize", "xml.etree.ElementTree", "xml.dom.minidom"),
    "numbers": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"),
    "networking": ("socket", "ssl", "http.client", "http.server", "http.cookies", "http.cookiejar",
                   "urllib.request", "urllib.parse", "urllib.error", "email.message", "email.utils",
                   "email.header", "email.mime.text", "email.parser", "email.policy", "smtplib", "ftplib",
                   "poplib", "imaplib", "socketserver"),
    "concurrency": ("threading", "multiprocessing", "multiprocessing.pool", "multiprocessing.managers",
                    "multiprocessing.queues", "multiprocessing.synchronize", "asyncio", "asyncio.tasks",
                    "asyncio.events", "asyncio.queues", "asyncio.locks", "asyncio.streams",
                    "asyncio.subprocess", "concurrent.futures", "queue", "sched", "selectors"),
}
# C modules whose objects a Python module re-exports as its own API (``io.open`` is ``_io.open``).
C_IMPL = {"os": ("posix", "nt"), "io": ("_io",), "socket": ("_socket",), "ssl": ("_ssl",),
          "re": ("_sre", "re._compiler"), "codecs": ("_codecs",), "decimal": ("_decimal", "_pydecimal"),
          "random": ("_random",), "threading": ("_thread",), "queue": ("_queue",), "operator": ("_operator",),
          "asyncio.tasks": ("_asyncio",), "asyncio.events": ("_asyncio",), "stat": ("_stat",),
          "statistics": ("_statistics",), "string": ("_string",), "json.decoder": ("_json",),
          "json.encoder": ("_json",), "csv": ("_csv",), "locale": ("_locale",), "xml.etree.ElementTree": ("_elementtree",), "os.path": ("posixpath", "genericpath"),
          "pathlib": ("pathlib._local", "pathlib._abc")}

_SIGNATURE = re.compile(r"^[\w.]+\(.*\)( -> .*)?$")  # "sqrt(x, /)" or "f(a) -> int" alone


def first_paragraph(doc: str | None) -> str | None:
    if not doc:
        return None
    para = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip(), maxsplit=1)[0]
    text = " ".join(para.split())
    if not (MIN_CHARS <= len(text) <= MAX_CHARS) or text.startswith(">>>") or _SIGNATURE.match(text):
        return None
    return text


def _own(obj, modname: str) -> bool:
    owner = getattr(obj, "__module__", None)
    return owner == modname or owner in C_IMPL.get(modname, ())


def module_texts(modname: str) -> list[str]:
    """First paragraphs of the docstrings of ``modname``'s public functions, classes and methods."""
    mod = importlib.import_module(modname)
    names = getattr(mod, "__all__", None)
    names = sorted(set(names) if names is not None else {n for n in vars(mod) if not n.startswith("_")})
    out = []
    for name in names:
        obj = getattr(mod, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _own(obj, modname):
            continue
        out.append(first_paragraph(obj.__doc__))
        if inspect.isclass(obj):
            for mname in sorted(vars(obj)):
                if mname.startswith("_"):
                    continue
                m = vars(obj)[mname]
                if isinstance(m, (staticmethod, classmethod)):
                    m = m.__func__
                if inspect.isroutine(m) or isinstance(m, property):
                    out.append(first_paragraph(getattr(m, "__doc__", None)))
    return [t for t in out if t]


def build() -> tuple[list[dict], dict]:
    by_topic: dict[str, list[str]] = {}
    skipped = []
    for topic, mods in TOPICS.items():
        seen: dict[str, None] = {}
        for m in mods:
            try:
                texts = module_texts(m)
            except ImportError as e:
                skipped.append(f"{m} ({e})")
                continue
            for t in texts:
                seen.setdefault(t, None)
        by_topic[topic] = list(seen)
    count = collections.Counter(t for texts in by_topic.values() for t in texts)
    by_topic = {k: [t for t in v if count[t] == 1] for k, v in by_topic.items()}
    raw = {k: len(v) for k, v in by_topic.items()}
    n = min(MAX_PER_CLASS, *raw.values())
    rng = random.Random(SEED)
    rows = []
    for topic in sorted(by_topic):
        texts = list(by_topic[topic])
        rng.shuffle(texts)
        rows += [{"text": t, "label": topic} for t in texts[:n]]
    rng.shuffle(rows)
    return rows, {"per_topic_before_balancing": raw, "per_class": n, "skipped_modules": skipped}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "probes/data/topics.jsonl"))
    args = ap.parse_args(argv)
    rows, stats = build()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"Python {sys.version.split()[0]}: {len(rows)} examples, {stats['per_class']} per class "
          f"(before balancing: {stats['per_topic_before_balancing']}), {len(text.encode())} bytes -> {args.out}")
    if stats["skipped_modules"]:
        print("skipped (import failed):", ", ".join(stats["skipped_modules"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
