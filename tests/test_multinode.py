"""Launch configs and multi-node recipes: they parse, generate the right per-node commands,
and two "machines" on loopback train exactly like one machine with two processes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import train_ddpm

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "accelerate_configs"
SLURM_RECIPE = REPO / "recipes" / "slurm_multinode.sbatch"
FAULTS = REPO / "tests" / "scripts" / "faults.py"
TORCHRUN_RECIPE = REPO / "recipes" / "torchrun_multinode.sh"
IMAGENET_RECIPE = REPO / "recipes" / "imagenet256_dit_xl2.sh"

# --------------------------------------------------------------------------- configs

EXPECTED = {
    "cpu_2proc.yaml": {
        "distributed_type": DistributedType.MULTI_GPU,  # MULTI_CPU would start one process
        "num_processes": 2,
        "num_machines": 1,
        "use_cpu": True,
        "main_process_port": 0,
    },
    "single_gpu.yaml": {"distributed_type": DistributedType.NO, "num_processes": 1},
    "1node_8gpu_bf16.yaml": {
        "distributed_type": DistributedType.MULTI_GPU,
        "num_processes": 8,
        "num_machines": 1,
        "mixed_precision": "bf16",
        "use_cpu": False,
    },
    "1node_8gpu_fsdp.yaml": {
        "distributed_type": DistributedType.FSDP,
        "fsdp_config": {"fsdp_version": 2},  # the rest is the toolkit's (--sharding fsdp)
        "num_processes": 8,
        "num_machines": 1,
        "mixed_precision": "bf16",
        "use_cpu": False,
    },
    "2node_8gpu_bf16.yaml": {
        "distributed_type": DistributedType.MULTI_GPU,
        "num_processes": 16,  # total over the machines
        "num_machines": 2,
        "machine_rank": 0,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": "bf16",
    },
    "2node_8gpu_hsdp.yaml": {
        "distributed_type": DistributedType.FSDP,
        "fsdp_config": {"fsdp_version": 2},
        "num_processes": 16,
        "num_machines": 2,
        "machine_rank": 0,
        "mixed_precision": "bf16",
    },
}
MUST_EDIT = {
    "2node_8gpu_bf16.yaml": ("machine_rank", "main_process_ip", "main_process_port"),
    "2node_8gpu_hsdp.yaml": ("machine_rank", "main_process_ip", "main_process_port"),
}


def test_every_config_is_covered() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerate_and_has_promised_fields(name: str) -> None:
    path = CONFIGS / name
    config = load_config_from_file(str(path))
    for field, value in EXPECTED[name].items():
        assert getattr(config, field) == value, f"{name}: {field}"
    # The header says when to use it and gives the exact launch command.
    header = path.read_text().split("\ncompute_environment")[0]
    assert f"accelerate launch --config_file accelerate_configs/{name}" in header
    for field in MUST_EDIT.get(name, ()):
        line = next(ln for ln in path.read_text().splitlines() if ln.strip().startswith(field))
        assert "# EDIT:" in line, f"{name}: {field} should be marked # EDIT:"


def test_fsdp_launch_is_refused_before_training(tmp_path: Path) -> None:
    """An FSDP accelerate config without --sharding fsdp: refused, naming the flag."""
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true"}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train_basic.py"),
            "--output-dir",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
            "--report-to",
            "none",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "FSDP" in result.stderr and "--sharding fsdp" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- recipes


def fake_slurm_bin(folder: Path) -> Path:
    """`scontrol` that expands the node list and records other calls; `scancel` records."""
    folder.mkdir()
    calls = folder / "calls.log"
    (folder / "scontrol").write_text(
        "#!/bin/bash\n"
        'if [[ "$1 $2" == "show hostnames" ]]; then printf "node01\\nnode02\\n"; '
        f'else echo "scontrol $*" >> {calls}; fi\n'
    )
    (folder / "scancel").write_text(
        f'#!/bin/bash\necho "scancel $*" >> {calls}\nkill -TERM "$(cat {folder}/srun.pid)"\n'
    )
    # srun: record its arguments, then become the task of node 1 (exec keeps the pid).
    (folder / "srun").write_text(
        f'#!/bin/bash\necho $$ > {folder}/srun.pid\nprintf "%s\\n" "$@" > {folder}/srun.args\n'
        'SLURM_NODEID=1 exec bash -c "${@: -1}"\n'
    )
    # accelerate: record the arguments of the per-node launch, then wait to be signalled.
    (folder / "accelerate").write_text(
        f'#!/bin/bash\nprintf "%s\\n" "$@" > {folder}/launch.args\nexec sleep 60\n'
    )
    for tool in ("scontrol", "scancel", "srun", "accelerate"):
        (folder / tool).chmod(0o755)
    return folder


def slurm_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[01-02]",
    }
    env.update(extra)
    return env


def node_commands(stdout: str) -> dict[int, list[str]]:
    commands = {}
    for line in stdout.splitlines():
        if line.startswith("node "):
            rank, command = line.removeprefix("node ").split(": ", 1)
            commands[int(rank)] = shlex.split(command)
    return commands


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_slurm_recipe_dry_run_prints_one_launch_per_node(tmp_path: Path) -> None:
    env = slurm_env(fake_slurm_bin(tmp_path / "bin"), DRY_RUN="1")
    out = subprocess.run(
        ["bash", str(SLURM_RECIPE), "--output-dir", "/shared/runs/a b", "--max-steps", "10"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = node_commands(out)
    assert sorted(commands) == [0, 1]
    port = str(20000 + 4242 % 20000)
    for rank, argv in commands.items():
        assert argv[:3] == ["accelerate", "launch", "--multi_gpu"]
        assert flag(argv, "--machine_rank") == str(rank)
        assert flag(argv, "--num_machines") == "2"
        assert flag(argv, "--num_processes") == "16"  # total: 2 nodes x 8 GPUs
        assert flag(argv, "--main_process_ip") == "node01"  # the first node of the list
        assert flag(argv, "--main_process_port") == port
        # The training script (default train_ddpm.py) and its arguments, quoting intact.
        script = argv.index("train_ddpm.py")
        assert argv[script + 1 :] == ["--output-dir", "/shared/runs/a b", "--max-steps", "10"]


def test_slurm_recipe_honours_overrides(tmp_path: Path) -> None:
    env = slurm_env(
        fake_slurm_bin(tmp_path / "bin"),
        DRY_RUN="1",
        TRAIN_SCRIPT="train_basic.py",
        GPUS_PER_NODE="4",
        MAIN_PORT="29555",
    )
    out = subprocess.run(
        ["bash", str(SLURM_RECIPE)], env=env, capture_output=True, text=True, check=True
    ).stdout
    argv = node_commands(out)[1]
    assert flag(argv, "--num_processes") == "8"
    assert flag(argv, "--main_process_port") == "29555"
    assert argv[-1] == "train_basic.py"


def test_slurm_recipe_runs_node_rank_per_task_and_requeues_on_usr1(tmp_path: Path) -> None:
    """Real (non-dry) path with fake srun/scancel/scontrol: each srun task substitutes its own
    SLURM_NODEID, and SIGUSR1 to the batch shell forwards USR1 to the step, then requeues."""
    bin_dir = fake_slurm_bin(tmp_path / "bin")
    env = slurm_env(bin_dir, GRACE_S="10")
    batch = subprocess.Popen(
        ["bash", str(SLURM_RECIPE), "--output-dir", "/shared/runs/x"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (bin_dir / "launch.args").exists():
            assert time.monotonic() < deadline, "the per-node launch never started"
            assert batch.poll() is None, batch.stdout.read()
            time.sleep(0.05)
        launch = (bin_dir / "launch.args").read_text().splitlines()
        assert flag(launch, "--machine_rank") == "1"  # this task's SLURM_NODEID
        assert launch[-3:] == ["train_ddpm.py", "--output-dir", "/shared/runs/x"]
        srun_args = (bin_dir / "srun.args").read_text()
        assert "--ntasks-per-node=1" in srun_args

        batch.send_signal(signal.SIGUSR1)
        output, _ = batch.communicate(timeout=20)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 0, output
    calls = (bin_dir / "calls.log").read_text().splitlines()
    assert calls == ["scancel --signal=USR1 4242", "scontrol requeue 4242"]


def test_torchrun_recipe_dry_run_uses_slurm_defaults(tmp_path: Path) -> None:
    env = slurm_env(fake_slurm_bin(tmp_path / "bin"), DRY_RUN="1", MASTER_PORT="29601")
    out = subprocess.run(
        ["bash", str(TORCHRUN_RECIPE), "--output-dir", "/shared/runs/a b"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    argv = shlex.split(out)
    assert argv[0] == "torchrun"
    assert flag(argv, "--nnodes") == "2"
    assert flag(argv, "--node_rank") == "1"
    assert flag(argv, "--master_addr") == "node01"
    assert flag(argv, "--master_port") == "29601"
    assert flag(argv, "--nproc_per_node") == "8"
    assert argv[-3:] == ["train_ddpm.py", "--output-dir", "/shared/runs/a b"]


def test_torchrun_recipe_explicit_variables_win(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "NNODES": "3",
        "NODE_RANK": "2",
        "MASTER_ADDR": "10.1.2.3",
        "NPROC_PER_NODE": "4",
        "TRAIN_SCRIPT": "train_basic.py",
    }
    for name in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST"):
        env.pop(name, None)
    argv = shlex.split(
        subprocess.run(
            ["bash", str(TORCHRUN_RECIPE)], env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    assert [flag(argv, f) for f in ("--nnodes", "--node_rank", "--master_addr")] == [
        "3",
        "2",
        "10.1.2.3",
    ]
    assert flag(argv, "--nproc_per_node") == "4"
    assert argv[-1] == "train_basic.py"


def test_imagenet_recipe_dry_run_is_the_dit_papers_setup_and_parses() -> None:
    env = {**os.environ, "DRY_RUN": "1", "OUTPUT_DIR": "/shared/runs/dit xl"}
    out = subprocess.run(
        ["bash", str(IMAGENET_RECIPE), "--save-on-each-node"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    argv = shlex.split(out)
    config_file = "accelerate_configs/1node_8gpu_bf16.yaml"
    assert argv[:5] == ["accelerate", "launch", "--config_file", config_file, "train_ddpm.py"]
    # Every flag exists and parses (the hub ids are resolved only when a run starts).
    cfg = train_ddpm.parse_config(train_ddpm.DDPMConfig, argv[5:])
    num_processes = load_config_from_file(str(REPO / config_file)).num_processes
    assert num_processes * cfg.batch_size == 256  # the paper's global batch
    assert (cfg.dataset, cfg.vae, cfg.preset, cfg.resolution, cfg.channels) == (
        "ILSVRC/imagenet-1k", "stabilityai/sd-vae-ft-ema", "dit-xl-2", 256, 3,
    )  # fmt: skip
    assert cfg.class_conditional and cfg.random_flip and cfg.use_ema
    assert (cfg.learning_rate, cfg.weight_decay, cfg.lr_schedule, cfg.lr_warmup_steps) == (
        1e-4, 0.0, "constant", 0,
    )  # fmt: skip
    assert (cfg.ema_max_decay, cfg.max_steps, cfg.mixed_precision) == (0.9999, 400_000, "bf16")
    assert cfg.max_grad_norm is None
    # Variables and appended flags reach the command.
    assert str(cfg.output_dir) == "/shared/runs/dit xl" and cfg.save_on_each_node


# --------------------------------------------------------------------------- loopback


def accelerate_bin() -> str:
    local = Path(sys.executable).with_name("accelerate")
    return str(local) if local.exists() else shutil.which("accelerate") or "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(output_dir: Path, *extra: str) -> list[str]:
    """A 6-step basic run through tests/scripts/faults.py (records each rank's pid)."""
    return [
        str(FAULTS), "train_basic.py", "--output-dir", str(output_dir), "--max-steps", "6",
        "--batch-size", "8", "--log-every", "3", "--checkpoint-every", "3",
        "--sample-every", "0", "--num-sample-images", "8", "--sample-steps", "2",
        "--report-to", "none", *extra,
    ]  # fmt: skip


def machine_command(acc: str, machine_rank: int, port: str, args: list[str]) -> list[str]:
    """One of two loopback "machines", one process each, rendezvous on 127.0.0.1:port."""
    return [
        acc, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(machine_rank),
        "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port,
        "--mixed_precision", "no", "--dynamo_backend", "no", *args,
    ]  # fmt: skip


def launch_env(tmp_path: Path, cache: Path, faults: str = "") -> dict[str, str]:
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # no user default accelerate config
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "DDP_DIFFUSION_CACHE": str(cache),
        "FAULTS": faults,
        "FAULT_PID_DIR": str(tmp_path / "pids"),
    }
    return env


