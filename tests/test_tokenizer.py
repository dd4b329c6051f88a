"""Tokenizers: SentencePiece training, HF directories, left padding, save/load beside a model."""
import pytest
import tokenizers
import transformers

from r3jax import tasks, tokenizer


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    task = tasks.get("arith", num_train=300)
    texts = [task.prompt(d.question) + d.response for d in task.demonstrations("train")]
    return tokenizer.train_sentencepiece(texts, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=120)


def test_sentencepiece_roundtrip_and_digits(sp_file):
    tok = tokenizer.load(sp_file)
    text = "Mia has 17 pens.\n\n### Response:\n17 + 5 = 22\n#### 22"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.stop_ids == (2,)
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("1234")]
    assert [p for p in pieces if p != "\u2581"] == ["1", "2", "3", "4"]  # one token per digit


def test_left_pad(sp_file):
    tok = tokenizer.load(sp_file)
    tokens, mask = tokenizer.left_pad([tok.encode(t, add_bos=True) for t in ["Mia has 3 pens.", "Leo"]], tok.pad_id)
    assert tokens.shape == mask.shape and tokens[0, 0] == tok.bos_id
    assert mask[1].tolist() == [0] * (mask.shape[1] - mask[1].sum()) + [1] * mask[1].sum()
    assert (tokens[mask == 0] == tok.pad_id).all()
    with pytest.raises(ValueError, match="more than the length"):
        tokenizer.left_pad([[1, 2, 3]], 0, 2)


def test_save_beside_model_and_hf_directories(sp_file, tmp_path):
    tok = tokenizer.load(sp_file)
    tok.save(str(tmp_path / "model"))
    again = tokenizer.load(str(tmp_path / "model"))
    assert isinstance(again, tokenizer.SentencePieceTokenizer)
    assert again.encode("17 + 5 = 22") == tok.encode("17 + 5 = 22")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(["Mia has 3 pens.", "Leo has 17 cups."] * 20, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                         pad_token="<pad>", unk_token="<unk>").save_pretrained(str(tmp_path / "hf"))
    loaded = tokenizer.load(str(tmp_path / "hf"))
    assert isinstance(loaded, tokenizer.HFTokenizer)
    ids = loaded.encode("Mia has 3 pens.", add_bos=True)
    assert ids[0] == loaded.bos_id and loaded.decode(ids) == "Mia has 3 pens."
    with pytest.raises(FileNotFoundError):
        tokenizer.load(str(tmp_path / "missing.model"))


def test_a_saved_sentencepiece_tokenizer_encodes_alike_in_transformers(sp_file, tmp_path):
    """What other tools read from an export: `AutoTokenizer` on the saved directory gives the ids
    r3jax trains on, BOS first, for texts the tokenizer never saw (unknown characters, runs of
    spaces, digits, newlines), and decodes them back; r3jax itself still reads the SentencePiece model."""
    tok = tokenizer.load(sp_file)
    tok.save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    task = tasks.get("arith", num_train=400, seed=7)
    texts = [task.prompt(d.question) + d.response for d in task.demonstrations("train")[300:]]
    texts += ["  two  spaces ", "émoji \U0001F600 and 12345 + 678", "\n\nQ: ?\nA:", ""]
    assert [hf(text)["input_ids"] for text in texts] == [tok.encode(text, add_bos=True) for text in texts]
    assert hf.decode(hf(texts[0])["input_ids"], skip_special_tokens=True) == texts[0]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert isinstance(tokenizer.load(str(tmp_path)), tokenizer.SentencePieceTokenizer)


def test_a_tokenizer_missing_some_digits_still_exports_a_tokenizer_json_that_encodes_alike(tmp_path):
    """SNLI's text trains a tokenizer without some digits; SentencePiece makes one <unk> of a run
    of unknown characters ("78"), and so must the exported tokenizer.json, or the export has none."""
    task = tasks.get("arith", num_train=300)
    texts = [(task.prompt(d.question) + d.response).translate(str.maketrans("", "", "78"))
             for d in task.demonstrations("train")]
    tok = tokenizer.load(tokenizer.train_sentencepiece(texts, str(tmp_path / "tok"), vocab_size=120))
    assert tok.sp.piece_to_id("7") == tok.sp.unk_id()
    tok.save(str(tmp_path / "export"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    probes = ["6 + 78 = 84", "787 - 8 = 779\n#### 779", texts[0]]
    assert [hf(text)["input_ids"] for text in probes] == [tok.encode(text, add_bos=True) for text in probes]
    assert tok.encode("78").count(tok.sp.unk_id()) == 1
