"""Measure the prompt_threshold and calibrated localizers with D-LEAF's fusion on the organism, as the oracle is
measured in docs/localization.md: where each flags (row recall and precision at the rows that predict hallucinated
object words) and what fusion at its flags does to the captions (CHAIR_s, CHAIR_i, recall, additions, with paired
bootstrap intervals against greedy), beside fusion at the oracle rows on the same images.

    python scripts/measure_localizers.py --stage grid --output_dir runs/localizers
    python scripts/measure_localizers.py --stage confirm --choose "prompt_threshold signal=mass_deficit kappa=1" \\
        --output_dir runs/localizers

Images: the calibration set is the first --n_calibration images of the indist split; the dev set (where knobs are
chosen, --stage grid) the next --n_dev indist images and the first --n_dev adversarial ones; --stage confirm runs
the chosen settings once on the first --n_confirm replication images. Writes <stage>.json and <stage>.md.
"""

import copy
import json
import sys
import time
from pathlib import Path

from dleaf import cli

SIGNALS = ("liae", "mass_deficit")
LAYERS = {"all": (0, None), "0-2": (0, 3), "0": (0, 1), "3-5": (3, None)}
KAPPAS = (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
PERCENTILES = (80.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.9)


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="organism", help="model name or path (default: organism)")
    ap.add_argument("--stage", default="grid", choices=["grid", "confirm", "choose"],
                    help="knob grid on dev, confirmation, or the choice from grid reports (--reports)")
    ap.add_argument("--reports", nargs="*", default=[], help="choose: grid reports (grid.json) to pool")
    ap.add_argument("--max_recall_drop", "--max-recall-drop", type=float, default=2.0,
                    help="choose: the largest drop of object recall, in points, a chosen setting may have")
    ap.add_argument("--choose", nargs="*", default=[], help="confirm: the chosen settings, as grid labels")
    ap.add_argument("--match", default=None, help="grid: only the settings whose label contains this")
    ap.add_argument("--gammas", nargs="+", type=float, default=[0.5, 1.0], help="fusion strengths")
    ap.add_argument("--grid_gammas", "--grid-gammas", nargs="+", type=float, default=[1.0],
                    help="fusion strengths run for every grid setting")
    ap.add_argument("--n_calibration", "--n-calibration", type=int, default=200, help="indist calibration images")
    ap.add_argument("--n_dev", "--n-dev", type=int, default=100, help="dev images per dev split")
    ap.add_argument("--n_confirm", "--n-confirm", type=int, default=200, help="replication images")
    ap.add_argument("--output_dir", "--output-dir", default="runs/localizers", help="where the reports go")
    ap.add_argument("--batch_size", "--batch-size", type=int, default=100, help="replies per generation batch")
    ap.add_argument("--n_bootstrap", "--n-bootstrap", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads torch may use")
    return ap


def grid():
    """``[(label, knobs)]`` of every localizer setting of the grid (without the calibration path)."""
    out = []
    for signal in SIGNALS:
        for lname, (start, end) in LAYERS.items():
            lk = {"layer_start": start, "layer_end": end}
            for kappa in KAPPAS:
                out.append((f"prompt_threshold signal={signal} kappa={kappa:g} layers={lname}",
                            {"localization": "prompt_threshold", "layer_signal": signal, "kappa": kappa, **lk}))
            for pct in PERCENTILES:
                out.append((f"calibrated signal={signal} percentile={pct:g} layers={lname}",
                            {"localization": "calibrated", "signal": signal, "percentile": pct, **lk}))
    return out


class Pool:
    """Items of one or more benchmark splits, scored each by its own benchmark, pooled as one section."""

    def __init__(self, parts, name):
        self.parts, self.name = parts, name  # [(bench, items)]
        self.items = [it for _, its in parts for it in its]
        bench = parts[0][0]
        self.max_new, self.rule = bench.max_new_tokens(), bench.protocol.sentence_rule
        self.objects = bench.vocab.synonyms
        self.truths = [set(it.truth) for it in self.items]

    def score(self, rows):
        from dleaf import eval as harness

        out, k = [], 0
        for bench, its in self.parts:
            part = [{"id": it.id, "section": it.section, **{a: b for a, b in r.items() if a != "id"}}
                    for it, r in zip(its, rows[k:k + len(its)])]
            out += [dict(s, section=self.name) for s in harness.item_scores(bench, part)]
            k += len(its)
        return out


def flag_hits(model, processor, pool, knobs, greedy, batch_size):
    """Row-level flag statistics of a localizer at zero strength (plain decoding): recall (hallucinated rows with
    a flagged layer / hallucinated rows), precision (hallucinated rows among the rows with a flagged layer), the
    flagged share of rows and of (row, watched layer) cells, and the first-token rows flagged; rows 0 to each reply's
    end-of-sequence row."""
    from dleaf.generation import generate
    from dleaf.localization import object_words
    from dleaf.settings import Setting

    setting = Setting("dleaf", {**knobs, "gamma": 0.0})
    cells, state = set(), {"offset": 0, "batch": 0}
    with setting.attached(model) as iv:
        loc = iv.method.localizer
        flags, before = loc.flags, loc.before_forward

        def spy_before(kwargs, new_sequence):
            if new_sequence:
                state["offset"] += state["batch"]
                state["batch"] = int(kwargs["input_ids"].shape[0])
            return before(kwargs, new_sequence)

        def spy(call, rows=None):
            out = flags(call, rows)
            pos = call.positions()
            for b, q in out.nonzero().tolist():
                cells.add((state["offset"] + b, int(pos[b, q]), call.layer))
            return out

        loc.flags, loc.before_forward = spy, spy_before
        rows = list(generate(model, processor, pool.items, setting, pool.max_new, batch_size, pool.rule,
                             intervention=iv, token_ids=True))
        n_watched = len(iv.watched)
    assert all(r["token_ids"] == g["token_ids"] for r, g in zip(rows, greedy))  # zero strength: plain decoding
    tok = processor.tokenizer
    n_rows = n_cells = n_flag_rows = n_h = n_h_flag = n_first = n_first_flag = 0
    by_row = {}
    for s, p, layer in cells:
        by_row.setdefault((s, p), set()).add(layer)
    for k, (g, truth) in enumerate(zip(greedy, pool.truths)):
        n = len(g["token_ids"])
        hall = {w["position"] for w in object_words(g["token_ids"], tok, truth, pool.objects) if w["hallucinated"]}
        for p in range(n):
            f = by_row.get((k, p), ())
            n_rows += 1
            n_cells += len(f)
            n_flag_rows += bool(f)
            if p in hall:
                n_h += 1
                n_h_flag += bool(f)
            if p == 0:
                n_first += 1
                n_first_flag += bool(f)
    return {"n_rows": n_rows, "n_hallucinated_rows": n_h, "recall": n_h_flag / n_h if n_h else None,
            "precision": n_h_flag / n_flag_rows if n_flag_rows else None, "row_share": n_flag_rows / n_rows,
            "cell_share": n_cells / (n_rows * n_watched), "first_token_share": n_first_flag / n_first,
            "n_flagged_rows": n_flag_rows}


def choose(reports, max_recall_drop=2.0, gamma="1"):
    """Per localizer, the grid setting with the largest CHAIR_s reduction at ``gamma`` among those whose object
    recall falls by at most ``max_recall_drop`` points (point estimates); ties: fewer rows flagged."""
    best = {}
    for label, e in reports["settings"].items():
        d = e["fusion"][gamma]["vs_greedy"]
        if -100 * d["recall"]["diff"] > max_recall_drop:
            continue
        key = (d["chair_s"]["diff"], e["hits"]["row_share"])
        name = label.split()[0]
        if name not in best or key < best[name][0]:
            best[name] = (key, label)
    return {name: label for name, (_, label) in best.items()}


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.stage == "choose":
        pooled = None
        for path in args.reports:
            rep = json.loads(Path(path).read_text())
            if pooled is None:
                pooled = rep
            else:
                pooled["settings"].update(rep["settings"])
        chosen = choose(pooled, args.max_recall_drop)
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "grid_all.md").write_text(markdown(pooled) + "\n")
        print(json.dumps(chosen))
        return 0
    import torch

    from dleaf import eval as harness
    from dleaf import models
    from dleaf.generation import generate
    from dleaf.io import write_json_atomic
    from dleaf.localization import _row_stats, compare_scores, organism_flags
    from dleaf.methods.localizers.calibrated import calibrate
    from dleaf.settings import Setting

    torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = models.load(args.model, attn_implementation="eager")
    load = lambda split, n: harness.load_benchmark("organism_caption", limit=n, splits=[split])  # noqa: E731
    indist = load("indist", args.n_calibration + args.n_dev)
    cal_items = indist.items[:args.n_calibration]
    if args.stage == "grid":
        dev_indist = copy.copy(indist)
        dev_indist.items = indist.items[args.n_calibration:]
        pool = Pool([(dev_indist, dev_indist.items),
                     (load("adversarial", args.n_dev), load("adversarial", args.n_dev).items)], "dev")
    else:
        rep = load("replication", args.n_confirm)
        pool = Pool([(rep, rep.items)], "replication")

    def say(msg):
        print(msg, flush=True)

    with torch.no_grad():
        cal_paths = {}
        for signal in SIGNALS:
            path = out_dir / f"calibration_{signal}.json"
            if not path.is_file():
                data = calibrate(model, processor, cal_items, {"layer_signal": signal}, indist.max_new_tokens(),
                                 args.batch_size, indist.protocol.sentence_rule,
                                 {"benchmark": "organism_caption", "splits": ["indist"], "n_images": len(cal_items)})
                write_json_atomic(data, path)
            cal_paths[signal] = str(path)

        def run(setting):
            rows = list(generate(model, processor, pool.items, setting, pool.max_new, args.batch_size, pool.rule,
                                 token_ids=True))
            return rows, pool.score(rows)

        greedy, g_scores = run(Setting())
        report = {"stage": args.stage, "pool": pool.name, "n_images": len(pool.items),
                  "greedy": _row_stats(g_scores), "settings": {}, "oracle": {}}
        flags = organism_flags(greedy, pool.truths, processor.tokenizer, pool.objects, "hallucinated")
        fpath = flags.save(out_dir / f"flags_{pool.name}.json")
        gammas = args.gammas
        for gamma in gammas:
            rows, scores = run(Setting("dleaf", {"gamma": gamma, "localization": "oracle", "flags": str(fpath)}))
            report["oracle"][f"{gamma:g}"] = {**_row_stats(scores), "vs_greedy": compare_scores(
                g_scores, scores, args.n_bootstrap, args.seed)}
            say(f"oracle gamma={gamma:g}: CHAIR_s {report['oracle'][f'{gamma:g}']['chair_s']:.3f}")
        settings = [s for s in grid() if args.match is None or args.match in s[0]] if args.stage == "grid" else [s for s in grid() if s[0] in args.choose]
        if args.stage == "confirm" and len(settings) != len(args.choose):
            raise SystemExit(f"unknown settings among {args.choose}")
        run_gammas = args.grid_gammas if args.stage == "grid" else gammas
        for label, knobs in settings:
            t = time.time()
            knobs = dict(knobs)
            if knobs["localization"] == "calibrated":
                knobs["calibration"] = cal_paths[knobs.pop("signal")]
            entry = {"knobs": {k: v for k, v in knobs.items() if k != "calibration"},
                     "hits": flag_hits(model, processor, pool, knobs, greedy, args.batch_size), "fusion": {}}
            for gamma in run_gammas:
                rows, scores = run(Setting("dleaf", {**knobs, "gamma": gamma}))
                entry["fusion"][f"{gamma:g}"] = {**_row_stats(scores), "vs_greedy": compare_scores(
                    g_scores, scores, args.n_bootstrap, args.seed),
                    "captions_changed": sum(g["token_ids"] != r["token_ids"] for g, r in zip(greedy, rows))}
            report["settings"][label] = entry
            h, f = entry["hits"], entry["fusion"][f"{run_gammas[-1]:g}"]
            say(f"{label}: {time.time() - t:.0f} s, recall {h['recall']}, precision {h['precision']}, rows "
                f"{h['row_share']:.3f}, CHAIR_s {f['chair_s']:.3f} recall {f['recall']:.3f}")
            write_json_atomic(report, out_dir / f"{args.stage}.json")
        write_json_atomic(report, out_dir / f"{args.stage}.json")
    (out_dir / f"{args.stage}.md").write_text(markdown(report) + "\n")
    print(json.dumps({"written": str(out_dir / f"{args.stage}.json")}))
    return 0


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def _iv(d, scale=100.0, digits=1):
    f = f"{{:+.{digits}f}}"
    return f"{f.format(scale * d['diff'])} [{f.format(scale * d['low'])}, {f.format(scale * d['high'])}]"


