"""Scoring a run's replies: per section CHAIR (caption benchmarks) or POPE (yes/no benchmarks) from
:mod:`dleaf.metrics`, and per item the numbers a paired comparison of two runs resamples (``scores.jsonl``).

Per item, a caption row holds ``n_words``, ``n_mentions``, ``n_hallucinated_mentions``, the ``hallucinated`` and
``grounded`` categories it names and ``n_truth`` (the size of its ground-truth set); a yes/no row holds ``label``
(the truth) and ``answer`` (``true`` yes, ``false`` no, ``null`` unparsed), parsed by the benchmark's answer rule
(``Benchmark.scoring["answer_rule"]``, :func:`dleaf.metrics.parse_answer`). Section metrics carry the scoring rules
(``chair_rules``, ``answer_rule``); a yes/no section scored by another rule than the official POPE one also gives
the official rule's numbers (``pope_official``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .. import metrics
from .registry import Benchmark


def _rows_by_id(rows) -> dict[str, dict]:
    return rows if isinstance(rows, Mapping) else {r["id"]: r for r in rows}


def _section_items(benchmark: Benchmark, rows: Mapping[str, dict]):
    missing = [it.id for it in benchmark.items if it.id not in rows]
    if missing:
        raise ValueError(f"{len(missing)} items have no generation yet (first {missing[0]!r})")
    for section in benchmark.sections:
        items = [it for it in benchmark.items if it.section == section]
        yield section, items, [rows[it.id]["text"] for it in items]


def compute_metrics(benchmark: Benchmark, rows: Mapping[str, dict] | Sequence[dict]) -> dict[str, dict]:
    """Per section: CHAIR (``kind == "caption"``, on each row's ``text``) or POPE (``kind == "yesno"``)."""
    rows = _rows_by_id(rows)
    out: dict[str, dict] = {}
    for section, items, texts in _section_items(benchmark, rows):
        if items[0].kind == "caption":
            res = metrics.chair(texts, [it.truth for it in items], benchmark.vocab)
            out[section] = {"kind": "caption", **res.as_dict(), **benchmark.scoring}
        else:
            rule = benchmark.scoring.get("answer_rule", "dleaf")
            labels = [it.truth for it in items]
            out[section] = {"kind": "yesno", **metrics.pope(texts, labels, rule).as_dict()}
            if rule != "pope_official":
                # what the official rule counts (every answer a yes or a no), beside the run's own rule
                official = metrics.pope(texts, labels, "pope_official").as_dict()
                out[section]["pope_official"] = {k: official[k] for k in
                                                 ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    return out


def item_scores(benchmark: Benchmark, rows: Mapping[str, dict] | Sequence[dict]) -> list[dict]:
    """Per item (in protocol order) the numbers behind its section's metrics (see the module docstring)."""
    rows = _rows_by_id(rows)
    out = []
    for section, items, texts in _section_items(benchmark, rows):
        if items[0].kind == "caption":
            res = metrics.chair(texts, [it.truth for it in items], benchmark.vocab)
            for it, pc in zip(items, res.per_caption):
                out.append({"id": it.id, "section": section, "kind": "caption", "n_words": pc.n_words,
                            "n_mentions": pc.n_mentions, "n_hallucinated_mentions": pc.n_hallucinated_mentions,
                            "hallucinated": sorted(pc.hallucinated),
                            "grounded": sorted(pc.mentioned - pc.hallucinated), "n_truth": len(set(it.truth))})
        else:
            rule = benchmark.scoring.get("answer_rule", "dleaf")
            for it, text in zip(items, texts):
                out.append({"id": it.id, "section": section, "kind": "yesno", "label": bool(it.truth),
                            "answer": metrics.parse_answer(text, rule)})
    return out
