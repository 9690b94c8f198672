"""Peak training memory of full fine-tuning vs LoRA vs QLoRA on the same model, each in its own process.

The model is Llama-shaped, built from a config with random weights (about 106M parameters, so the weights, not the
Python runtime, dominate). Each process loads it (full: plain transformers, every parameter trained; LoRA and
QLoRA: sovtune's own loaders, r=16 on every linear layer, QLoRA in NF4 with double quantisation), then runs the same
optimizer steps (AdamW, activation checkpointing, 2 x 256 tokens). Memory is the process's resident set (RSS) on
the CPU, reset after loading so the training peak is its own, and CUDA max allocated on a GPU. QLoRA's storage is
also counted tensor by tensor: bytes per base parameter of the quantised linears (4-bit codes + quantisation
constants), and so is each mode's model state (weights, gradients, optimizer moments), the part that differs.

    python scripts/bench_memory.py                      # 4 to 6 minutes on 2 shared CPU cores
    python scripts/bench_memory.py --shape llama-8b     # the GPU half (full fine-tuning of 8B reports OOM on 80 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES, build_model, describe_machine  # noqa: E402  (shared model builder)

RESULT_PREFIX = "MEMORY_RESULT "
MODES = {"full": "full fine-tuning", "lora": "LoRA r=16 all-linear", "qlora": "QLoRA NF4 + double quant, r=16"}
MEMORY_SHAPES = {
    **SHAPES,
    # 111M parameters, 94M of them in the decoder's linear layers (what QLoRA quantises).
    "medium": dict(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=2048,
    ),
}
BATCH, SEQ, STEPS = 2, 256, 3


def proc_status_kib(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in KiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class AnonymousPeak:
    """Samples RssAnon every few milliseconds: the process's own memory, without file pages it has mapped (the
    safetensors file stays mapped after loading; its pages count in RSS, but the kernel can drop them)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import threading

        self.peak_kib = proc_status_kib("RssAnon") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak_kib = max(self.peak_kib, proc_status_kib("RssAnon") or 0)

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def reset_peak_rss() -> bool:
    """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the training peak excludes loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def recipe_for(model_dir: Path, mode: str) -> Any:
    from sovtune.config import validate_recipe

    data = model_dir.parent / "unused.jsonl"  # the recipe needs training data; loading the model never reads it
    data.write_text('{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}\n')
    recipe: dict[str, Any] = {
        "name": f"memory-{mode}",
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data)},
        "adapter": {"r": 16},
    }
    if mode == "qlora":
        recipe["quantization"] = {"mode": "4bit", "quant_type": "nf4", "double_quant": True}
    return validate_recipe(recipe)


def load(model_dir: Path, mode: str) -> Any:
    import torch

    if mode == "full":
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        return model.to("cuda") if torch.cuda.is_available() else model
    from sovtune import model as models

    recipe = recipe_for(model_dir, mode)
    base = models.load_base_model(recipe, models.load_tokenizer(recipe))
    if torch.cuda.is_available() and mode == "lora":
        base = base.to("cuda")
    return models.attach_adapter(base, recipe)


def quantised_bytes_per_parameter(model: Any) -> tuple[float, int]:
    """Bytes of storage per base parameter over every bitsandbytes 4-bit linear: codes, absmax, nested constants."""
    import bitsandbytes as bnb
    import torch

    stored, parameters = 0, 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):  # peft's LoRA wrapper shares the name; its base_layer is this
            continue
        weight = module.weight
        state = weight.quant_state
        tensors = [weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code]
        if isinstance(state.offset, torch.Tensor):
            tensors.append(state.offset)
        stored += sum(t.numel() * t.element_size() for t in tensors)
        parameters += int(torch.Size(state.shape).numel())
    return (stored / parameters if parameters else float("nan")), parameters


def child(mode: str, model_dir: Path, threads: int, vocab_size: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    import peft  # noqa: F401  (libraries first, so the baseline holds every import and only the model follows)
    import transformers  # noqa: F401

    import sovtune.model  # noqa: F401

    if not cuda:
        import bitsandbytes  # noqa: F401
    baseline_kib, baseline_anon_kib = proc_status_kib("VmRSS"), proc_status_kib("RssAnon")
    model = load(model_dir, mode)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode != "full":
        model.enable_input_require_grads()
    trainable = [p for p in model.parameters() if p.requires_grad]
    loaded_kib, load_peak_kib = proc_status_kib("VmRSS"), proc_status_kib("VmHWM")
    loaded_cuda = torch.cuda.memory_allocated() if cuda else 0
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(10, vocab_size, (BATCH, SEQ), generator=generator) for _ in range(STEPS)]
    reset = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        with AnonymousPeak() as anonymous:
            for ids in batches:
                ids = ids.to(model.device)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        print(RESULT_PREFIX + json.dumps({"mode": mode, "oom": True, "trainable": sum(p.numel() for p in trainable)}))
        return
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(p.numel() * p.element_size() for p in trainable)  # one gradient each, freed after the step
    state_bytes += sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    result: dict[str, Any] = {
        "model_state_mib": state_bytes / 2**20,
        "mode": mode,
        "trainable": sum(p.numel() for p in trainable),
        "total": sum(p.numel() for p in model.parameters()),
        "baseline_mib": baseline_kib / 1024 if baseline_kib else None,
        "loaded_mib": loaded_kib / 1024 if loaded_kib else None,
        "load_peak_mib": load_peak_kib / 1024 if load_peak_kib else None,
        "train_peak_mib": (proc_status_kib("VmHWM") or 0) / 1024 if reset else None,
        "anon_peak_above_baseline_mib": (anonymous.peak_kib - baseline_anon_kib) / 1024 if baseline_anon_kib else None,
        "cuda_loaded_mib": loaded_cuda / 2**20 if cuda else None,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "step_s": (time.perf_counter() - started) / STEPS,
        "loss": float(loss),
    }
    if mode == "qlora":
        result["bytes_per_quantised_parameter"], result["quantised_parameters"] = quantised_bytes_per_parameter(model)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(mode: str, model_dir: Path, threads: int, vocab_size: int) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--model",
        str(model_dir),
        "--threads",
        str(threads),
        "--vocab-size",
        str(vocab_size),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
        # A fixed mmap threshold: glibc returns freed tensors to the OS, so RSS follows live memory rather than
        # whatever the heap grew to while loading (its default threshold rises after the first large frees).
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise SystemExit(f"{mode} failed (exit {done.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    parser.add_argument("--shape", choices=sorted(MEMORY_SHAPES), default="medium", help="model shape")
    parser.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.threads, args.vocab_size)
        return
    shape = MEMORY_SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="sovtune-memory-") as tmp:
        model_dir = Path(tmp) / "model"
        parameters = build_model(model_dir, shape)
        print(f"machine: {describe_machine()}")
        print(
            f"model: Llama, {parameters / 1e6:.1f}M parameters ({shape}), {STEPS} AdamW steps of {BATCH} x {SEQ} tokens"
        )
        results = {mode: run_child(mode, model_dir, args.threads, shape["vocab_size"]) for mode in MODES}
    import torch

    if torch.cuda.is_available():
        header = [
            "mode",
            "trainable params",
            "model state MiB",
            "CUDA after load MiB",
            "CUDA max allocated MiB",
            "s/step",
        ]
        rows = [
            [MODES[m], f"{r['trainable']:,}", "out of memory", "", "", ""]
            if r.get("oom")
            else [
                MODES[m],
                f"{r['trainable']:,}",
                fmt(r["model_state_mib"]),
                fmt(r["cuda_loaded_mib"]),
                fmt(r["cuda_peak_mib"]),
                fmt(r["step_s"], 2),
            ]
            for m, r in results.items()
        ]
    else:
        header = [
            "mode",
            "trainable params",
            "model state MiB",
            "RSS before load MiB",
            "RSS after load MiB",
            "peak RSS while loading MiB",
            "peak RSS while training MiB",
            "training peak - before load MiB",
            "anonymous RSS peak - before load MiB",
            "s/step",
        ]
        rows = []
        for mode, r in results.items():
            above = r["train_peak_mib"] - r["baseline_mib"] if r["train_peak_mib"] and r["baseline_mib"] else None
            rows.append(
                [
                    MODES[mode],
                    f"{r['trainable']:,}",
                    fmt(r["model_state_mib"]),
                    fmt(r["baseline_mib"]),
                    fmt(r["loaded_mib"]),
                    fmt(r["load_peak_mib"]),
                    fmt(r["train_peak_mib"]),
                    fmt(above),
                    fmt(r["anon_peak_above_baseline_mib"]),
                    fmt(r["step_s"], 2),
                ]
            )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        "(model state = weights, buffers, gradients and AdamW moments, counted tensor by tensor; RSS = the whole "
        "process, including the Python runtime, libraries, activations, allocator slack and the mapped weights file; "
        "anonymous RSS leaves the mapped file out, sampled every 5 ms)"
    )
    qlora = results["qlora"]
    print(
        f"QLoRA quantised linears: {qlora['quantised_parameters']:,} base parameters, "
        f"{qlora['bytes_per_quantised_parameter']:.4f} bytes per base parameter (target <= 0.6)"
    )


if __name__ == "__main__":
    main()
