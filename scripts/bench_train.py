"""Training throughput: sovtune's default recipe vs a plain TRL SFTTrainer script (TRL's defaults, then TRL's packing).

One Llama-architecture model built from a config (about 21M parameters, random weights), one chat dataset whose
prompt and answer lengths are drawn from log-normal distributions (long-tailed, like real SFT data; prompts masked).
Each run trains one epoch over the same tokenised examples in its own process, one after the other, and reports
effective (non-pad) and supervised tokens per second of wall-clock and of CPU time, the share of computed token
slots that were padding, and the process's peak memory (RSS on the CPU, CUDA max allocated on a GPU).

    python scripts/bench_train.py                   # about 5 minutes on 2 CPU cores, one torch thread per run
    python scripts/bench_train.py --rounds 3        # runs interleaved three times, medians reported
    python scripts/bench_train.py --runs sovtune,sovtune-rows,sovtune-padded,trl-packed   # sovtune's batchings
    python scripts/bench_train.py --shape quickstart --lengths short --set train.batch_size=16 --set data.max_length=128
    python scripts/bench_train.py --shape llama-8b --quantization 4bit   # the GPU half: 8B-shaped QLoRA

Settings held equal across runs (not what is being compared): the model, the tokenised examples, LoRA r=16 on every
linear layer, activation checkpointing (on by default in both), fp32 on the CPU. TRL's own default `bf16=True`
would autocast to bf16 even on the CPU, so TRL runs get `bf16=False` there. Speeds are only comparable as ratios
between runs of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
ROLE_WORDS = ["user", "assistant", "system"]
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHAPES = {
    # Llama-shaped, 21.0M parameters: big enough that the decoder layers, not the embeddings, dominate the compute.
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
    # The shipped quickstart base model's shape (5M parameters), with short examples like its text-to-SQL data.
    "quickstart": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    # Llama-3.1-8B's shape (8.0B parameters), for GPUs: built in bf16 (16 GB on disk).
    "llama-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}
MODEL_SHAPE = SHAPES["small"]
MAX_LENGTH = 1024  # sovtune's data.max_length default and TRL's max_length default
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")  # sovtune's adapter defaults
RUNS = {
    "sovtune": "sovtune default recipe (sovtune.training.train)",
    "trl-default": "plain TRL SFTTrainer, TRL defaults",
    "trl-packed": "plain TRL SFTTrainer, packing=True (bfd, padding-free)",
    "sovtune-rows": "sovtune, data.packing: true (whole batch in one row)",
    "sovtune-padded": "sovtune, data.packing: false (padded, grouped by length)",
}
SOVTUNE_VARIANTS = {"sovtune": [], "sovtune-rows": ["data.packing=true"], "sovtune-padded": ["data.packing=false"]}
# Log-normal (median, sigma) of prompt and answer lengths in tokens: long-tailed like general SFT data, or short and
# narrow like the quickstart's text-to-SQL pairs.
LENGTHS = {"long-tailed": ((40, 1.0), (60, 1.1)), "short": ((14, 0.3), (18, 0.35))}


# ---------------------------------------------------------------------------------------------------------------
# Assets: tokenizer, model, data, recipe (shared with bench_memory.py)


def build_tokenizer(folder: Path, vocab_size: int = MODEL_SHAPE["vocab_size"]) -> Any:
    """Word-level: one token per word, so the generated lengths are token lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ROLE_WORDS + [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS) - len(ROLE_WORDS))]
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=MAX_LENGTH,
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(folder: Path, shape: dict[str, Any] | None = None, seed: int = 0) -> int:
    """A randomly initialised Llama saved like a hub checkpoint; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = shape or MODEL_SHAPE
    tokenizer = build_tokenizer(folder, shape["vocab_size"])
    torch.manual_seed(seed)
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # Billions of parameters are built in bf16 (half the host memory); small models in fp32.
    dtype = torch.bfloat16 if 12 * config.num_hidden_layers * config.hidden_size**2 > 1e9 else torch.float32
    model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def sample_rows(
    count: int, seed: int, lengths: str = "long-tailed", vocab_size: int = MODEL_SHAPE["vocab_size"]
) -> list[dict[str, Any]]:
    """Chats with log-normal prompt and answer lengths (see LENGTHS), one word per token."""
    rng = random.Random(seed)
    vocabulary = vocab_size - len(SPECIAL_TOKENS) - len(ROLE_WORDS)
    budget = MAX_LENGTH - 12  # template tokens around the two turns
    (prompt_median, prompt_sigma), (answer_median, answer_sigma) = LENGTHS[lengths]
    rows = []
    for _ in range(count):
        prompt = min(budget // 2, max(4, round(rng.lognormvariate(math.log(prompt_median), prompt_sigma))))
        answer = min(budget - prompt, max(2, round(rng.lognormvariate(math.log(answer_median), answer_sigma))))

        def words(n: int) -> str:
            return " ".join(f"w{rng.randrange(vocabulary)}" for _ in range(n))

        rows.append(
            {"messages": [{"role": "user", "content": words(prompt)}, {"role": "assistant", "content": words(answer)}]}
        )
    return rows


def build_assets(
    folder: Path,
    examples: int,
    seed: int,
    shape: str = "small",
    quantization: str = "none",
    lengths: str = "long-tailed",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    parameters = build_model(folder / "model", SHAPES[shape], seed=seed)
    data_file = folder / "train.jsonl"
    rows = sample_rows(examples, seed, lengths, SHAPES[shape]["vocab_size"])
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    # sovtune's default recipe: only what must be named (model, data, where to write) is set.
    recipe = folder / "bench.yaml"
    quantised = "quantization:\n  mode: 4bit\n" if quantization == "4bit" else ""
    recipe.write_text(
        f"name: bench\nmodel:\n  name_or_path: {folder / 'model'}\ndata:\n  train: {data_file}\n{quantised}"
        f"output:\n  dir: {folder / 'runs' / 'sovtune'}\n",
        encoding="utf-8",
    )
    return {
        "parameters": parameters,
        "recipe": str(recipe),
        "model": str(folder / "model"),
        "quantization": quantization,
        "overrides": list(overrides or []),
    }


# ---------------------------------------------------------------------------------------------------------------
# One run (in its own process)


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def meter(pad_id: int, warmup_steps: int) -> tuple[Any, dict[str, Any]]:
    """A callback counting the token slots each forward computes; timing starts after `warmup_steps` steps."""
    import torch
    from transformers import TrainerCallback

    counts: dict[str, Any] = {"slots": 0, "pad": 0, "supervised": 0, "examples": 0}

    def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        input_ids, labels = kwargs["input_ids"], kwargs["labels"]
        counts["slots"] += input_ids.numel()
        counts["pad"] += int((input_ids == pad_id).sum())
        counts["supervised"] += int((labels[..., 1:] != -100).sum())
        position_ids = kwargs.get("position_ids")
        counts["examples"] += int((position_ids == 0).sum()) if position_ids is not None else input_ids.shape[0]

    class Meter(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            model.register_forward_pre_hook(count, with_kwargs=True)
            counts["micro_batch"] = args.per_device_train_batch_size  # what the trainer runs, after sovtune's plan
            counts["accumulation"] = args.gradient_accumulation_steps

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == warmup_steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                counts["start"] = {
                    **{k: counts[k] for k in ("slots", "pad", "supervised", "examples")},
                    "wall": time.perf_counter(),
                    "cpu": time.process_time(),
                    "step": state.global_step,
                }

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            counts["end"] = {
                **{k: counts[k] for k in ("slots", "pad", "supervised", "examples")},
                "wall": time.perf_counter(),
                "cpu": time.process_time(),
                "step": state.global_step,
            }

    return Meter(), counts


def metered_trainer(callback: Any) -> type:
    """SFTTrainer with the meter attached; installed as `trl.SFTTrainer` so sovtune's train path picks it up too."""
    import trl

    base = trl.SFTTrainer

    class MeteredSFTTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, callbacks: list[Any] | None = None, **kwargs: Any) -> None:
            super().__init__(*args, callbacks=[*(callbacks or []), callback], **kwargs)

    trl.SFTTrainer = MeteredSFTTrainer
    return MeteredSFTTrainer


