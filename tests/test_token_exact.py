"""Start states are token prefixes of the SFT sequences, for Llama-style SentencePiece (dummy
prefix, byte fallback) and byte-level BPE (Qwen2 / Llama 3) tokenizers, both trained here on the
released task text."""
import io

import pytest
import sentencepiece as spm
import tokenizers
import transformers

from r3jax import curriculum, rollout, tasks, tokenizer

TASKS = ("gsm8k", "svamp", "gsm8k_pot", "snli")


@pytest.fixture(scope="module")
def task_demos(data_dir):
    loaded = {name: tasks.get(name) for name in TASKS}
    return {name: (task, task.demonstrations("train")) for name, task in loaded.items()}


def _training_text(task_demos):
    return [task.prompt(d.question) + d.response for task, demos in task_demos.values() for d in demos[:300]]


@pytest.fixture(scope="module")
def llama_sentencepiece(task_demos, tmp_path_factory):
    """Llama's SentencePiece settings: BPE, a dummy prefix, byte fallback, whitespace kept, and
    pieces that may hold a newline (so ':\\n' can be one piece, as in the reported defect)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text(task_demos)), model_writer=model, vocab_size=800,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True, split_digits=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "llama.model"
    path.write_bytes(model.getvalue())
    return tokenizer.load(str(path))


@pytest.fixture(scope="module")
def byte_level_bpe(task_demos, tmp_path_factory):
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(_training_text(task_demos), tokenizers.trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    path = str(tmp_path_factory.mktemp("bpe"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                         bos_token="<|im_start|>").save_pretrained(path)
    return tokenizer.load(path)


@pytest.mark.parametrize("kind", ["llama_sentencepiece", "byte_level_bpe"])
@pytest.mark.parametrize("stride", [4, pytest.param(1, marks=pytest.mark.slow)])  # every 4th demo in CI, all: slow
def test_every_start_state_is_a_token_prefix_of_its_sft_sequence(kind, stride, task_demos, request):
    tok = request.getfixturevalue(kind)
    checked = 0
    for name, (task, demos) in task_demos.items():
        for demo in demos[::stride]:
            encoded = rollout.encode_demo(tok, task, demo)
            sft_tokens, loss_mask = rollout.sft_example(encoded, tok.eos_id)
            # the SFT sequence spells the text exactly: no dummy-prefix space before the response
            assert tok.decode(sft_tokens) == task.prompt(demo.question) + demo.response, (name, demo.id)
            prompt_length = loss_mask.index(1)
            states = rollout.tokenize_states(tok, task, curriculum.start_states(task, demo, 5))
            for state, raw in zip(states, curriculum.start_states(task, demo, 5)):
                prompt = list(state.prompt_tokens)
                assert prompt == sft_tokens[:len(prompt)], (name, demo.id, state.k)
                assert len(prompt) >= prompt_length and (state.k > 0 or len(prompt) == prompt_length)
                # the prompt covers the given steps, but for one token straddling their end
                assert raw.given.startswith(state.given) and state.prompt_text + state.target == raw.prompt_text + raw.target
                if state.given != raw.given:
                    begin, end = encoded.spans[len(prompt) - prompt_length]
                    assert begin == len(state.given) < len(raw.given) < end
                checked += 1
    assert checked > 1000


def test_eval_prompt_at_k0_is_the_sft_prompt_and_encodes_the_prompt_alone(llama_sentencepiece, task_demos):
    tok = llama_sentencepiece
    task, demos = task_demos["gsm8k"]
    for demo in demos[:50]:
        state = rollout.tokenize_states(tok, task, curriculum.start_states(task, demo, None)[:1])[0]
        assert list(state.prompt_tokens) == tok.encode(task.prompt(demo.question), add_bos=True)


def test_reported_defect_is_gone(llama_sentencepiece, task_demos):
    """Encoding prompt + given steps as one string (the old RL path) differs from the SFT tokens
    for this tokenizer, which is what the token-exact cut fixes."""
    tok = llama_sentencepiece
    task, demos = task_demos["gsm8k"]
    differing = 0
    for demo in demos[:100]:
        state = rollout.tokenize_states(tok, task, curriculum.start_states(task, demo, 5))[-1]
        differing += tok.encode(state.prompt_text, add_bos=True) != list(state.prompt_tokens)
    assert differing > 50


def test_boundary_inside_a_token_goes_to_the_completion():
    # tokens 2 and 3 are the byte-fallback bytes of the character at 5 (the first zero-width)
    spans = [(0, 2), (2, 5), (5, 5), (5, 6), (6, 8)]
    assert [tokenizer.tokens_within(spans, c) for c in range(9)] == [0, 0, 1, 1, 1, 2, 4, 4, 5]
