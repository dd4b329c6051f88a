"""One tokenizer interface over HF tokenizer directories and SentencePiece `.model` files."""
from __future__ import annotations

import io
import os
import shutil
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from r3jax import files
from r3jax.errors import InputError


SENTENCEPIECE_FILE = "tokenizer.model"
# tokenizer_config.json's key, in directories r3jax wrote, naming the SentencePiece model r3jax reads there
R3JAX_SENTENCEPIECE_KEY = "r3jax_sentencepiece"


Span = tuple[int, int]  # (begin, end) characters of a token in the text it was encoded from

# Encoded before a text to get the tokens the text has where it follows other text: no dummy-prefix
# space (SentencePiece, Llama's HF tokenizers) and no merge with a previous character. Byte 0
# occurs in no training text, so no tokenizer merges it with what follows.
_CONTINUATION_SENTINEL = "\x00"


def tokens_within(spans: Sequence[Span], chars: int) -> int:
    """How many leading tokens lie wholly within the first `chars` characters of their text.

    A token that straddles the boundary is left out, and so are the byte tokens of a character
    that byte fallback splits (they share its span)."""
    for i, (begin, end) in enumerate(spans):
        if end > chars or begin >= chars:
            return i
    return len(spans)


class Tokenizer:
    """encode/decode plus the special ids the sampler and trainers need."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    stop_ids: tuple[int, ...]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_with_spans(self, text: str) -> tuple[list[int], list[Span]]:
        """Token ids of `text` (no BOS) and each token's character span in it."""
        raise NotImplementedError

    def encode_continuation(self, text: str) -> tuple[list[int], list[Span]]:
        """The ids and character spans of `text` encoded as the continuation of other text (no
        dummy-prefix space): what SFT trains on after a prompt, cut into start states by span."""
        ids, spans = self.encode_with_spans(_CONTINUATION_SENTINEL + text)
        skip = tokens_within(spans, 1)
        if skip == len(ids) or spans[skip][0] != 1:  # the sentinel merged with the text: no prefix to drop
            return self.encode_with_spans(text)
        return ids[skip:], [(begin - 1, end - 1) for begin, end in spans[skip:]]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def known(self, ids: Sequence[int]) -> list[int]:
        """The ids this tokenizer has: a model's vocabulary may be padded past the tokenizer's, and
        a sampled padding id has no text."""
        return [int(i) for i in ids if 0 <= i < self.vocab_size]

    def save(self, directory: str) -> bool:
        """Writes the tokenizer into a model directory, where `load(directory)` finds it; False
        where `transformers.AutoTokenizer` would not encode as this tokenizer does there."""
        raise NotImplementedError


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
             ) -> tuple[np.ndarray, np.ndarray]:
    length = length or max(len(r) for r in rows)
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row {i} has {len(row)} tokens, more than the length {length}")
        if row:
            tokens[i, length - len(row):] = row
            mask[i, length - len(row):] = 1
    return tokens, mask


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str):
        if not os.path.exists(model_file):
            raise FileNotFoundError(f"{model_file}: SentencePiece model not found")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.vocab_size = self.sp.get_piece_size()
        self.stop_ids = (self.eos_id,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if add_bos else ids

    def encode_with_spans(self, text: str) -> tuple[list[int], list[Span]]:
        pieces = self.sp.encode(text, return_type="proto").pieces
        # SentencePiece reports byte offsets; char_starts[c] is the byte where character c begins
        char_starts = np.cumsum([0] + [len(ch.encode()) for ch in text])
        begins = np.searchsorted(char_starts, [p.begin for p in pieces], side="right") - 1
        ends = np.searchsorted(char_starts, [p.end for p in pieces], side="left")
        return [p.id for p in pieces], [(int(b), int(e)) for b, e in zip(begins, ends)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(self.known(ids))

    def save(self, directory: str) -> bool:
        """The SentencePiece model, and beside it the same tokenizer as HF files (`tokenizer.json`,
        `tokenizer_config.json`) that `transformers.AutoTokenizer` loads and that encode as r3jax
        does, BOS included: what TRL, vLLM or any transformers user of an export then reads. r3jax
        itself reads the SentencePiece model (`load`). The HF files are left out (False) for a model
        whose encoding they do not reproduce on a probe of its own pieces."""
        os.makedirs(directory, exist_ok=True)
        shutil.copyfile(self.model_file, os.path.join(directory, SENTENCEPIECE_FILE))
        fast = self._fast_tokenizer()
        pieces = (self.sp.id_to_piece(i) for i in range(self.vocab_size)
                  if not (self.sp.is_control(i) or self.sp.is_unknown(i)))
        probe = ["".join(pieces).replace("\u2581", " "),
                 "  two  spaces, 12345 + 678 = 9\n\nQ: ?\nA: x"]
        if any(fast.encode(text).ids != self.encode(text, add_bos=True) for text in probe):
            return False
        fast.save(os.path.join(directory, "tokenizer.json"))
        piece = self.sp.id_to_piece
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": piece(self.bos_id),
                  "eos_token": piece(self.eos_id), "pad_token": piece(self.pad_id), "unk_token": piece(self.sp.unk_id()),
                  "add_bos_token": True, R3JAX_SENTENCEPIECE_KEY: SENTENCEPIECE_FILE}
        files.write_json(os.path.join(directory, "tokenizer_config.json"), config)
        return True

    def _fast_tokenizer(self):
        """r3jax's SentencePiece settings (`train_sentencepiece`: BPE, digits split, no dummy prefix,
        identity normalisation, "\n" a piece of its own) as a `tokenizers.Tokenizer` adding BOS. No
        pre-tokenizer: the merges never join a digit to anything, and SentencePiece makes one <unk>
        of a run of unknown characters, digits included, which BPE fuses only within one pre-token."""
        from tokenizers import AddedToken, Tokenizer as FastTokenizer, decoders, models, normalizers, processors
        from transformers.convert_slow_tokenizer import SentencePieceExtractor

        extracted = SentencePieceExtractor(self.model_file).extract(models.BPE)
        piece = self.sp.id_to_piece
        fast = FastTokenizer(models.BPE(extracted["vocab"], extracted["merges"], unk_token=piece(self.sp.unk_id()),
                                        fuse_unk=True, byte_fallback=False))
        fast.normalizer = normalizers.Replace(" ", "\u2581")
        fast.decoder = decoders.Replace("\u2581", " ")
        fast.add_special_tokens([AddedToken(piece(i), special=True) for i in (self.bos_id, self.eos_id, self.pad_id)])
        fast.add_tokens([AddedToken("\n", normalized=False)])
        fast.post_processor = processors.TemplateProcessing(single=f"{piece(self.bos_id)} $A",
                                                            special_tokens=[(piece(self.bos_id), self.bos_id)])
        return fast


class HFTokenizer(Tokenizer):
    def __init__(self, path: str):
        import transformers

        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.tok)
        # Llama 3 ends chat turns with <|eot_id|> as well as EOS.
        extra = [self.tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|im_end|>")
                 if t in self.tok.get_vocab()]
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *extra]))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def encode_with_spans(self, text: str) -> tuple[list[int], list[Span]]:
        if not self.tok.is_fast:
            raise ValueError(f"{self.tok.name_or_path}: token-exact start states need a fast tokenizer "
                             "(tokenizer.json); save it with transformers to convert")
        encoded = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoded["input_ids"], [tuple(span) for span in encoded["offset_mapping"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(self.known(ids), skip_special_tokens=True)

    def save(self, directory: str) -> bool:
        self.tok.save_pretrained(directory)
        return True


def _r3jax_sentencepiece(directory: str) -> str | None:
    """The SentencePiece model r3jax saved in `directory` beside its HF files, if it did."""
    config_file = os.path.join(directory, "tokenizer_config.json")
    if not os.path.exists(config_file):
        return None
    name = files.read_json(config_file, "export the model again, or give config.tokenizer.path").get(
        R3JAX_SENTENCEPIECE_KEY)
    return os.path.join(directory, name) if name and os.path.exists(os.path.join(directory, name)) else None


def load(path: str) -> Tokenizer:
    """A `.model` file is SentencePiece; a directory holds an HF tokenizer, or only a
    SentencePiece `tokenizer.model` (as r3jax writes next to from-scratch models)."""
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if os.path.isdir(path):
        written_by_r3jax = _r3jax_sentencepiece(path)
        if written_by_r3jax:
            return SentencePieceTokenizer(written_by_r3jax)
        hf_files = ("tokenizer.json", "tokenizer_config.json")
        if not any(os.path.exists(os.path.join(path, f)) for f in hf_files) and \
                os.path.exists(os.path.join(path, SENTENCEPIECE_FILE)):
            return SentencePieceTokenizer(os.path.join(path, SENTENCEPIECE_FILE))
        if not any(os.path.exists(os.path.join(path, f)) for f in hf_files):
            raise InputError(f"{path}: no tokenizer here (tokenizer.json, tokenizer_config.json or "
                             f"{SENTENCEPIECE_FILE}); give config.tokenizer.path")
        return HFTokenizer(path)
    raise FileNotFoundError(f"{path}: neither a SentencePiece .model file nor a tokenizer directory")


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int = 512) -> str:
    """Trains a small BPE SentencePiece model (digits split one per token) on `texts`.

    Ids: pad 0, bos 1, eos 2, unk 3. Returns the path of the `.model` file.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        split_digits=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        character_coverage=1.0, remove_extra_whitespaces=False, add_dummy_prefix=False,
        user_defined_symbols=["\n"], normalization_rule_name="identity", hard_vocab_limit=False,
        minloglevel=2)
    path = model_prefix + ".model"
    files.write_bytes(path, model.getvalue())
    return path
