"""The learned detector's organism study (``python -m dleaf.detect``): fit the token-level hallucination detector of
:mod:`dleaf.detect` on labelled rows of training captions, score it on held-out dev and replication captions
(AUROC, AUPRC, reliability, position control), choose its flag threshold on dev (recorded in the detector file), and
decode with D-LEAF's fusion at its flags (``localization="learned"``). ``docs/localization.md`` reports the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .detect import THRESHOLD_RULE, fit, grouped_bootstrap, model_identity, reliability, row_features

#: captions of the organism's caption benchmark: (split, first item, last item + 1)
TRAIN_SETS = (("indist", 0, 300), ("adversarial", 200, 500))
DEV_SET = ("adversarial", 0, 200)
REPLICATION_SET = ("replication", 0, 200)
#: held-out in-distribution captions (after the training items), a second dev set: scored, nothing chosen on it
INDIST_SET = ("indist", 300, 500)


def _items(split, lo, hi):
    from . import eval as harness

    import dataclasses

    bench = harness.load_benchmark("organism_caption", limit=hi, splits=[split])
    bench = dataclasses.replace(bench, items=bench.items[lo:hi])
    return bench, bench.items


def caption_rows(model, processor, split, lo, hi, batch_size: int = 100) -> dict:
    """Greedy captions of items ``[lo, hi)`` of ``split`` and every reply row: features (all layers), label (the row
    predicts a hallucinated object word), position, caption index; plus the greedy rows and their scores."""
    from . import eval as harness
    from .generation import generate
    from .localization import object_words
    from .settings import Setting

    bench, items = _items(split, lo, hi)
    rows = list(generate(model, processor, items, Setting(), bench.max_new_tokens(), batch_size,
                         bench.protocol.sentence_rule, token_ids=True))
    rows = [{"id": it.id, "section": it.section, **{k: v for k, v in r.items() if k != "id"}}
            for it, r in zip(items, rows)]
    tok = processor.tokenizer
    replies = [tok.decode(r["token_ids"], skip_special_tokens=True) for r in rows]
    recs = row_features(model, processor, [it.image() for it in items], [it.prompt for it in items], replies,
                        batch_size=16)
    X, y, pos, cap, mismatched = [], [], [], [], 0
    for k, (it, r, rec) in enumerate(zip(items, rows, recs)):
        ids = rec["token_ids"]
        mismatched += list(r["token_ids"][:len(ids)]) != ids
        hall = {w["position"] for w in object_words(ids, tok, set(it.truth), bench.vocab.synonyms) if w["hallucinated"]}
        X.append(rec["features"])
        y += [int(j in hall) for j in range(len(ids))]
        pos += list(range(len(ids)))
        cap += [k] * len(ids)
    return {"X": np.concatenate(X), "y": np.array(y), "position": np.array(pos), "caption": np.array(cap),
            "greedy": rows, "scores": harness.item_scores(bench, rows), "n_mismatched": mismatched,
            "split": split, "range": [lo, hi]}


def auroc(y, s):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(y, s)


def auprc(y, s):
    from sklearn.metrics import average_precision_score

    return average_precision_score(y, s)


def _columns(layers, num_heads, all_layers):
    """Indices of the features of ``layers`` among the all-layer features."""
    per = 2 + 2 * num_heads
    return [layer * per + i for layer in layers for i in range(per)] if layers is not None else list(range(all_layers * per))


def _position_features(pos):
    pos = np.asarray(pos, float)
    return np.stack([pos, np.log1p(pos)], 1)


def evaluate(det_scores: dict, y, caption, n_resamples=2000) -> dict:
    return {name: {"auroc": grouped_bootstrap(y, s, caption, auroc, n_resamples),
                   "auprc": grouped_bootstrap(y, s, caption, auprc, n_resamples)} for name, s in det_scores.items()}


def flag_stats(p, y, threshold) -> dict:
    f = p > threshold
    tp = int((f & (y == 1)).sum())
    return {"threshold": threshold, "n_flagged": int(f.sum()), "flagged_share": float(f.mean()),
            "precision": tp / f.sum() if f.sum() else float("nan"), "recall": tp / max(int(y.sum()), 1)}


def study(model, processor, out_dir, detector_path, n_resamples: int = 2000, gammas=(0.5, 1.0),
          say=print, replication: bool = True) -> dict:
    """Fit, held-out detection, threshold on dev, D-LEAF with the learned localization on dev and replication."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from .io import write_json_atomic
    from .localization import _row_stats, compare_scores

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ident = model_identity(model)
    L, H = ident["num_layers"], ident["num_heads"]
    sets = {}
    for name, spec in [("train_" + s[0], s) for s in TRAIN_SETS] + [("dev", DEV_SET), ("indist", INDIST_SET)] + \
            ([("replication", REPLICATION_SET)] if replication else []):
        sets[name] = caption_rows(model, processor, *spec)
        say(f"[detect] {name}: {len(sets[name]['y'])} rows, {int(sets[name]['y'].sum())} hallucinated, "
            f"{sets[name]['n_mismatched']} replies re-tokenized differently")
    tr = [sets["train_" + s[0]] for s in TRAIN_SETS]
    Xtr = np.concatenate([t["X"] for t in tr])
    ytr = np.concatenate([t["y"] for t in tr])
    ptr = np.concatenate([t["position"] for t in tr])
    report = {"model": ident, "train": [list(s) for s in TRAIN_SETS], "dev": list(DEV_SET),
              "n_train_rows": int(len(ytr)), "n_train_positive": int(ytr.sum()), "detectors": {}, "splits": {}}
    dets = {}
    for label, layers in (("layer 0", [0]), ("layers 0-1", [0, 1]), ("all layers", list(range(L)))):
        cols = _columns(layers, H, L)
        dets[label] = (fit(Xtr[:, cols], ytr, layers, H, ident, meta={"train": report["train"]}), cols)
    dets["all layers"][0].save(out_dir / "detector_all_layers.json")
    pos_model = LogisticRegression(max_iter=5000)
    psc = StandardScaler().fit(_position_features(ptr))
    pos_model.fit(psc.transform(_position_features(ptr)), ytr)
    comb = {}
    for label in ("layer 0", "all layers"):
        cols = dets[label][1]
        Z = np.concatenate([Xtr[:, cols], _position_features(ptr)], 1)
        sc = StandardScaler().fit(Z)
        comb[label] = (sc, LogisticRegression(max_iter=5000).fit(sc.transform(Z), ytr), cols)

    def all_scores(s):
        out = {f"detector, {k}": d.probability(s["X"][:, cols]) for k, (d, cols) in dets.items()}
        pf = _position_features(s["position"])
        out["position only"] = pos_model.predict_proba(psc.transform(pf))[:, 1]
        for k, (sc, m, cols) in comb.items():
            out[f"detector, {k} + position"] = m.predict_proba(sc.transform(np.concatenate([s["X"][:, cols], pf], 1)))[:, 1]
        out["layer-0 image-mass deficit"] = -s["X"][:, 1]
        return out

    chosen = None
    for name in ("dev", "indist", "replication"):
        if name not in sets:
            continue
        s = sets[name]
        sc_ = all_scores(s)
        p = sc_["detector, layer 0"]
        part = {"n_rows": int(len(s["y"])), "n_positive": int(s["y"].sum()), "n_captions": int(len(s["greedy"])),
                "detection": evaluate(sc_, s["y"], s["caption"], n_resamples),
                "reliability": {k: reliability(sc_[f"detector, {k}"], s["y"]) for k in dets}}
        if name == "dev":
            grid = sorted(set(np.round(np.quantile(p, np.linspace(0.90, 0.999, 60)), 4).tolist()))
            f1 = []
            for t in grid:
                st = flag_stats(p, s["y"], t)
                pr, rc = st["precision"], st["recall"]
                f1.append(0.0 if not pr == pr or pr + rc == 0 else 2 * pr * rc / (pr + rc))
            chosen = float(grid[int(np.argmax(f1))])
            part["threshold_rule"] = THRESHOLD_RULE
            det0 = dets["layer 0"][0]
            det0.meta.update(threshold=chosen, threshold_rule=THRESHOLD_RULE)
            det0.save(detector_path)  # written once its threshold is known (detector_threshold=None reads it)
        part["flags"] = flag_stats(p, s["y"], chosen)
        part["greedy"] = _row_stats(s["scores"])
        part["operators"] = {}
        from .generation import generate
        from .settings import Setting

        bench, items = _items(s["split"], *s["range"])
        for g in gammas:
            setting = Setting("dleaf", {"gamma": g, "localization": "learned", "detector": str(detector_path),
                                        "detector_threshold": chosen})
            rows = list(generate(model, processor, items, setting, bench.max_new_tokens(), 100,
                                 bench.protocol.sentence_rule, token_ids=True))
            rows = [{"id": it.id, "section": it.section, **{k: v for k, v in r.items() if k != "id"}}
                    for it, r in zip(items, rows)]
            from . import eval as harness

            scores = harness.item_scores(bench, rows)
            part["operators"][f"dleaf fusion gamma={g:g}, learned"] = {
                **_row_stats(scores), "vs_greedy": compare_scores(s["scores"], scores, n_resamples),
                "captions_changed": sum(a["token_ids"] != b["token_ids"] for a, b in zip(s["greedy"], rows))}
            say(f"[detect] {name} gamma={g}: CHAIR_s {_row_stats(scores)['chair_s']:.3f}")
        report["splits"][name] = part
        report["threshold"] = chosen
        write_json_atomic(report, out_dir / "detect_study.json")
    return report


