"""One image and prompt through plain decoding and through a method, side by side (the logic behind
``scripts/run_dleaf.py``): the two replies, and for methods that flag layers the method's trace and the trace of
the same method watching plain decoding at zero strength (which decodes exactly like plain decoding), exported as
JSON, summarised in text and drawn by :mod:`dleaf.trace_report`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

from .cli import parse_knobs as _parse_pairs
from .generation import generate
from .settings import Setting


def parse_knobs(method: str, pairs: list[str]) -> dict:
    """``["gamma=0.5", "threshold=best"]`` -> the typed knobs of ``method``'s configuration; an unknown method or
    knob, a value of the wrong type or out of range raises :class:`dleaf.io.InputError` naming it."""
    return Setting(method, _parse_pairs(pairs)).knob_dict


def token_marks(tokenizer, token_ids, vocab=None, truth=None) -> list[str]:
    """Per generated token: ``"object"`` (the first token of an object word that is in ``truth``),
    ``"hallucinated"`` (one that is not) or ``""``; all ``""`` without a vocabulary and ground truth."""
    marks = [""] * len(token_ids)
    if vocab is None or truth is None:
        return marks
    from .premise_check import mention_token_offsets

    for j, m in mention_token_offsets(tokenizer, token_ids, vocab):
        marks[j] = "object" if m.category in truth else "hallucinated"
    return marks


def compare(model, processor, image, prompt: str, setting: Setting, max_new_tokens: int = 64, vocab=None,
            truth=None) -> dict:
    """Plain greedy decoding and ``setting`` on one image: ``plain``, ``method`` (the replies), ``config`` (the
    method's configuration), ``trace`` and ``plain_trace`` (for methods that flag layers: the method's
    :class:`~dleaf.engine.Trace`, and the trace of the same configuration at zero strength, which decodes like plain
    decoding; else None), ``tokens`` / ``plain_tokens`` (the generated tokens, one list per sample) and ``marks`` /
    ``plain_marks`` (object and hallucinated words, see :func:`token_marks`, when ``vocab`` and ``truth`` are
    given)."""
    item = SimpleNamespace(id="0", prompt=prompt, image=image)
    config = setting.config()
    traced = getattr(config, "traces_flags", False)  # methods whose traces hold flags (D-LEAF)
    tok = processor.tokenizer
    plain_trace = None
    if traced:
        watch = Setting(setting.method, {**setting.knob_dict, "gamma": 0.0})
        with watch.attached(model, trace=True) as iv:
            plain = next(generate(model, processor, [item], watch, max_new_tokens, intervention=iv, token_ids=True))
        plain_trace = iv.trace
    else:
        plain = next(generate(model, processor, [item], Setting(), max_new_tokens, token_ids=True))
    with setting.attached(model, trace=traced) as iv:
        steered = next(generate(model, processor, [item], setting, max_new_tokens, intervention=iv, token_ids=True))
    return {"plain": plain["raw"], "method": steered["raw"], "config": config,
            "trace": iv.trace if traced else None, "plain_trace": plain_trace,
            "tokens": [tok.convert_ids_to_tokens(steered["token_ids"])],
            "plain_tokens": [tok.convert_ids_to_tokens(plain["token_ids"])],
            "marks": token_marks(tok, steered["token_ids"], vocab, truth),
            "plain_marks": token_marks(tok, plain["token_ids"], vocab, truth)}


def write_outputs(result: dict, out_dir: str | Path, title: str | None = None, method: str | None = None,
                  meta: dict | None = None) -> list[Path]:
    """The files of a :func:`compare` result under ``out_dir``: ``result.json`` (the two replies, the method's
    configuration and ``meta``, such as the model and the image), ``summary.txt`` (the replies, and for methods
    that flag layers the trace summary) and, for those methods, ``trace.json`` and ``trace.png``. Every method
    writes the first two (PAI, SPIN and VCD flag no layers, so they have no trace)."""
    from . import trace_report
    from .io import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    trace = result["trace"]
    config = dataclasses.asdict(result["config"]) if result["config"] is not None else None
    label = method or "method"
    record = {**(meta or {}), "method": method, "replies": {"plain": result["plain"], label: result["method"]},
              "config": config}
    paths = [write_json_atomic(record, out_dir / "result.json")]
    head = "" if trace is None else trace_report.trace_summary(trace) + "\n\n"
    paths.append(write_text_atomic(f"{head}plain   : {result['plain']}\n{label:<8}: {result['method']}\n"
                                   + ("" if title is None else f"\n{title}\n"), out_dir / "summary.txt"))
    if trace is None:
        return paths
    n = trace.sample(0)["positions"].shape[0]
    plain = result.get("plain_trace")
    m = plain.sample(0)["positions"].shape[0] if plain is not None else 0
    paths += [trace_report.write_trace_json(trace, out_dir / "trace.json", tokens=result["tokens"],
                                            config=result["config"]),
              trace_report.plot_trace(trace, out_dir / "trace.png", tokens=result["tokens"][0][:n],
                                      config=result["config"], marks=result["marks"][:n], plain=plain,
                                      plain_tokens=result["plain_tokens"][0][:m],
                                      plain_marks=result["plain_marks"][:m], title=title)]
    return paths