def markdown(report):
    g = report["greedy"]
    lines = [f"{report['pool']}: {report['n_images']} images (greedy: CHAIR_s {100 * g['chair_s']:.1f}%, CHAIR_i "
             f"{100 * g['chair_i']:.1f}%, recall {100 * g['recall']:.1f}%, additions {g['n_additions']})", "",
             "| setting | gamma | flag recall % | flag precision % | rows flagged % | first tokens flagged % | "
             "CHAIR_s % | CHAIR_i % | recall % | additions | share of the oracle's CHAIR_s drop |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for gamma, o in report["oracle"].items():
        d = o["vs_greedy"]
        lines.append(f"| oracle (hallucinated rows) | {gamma} | 100.0 | 100.0 | - | - | {100 * o['chair_s']:.1f} "
                     f"({_iv(d['chair_s'])}) | {100 * o['chair_i']:.1f} ({_iv(d['chair_i'])}) | "
                     f"{100 * o['recall']:.1f} ({_iv(d['recall'])}) | {o['n_additions']} "
                     f"({_iv(d['n_additions'], 1, 0)}) | 1.00 |")
    for label, e in report["settings"].items():
        h = e["hits"]
        for gamma, f in e["fusion"].items():
            d = f["vs_greedy"]
            o = report["oracle"].get(gamma)
            share = "-" if o is None else f"{d['chair_s']['diff'] / o['vs_greedy']['chair_s']['diff']:.2f}"
            lines.append(f"| {label} | {gamma} | {_pct(h['recall'])} | {_pct(h['precision'])} | "
                         f"{_pct(h['row_share'])} | {_pct(h['first_token_share'])} | {100 * f['chair_s']:.1f} "
                         f"({_iv(d['chair_s'])}) | {100 * f['chair_i']:.1f} ({_iv(d['chair_i'])}) | "
                         f"{100 * f['recall']:.1f} ({_iv(d['recall'])}) | {f['n_additions']} "
                         f"({_iv(d['n_additions'], 1, 0)}) | {share} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
