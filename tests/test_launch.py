"""Shipped accelerate configs parse with accelerate's own classes, `sovtune launch` builds the right command for each
strategy and refuses what FSDP/ZeRO-3 cannot shard, and the Slurm example produces a valid multi-node launch."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import invoke
from sovtune.config import load_recipe
from sovtune.launch import LaunchError, build_command, check_strategy

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
DEEPSPEED_JSONS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


def _launch_args(argv: list[str]):
    """accelerate's own parsing and validation of `accelerate launch ARGV` (config file merged into the args)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def _plugin_env(args) -> dict[str, str]:
    from accelerate.utils.launch import prepare_multi_gpu_env

    return prepare_multi_gpu_env(args)


def test_every_strategy_has_a_config_and_the_expected_files_ship():
    names = {path.name for path in ACCELERATE_CONFIGS}
    assert {"ddp.yaml", "fsdp.yaml", "fsdp-qlora.yaml", "deepspeed-zero3.yaml", "multinode-template.yaml"} <= names
    assert (ROOT / "scripts" / "slurm_multinode.sh").is_file()


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_config_parses_with_accelerate(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # rejects unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.compute_environment.value == "LOCAL_MACHINE"
    # accelerate copies nested keys onto launch arguments without checking them: a typo would be silently ignored.
    from accelerate.commands.launch import launch_command_parser

    known = vars(launch_command_parser().parse_args(["x.py"]))
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section):
            assert key in known, f"{path.name}: {section}.{key} is not an accelerate launch setting"
    header = path.read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("# "), f"{path.name}: start with a comment saying what it is for"


@pytest.mark.parametrize("name", ["fsdp.yaml", "fsdp-qlora.yaml"])
def test_fsdp_configs_build_an_fsdp2_plugin(name: str, monkeypatch: pytest.MonkeyPatch):
    """The environment accelerate hands each rank must produce a valid FSDP2 plugin (FSDP2 where available)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    args, _ = _launch_args(["--config_file", str(ROOT / "configs/accelerate" / name), "--num_processes", "2", "x.py"])
    assert args.use_fsdp and not args.multi_gpu
    env = _plugin_env(args)
    for key in [k for k in os.environ if k.startswith("FSDP_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.activation_checkpointing is False  # sovtune checkpoints through the trainer; not both
    assert plugin.cpu_ram_efficient_loading is True
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)


def test_ddp_config_launches_one_process_per_gpu():
    args, defaults = _launch_args(
        ["--config_file", str(ROOT / "configs/accelerate/ddp.yaml"), "--num_processes", "4", "x.py"]
    )
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert args.num_processes == 4 and args.num_machines == 1
    env = _plugin_env(args)
    assert args.nproc_per_node == "4"
    assert int(args.master_port) > 0  # main_process_port: 0 picks a free port
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the trainer sets bf16 from the recipe


@pytest.mark.parametrize("name", ["deepspeed-zero3.yaml", "deepspeed-zero2.yaml"])
def test_deepspeed_configs_and_json(name: str):
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    args, defaults = _launch_args(
        ["--config_file", str(ROOT / "configs/accelerate" / name), "--num_processes", "2", "x.py"]
    )
    assert args.use_deepspeed
    json_path = ROOT / defaults.deepspeed_config["deepspeed_config_file"]
    assert json_path.is_file()
    ds = HfDeepSpeedConfig(str(json_path))
    assert ds.is_zero3() == (name == "deepspeed-zero3.yaml")
    # Every "auto" must be one transformers fills from the trainer arguments (which come from the recipe).
    fillable = {
        "train_micro_batch_size_per_gpu",
        "train_batch_size",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "bf16.enabled",
        "fp16.enabled",
        "zero_optimization.reduce_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size",
        "zero_optimization.stage3_param_persistence_threshold",
    }
    autos = {key for key in _flatten(json.loads(json_path.read_text())) if ds.get_value(key) == "auto"}
    assert autos and autos <= fillable, autos - fillable


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys += _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


# --- sovtune launch ------------------------------------------------------------------------------------------


@pytest.fixture
def recipe_file(make_recipe):
    def make(model_dtype: str | None = None, **quant):
        sections = {}
        if quant:
            sections["quantization"] = quant
        if model_dtype:
            sections["model"] = {"dtype": model_dtype}  # merged over the tiny model's section
        return make_recipe(**sections)

    return make


def test_ddp_command(recipe_file, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    path = recipe_file()
    command = build_command(path, load_recipe(path), 4, "ddp", ["train.max_steps=2"], resume=True)
    assert command.shown == (
        f"accelerate launch --config_file {ROOT}/configs/accelerate/ddp.yaml --num_processes 4 "
        f"-m sovtune train {path} --set train.max_steps=2 --resume"
    )
    assert command.argv[:4] == [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    assert command.argv[4:] == shlex.split(command.shown)[2:]
    # accelerate itself accepts what was built
    args, _ = _launch_args(command.argv[4:])
    assert args.multi_gpu and args.num_processes == 4 and args.module and args.training_script == "sovtune"
    assert args.training_script_args == ["train", str(path), "--set", "train.max_steps=2", "--resume"]


def test_one_gpu_ddp_is_plain_training(recipe_file):
    path = recipe_file()
    command = build_command(path, load_recipe(path), 1, "ddp")
    assert command.shown == f"sovtune train {path}"
    assert command.argv == [sys.executable, "-m", "sovtune", "train", str(path)]


def test_fsdp_picks_the_qlora_config_for_4bit_float_storage(recipe_file):
    path = recipe_file(model_dtype="bfloat16", mode="4bit", storage_dtype="bfloat16")
    command = build_command(path, load_recipe(path), 2, "fsdp")
    assert "/configs/accelerate/fsdp-qlora.yaml" in command.shown
    plain = recipe_file(model_dtype="bfloat16")
    assert "/configs/accelerate/fsdp.yaml" in build_command(plain, load_recipe(plain), 2, "fsdp").shown


@pytest.mark.parametrize(
    ("strategy", "quant", "model_dtype", "message"),
    [
        (
            "fsdp",
            {"mode": "4bit"},
            None,
            "--strategy fsdp with 4-bit weights: FSDP/ZeRO-3 shard only float tensors, but "
            "quantization.storage_dtype is uint8; add --set quantization.storage_dtype=bfloat16 "
            "(and model.dtype: bfloat16), or use --strategy ddp",
        ),
        (
            "fsdp",
            {"mode": "4bit", "storage_dtype": "bfloat16"},
            None,
            "--strategy fsdp with 4-bit weights: model.dtype (auto) must equal quantization.storage_dtype "
            "(bfloat16) so every sharded tensor has one dtype; set model.dtype: bfloat16",
        ),
        (
            "fsdp",
            {"mode": "8bit"},
            None,
            "--strategy fsdp: 8-bit (LLM.int8) weights cannot be sharded; use quantization.mode=4bit with "
            "quantization.storage_dtype=bfloat16, or --strategy ddp",
        ),
        ("ring", {}, None, "--strategy 'ring': choose one of ddp, fsdp, deepspeed, deepspeed-zero2"),
    ],
)
def test_strategy_must_fit_the_quantisation(recipe_file, strategy, quant, model_dtype, message):
    path = recipe_file(model_dtype=model_dtype, **quant)
    with pytest.raises(LaunchError) as caught:
        build_command(path, load_recipe(path), 2, strategy)
    assert str(caught.value) == message


def test_ddp_accepts_every_quantisation(recipe_file):
    for quant in ({}, {"mode": "4bit"}, {"mode": "8bit"}):
        path = recipe_file(**quant)
        check_strategy(load_recipe(path), "ddp")


def test_deepspeed_needs_the_package_or_uses_the_json(recipe_file):
    import importlib.util

    path = recipe_file()
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(LaunchError, match=r"deepspeed package is not installed; pip install -e '\.\[deepspeed\]'"):
            build_command(path, load_recipe(path), 2, "deepspeed")
    else:
        command = build_command(path, load_recipe(path), 2, "deepspeed")
        assert f"--deepspeed_config_file {ROOT}/configs/deepspeed/zero3.json" in command.shown


def test_recipes_that_document_a_launch_are_consistent_with_it(monkeypatch: pytest.MonkeyPatch):
    """Every `sovtune launch ... --strategy X` written in a shipped recipe must pass sovtune's own checks."""
    import importlib.util

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checked = 0
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        for strategy in re.findall(
            r"sovtune launch \S+ --gpus \d+ --strategy ([\w-]+)", path.read_text(encoding="utf-8")
        ):
            if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
                continue
            check_strategy(load_recipe(path), strategy)
            checked += 1
    assert checked >= 1