def _ci(d, scale=1.0, digits=3, sign=False):
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(scale * d['value'])} [{f.format(scale * d['low'])}, {f.format(scale * d['high'])}]"


def markdown(report: dict) -> str:
    """The study's tables: held-out detection, reliability, flags at the chosen threshold, and D-LEAF's fusion with
    the learned localization against greedy, per split."""
    from .localization import operator_table

    lines = []
    for name, part in report["splits"].items():
        title = {"dev": "Dev (adversarial split, items 0-199)", "indist": "In-distribution split, items 300-499",
                 "replication": "Replication split, items 0-199"}[name]
        g = part["greedy"]
        lines += [f"#### {title}: {part['n_captions']} captions, {part['n_rows']} rows, {part['n_positive']} "
                  f"hallucinated rows (greedy CHAIR_s {100 * g['chair_s']:.1f}%, recall {100 * g['recall']:.1f}%, "
                  f"additions {g['n_additions']})", "",
                  "| scores | AUROC [95% CI] | AUPRC [95% CI] |", "|---|---|---|"]
        for k, v in part["detection"].items():
            lines.append(f"| {k} | {_ci(v['auroc'])} | {_ci(v['auprc'])} |")
        lines += ["", "| detector | mean predicted | observed rate | ECE | Brier | top tenth: predicted / observed |",
                  "|---|---|---|---|---|---|"]
        for k, v in part["reliability"].items():
            top = v["bins"][-1]
            lines.append(f"| {k} | {v['mean_predicted']:.4f} | {v['observed_rate']:.4f} | {v['ece']:.4f} | "
                         f"{v['brier']:.4f} | {top['predicted']:.3f} / {top['observed']:.3f} |")
        f = part["flags"]
        lines += ["", f"Flags of the layer-0 detector at probability > {f['threshold']:g}: {f['n_flagged']} rows "
                  f"({100 * f['flagged_share']:.1f}% of the rows), precision {100 * f['precision']:.1f}%, recall "
                  f"{100 * f['recall']:.1f}%.", ""]
        lines += operator_table(part["operators"])
    return "\n".join(lines)


