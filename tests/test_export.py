"""Exported HF directories: they generate and stop where r3jax's sampler stops, appear whole or
not at all, and PyTorch .bin checkpoints are refused in one line."""
import dataclasses
import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, tiny_params
from r3jax.errors import UnreadableFileError
from r3jax.models import hf
from r3jax.sampling import SamplingConfig, sample
from r3jax.rollout import Policy
from r3jax.train import sft


def _greedy_both(params, cfg, tok, path, max_new=10):
    import torch
    import transformers

    prompt = tok.encode("Mia has 3 pens.", add_bos=True)
    rollout = sample(cfg, params, jnp.asarray([prompt]), jnp.ones((1, len(prompt)), jnp.int32), jax.random.key(0),
                     SamplingConfig(max_new_tokens=max_new, greedy=True, stop_ids=tok.stop_ids, pad_id=tok.pad_id))
    ours = [int(t) for t, m in zip(rollout.completions[0], rollout.completion_mask[0]) if m]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)[0, len(prompt):].tolist()
    return ours, theirs

def test_export_generates_and_stops_where_the_sampler_stops(tok, tmp_path):
    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size)
    params = tiny_params(cfg, scale=4.0)
    sft.export(str(tmp_path / "plain"), Policy(cfg, params, tok, None))
    ours, theirs = _greedy_both(params, cfg, tok, str(tmp_path / "plain"))
    assert ours == theirs and len(ours) == 10  # no stop token within 10: the same 10 tokens

    forced = jax.tree.map(jnp.copy, params)  # EOS always wins: a large positive residual feature that only it reads
    forced["embed"]["embedding"] = forced["embed"]["embedding"].at[:, 0].set(100.0)
    forced["lm_head"]["kernel"] = forced["lm_head"]["kernel"].at[0, tok.eos_id].set(50.0)
    sft.export(str(tmp_path / "forced"), Policy(cfg, forced, tok, None))
    ours, theirs = _greedy_both(forced, cfg, tok, str(tmp_path / "forced"))
    assert ours == theirs == [tok.eos_id]
    generation = json.load(open(tmp_path / "forced" / "generation_config.json"))
    assert generation["eos_token_id"] == tok.eos_id and generation["pad_token_id"] == tok.pad_id
    assert json.load(open(tmp_path / "forced" / "config.json"))["bos_token_id"] == tok.bos_id

def test_qwen3_from_scratch_exports_to_transformers_and_generates_alike(tok, tmp_path):
    """model_type=qwen3 from scratch (q/k norms, tied embeddings): transformers loads the export as
    Qwen3ForCausalLM and its greedy `generate` equals r3jax's greedy sampler."""
    import transformers

    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size, model_type="qwen3", tie_word_embeddings=True)
    params = tiny_params(cfg, scale=4.0)
    params["layers_1"]["attn"]["q_norm"]["scale"] = jnp.linspace(0.5, 2.0, cfg.head_dim)  # not the identity
    sft.export(str(tmp_path), Policy(cfg, params, tok, None))
    assert isinstance(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)),
                      transformers.Qwen3ForCausalLM)
    ours, theirs = _greedy_both(params, cfg, tok, str(tmp_path))
    assert ours == theirs and len(ours) == 10
    assert hf.read_config(str(tmp_path)) == cfg

def test_export_is_whole_or_absent(tok, tmp_path, monkeypatch):
    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size)
    path = str(tmp_path / "best")
    sft.export(path, Policy(cfg, tiny_params(cfg, seed=0), tok, None))
    first = sorted(os.listdir(path))

    def killed(directory):
        raise KeyboardInterrupt("killed while writing the tokenizer")

    monkeypatch.setattr(type(tok), "save", lambda self, directory: killed(directory))
    with pytest.raises(KeyboardInterrupt):
        sft.export(path, Policy(cfg, tiny_params(cfg, seed=1), tok, None))
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == first  # the previous export, untouched
    _, loaded = hf.load(path)
    np.testing.assert_array_equal(np.asarray(loaded["lm_head"]["kernel"]),
                                  np.asarray(tiny_params(cfg, seed=0)["lm_head"]["kernel"]))
    sft.export(path, Policy(cfg, tiny_params(cfg, seed=1), tok, None))  # the rerun cleans the partial one up
    assert not os.path.exists(path + ".partial") and sorted(os.listdir(path)) == first

    def killed_while_removing(directory):  # before, the removal of the previous export at `path` itself
        os.remove(os.path.join(directory, "model.safetensors"))
        raise KeyboardInterrupt("killed while removing the previous export")

    monkeypatch.setattr(sft.shutil, "rmtree", killed_while_removing)
    with pytest.raises(KeyboardInterrupt):
        sft.export(path, Policy(cfg, tiny_params(cfg, seed=2), tok, None))
    monkeypatch.undo()
    _, loaded = hf.load(path)  # the new export, whole
    np.testing.assert_array_equal(np.asarray(loaded["lm_head"]["kernel"]),
                                  np.asarray(tiny_params(cfg, seed=2)["lm_head"]["kernel"]))
    sft.export(path, Policy(cfg, tiny_params(cfg, seed=3), tok, None))
    assert sorted(os.listdir(tmp_path)) == ["best"]  # what the kill left is cleaned up

    rename = os.replace

    def killed_between_the_renames(source, destination):
        if source == path + ".partial":
            raise KeyboardInterrupt("killed between the two renames")
        rename(source, destination)

    monkeypatch.setattr(sft.os, "replace", killed_between_the_renames)
    with pytest.raises(KeyboardInterrupt):
        sft.export(path, Policy(cfg, tiny_params(cfg, seed=4), tok, None))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["best.partial", "best.replaced"]
    sft.export(path + "-other", Policy(cfg, tiny_params(cfg, seed=5), tok, None))  # another export: no effect here
    sft.finish_interrupted_export(path)
    _, loaded = hf.load(path)  # the export the kill interrupted
    np.testing.assert_array_equal(np.asarray(loaded["lm_head"]["kernel"]),
                                  np.asarray(tiny_params(cfg, seed=4)["lm_head"]["kernel"]))
    sft.export(path, Policy(cfg, tiny_params(cfg, seed=6), tok, None))
    assert sorted(os.listdir(tmp_path)) == ["best", "best-other"]