def run_sovtune(assets: dict[str, Any], callback: Any, overrides: list[str]) -> None:
    from sovtune.config import load_recipe
    from sovtune.training import train

    metered_trainer(callback)
    recipe = load_recipe(assets["recipe"], overrides)
    train(recipe, overwrite=True)


def run_trl(assets: dict[str, Any], callback: Any, packed: bool, packed_batch: int) -> None:
    """A plain TRL script: the model, a LoRA config and the already tokenised examples, TRL's defaults otherwise."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from sovtune import model as models
    from sovtune.config import load_recipe
    from sovtune.inputs import prepare_recipe_data as prepare_data

    trainer_class = metered_trainer(callback)
    recipe = load_recipe(assets["recipe"], assets["overrides"])
    tokenizer = models.load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)  # the very examples sovtune trains on (same split, same masks)
    dataset = Dataset.from_dict(
        {"input_ids": [i.input_ids for i in data.train], "labels": [i.labels for i in data.train]}
    )
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    loading: dict[str, Any] = {"dtype": dtype}
    if assets["quantization"] == "4bit":  # the usual QLoRA script
        from transformers import BitsAndBytesConfig

        loading["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        if cuda:
            loading["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(assets["model"], **loading)
    settings: dict[str, Any] = {
        "output_dir": str(Path(assets["recipe"]).parent / "runs" / "trl"),
        "report_to": "none",
        "save_strategy": "no",
        "num_train_epochs": 1,
    }
    if not cuda:
        settings["bf16"] = False  # TRL's default autocasts to bf16 even on the CPU; all runs compute in fp32 here
    if packed:
        settings.update(packing=True, per_device_train_batch_size=packed_batch)
    args = SFTConfig(**settings)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
    )
    trainer.train()


def child(name: str, assets_file: Path, threads: int, packed_batch: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    assets = json.loads(assets_file.read_text(encoding="utf-8"))
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(assets["model"]).pad_token_id
    callback, counts = meter(pad_id, warmup_steps=1)
    if name in SOVTUNE_VARIANTS:
        run_sovtune(assets, callback, assets["overrides"] + SOVTUNE_VARIANTS[name])
    else:
        run_trl(assets, callback, packed=name == "trl-packed", packed_batch=packed_batch)
    if "start" not in counts:
        raise SystemExit(f"{name}: fewer than two optimizer steps; generate more examples (--examples)")
    start, end = counts["start"], counts["end"]
    delta = {k: end[k] - start[k] for k in ("slots", "pad", "supervised", "examples", "wall", "cpu", "step")}
    result = {
        "run": name,
        "micro_batch": counts["micro_batch"],
        "accumulation": counts["accumulation"],
        "steps_timed": delta["step"],
        "examples_timed": delta["examples"],
        "tokens_per_s": (delta["slots"] - delta["pad"]) / delta["wall"],
        "supervised_per_s": delta["supervised"] / delta["wall"],
        "tokens_per_cpu_s": (delta["slots"] - delta["pad"]) / delta["cpu"],
        "padding_share": counts["pad"] / counts["slots"],
        "peak_memory_mib": peak_memory_mib(),
        "wall_s": delta["wall"],
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The whole benchmark


def run_child(name: str, assets_file: Path, threads: int, packed_batch: int) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--assets",
        str(assets_file),
        "--threads",
        str(threads),
        "--trl-packed-batch",
        str(packed_batch),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise SystemExit(f"run {name} failed (exit {done.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(results[0])
    for key in ("tokens_per_s", "supervised_per_s", "tokens_per_cpu_s", "peak_memory_mib", "wall_s", "padding_share"):
        merged[key] = statistics.median(r[key] for r in results)
    return merged


def describe_machine() -> str:
    import torch
    import transformers
    import trl

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return (
        f"{device}; {platform.platform()}; python {platform.python_version()}; torch {torch.__version__}; "
        f"transformers {transformers.__version__}; trl {trl.__version__}"
    )


def data_summary(assets: dict[str, Any]) -> str:
    from sovtune import model as models
    from sovtune.config import load_recipe
    from sovtune.inputs import prepare_recipe_data as prepare_data

    recipe = load_recipe(assets["recipe"])
    data = prepare_data(recipe, models.load_tokenizer(recipe))
    lengths = sorted(len(item.input_ids) for item in data.train)
    supervised = sum(item.supervised_tokens for item in data.train) / sum(lengths)

    def pct(p: int) -> int:
        return lengths[min(len(lengths) - 1, round(p / 100 * (len(lengths) - 1)))]

    return (
        f"{len(lengths)} training examples, tokens per example p50 {pct(50)} / p90 {pct(90)} / p99 {pct(99)} / "
        f"max {lengths[-1]} (mean {statistics.mean(lengths):.0f}), supervised share {supervised:.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=96, help="chat rows generated (sovtune holds out 10%%)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; medians are reported")
    # One thread: on a shared machine, a second thread per run makes every parallel region wait for whichever
    # thread the other jobs have descheduled, and the timings measure the neighbours more than the training.
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (0 = torch's default)")
    parser.add_argument("--trl-packed-batch", type=int, default=1, help="packed rows per micro-batch for trl-packed")
    parser.add_argument(
        "--runs", default="sovtune,trl-default,trl-packed", help=f"comma-separated, from {', '.join(RUNS)}"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="recipe override for the sovtune runs, e.g. --set train.batch_size=16 (repeatable)",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="model shape (llama-8b: for GPUs)")
    parser.add_argument("--lengths", choices=sorted(LENGTHS), default="long-tailed", help="example length distribution")
    parser.add_argument("--quantization", choices=["none", "4bit"], default="none", help="4bit: QLoRA in every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the model and data (default: temp)")
    parser.add_argument("--child", choices=sorted(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--assets", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)}")
    if args.child:
        child(args.child, args.assets, args.threads, args.trl_packed_batch)
        return

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sovtune-bench-") as tmp:
        folder = args.workdir or Path(tmp)
        assets = build_assets(
            folder, args.examples, args.seed, args.shape, args.quantization, args.lengths, args.overrides
        )
        assets_file = folder / "assets.json"
        assets_file.write_text(json.dumps(assets), encoding="utf-8")
        print(f"machine: {describe_machine()}")
        quantised = ", base quantised to NF4 (QLoRA)" if args.quantization == "4bit" else ""
        print(
            f"model: Llama, {assets['parameters'] / 1e6:.1f}M parameters ({SHAPES[args.shape]}), random weights, "
            f"LoRA r=16 all-linear{quantised}; {args.threads or 'default'} torch thread(s) per run"
        )
        print(f"data: {data_summary(assets)}")
        if args.overrides:
            print(f"sovtune recipe overrides: {' '.join(args.overrides)} (TRL runs keep TRL's defaults)")
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            for name in names:
                result = run_child(name, assets_file, args.threads, args.trl_packed_batch)
                results[name].append(result)
                print(
                    f"  round {round_index + 1} {name}: {result['tokens_per_s']:.1f} tokens/s "
                    f"({result['wall_s']:.0f} s timed)",
                    flush=True,
                )
    medians = {name: median_result(found) for name, found in results.items()}
    print_table(medians, args)
    print(f"total benchmark time {time.time() - started:.0f} s")
    ours = medians.get("sovtune")
    if ours is None:
        return
    print(f"sovtune padding share: {ours['padding_share']:.1%} (target <= 2%)")
    for name in ("sovtune-rows", "sovtune-padded", "trl-packed"):
        if name in medians:
            other = medians[name]
            target = "; target >= 1.0x" if name == "trl-packed" else ""
            print(
                f"sovtune/{name} effective tokens/s: {ours['tokens_per_s'] / other['tokens_per_s']:.2f}x "
                f"(per CPU-second: {ours['tokens_per_cpu_s'] / other['tokens_per_cpu_s']:.2f}x{target})"
            )
    if "trl-default" in medians:
        default = medians["trl-default"]
        print(
            f"sovtune/trl-default per CPU-second: {ours['tokens_per_cpu_s'] / default['tokens_per_cpu_s']:.2f}x "
            "(target >= 1.8x)"
        )
        print(f"sovtune/trl-default effective tokens/s: {ours['tokens_per_s'] / default['tokens_per_s']:.2f}x")


def print_table(medians: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    import torch

    memory = "peak CUDA MiB" if torch.cuda.is_available() else "peak RSS MiB"
    header = [
        "run",
        "settings",
        "micro-batch x accum",
        "steps timed",
        "tokens/s",
        "supervised/s",
        "tokens/CPU-s",
        "padding",
        memory,
    ]
    rows = []
    for name, result in medians.items():
        settings = RUNS[name] + (f", {args.trl_packed_batch} x {MAX_LENGTH}-token rows" if name == "trl-packed" else "")
        rows.append(
            [
                name,
                settings,
                f"{result['micro_batch']} x {result['accumulation']}",
                str(result["steps_timed"]),
                f"{result['tokens_per_s']:.1f}",
                f"{result['supervised_per_s']:.1f}",
                f"{result['tokens_per_cpu_s']:.1f}",
                f"{result['padding_share']:.1%}",
                f"{result['peak_memory_mib']:.0f}",
            ]
        )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"(medians of {args.rounds} round(s); timing starts after each run's first optimizer step; "
        "tokens = non-pad tokens computed; padding = pad share of all computed token slots)"
    )


if __name__ == "__main__":
    main()
