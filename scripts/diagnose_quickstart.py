"""Does a fine-tune of the shipped base read the question? The experiments behind docs/benchmarks.md's quickstart table.

A plain PyTorch loop (AdamW, constant learning rate, batches of 16 drawn with a seeded RNG, padded) trains the
shipped base on the quickstart's data, restricted to the questions whose values come from small closed sets
(8 departments, 6 titles, 5 cities), in one of four ways: full fine-tuning, full fine-tuning with the embeddings
frozen, the recipe's LoRA adapter (sovtune's own `attach_adapter`) or LoRA with PiSSA initialisation. It prints the
training loss every 25 steps, then a probe: the next-token distribution at `WHERE d.name = '` after
"Which employees belong to X?" for several departments X. A model that reads the question puts X's first token on
top; identical distributions for every X mean the question is ignored.

    python scripts/diagnose_quickstart.py --mode full --lr 1e-3
    python scripts/diagnose_quickstart.py --mode lora --lr 4e-3
    python scripts/diagnose_quickstart.py --mode lora --lr 4e-3 --set "adapter.modules_to_save=[embed_tokens,lm_head]"
    python scripts/diagnose_quickstart.py --mode lora --lr 4e-3 --familiar  # values replaced by tokens the base knows
    python scripts/diagnose_quickstart.py --write-data runs/closed           # the subset, for sovtune run --set data...
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOSED_SLOTS = {"dept", "title", "city"}
# --familiar: every closed-set value becomes a word the base saw thousands of times in the standard library, and a
# single token of its vocabulary.
FAMILIAR = {
    "Engineering": "socket", "Finance": "email", "Legal": "math", "Marketing": "logging", "Operations": "string",
    "Research": "sys", "Sales": "time", "Support": "path",
    "Accountant": "dict", "Analyst": "list", "Designer": "bytes", "Engineer": "int", "Manager": "str",
    "Recruiter": "set",
    "Berlin": "http", "London": "xml", "Madrid": "html", "Paris": "unittest", "Rome": "format",
}  # fmt: skip
PROBE_ANSWER = "SELECT e.name FROM employees e JOIN departments d ON e.department_id = d.id WHERE d.name = '"


def familiar(text: str) -> str:
    for value, token in FAMILIAR.items():
        text = re.sub(rf"\b{value}s?\b", token, text)
    return text


def write_subset(split: str, out: Path, use_familiar: bool) -> Path:
    """The closed-value rows of data/sql/<split>.jsonl, in file order (optionally with familiar values)."""
    rows = [json.loads(line) for line in (ROOT / "data" / "sql" / f"{split}.jsonl").read_text().splitlines()]
    kept = [row for row in rows if set(row["slots"]) <= CLOSED_SLOTS]
    path = out / f"{split}.jsonl"
    with path.open("w") as handle:
        for row in kept:
            messages = [
                {"role": m["role"], "content": familiar(m["content"]) if use_familiar else m["content"]}
                for m in row["messages"]
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def build_model(mode: str, recipe, models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(recipe.model_location)
    if mode == "frozen-embeddings":
        model.get_input_embeddings().weight.requires_grad_(False)
    elif mode == "lora":
        model = models.attach_adapter(model, recipe)
    elif mode == "pissa":
        from peft import LoraConfig, get_peft_model

        r = recipe.adapter.r
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=r,
            lora_alpha=r,
            lora_dropout=0.0,
            target_modules="all-linear",
            init_lora_weights="pissa",
        )
        model = get_peft_model(model, config)
    return model


def main() -> None:
    import torch

    from sovtune import model as models
    from sovtune.config import load_recipe
    from sovtune.inputs import prepare_recipe_data as prepare_data

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["full", "frozen-embeddings", "lora", "pissa"])
    parser.add_argument("--lr", type=float)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--familiar", action="store_true", help="replace the values by tokens the base knows well")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override (repeatable)")
    parser.add_argument("--write-data", type=Path, help="only write the subset's train.jsonl and eval.jsonl here")
    args = parser.parse_args()
    if args.write_data is not None:
        args.write_data.mkdir(parents=True, exist_ok=True)
        for split in ("train", "eval"):
            print(write_subset(split, args.write_data, args.familiar))
        return
    if args.mode is None or args.lr is None:
        parser.error("--mode and --lr are required unless --write-data is given")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        train = write_subset("train", Path(scratch), args.familiar)
        held = write_subset("eval", Path(scratch), args.familiar)
        recipe = load_recipe(
            ROOT / "recipes" / "quickstart.yaml", [*args.overrides, f"data.train={train}", f"data.eval={held}"]
        )
        tokenizer = models.load_tokenizer(recipe)
        items = prepare_data(recipe, tokenizer).train
    model = build_model(args.mode, recipe, models)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng, started = random.Random(0), time.time()
    print(
        f"{args.mode}, lr {args.lr}, {args.steps} steps of 16 from {len(items)} closed-value training examples"
        + (" (familiar values)" if args.familiar else "")
    )
    for step in range(args.steps):
        batch = rng.sample(items, 16)
        width = max(len(item.input_ids) for item in batch)
        ids = torch.tensor(
            [item.input_ids + [tokenizer.pad_token_id] * (width - len(item.input_ids)) for item in batch]
        )
        labels = torch.tensor([item.labels + [-100] * (width - len(item.labels)) for item in batch])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(item.input_ids) for item in batch])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 25 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    model.eval()
    departments = ["Legal", "Sales", "Finance", "Support"]
    print("next token after `WHERE d.name = '` for 'Which employees belong to X?' (top 4):")
    for department in departments:
        asked = familiar(department) if args.familiar else department
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Which employees belong to {asked}?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tokenizer(prompt + PROBE_ANSWER, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            top = model(ids).logits[0, -1].softmax(-1).topk(4)
        shown = ", ".join(
            f"{tokenizer.decode([i])!r} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist())
        )
        print(f"  {asked}: {shown}")


if __name__ == "__main__":
    main()
