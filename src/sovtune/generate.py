"""`sovtune generate` and `sovtune chat`: talk to a trained adapter (and, with --base, to the base beside it)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovtune import model as models
from sovtune.config import Recipe, RunOptIns, load_run_recipe
from sovtune.core.rundir import RunDir
from sovtune.data import adds_bos, generation_prompt, template_budget
from sovtune.errors import SovtuneError
from sovtune.run.verify import verify_before_loading


class RunNotFound(SovtuneError):
    """The run directory lacks what the command needs."""


@dataclass
class LoadedRun:
    recipe: Recipe
    tokenizer: Any
    model: Any  # a PeftModel: `with model.disable_adapter():` gives the base


def load_run(
    run_dir: Path,
    overrides: list[str] | tuple[str, ...] = (),
    opt_ins: RunOptIns = RunOptIns(),
    verify: bool = True,
) -> LoadedRun:
    """The run's resolved recipe, its tokenizer (with the trained chat template) and base + adapter.

    The run folder is data: its files must match its manifest first (`verify`, the command line's --no-verify turns
    it off), and what its recipe may run or unpickle is what `opt_ins` allow.
    """
    run = RunDir(run_dir)
    if not (run / RunDir.RECIPE).is_file():
        raise RunNotFound(f"{run_dir}: no recipe.yaml; is this a run directory? (sovtune train writes one)")
    if not run.has_adapter():
        raise RunNotFound(f"{run_dir}: no trained adapter in {run.adapter_dir}; run sovtune train first")
    if verify:
        verify_before_loading(run.path)
    recipe = load_run_recipe(run.path, overrides, opt_ins=opt_ins)
    models.check_adapter_files(run.adapter_dir, opt_ins.allow_pickle_weights)
    tokenizer = models.load_adapter_tokenizer(recipe, run.adapter_dir)
    model = models.load_adapted_model(recipe, tokenizer, run.adapter_dir, opt_ins.allow_pickle_weights)
    return LoadedRun(recipe=recipe, tokenizer=tokenizer, model=model)


def render_prompt(run: LoadedRun, messages: list[dict[str, str]]) -> str:
    """The text generation starts from, as in training: chat template for chat formats, raw text otherwise."""
    if run.recipe.data.format in ("messages", "instruction"):
        try:
            with template_budget(run.recipe.data):
                return generation_prompt(messages, run.tokenizer, run.recipe.data.system_message)
        except SovtuneError:
            raise  # the time budget's one line, a row the template refuses
        except Exception as exc:  # a template may raise anything; jinja2's sandbox raises SecurityError
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise RunNotFound(
                f"{run.recipe.run_dir}/adapter: the chat template saved with the adapter failed ({first}); "
                "restore the run's tokenizer files"
            ) from None
    return messages[-1]["content"]


def complete(run: LoadedRun, prompt: str, max_new_tokens: int = 128, use_adapter: bool = True) -> str:
    """Greedy completion of one prompt, stopping at EOS or the template's turn terminator."""
    import torch

    tokenizer = run.tokenizer
    add_bos = run.recipe.data.format in ("prompt_completion", "text")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if add_bos and adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + ids
    device = next(run.model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    context = contextlib.nullcontext() if use_adapter else run.model.disable_adapter()
    with context, torch.no_grad():
        output = run.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=models.stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip()
