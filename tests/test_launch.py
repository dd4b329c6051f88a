"""The launchers pass arguments through intact, run against fake srun/scontrol/gcloud/python."""
import json
import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/gsm8k.py", "--config.mesh=(1,-1,1)", "--workdir=/shared/my runs/r3 gsm8k",
        "--config.model.path=/data/it's a model"]


def _fake(bin_dir, name, body):
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.jsonl"
    recorder = tmp_path / "record.py"
    recorder.write_text(f"import json, sys\nopen({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    # python records the argv it got; srun runs its command as two tasks; gcloud runs --command locally
    _fake(bin_dir, "python", f'exec python3 {recorder} "$@"\n')
    _fake(bin_dir, "scontrol", "printf 'node-a\\nnode-b\\n'\n")
    _fake(bin_dir, "srun", 'for i in 0 1; do SLURM_NTASKS=2 SLURM_PROCID=$i "$@"; done\n')
    _fake(bin_dir, "pip", "true\n")
    _fake(bin_dir, "gcloud", 'while [ "$1" != "--command" ]; do shift; done; bash -c "$2"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, record


def test_slurm_launcher_passes_arguments_intact(tmp_path):
    env, record = _fakes(tmp_path)
    env["SLURM_JOB_NODELIST"] = "node-[a-b]"
    subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sh"), *ARGS], env=env, check=True, timeout=60)
    calls = [json.loads(line) for line in open(record)]
    assert calls == [["-m", "r3jax.main", "--coordinator=node-a:12355", "--num_processes=2", f"--process_id={i}", *ARGS]
                     for i in (0, 1)]


def test_tpu_launcher_passes_arguments_intact(tmp_path):
    env, record = _fakes(tmp_path)
    env.update(TPU_NAME="pod", ZONE="zone", REPO=str(tmp_path))
    subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), *ARGS], env=env, check=True, timeout=60)
    assert [json.loads(line) for line in open(record)] == [["-m", "r3jax.main", "--distributed", *ARGS]]
