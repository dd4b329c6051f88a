"""Optional TFDS sources (`pip install r3jax[tfds]`), turned into the records our parsers read."""
from __future__ import annotations

from typing import Iterator

from r3jax.errors import RecordError

NLI_LABELS = {0: "yes", 1: "it is not possible to tell", 2: "no"}
NLI_OPTIONS = "\n\nOPTIONS:\n- yes\n- it is not possible to tell\n- no"


def _examples(name: str, split: str) -> Iterator[dict]:
    """Random-access TFDS data source (array_record): reading needs no TensorFlow. The dataset
    must be prepared in the TFDS data dir (`tfds build`), as TFDS always requires."""
    try:
        import tensorflow_datasets as tfds
        import tensorflow_datasets.text  # noqa: F401  registers gsm8k and multi_nli when TensorFlow is absent
    except ImportError:
        raise ImportError("TFDS sources need tensorflow-datasets: pip install 'r3jax[tfds]'") from None
    for example in tfds.data_source(name, split=split):
        yield {k: (v.decode() if isinstance(v, bytes) else v) for k, v in example.items()}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def records(name: str, split: str) -> Iterator[tuple[str, dict]]:
    """(location, record) in the formats of the paper's released files."""
    if name == "gsm8k":
        for i, ex in enumerate(_examples("gsm8k", split)):
            yield f"tfds:gsm8k/{split}[{i}]", {"question": ex["question"], "answer": ex["answer"]}
    elif name in ("snli", "multi_nli"):
        tfds_split = {"test": "validation_matched"}.get(split, split) if name == "multi_nli" else split
        for i, ex in enumerate(_examples(name, tfds_split)):
            if int(ex["label"]) not in NLI_LABELS:
                continue
            instruction = (f"Premise: {ex['premise']}\n\nHypothesis: {ex['hypothesis']}\n\n"
                           f"Does the premise entail the hypothesis?{NLI_OPTIONS}")
            yield f"tfds:{name}/{tfds_split}[{i}]", {
                "instruction": instruction, "input": "", "output": f"### {NLI_LABELS[int(ex['label'])]}"}
    elif name.startswith("race/"):
        for i, ex in enumerate(_examples(name, split)):
            for j, (question, answer, options) in enumerate(zip(ex["questions"], ex["answers"], ex["options"])):
                if len(options) != 4:
                    raise RecordError(f"tfds:{name}/{split}[{i}.{j}]: expected 4 options, got {len(options)}")
                letters = "\n".join(f"{'ABCD'[k]}: {_text(o)}" for k, o in enumerate(options))
                instruction = (f"Read the article and select the best answer.\nArticle: {ex['article']}\n"
                               f"Question: {_text(question)}\nOptions: {letters}")
                yield f"tfds:{name}/{split}[{i}.{j}]", {
                    "instruction": instruction, "input": "", "output": f"### {_text(answer)}"}
    else:
        raise ValueError(f"no TFDS source for {name!r}")
