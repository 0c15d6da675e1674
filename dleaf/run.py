"""Run one image and prompt through plain decoding and through a method, side by side (the logic behind
``scripts/run_dleaf.py``)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import torch

from . import engine
from .config import METHODS, method_config


def parse_knobs(method: str, pairs: list[str]) -> dict:
    """``["gamma=0.5", "threshold=best"]`` -> typed knobs of ``method``'s config; errors name the bad pair."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods are {', '.join(METHODS)}")
    cls = METHODS[method][0]
    hints = typing.get_type_hints(cls)
    knobs = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"knob {pair!r} is not of the form name=value")
        name, value = pair.split("=", 1)
        if name not in hints:
            raise ValueError(f"method {method!r} has no knob {name!r}; its knobs are "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        hint = hints[name]
        try:
            if value.lower() == "none" and "None" in str(hint):
                knobs[name] = None
            elif hint is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                knobs[name] = value.lower() in ("true", "1")
            elif hint is int or str(hint).startswith("int"):
                knobs[name] = int(value)
            elif hint is float:
                knobs[name] = float(value)
            else:
                knobs[name] = value
        except ValueError:
            raise ValueError(f"knob {name}={value!r}: expected a value of type {hint}") from None
    method_config(method, **knobs)  # validate now
    return knobs


def load_model(path: str | None):
    """``(model, processor, is_organism)``: the organism when ``path`` is None, else any image-text-to-text
    checkpoint (local folder or hub id) with eager attention."""
    if path is None:
        from .organism import build

        model, processor = build.load_organism()
        return model, processor, True
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager", dtype="auto")
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor, False


def prompt_inputs(processor, image, prompt: str, organism: bool):
    """Processor inputs for one image and one user prompt, through the model's chat template."""
    if organism:
        from .organism.chat import user_turn

        messages = user_turn(prompt)
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


@torch.no_grad()
def compare(model, processor, inputs, method: str, knobs: dict, max_new_tokens: int = 64) -> dict:
    """Greedy text from plain decoding and from ``method``, and the method's trace (for D-LEAF variants)."""
    inputs = inputs.to(model.device)
    n = inputs["input_ids"].shape[1]
    plain = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    trace = METHODS[method][0].__name__ == "DLeafConfig"
    with engine.attached(model, method, trace=trace, **knobs) as iv:
        steered = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    decode = processor.tokenizer.batch_decode
    out = {
        "plain": decode(plain[:, n:], skip_special_tokens=True)[0].strip(),
        "method": decode(steered[:, n:], skip_special_tokens=True)[0].strip(),
        "config": iv.config, "trace": iv.trace if trace else None,
        "tokens": [processor.tokenizer.convert_ids_to_tokens(steered[0, n:].tolist())],
    }
    return out


def write_outputs(result: dict, out_dir: str | Path, signal_name: str) -> list[Path]:
    """Trace JSON, text summary and figure of a :func:`compare` result under ``out_dir``."""
    from . import trace_report

    out_dir = Path(out_dir)
    trace = result["trace"]
    if trace is None:
        return []
    tokens = result["tokens"]
    paths = [trace_report.write_trace_json(trace, out_dir / "trace.json", tokens=tokens, config=result["config"]),
             trace_report.plot_trace(trace, out_dir / "trace.png", tokens=tokens[0][: trace.sample(0)["positions"].shape[0]],
                                     signal_name=signal_name)]
    (out_dir / "summary.txt").write_text(trace_report.trace_summary(trace) + "\n")
    paths.append(out_dir / "summary.txt")
    return paths