def test_cli_dry_run_prints_the_command(recipe_file, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    path = recipe_file()
    result = invoke("launch", str(path), "--gpus", "2", "--dry-run", "--set", "train.seed=3")
    assert result.exit_code == 0, result.output
    assert result.output.replace("\n", "") == (
        f"accelerate launch --config_file {ROOT}/configs/accelerate/ddp.yaml --num_processes 2 "
        f"-m sovtune train {path} --set train.seed=3"
    )


def test_cli_refusal_is_one_line_exit_2(recipe_file):
    path = recipe_file(mode="8bit")
    result = invoke("launch", str(path), "--gpus", "2", "--strategy", "fsdp", "--dry-run")
    assert result.exit_code == 2
    assert "error: --strategy fsdp: 8-bit (LLM.int8) weights cannot be sharded" in result.output
    assert "Traceback" not in result.output


def test_a_failing_accelerate_launch_is_a_clear_error(recipe_file, tmp_path: Path):
    """A launch that dies (here: a config accelerate rejects) ends as one sovtune error line, exit 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: MULTI_GPU\nnot_a_setting: 1\n", encoding="utf-8")
    path = recipe_file()
    result = invoke("launch", str(path), "--gpus", "2", "--config-file", str(bad))
    assert result.exit_code == 2
    assert "error: accelerate launch exited with code 1: a process failed and the others were stopped" in result.output


def test_slurm_script_builds_a_valid_multinode_launch(tmp_path: Path):
    script = ROOT / "scripts" / "slurm_multinode.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu-a01",
        "GPUS_PER_NODE": "8",
    }
    out = subprocess.run(
        ["bash", str(script), "recipes/llama-3.1-8b-multi-gpu.yaml", "ddp", "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    argv = shlex.split(out)
    assert argv[:2] == ["accelerate", "launch"]
    args, defaults = _launch_args(
        [a.replace("configs/", f"{ROOT}/configs/", 1) if a.startswith("configs/") else a for a in argv[2:]]
    )
    assert (args.num_machines, args.num_processes, int(args.machine_rank)) == (2, 16, 1)
    assert args.main_process_ip == "gpu-a01" and args.multi_gpu
    assert args.training_script_args == ["train", "recipes/llama-3.1-8b-multi-gpu.yaml", "--resume"]
    _plugin_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
