"""Metrics log: resume truncation, TensorBoard events, PNG curves; config validation."""
import os

import pytest

from r3jax import config as config_lib, metrics
from r3jax.errors import InputError
from r3jax.metrics import MetricsWriter, plot_curves, read_jsonl


def test_writer_truncates_on_resume_and_plots(tmp_path):
    writer = MetricsWriter(str(tmp_path), "rl")
    for step in range(1, 7):
        writer.write(step, {"reward": step / 10, "reward/stage_0": step / 20, "accuracy": 0.5})
    writer.close()
    with open(tmp_path / "rl.jsonl", "a") as f:
        f.write('{"step": 7, "rew')  # a write cut short by SIGKILL
    resumed = MetricsWriter(str(tmp_path), "rl", resume_step=4)
    resumed.write(5, {"reward": 0.9, "accuracy": 0.6})
    resumed.close()
    records = read_jsonl(str(tmp_path / "rl.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["reward"] == 0.9
    assert os.listdir(tmp_path / "tensorboard" / "rl")
    png = plot_curves(records, str(tmp_path / "curves.png"))
    assert os.path.getsize(png) > 1000


def test_validate_names_the_key():
    c = config_lib.base_config()
    config_lib.validate(c, num_devices=8)
    c.rl.batch_size = 12
    with pytest.raises(config_lib.ConfigError, match=r"config.rl.batch_size: 12 is not a multiple of the data-parallel "
                                                     r"size 8 \(the mesh's data x fsdp\): 8 or 16 would do"):
        config_lib.validate(c, num_devices=8)
    c.rl.batch_size, c.rl.group_size = 4, 4
    with pytest.raises(config_lib.ConfigError, match="config.rl.batch_size: 4 .* size 8 .*: 8 would do"):
        config_lib.validate(c, num_devices=8)
    c = config_lib.base_config()
    c.rl.stage_unit = "budget"
    with pytest.raises(config_lib.ConfigError, match="config.rl.stage_unit"):
        config_lib.validate(c, num_devices=1)
    c = config_lib.base_config()
    c.compare.arms = ("rl", "ppo")
    with pytest.raises(config_lib.ConfigError, match="config.compare.arms"):
        config_lib.validate(c, num_devices=1)


def test_curves_on_demand_default_to_what_the_log_has():
    rl_records, sft_records = [{"step": 1, "reward": 0.5, "accuracy/stage_0": 0.2}], [{"step": 1, "loss": 2.0}]
    assert metrics.panels(rl_records, None, "rl.jsonl") == ["reward", "accuracy"]
    assert metrics.panels(sft_records, None, "sft.jsonl") == ["loss"]
    assert metrics.panels(sft_records, ["loss"], "sft.jsonl") == ["loss"]
    with pytest.raises(InputError, match=r"^rl.jsonl: no step logged yet \(a run writes one line per step"):
        metrics.panels([], None, "rl.jsonl")  # the file a run makes before its first step: an empty plot before
    with pytest.raises(InputError, match=r"^other.jsonl: logs none of reward, accuracy or loss: name what to draw "
                                         r"with --keys \(logged: kl, step\)$"):
        metrics.panels([{"step": 1, "kl": 0.1}], None, "other.jsonl")


def test_curves_on_demand_cli(tmp_path, capsys):
    writer = MetricsWriter(str(tmp_path), "rl")
    for step in range(1, 4):
        writer.write(step, {"reward": step / 10, "kl": 0.01 * step})
    writer.close()
    log = str(tmp_path / "rl.jsonl")
    assert metrics.main([log, "--keys", "reward", "kl"]) == 0
    assert os.path.getsize(tmp_path / "rl_curves_on_demand.png") > 1000
    assert metrics.main([log, "--keys", "rewrd"]) == 2
    assert f"--keys rewrd: not logged in {log} (closest logged: reward" in capsys.readouterr().err
    assert metrics.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such metrics file" in capsys.readouterr().err
    with open(log, "a") as f:
        f.write('{"step": 4, "rew\n')
    assert metrics.main([log]) == 2
    assert "rl.jsonl:4: not valid JSON" in capsys.readouterr().err
    empty = tmp_path / "sft.jsonl"
    open(empty, "w").close()
    assert metrics.main([str(empty)]) == 2 and not os.path.exists(tmp_path / "sft_curves_on_demand.png")
    assert capsys.readouterr().err == (f"error: {empty}: no step logged yet (a run writes one line per step; try again "
                                       "after its first)\n")


def _tensorboard_summaries(directory) -> dict[str, list]:
    """{tag: [summary value, ...]} read back from the event files (TFRecord framing) in `directory`."""
    import struct

    from tensorboardX.proto import event_pb2

    values = {}
    for path in directory.iterdir():
        data = path.read_bytes()
        position = 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
            position += 16 + length
            for value in event.summary.value:
                values.setdefault(value.tag, []).append(value)
    return values


def test_samples_and_learning_rate_reach_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    options = metrics.MetricsConfig(sample_completions=2, wandb="offline", wandb_project="test")
    config = config_lib.base_config()
    writer = MetricsWriter(str(tmp_path), "sft", None, options, config.to_dict())
    samples = [{"prompt": f"Q{i}?", "completion": f"\nA{i}\n#### {i}", "answer": str(i), "correct": i % 2 == 0}
               for i in range(3)]
    writer.write(1, {"loss": 2.0, "lr": 1e-3})
    writer.write_samples(1, samples)
    writer.close()
    summaries = _tensorboard_summaries(tmp_path / "tensorboard" / "sft")
    assert [v.simple_value for v in summaries["lr"]] == [pytest.approx(1e-3)]
    text = summaries["samples/text_summary"][0].tensor.string_val[0].decode()
    assert "**correct** (gold 0)" in text and "**wrong** (gold 1)" in text and "#### 2" not in text
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert list(runs[0].glob("files/media/table/samples_1_*.table.json"))
    resumed = MetricsWriter(str(tmp_path), "sft", 1, options)  # the same W&B run id: one run per phase
    resumed.close()
    run_ids = {p.name.split("-")[3] for p in (tmp_path / "wandb").glob("offline-run-*")}  # offline-run-<time>-<id>[-n]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2 and len(run_ids) == 1


def test_the_processor_is_named_where_a_result_was_measured():
    """Two 2-core hosts ran one code's PPO update at 0.61x and 0.47x their matmul rates: a result
    needs its processor's name and vector width, which `cpu` (x86_64) did not give."""
    epyc = ("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 avx512f\n\n"
            "processor\t: 1\nmodel name\t: another\n")
    xeon = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t\t: fpu avx avx2 fma\n"
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n"
    assert metrics.cpu_model(epyc) == {"cpu_model": "AMD EPYC", "cpu_vectors": "avx512f"}
    assert metrics.cpu_model(xeon) == {"cpu_model": "Intel(R) Xeon(R) CPU @ 2.20GHz", "cpu_vectors": "avx2"}
    assert metrics.cpu_model(arm) == {"cpu_model": None, "cpu_vectors": None}
    assert {"cpu_model", "cpu_vectors"} <= set(metrics.machine_info())
