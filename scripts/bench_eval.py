"""Examples/s of sovtune's loss and generation evaluation, batched vs one at a time, on a model built from a config.

Runs the same code paths as `sovtune eval` (length-sorted batches, left-padded generation with the KV cache, base
and tuned on one model via peft's disable_adapter) on random weights, so it needs no download:

    python scripts/bench_eval.py                        # CPU-sized defaults
    python scripts/bench_eval.py --hidden 1024 --layers 8 --examples 256 --batch-size 32   # on a GPU
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from sovtune import evaluation as ev
from sovtune.data import IGNORE_INDEX, Tokenized


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128, help="Hidden size of the Llama config.")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--examples", type=int, default=64, help="Eval examples.")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(16, 96), metavar=("MIN", "MAX"))
    parser.add_argument("--completion-tokens", type=int, default=24, help="Supervised tokens per example (loss eval).")
    parser.add_argument("--new-tokens", type=int, default=24, help="Tokens generated per example.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_model(args: argparse.Namespace) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.prompt_tokens[1] + max(args.completion_tokens, args.new_tokens) + 8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    base = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def synthetic_data(args: argparse.Namespace) -> tuple[list[Tokenized], list[list[int]]]:
    rng = random.Random(args.seed)
    sequences, prompts = [], []
    for index in range(args.examples):
        prompt = [1] + [rng.randrange(3, args.vocab) for _ in range(rng.randint(*args.prompt_tokens) - 1)]
        completion = [rng.randrange(3, args.vocab) for _ in range(args.completion_tokens)]
        sequences.append(
            Tokenized(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, f"synthetic#{index}")
        )
        prompts.append(prompt)
    return sequences, prompts


def timed(step: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    from transformers import GenerationConfig

    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    device = ev.model_device(model)
    sequences, prompts = synthetic_data(args)
    # A fixed number of new tokens (no EOS) so batched and one-by-one runs do the same work.
    config = GenerationConfig(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, use_cache=True
    )

    def loss_eval(batch_size: int) -> Callable[[], Any]:
        return lambda: [
            ev.teacher_forced_sums(model, sequences, batch_size, context) for _, context in ev.both_models(model)
        ]

    def generation_eval(batch_size: int) -> Callable[[], Any]:
        return lambda: ev.generate_ids_both(model, prompts, config, batch_size)

    ev.teacher_forced_sums(model, sequences[:2], 2)  # warm-up: kernels, allocator
    rows = []
    for phase, make in (("loss (teacher-forced)", loss_eval), ("generation (greedy)", generation_eval)):
        single = timed(make(1), device)
        batched = timed(make(args.batch_size), device)
        rows.append((phase, "one at a time", single))
        rows.append((phase, f"batched x{args.batch_size}", batched, single / batched))

    params = sum(p.numel() for p in model.base_model.model.parameters())
    table = Table(
        title=f"eval throughput: {params / 1e6:.1f}M-param Llama ({args.layers} layers, hidden {args.hidden}) + LoRA, "
        f"{args.examples} examples, base and tuned each, on {device.type}",
        title_justify="left",
    )
    for column in ("phase", "mode", "seconds", "examples/s (base+tuned)", "speed-up"):
        table.add_column(column, justify="left" if column in ("phase", "mode") else "right")
    for phase, mode, seconds, *speedup in rows:
        table.add_row(
            phase, mode, f"{seconds:.2f}", f"{args.examples / seconds:.1f}", f"{speedup[0]:.1f}x" if speedup else ""
        )
    console = Console(width=max(Console().width, 110))
    console.print(table)
    lengths = [len(sequence.input_ids) for sequence in sequences]
    arrival = [
        list(range(start, min(start + args.batch_size, len(lengths))))
        for start in range(0, len(lengths), args.batch_size)
    ]
    console.print(
        f"padding share of loss batches: {padding_share(lengths, ev.length_batches(lengths, args.batch_size)):.1%} "
        f"length-sorted (what sovtune does) vs {padding_share(lengths, arrival):.1%} in arrival order"
    )


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - sum(lengths) / padded


if __name__ == "__main__":
    main()