def test_a_large_model_shows_its_progress_loading_and_saving(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "model")
    hf.save(path, TINY, tiny_params())
    hf.load(path)
    assert capsys.readouterr().err == ""  # a small model: no bar
    monkeypatch.setattr(hf, "PROGRESS_BYTES", TINY.num_params() * 4)  # as large as this one
    hf.save(path, TINY, tiny_params())
    hf.load(path)
    err = capsys.readouterr().err
    tensors = len(hf._grouped_tensors(TINY))
    assert f"saving {path}:   0%" in err and f"loading {path}:   0%" in err and f"0/{tensors} " in err, err
    hf.save(path, TINY, tiny_params(), dtype="bfloat16")  # half the bytes
    assert capsys.readouterr().err == ""


def test_exported_files_take_their_permissions_from_the_umask(tok, tmp_path):
    """safetensors writes its files 0600: before, no one but the run's own user could load an
    exported model.safetensors, on a shared machine or a team's NFS workdir."""
    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size)
    previous = os.umask(0o022)
    try:
        sft.export(str(tmp_path / "best"), Policy(cfg, tiny_params(cfg), tok, None))
        hf.save(str(tmp_path / "sharded"), cfg, tiny_params(cfg), max_shard_bytes=1 << 14)
    finally:
        os.umask(previous)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    modes = {str(path.relative_to(tmp_path)): stat.S_IMODE(path.stat().st_mode)
             for path in tmp_path.rglob("*") if path.is_file()}
    assert "best/model.safetensors" in modes and "sharded/model.safetensors.index.json" in modes
    assert {path: mode for path, mode in modes.items() if mode != 0o644} == {}


def test_pytorch_bin_checkpoint_is_refused_with_the_conversion_command(tmp_path):
    hf.save(str(tmp_path), TINY, tiny_params())
    os.rename(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
    with pytest.raises(hf.CheckpointError, match="PyTorch .bin checkpoint.*save_pretrained"):
        hf.load(str(tmp_path))


@pytest.mark.parametrize("file, damage", [("model.safetensors", "cut short"), ("config.json", "emptied"),
                                          ("model.safetensors.index.json", "cut short"),
                                          ("model-00002-of-00006.safetensors", "cut short")])
def test_a_damaged_model_directory_is_named_file_by_file(tmp_path, file, damage):
    """Before: a traceback from safetensors' or json's depths (rl.init, model.path)."""
    sharded = file.startswith("model-") or file.endswith("index.json")
    hf.save(str(tmp_path), TINY, tiny_params(), max_shard_bytes=1 << 14 if sharded else 4 << 30)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == (6 if sharded else 0)
    os.truncate(tmp_path / file, 0 if damage == "emptied" else os.path.getsize(tmp_path / file) // 2)
    with pytest.raises(UnreadableFileError, match=f"^{tmp_path / file} cannot be read \\(.+\\), perhaps cut short "
                                                  "by a crash: export or download the model again$"):
        hf.load(str(tmp_path))


def test_an_export_without_a_faithful_tokenizer_json_says_so_under_its_own_name(tok, tmp_path, monkeypatch, capsys):
    """Where the converted tokenizer.json would encode otherwise (here: a BPE without merges), the
    export leaves it out and names the export's path, not the directory it was written in first."""
    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size)
    unfaithful = tok._fast_tokenizer()
    unfaithful.model = type(unfaithful.model)(unfaithful.get_vocab(), [], unk_token="<unk>")
    monkeypatch.setattr(type(tok), "_fast_tokenizer", lambda self: unfaithful)
    path = str(tmp_path / "best")
    sft.export(path, Policy(cfg, tiny_params(cfg), tok, None))
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {path}: no tokenizer.json (it would encode otherwise than the SentencePiece model tokenizer.model "
        "beside it, which r3jax reads)"]
    assert "tokenizer.json" not in os.listdir(path) and "tokenizer.model" in os.listdir(path)