def detector_file_name(model: str) -> str:
    """The study's default detector file name for ``model``: ``<name>_detector.json``, the name being a registered
    model's or the checkpoint folder's (``organism`` -> ``organism_detector.json``, as the shipped file is called)."""
    name = Path(str(model).rstrip("/\\")).name or "model"
    return f"{name}_detector.json"


def _run(argv=None) -> int:
    import argparse

    from . import cli, models
    from .io import InputError, write_text_atomic

    ap = argparse.ArgumentParser(prog="python -m dleaf.detect",
                                 description="the learned detector's organism study: fit on training captions, held-out "
                                             "detection, D-LEAF's fusion at its flags (docs/localization.md)")
    ap.add_argument("--output_dir", default="runs/detect", help="folder for the outputs (default: runs/detect)")
    ap.add_argument("--model", default="organism",
                    help="a model of the organism's world: 'organism' (default), another registered organism or a "
                         "checkpoint folder trained by scripts/train_organism.py")
    ap.add_argument("--detector", default=None,
                    help="where to write the fitted layer-0 detector (default: <output_dir>/<model>_detector.json, "
                         "for example runs/detect/organism_detector.json)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads torch may use (default: 1)")
    ap.add_argument("--n_bootstrap", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    ap.add_argument("--no_replication", action="store_true", help="leave the replication split unscored")
    args = ap.parse_args(argv)
    if args.n_bootstrap < 1:
        raise InputError(f"--n_bootstrap must be positive, got {args.n_bootstrap}")
    models.check_model(args.model)
    out = cli.check_output_dir(args.output_dir)
    detector = Path(args.detector) if args.detector else out / detector_file_name(args.model)
    cli.check_output_dir(detector.parent, "--detector")
    cli.set_threads(args.threads)
    model, processor = models.load(args.model, attn_implementation="eager")
    detector.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        report = study(model, processor, out, detector, args.n_bootstrap, say=lambda m: print(m, flush=True),
                       replication=not args.no_replication)
    write_text_atomic(markdown(report), out / "detect_study.md")
    cli.done(out / "detect_study.json", out / "detect_study.md", detector)
    return 0


def main(argv=None) -> int:
    """``python -m dleaf.detect``: the organism study (``error:`` lines, exit status 2)."""
    from . import cli

    return cli.main(_run, argv, resumable=False)


__all__ = ["DEV_SET", "INDIST_SET", "REPLICATION_SET", "TRAIN_SETS", "auprc", "auroc", "caption_rows",
           "detector_file_name", "evaluate", "flag_stats", "main", "markdown", "study"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
