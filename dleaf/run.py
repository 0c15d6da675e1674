"""One image and prompt through plain decoding and through a method, side by side (the logic behind
``scripts/run_dleaf.py``): the two replies, and for methods that flag layers the method's trace (exported as JSON,
summarised in text and drawn by :mod:`dleaf.trace_report`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from .cli import parse_knobs as _parse_pairs
from .generation import generate
from .settings import Setting


def parse_knobs(method: str, pairs: list[str]) -> dict:
    """``["gamma=0.5", "threshold=best"]`` -> the typed knobs of ``method``'s configuration; an unknown method or
    knob, a value of the wrong type or out of range raises :class:`dleaf.io.InputError` naming it."""
    return Setting(method, _parse_pairs(pairs)).knob_dict


def compare(model, processor, image, prompt: str, setting: Setting, max_new_tokens: int = 64) -> dict:
    """Plain greedy decoding and ``setting`` on one image: ``plain``, ``method`` (the replies), ``config`` (the
    method's configuration), ``trace`` (the method's :class:`~dleaf.engine.Trace` for methods that flag layers,
    else None), ``tokens`` (the method's generated tokens, one list per sample) and ``plain_tokens``."""
    item = SimpleNamespace(id="0", prompt=prompt, image=image)
    plain = next(generate(model, processor, [item], Setting(), max_new_tokens, token_ids=True))
    config = setting.config()
    traced = config is not None and hasattr(config, "localization")
    with setting.attached(model, trace=traced) as iv:
        steered = next(generate(model, processor, [item], setting, max_new_tokens, intervention=iv, token_ids=True))
    tok = processor.tokenizer
    return {"plain": plain["raw"], "method": steered["raw"], "config": config,
            "trace": iv.trace if traced else None,
            "tokens": [tok.convert_ids_to_tokens(steered["token_ids"])],
            "plain_tokens": [tok.convert_ids_to_tokens(plain["token_ids"])]}


def write_outputs(result: dict, out_dir: str | Path, signal_name: str) -> list[Path]:
    """Trace JSON, text summary and figure of a :func:`compare` result under ``out_dir``."""
    from . import trace_report
    from .io import write_text_atomic

    out_dir = Path(out_dir)
    trace = result["trace"]
    if trace is None:
        return []
    tokens = result["tokens"]
    n = trace.sample(0)["positions"].shape[0]
    paths = [trace_report.write_trace_json(trace, out_dir / "trace.json", tokens=tokens, config=result["config"]),
             trace_report.plot_trace(trace, out_dir / "trace.png", tokens=tokens[0][:n], signal_name=signal_name),
             write_text_atomic(trace_report.trace_summary(trace) + "\n", out_dir / "summary.txt")]
    return paths
