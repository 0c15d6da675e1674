"""The organism's hallucination profile: greedy captions and yes/no answers on held-out splits through the
evaluation harness (the organism's two benchmarks and their protocols, the one generation loop, the trailing-sentence
rule, the metric core), and the premise tables (from :mod:`dleaf.premise_check`): per layer, LIAE and image mass at
hallucinated versus grounded object words; at every reply row, the rows that predict hallucinated object words
against the other rows (actionability, percentile flags), with position held fixed; and at the first token of the
yes/no answers, wrong against right.

The premise statistics are read at the query row that *predicts* each object word (the position just before it), in
one teacher-forced eager forward pass over the prompt and the generated reply, which reproduces the attention the
model had while generating greedily.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .. import eval as harness
from .. import actionability, premise
from ..premise_check import (ERROR_KINDS, FIRST_TOKEN_INTRO, POSITION_INTRO, ROWS_INTRO, first_token_records,
                             first_token_rows, premise_rows, reply_records, row_tables, row_tables_markdown)
from ..settings import Setting
from . import regime, world
from .benchmarks import VOCAB

__all__ = ["VOCAB", "ProfileProtocol", "profile_model", "profile_markdown", "patch_probe", "patch_labels",
           "image_token_features"]


@dataclasses.dataclass(frozen=True)
class ProfileProtocol:
    """Everything that fixes a profile run besides the benchmark protocols (``data/protocols/organism_caption.yaml``
    and ``organism_pope.yaml``: prompts, token limits, world and question seeds, sentence rule); recorded with its
    results."""

    n_images: int = 1000
    caption_splits: tuple[str, ...] = ("indist", "adversarial", "replication")
    pope_split: str = "adversarial"
    pope_negatives: tuple[str, ...] = world.POPE_NEGATIVES
    premise_splits: tuple[str, ...] = ("adversarial", "replication")
    batch_size: int = 100
    n_bootstrap: int = 2000
    #: The caption splits whose attention regime is measured when the profile is asked for it (``None``: the premise
    #: splits); each must be a caption split.
    regime_splits: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.n_images <= 0 or self.batch_size <= 0:
            raise ValueError(f"n_images and batch_size must be positive, got {self.n_images}, {self.batch_size}")
        for s in self.caption_splits + self.premise_splits + (self.pope_split,) + tuple(self.regime_splits or ()):
            if s not in world.SPLITS or s == "train":
                raise ValueError(f"{s!r} is not a held-out split; expected one of indist, adversarial, replication")
        if not self.caption_splits:
            raise ValueError("caption_splits is empty: name at least one of indist, adversarial, replication")
        for name in ("premise_splits", "regime_splits"):
            extra = [s for s in getattr(self, name) or () if s not in self.caption_splits]
            if extra:
                raise ValueError(f"{name} {', '.join(extra)} not among the caption splits "
                                 f"({', '.join(self.caption_splits)}): they are measured on the split's captions")
        unknown = [n for n in self.pope_negatives if n not in world.POPE_NEGATIVES]
        if unknown:
            raise ValueError(f"pope_negatives {', '.join(unknown)}: expected some of {', '.join(world.POPE_NEGATIVES)}")

    @property
    def regime_split_set(self) -> tuple[str, ...]:
        """The splits whose attention regime is measured: ``regime_splits``, or the premise splits."""
        return self.premise_splits if self.regime_splits is None else self.regime_splits


def _benchmark(name: str, n_images: int, **options) -> "harness.Benchmark":
    return harness.load_benchmark(name, limit=n_images, **options)


def profile_model(model, processor, protocol: ProfileProtocol = ProfileProtocol(), progress=None,
                  attention_regime: bool = False) -> dict:
    """Captions, yes/no answers and the premise table of one model on the protocol's held-out splits, through the
    harness (greedy decoding); with ``attention_regime``, also the attention regime of the captions of the protocol's
    regime splits (:attr:`ProfileProtocol.regime_split_set`; :mod:`dleaf.organism.regime`, under
    ``attention_regime``)."""
    say = progress or (lambda msg: None)
    result: dict = {"captions": {}, "pope": {}, "premise": {}, "premise_by_error": {}, "premise_counts": {},
                    "image_share": {}, "row_tables": {}, "first_token": {}, "examples": {}, "protocols": {}}
    for split in protocol.caption_splits:
        bench = _benchmark("organism_caption", protocol.n_images, splits=[split])
        result["protocols"]["organism_caption"] = bench.protocol.record()
        say(f"captioning {split} ({len(bench.items)} images)")
        run = harness.evaluate(model, processor, bench, Setting(), protocol.batch_size)
        result["captions"][split] = run["sections"][split]
        result["examples"][split] = [{"objects": sorted(it.truth), "caption": r["text"]}
                                     for it, r in zip(bench.items[:5], run["rows"][:5])]
        if attention_regime and split in protocol.regime_split_set:
            say(f"attention regime on {split}")
            result.setdefault("attention_regime", {})[split] = regime.regime_from_run(
                model, processor, bench, run["rows"], split, int(bench.protocol["world_seed"]), protocol.batch_size)
        if split in protocol.premise_splits:
            say(f"premise on {split}")
            res = reply_records(
                model, processor, [it.image() for it in bench.items], [it.prompt for it in bench.items],
                [r["raw"] for r in run["rows"]], [sorted(it.truth) for it in bench.items], VOCAB,
                batch_size=protocol.batch_size)
            records, share = res["mentions"], res["share"]
            result["row_tables"][split] = row_tables(res["rows"], len(bench.items), protocol.n_bootstrap)
            result["premise"][split] = [dataclasses.asdict(r) for r in premise_rows(records, protocol.n_bootstrap)]
            result["premise_by_error"][split] = {
                kind: [dataclasses.asdict(r) for r in premise_rows(records, protocol.n_bootstrap, error=kind)]
                for kind in ("addition", "substitution")}
            result["premise_counts"][split] = {
                "grounded": sum(not r["hallucinated"] for r in records),
                **{kind: sum(r.get("error") == kind for r in records) for kind in ERROR_KINDS}}
            result["image_share"][split] = share
    for neg in protocol.pope_negatives:
        bench = _benchmark("organism_pope", protocol.n_images, splits=[protocol.pope_split], negatives=[neg])
        result["protocols"]["organism_pope"] = bench.protocol.record()
        say(f"yes/no questions, {neg} negatives ({len(bench.items)} questions)")
        run = harness.evaluate(model, processor, bench, Setting(), protocol.batch_size)
        result["pope"][neg] = run["sections"][f"{protocol.pope_split}/{neg}"]
        records = first_token_records(model, processor, [it.image() for it in bench.items],
                                      [it.prompt for it in bench.items], [r["raw"] for r in run["rows"]],
                                      [bool(it.truth) for it in bench.items], batch_size=protocol.batch_size)
        result["first_token"][neg] = first_token_rows(records, protocol.n_bootstrap)
    return result


def _pct(x) -> str:
    return "nan" if x is None or x != x else f"{100 * x:.1f}"


def _best(rows: Sequence[dict]) -> dict | None:
    rows = [r for r in rows if r["auroc"] == r["auroc"]]
    return max(rows, key=lambda r: r["auroc"]) if rows else None


# Fewer hallucinated mentions than this and a premise target is not judged: with a handful of words the bootstrap
# interval of the best of 12 (signal, layer) cells says nothing (4 additions gave AUROC 1.000 [1.000, 1.000]).
MIN_PREMISE_MENTIONS = 20


def _premise_cell(top: dict | None) -> str:
    if top is None:
        return "no hallucinated mentions of this kind"
    cell = (f"best {top['signal']} layer {top['layer']}: {top['auroc']:.3f} "
            f"[{top['ci_low']:.3f}, {top['ci_high']:.3f}]")
    n = top.get("n_hallucinated")
    if n is not None and n < MIN_PREMISE_MENTIONS:
        cell += f", on only {n} mentions (at least {MIN_PREMISE_MENTIONS} needed to judge)"
    return cell


def _premise_met(top: dict | None) -> bool:
    if top is None or top.get("n_hallucinated", MIN_PREMISE_MENTIONS) < MIN_PREMISE_MENTIONS:
        return False
    return top["auroc"] >= 0.65 and top["ci_low"] > 0.5


def design_targets(profile: dict) -> list[str]:
    """The organism's design targets, each with the measured value and whether it is met (measured, not tuned).

    Captions (adversarial split): additions outnumber substitutions; CHAIR_s between 15% and 50%; recall at least
    85%; partner share at least 1.5 times its chance rate. In-distribution recall at least 97%. The premise: on
    each held-out split with a premise table, some signal and layer separates *additions* from grounded words with
    AUROC at least 0.65 and its interval clear of 0.5. Yes/no: the control at least 90% accurate under every
    negative set; the organism at least 80% with random negatives, lower with adversarial negatives and with a
    higher yes-ratio there. The control: its hallucinations no more partners than chance would give (partner share
    below 1.5 times chance), so that the organism's lean toward partners is the prior's.
    """
    models = profile["models"]
    out = ["## Design targets, as measured", "", "| target | measured | met |", "|---|---|---|"]

    def row(text, value, ok):
        out.append(f"| {text} | {value} | {'yes' if ok else '**no**'} |")

    organism = models.get("organism", {})
    org = organism.get("captions", {})
    if "adversarial" in org:
        a = org["adversarial"]
        row("organism, adversarial: additions outnumber substitutions",
            f"{a['n_additions']} vs {a['n_substitutions']}", a["n_additions"] > a["n_substitutions"])
        row("organism, adversarial: CHAIR_s between 15% and 50%", _pct(a["chair_s"]), 0.15 <= a["chair_s"] <= 0.50)
        row("organism, adversarial: recall >= 85%", _pct(a["recall"]), a["recall"] >= 0.85)
        share, chance = a.get("partner_share"), a.get("partner_chance")
        if share is not None and chance is not None and share == share:
            row("organism, adversarial: partner share >= 1.5 x chance",
                f"{_pct(share)} vs chance {_pct(chance)}", share >= 1.5 * chance)
    if "indist" in org:
        row("organism, in-distribution: recall >= 97%", _pct(org["indist"]["recall"]),
            org["indist"]["recall"] >= 0.97)
    for split, by_error in organism.get("premise_by_error", {}).items():
        top = _best(by_error.get("addition", []))
        row(f"organism, {split} premise on additions: some signal and layer reaches AUROC 0.65, interval clear "
            "of 0.5", _premise_cell(top), _premise_met(top))
    pope = organism.get("pope", {})
    if "random" in pope:
        row("organism, yes/no with random negatives: accuracy >= 80%", _pct(pope["random"]["accuracy"]),
            pope["random"]["accuracy"] >= 0.80)
    if "random" in pope and "adversarial" in pope:
        r, v = pope["random"], pope["adversarial"]
        row("organism, yes/no: adversarial negatives lower accuracy and a higher yes-ratio than random ones",
            f"accuracy {_pct(v['accuracy'])} vs {_pct(r['accuracy'])}, yes-ratio {_pct(v['yes_ratio'])} vs "
            f"{_pct(r['yes_ratio'])}", v["accuracy"] < r["accuracy"] and v["yes_ratio"] > r["yes_ratio"])
    control = models.get("control", {})
    cpope = control.get("pope", {})
    if cpope:
        worst = min(cpope, key=lambda k: cpope[k]["accuracy"])
        row("control, yes/no: accuracy >= 90% under every negative set",
            f"lowest {_pct(cpope[worst]['accuracy'])} ({worst})", all(p["accuracy"] >= 0.90 for p in cpope.values()))
    ctl = control.get("captions", {})
    if "adversarial" in ctl:
        c = ctl["adversarial"]
        share, chance = c.get("partner_share"), c.get("partner_chance")
        if share is not None and chance is not None and share == share:
            row("control, adversarial: hallucinations no more partners than chance (share < 1.5 x chance)",
                f"{_pct(share)} vs chance {_pct(chance)}", share < 1.5 * chance)
        else:
            row("control, adversarial: hallucinations no more partners than chance (share < 1.5 x chance)",
                "no hallucinations", True)
    return out + [""]


def profile_markdown(profile: dict) -> str:
    """Markdown tables of a profile written by :func:`profile_model` for one or more models."""
    lines = ["# Organism hallucination profile", ""]
    proto = profile.get("protocol", {})
    if proto:
        records = next(iter(profile["models"].values()), {}).get("protocols", {})
        named = ", ".join(f"{r['name']} v{r['version']}" for r in records.values())
        lines += [f"Greedy decoding through the evaluation harness, {proto.get('n_images')} images per split"
                  + (f" (protocols {named}: prompts, token limits, seeds and the trailing-sentence rule)" if named
                     else "") + ".", ""]
    lines += ["## Captions (CHAIR)", "",
              "| model | split | CHAIR_s % | CHAIR_i % | recall % | words | hallucinated mentions | grounded mentions "
              "| additions | substitutions | partner share % | partner chance % |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in profile["models"].items():
        for split, c in res["captions"].items():
            lines.append(
                f"| {name} | {split} | {_pct(c['chair_s'])} | {_pct(c['chair_i'])} | {_pct(c['recall'])} | "
                f"{c['mean_length']:.1f} | {c['n_hallucinated_mentions']} | {c['n_grounded_mentions']} | "
                f"{c['n_additions']} | {c['n_substitutions']} | {_pct(c['partner_share'])} | {_pct(c['partner_chance'])} |")
    lines += ["", f"## Yes/no questions (POPE-style, {proto.get('pope_split', '')} scenes)", "",
              "| model | negatives | accuracy % | precision % | recall % | F1 % | yes ratio % | unparsed |",
              "|---|---|---|---|---|---|---|---|"]
    for name, res in profile["models"].items():
        for neg, p in res["pope"].items():
            lines.append(f"| {name} | {neg} | {_pct(p['accuracy'])} | {_pct(p['precision'])} | {_pct(p['recall'])} | "
                         f"{_pct(p['f1'])} | {_pct(p['yes_ratio'])} | {p['n_unparsed']} |")
    lines += [""]
    if any(res.get("premise") for res in profile["models"].values()):
        lines += ["## The premise: image attention at hallucinated vs grounded object words", "",
                  "AUROC > 0.5 means the signal is larger (more anomalous) at hallucinated words; `image_mass_deficit` "
                  "is minus the head-mean image mass of the row that predicts the word.", ""]
    if any(res.get("row_tables") for res in profile["models"].values()):
        lines += [ROWS_INTRO, "", POSITION_INTRO.format(bin=actionability.POSITION_BIN), ""]
    for name, res in profile["models"].items():
        for split, rows in res["premise"].items():
            counts = res.get("premise_counts", {}).get(split)
            lines += [f"### {name}, {split}: every hallucinated mention", ""]
            if counts:
                lines += [f"{counts['grounded']} grounded mentions; hallucinated: {counts['addition']} in additions, "
                          f"{counts['substitution']} in substitutions, {counts['mixed']} in replies with some of each "
                          "(left out of the tables by error type).", ""]
            lines += [premise.premise_markdown([premise.PremiseRow(**r) for r in rows]), ""]
            for kind, kind_rows in res.get("premise_by_error", {}).get(split, {}).items():
                lines += [f"### {name}, {split}: {kind}s against grounded mentions", ""]
                lines += [premise.premise_markdown([premise.PremiseRow(**r) for r in kind_rows])
                          if kind_rows else "(none)", ""]
        for split, tables in res.get("row_tables", {}).items():
            lines += [f"### {name}, {split}: what a flag sees", "", row_tables_markdown(tables, heading="####")]
        for split, share in res["image_share"].items():
            lines.append(f"Image share of attention per layer ({name}, {split}, mean over generated positions): "
                         + ", ".join(f"L{i} {s:.2f}" for i, s in enumerate(share)))
        lines.append("")
    first = {name: res["first_token"] for name, res in profile["models"].items() if res.get("first_token")}
    if first:
        lines += [f"## Yes/no answers at their first token ({proto.get('pope_split', '')} scenes)", "",
                  FIRST_TOKEN_INTRO, ""]
        for name, by_neg in first.items():
            for neg, rows in by_neg.items():
                lines += [f"### {name}, {neg} negatives", "",
                          actionability.first_token_markdown(rows) if rows else "No parsed answers.", ""]
    lines += regime.regime_section(profile)
    lines += design_targets(profile)
    probes = {name: res["patch_probe"] for name, res in profile["models"].items() if "patch_probe" in res}
    if probes:
        lines += ["## Per-patch linear probe (object evidence is local to its patches)", "",
                  "| model | accuracy % (all tokens) | accuracy % (object tokens) | label from a far patch: all | "
                  "object tokens |", "|---|---|---|---|---|"]
        for name, pr in probes.items():
            lines.append(f"| {name} | {_pct(pr['accuracy'])} | {_pct(pr['accuracy_objects'])} | "
                         f"{_pct(pr['shuffled_accuracy'])} | {_pct(pr['shuffled_accuracy_objects'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def image_token_features(model, processor, scenes: Sequence[world.Scene]) -> torch.Tensor:
    """The decoder-side image token embeddings (projector outputs), shape (n_scenes, n_image_tokens, hidden)."""
    pix = processor.image_processor([world.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    feats = model.model.get_image_features(pixel_values=pix.to(model.dtype))
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    return feats.reshape(len(scenes), -1, feats.shape[-1]).float()


def patch_labels(scenes: Sequence[world.Scene], n_tokens: int) -> torch.Tensor:
    """Per image token, the index of the object covering its patch (``len(world.OBJECTS)`` for none)."""
    patch = world.CANVAS // int(round(n_tokens ** 0.5))
    labels = torch.full((len(scenes), n_tokens), len(world.OBJECTS), dtype=torch.long)
    for i, s in enumerate(scenes):
        for obj in s.objects:
            labels[i, s.patches_of(obj, patch)] = world.OBJECTS.index(obj)
    return labels


def patch_probe(model, processor, n_train: int = 400, n_test: int = 200, steps: int = 300, seed: int = 0) -> dict:
    """Per-patch linear probe: can one image token's embedding tell which object (or none) covers its patch?

    Trained on ``n_train`` training-split scenes (softmax regression, full-batch Adam), scored on ``n_test``
    adversarial scenes. ``accuracy_objects`` is the accuracy on tokens covered by an object; the ``shuffled``
    accuracy, with each token's label taken from a different patch of the same image, is the locality control.
    """
    torch.manual_seed(seed)
    tr, te = world.scenes("train", n_train), world.scenes("adversarial", n_test)
    xtr, xte = image_token_features(model, processor, tr), image_token_features(model, processor, te)
    n_tok = xtr.shape[1]
    ytr, yte = patch_labels(tr, n_tok), patch_labels(te, n_tok)
    mu, sd = xtr.mean((0, 1)), xtr.std((0, 1)) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    n_cls = len(world.OBJECTS) + 1

    def fit(x, y):
        lin = torch.nn.Linear(x.shape[-1], n_cls)
        opt = torch.optim.Adam(lin.parameters(), lr=0.05)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(lin(x.reshape(-1, x.shape[-1])), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return lin

    def score(lin, x, y):
        with torch.no_grad():
            pred = lin(x.reshape(-1, x.shape[-1])).argmax(-1).reshape(y.shape)
        obj = y != len(world.OBJECTS)
        return float((pred == y).float().mean()), float((pred[obj] == y[obj]).float().mean())

    acc, acc_obj = score(fit(xtr, ytr), xte, yte)
    roll = n_tok // 2  # a patch far away in the same image
    sh_acc, sh_obj = score(fit(xtr, ytr.roll(roll, dims=1)), xte, yte.roll(roll, dims=1))
    return {"accuracy": acc, "accuracy_objects": acc_obj, "shuffled_accuracy": sh_acc,
            "shuffled_accuracy_objects": sh_obj, "n_train": n_train, "n_test": n_test}