def run_machines(
    tmp_path: Path, args: list[list[str]], caches: list[Path], faults: str = ""
) -> list[tuple[int, str]]:
    """Both "machines" at once: (exit code, log) of each. The rendezvous port is bound by the
    main node itself: if another process took it in between, the launch is retried."""
    acc = accelerate_bin()
    for _ in range(3):
        port = str(free_port())
        procs = [
            subprocess.Popen(
                machine_command(acc, rank, port, args[rank]),
                cwd=REPO,
                env=launch_env(tmp_path, caches[rank], faults),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            for rank in (0, 1)
        ]
        try:
            results = [(proc.wait(timeout=240), proc.stdout.read()) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        if not any("address already in use" in log.lower() for _, log in results):
            return results
    raise AssertionError("no free rendezvous port in 3 tries")


def worker_pid(tmp_path: Path, rank: int) -> int:
    return int((tmp_path / "pids" / f"worker-{rank}.pid").read_text())


@pytest.mark.slow
def test_two_machines_on_loopback_train_like_one_machine(tmp_path: Path) -> None:
    """Two launchers (--num_machines 2, one process each) vs one launcher with two processes:
    same world size, same weights, and only the global main process writes the run dir."""
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"
    node_cache = tmp_path / "node_cache"  # shared by both "nodes": both local mains build it
    single = subprocess.Popen(
        [accelerate_bin(), "launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
         *train_args(one_node)],
        cwd=REPO,
        env=launch_env(tmp_path / "single", tmp_path / "single_cache"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        (code0, log0), (code1, log1) = run_machines(
            tmp_path, [train_args(two_nodes), train_args(two_nodes)], [node_cache, node_cache]
        )
        single_log, _ = single.communicate(timeout=240)
    finally:
        if single.poll() is None:
            single.kill()
    assert code0 == 0 and code1 == 0, f"{log0[-3000:]}\n{log1[-3000:]}"
    assert single.returncode == 0, single_log[-3000:]

    # World size 2 really happened, in both setups.
    for log in (log0, single_log):
        assert "batch: per device 8 x 2 processes" in log, log[-3000:]
    # One writer: the run directory's lock was taken by rank 0's process (on node 0), and
    # one set of run files was written, once.
    holder = json.loads((two_nodes / ".lock").read_text())
    assert holder["pid"] == worker_pid(tmp_path, 0) != worker_pid(tmp_path, 1)
    checkpoints = two_nodes / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    state = json.loads((checkpoints / "checkpoint-6" / "state.json").read_text())
    assert state["num_processes"] == 2
    steps = [json.loads(line)["step"] for line in (two_nodes / "metrics.jsonl").open()]
    assert steps == [3, 6]
    assert (two_nodes / "config.yaml").is_file() and (two_nodes / "model").is_dir()

    # Both local mains wrote the shared data cache (unique temp + os.replace): one intact
    # file, no leftover temporaries.
    assert [p.name.startswith("images-") for p in node_cache.iterdir()] == [True]

    # Same seed, same world size: the weights and optimizer state are bit-identical.
    for stem in ("model", "optimizer"):
        a = load_file(checkpoints / "checkpoint-6" / f"{stem}.safetensors")
        b = load_file(one_node / "checkpoints" / "checkpoint-6" / f"{stem}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{stem}.{key}"


@pytest.fixture(scope="module")
def node_local_runs(tmp_path_factory) -> list[Path]:
    """--save-on-each-node: each "machine" has its own run directory."""
    tmp_path = tmp_path_factory.mktemp("node_local")
    dirs = [tmp_path / f"node{rank}_local" for rank in (0, 1)]
    caches = [tmp_path / f"cache{rank}" for rank in (0, 1)]
    results = run_machines(tmp_path, [train_args(d, "--save-on-each-node") for d in dirs], caches)
    for code, log in results:
        assert code == 0, log[-3000:]
    return dirs


@pytest.mark.slow
def test_node_local_run_directories_with_save_on_each_node(node_local_runs) -> None:
    for folder in node_local_runs:
        checkpoints = folder / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]
        assert [json.loads(line)["step"] for line in (folder / "metrics.jsonl").open()] == [3, 6]
        assert (folder / "model" / "config.json").is_file() and (folder / "config.yaml").is_file()
    a, b = (
        load_file(d / "checkpoints" / "checkpoint-6" / "model.safetensors") for d in node_local_runs
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_node_local_runs_resume_after_a_kill_and_refuse_a_node_without_its_checkpoint(
    node_local_runs, tmp_path: Path
) -> None:
    dirs = [tmp_path / f"node{rank}_local" for rank in (0, 1)]
    caches = [tmp_path / f"cache{rank}" for rank in (0, 1)]
    args = [train_args(d, "--save-on-each-node") for d in dirs]
    # SIGKILL of every process of both "machines" in step 5 (after checkpoint-3).
    killed = run_machines(tmp_path, args, caches, faults="kill@4")
    assert all(code != 0 for code, _ in killed)
    for folder in dirs:
        assert [p.name for p in (folder / "checkpoints").iterdir()] == ["checkpoint-3"]
    # Rerun: each node resumes from its own copy and ends like the uninterrupted run.
    results = run_machines(tmp_path, args, caches)
    assert all(code == 0 for code, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    assert "resumed from" in results[0][1]  # node 0 holds the main process (INFO lines)
    reference = load_file(node_local_runs[0] / "checkpoints" / "checkpoint-6" / "model.safetensors")
    for folder in dirs:
        resumed = load_file(folder / "checkpoints" / "checkpoint-6" / "model.safetensors")
        assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    # Node 1 lost its checkpoints: every rank stops with the same clear error, nobody hangs.
    shutil.rmtree(dirs[1] / "checkpoints")
    longer = [[*a, "--max-steps", "9"] for a in args]
    for code, log in run_machines(tmp_path, longer, caches):
        assert code != 0, log[-3000:]
        assert "the ranks found different checkpoints to resume from (steps by rank: [6, -1]" in log
