"""Metrics log: resume truncation, TensorBoard events, PNG curves; config validation."""
import os

import pytest

from r3jax import config as config_lib, metrics
from r3jax.metrics import MetricsWriter, plot_curves, read_jsonl


def test_writer_truncates_on_resume_and_plots(tmp_path):
    writer = MetricsWriter(str(tmp_path), "rl")
    for step in range(1, 7):
        writer.write(step, {"reward": step / 10, "reward/stage_0": step / 20, "accuracy": 0.5})
    writer.close()
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
    with pytest.raises(config_lib.ConfigError, match="config.rl.batch_size: 12 is not a multiple of the data-parallel size 8"):
        config_lib.validate(c, num_devices=8)
    c = config_lib.base_config()
    c.rl.stage_unit = "budget"
    with pytest.raises(config_lib.ConfigError, match="config.rl.stage_unit"):
        config_lib.validate(c, num_devices=1)
    c = config_lib.base_config()
    c.compare.arms = ("rl", "ppo")
    with pytest.raises(config_lib.ConfigError, match="config.compare.arms"):
        config_lib.validate(c, num_devices=1)


def test_curves_on_demand_cli(tmp_path, capsys):
    writer = MetricsWriter(str(tmp_path), "rl")
    for step in range(1, 4):
        writer.write(step, {"reward": step / 10, "kl": 0.01 * step})
    writer.close()
    log = str(tmp_path / "rl.jsonl")
    assert metrics.main([log, "--keys", "reward", "kl"]) == 0
    assert os.path.getsize(tmp_path / "rl_curves_on_demand.png") > 1000
    assert metrics.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such metrics file" in capsys.readouterr().err
    with open(log, "a") as f:
        f.write('{"step": 4, "rew\n')
    assert metrics.main([log]) == 2
    assert "rl.jsonl:4: not valid JSON" in capsys.readouterr().err
