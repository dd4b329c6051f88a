import atexit
import os
import shutil
import tempfile

# The suite's programs are tiny, so it spends most of its time in XLA's CPU compiler. Without LLVM's
# optimisation passes and with XLA's classic fusion code generation (not the newer fusion emitters)
# the whole suite ran in 6 min 12 s instead of 11 min 38 s on this 2-core host, all tests passing;
# the numerics are XLA's own either way. Exported for the CLI runs the tests start as subprocesses.
# YNNPACK as XLA:CPU sets it, not as importing r3jax does (dots and reductions only): with that,
# XLA:CPU copies half a layer's KV cache per layer in a scanned decode step, which
# test_scan.py's in-place check is there to catch in r3jax's code (docs/experiments.md).
os.environ.setdefault("R3JAX_TEST_COMPILE_FLAGS",
                      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                      "--xla_cpu_experimental_ynn_fusion_type=")
# 8 simulated CPU devices for the mesh tests; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      + os.environ["R3JAX_TEST_COMPILE_FLAGS"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared with the CLI runs the tests start as
# subprocesses: their identical programs compile once (the killed-run test: 93 s -> 57 s).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="r3jax-jit-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402

DATA_DIR = os.environ.get("R3JAX_DATA_DIR",
                          os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(scope="session")
def data_dir():
    return os.path.abspath(DATA_DIR)


# The end-to-end files first: each takes minutes, and on two workers (pytest-xdist) a long test
# left for last keeps one core busy while the other idles.
LONGEST_FIRST = ("test_multihost.py", "test_main.py", "test_trim.py", "test_precision.py", "test_loop.py")


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A SentencePiece tokenizer of arith's text with TINY's vocabulary."""
    from helpers import TINY
    from r3jax import tasks, tokenizer

    task = tasks.get("arith", num_train=200)
    texts = [task.prompt(d.question) + d.response for d in task.demonstrations("train")]
    return tokenizer.load(tokenizer.train_sentencepiece(
        texts, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=TINY.vocab_size))


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)
