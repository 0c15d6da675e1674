"""A learned token-level hallucination detector on D-LEAF's own attention signals, and the ``learned`` localizer's model.

Features of a row (the query position that predicts one reply token), per layer of ``layers``: the layer's LIAE
(entropy of the head-mixed image profile, in nats, not normalised), the head-mean image mass, each head's image mass
and each head's focus (mass times one minus the normalised entropy of its image profile). They are the values D-LEAF's
trace records when it runs teacher-forced at gamma 0 (:mod:`dleaf.premise_check` reads the same trace):
:func:`row_features` attaches D-LEAF twice (IAF = mass, IAF = focus) and reads ``signal`` and ``iaf``.

A :class:`Detector` is a standardisation and a logistic regression (scikit-learn's, fitted by :func:`fit`) over those
features; its probability is the logistic's own (no class weighting, so the probabilities estimate the base rate;
:func:`reliability` checks them). It is saved as a small JSON file with the model identity it was fitted on
(:func:`model_identity`); loading it for another model raises.

:func:`score` gives the probability at every token of a caption for an image (``dleaf detect``, ``scripts/detect.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

DETECTOR_VERSION = 1


def feature_names(layers: Sequence[int], num_heads: int) -> list[str]:
    names = []
    for layer in layers:
        names += [f"L{layer}.liae", f"L{layer}.mass_mean"]
        names += [f"L{layer}.mass_h{h}" for h in range(num_heads)]
        names += [f"L{layer}.focus_h{h}" for h in range(num_heads)]
    return names


def features_from_values(liae: torch.Tensor, mass: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
    """(N, F) features from per-layer ``liae`` (N, Lf), per-head ``mass`` and ``focus`` (N, Lf, H), in the order
    of :func:`feature_names`."""
    parts = []
    for i in range(liae.shape[1]):
        parts += [liae[:, i:i + 1], mass[:, i].mean(-1, keepdim=True), mass[:, i], focus[:, i]]
    return torch.cat(parts, 1)


def model_identity(model) -> dict:
    """What a detector file names as its model: the decoder's shape and a fingerprint of its token embeddings."""
    cfg = model.config
    text = getattr(cfg, "text_config", cfg)
    emb = model.get_input_embeddings().weight.detach()
    flat = emb.reshape(-1)[:8192].to(torch.float32).cpu().numpy()
    digest = hashlib.sha256(np.round(flat, 5).astype(np.float32).tobytes()
                            + repr(tuple(emb.shape)).encode()).hexdigest()[:16]
    return {"model_type": getattr(cfg, "model_type", type(model).__name__),
            "num_layers": int(text.num_hidden_layers), "num_heads": int(text.num_attention_heads),
            "embedding_fingerprint": digest}


class Detector:
    """Standardised features -> logistic regression -> probability that the row predicts a hallucinated object word."""

    def __init__(self, layers, num_heads, mean, scale, coef, intercept, model: dict, meta: dict | None = None):
        self.layers = [int(x) for x in layers]
        self.num_heads = int(num_heads)
        self.mean = np.asarray(mean, float)
        self.scale = np.asarray(scale, float)
        self.coef = np.asarray(coef, float)
        self.intercept = float(intercept)
        self.model = dict(model)
        self.meta = dict(meta or {})
        t = self.meta.get("threshold")
        if t is not None and not (isinstance(t, (int, float)) and 0.0 < t < 1.0):
            raise ValueError(f"the detector's recorded threshold must be a probability in (0, 1); got {t!r}")
        self.names = feature_names(self.layers, self.num_heads)
        if not len(self.names) == len(self.mean) == len(self.scale) == len(self.coef):
            raise ValueError(f"a detector over layers {self.layers} with {self.num_heads} heads has "
                             f"{len(self.names)} features; the file holds {len(self.coef)} coefficients")

    def decision(self, x) -> np.ndarray:
        x = np.asarray(x, float)
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def probability(self, x) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.decision(x)))

    def torch_probability(self, x: torch.Tensor) -> torch.Tensor:
        """The same probability in float64 torch (the localizer's path)."""
        x = x.to(torch.float64)
        m, s, c = (torch.as_tensor(a, dtype=torch.float64, device=x.device) for a in (self.mean, self.scale, self.coef))
        return torch.sigmoid(((x - m) / s) @ c + self.intercept)

    @property
    def threshold(self) -> float | None:
        """The flag threshold recorded with the detector (chosen where it was fitted), or None."""
        t = self.meta.get("threshold")
        return None if t is None else float(t)

    def check_model(self, model) -> None:
        ident = model_identity(model)
        if ident != self.model:
            raise ValueError(f"this detector was fitted on model {self.model} and cannot score model {ident}: its "
                             "coefficients weigh that model's attention heads (fit one for this model)")

    def to_json(self) -> dict:
        return {"version": DETECTOR_VERSION, "kind": "dleaf token hallucination detector", "model": self.model,
                "layers": self.layers, "num_heads": self.num_heads, "feature_names": self.names,
                "scaler": {"mean": self.mean.tolist(), "scale": self.scale.tolist()},
                "coef": self.coef.tolist(), "intercept": self.intercept, "meta": self.meta}

    def save(self, path) -> Path:
        from .io import write_json_atomic

        return write_json_atomic(self.to_json(), path)

    @classmethod
    def from_json(cls, data: dict) -> "Detector":
        if not isinstance(data, dict) or data.get("version") != DETECTOR_VERSION or "coef" not in data:
            raise ValueError(f"not a version-{DETECTOR_VERSION} detector file")
        det = cls(data["layers"], data["num_heads"], data["scaler"]["mean"], data["scaler"]["scale"], data["coef"],
                  data["intercept"], data["model"], data.get("meta"))
        if data.get("feature_names") not in (None, det.names):
            raise ValueError("the detector file's feature names are not the features this version computes")
        return det

    @classmethod
    def load(cls, path) -> "Detector":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read a detector file ({e})") from e
        try:
            return cls.from_json(data)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e


#: how the study of :func:`study` chooses the flag threshold it records in the detector file (``meta.threshold``)
THRESHOLD_RULE = "the probability threshold of largest flag F1 at the dev rows (grid: 60 quantiles 90-99.9%)"

#: detectors shipped with the package, by name (``detector=organism``): ``data/detectors/<name>_detector.json``
SHIPPED = ("organism", "organism_llava_like")


def shipped_detector(name: str) -> Path:
    """The path of the shipped detector called ``name`` (one of :data:`SHIPPED`)."""
    from .resources import data_path

    if name not in SHIPPED:
        raise ValueError(f"no shipped detector is called {name!r} (shipped: {', '.join(SHIPPED)}); give the path of "
                         "a detector file (python -m dleaf.detect fits one: dleaf.detect_study)")
    return data_path("detectors", f"{name}_detector.json")


def shipped_detector_for(model) -> str | None:
    """The name of the shipped detector (:data:`SHIPPED`) that was fitted on ``model``, or None when none was."""
    for name in SHIPPED:
        try:
            Detector.load(shipped_detector(name)).check_model(model)
        except ValueError:
            continue
        return name
    return None


def checked_detector(detector, model) -> Detector:
    """:func:`as_detector`, checked to have been fitted on ``model``; an :class:`~dleaf.io.InputError` naming
    ``--detector`` otherwise (a file that cannot be read, or a detector of another model)."""
    from .io import InputError

    try:
        det = as_detector(detector)
        det.check_model(model)
    except ValueError as e:
        raise InputError(f"--detector {detector}: {e}") from None
    return det


def as_detector(detector) -> Detector:
    """A :class:`Detector` from a detector, a shipped detector's name (:data:`SHIPPED`), a JSON file's path or the
    file's dict."""
    if isinstance(detector, Detector):
        return detector
    if isinstance(detector, str) and detector in SHIPPED:
        return Detector.load(shipped_detector(detector))
    if isinstance(detector, (str, os.PathLike)):
        return Detector.load(detector)
    if isinstance(detector, dict):
        return Detector.from_json(detector)
    raise ValueError(f"detector must be a Detector, a JSON detector file path or its dict; got {type(detector).__name__}")


# ------------------------------------------------------------------------------------------------- features
@torch.no_grad()
def row_features(model, processor, images, prompts, replies, layers=None, batch_size: int = 8) -> list[dict]:
    """Per reply: ``{"token_ids": reply ids, "features": (T, F) float64 array}``, row ``j`` the row that predicts
    reply token ``j`` (teacher-forced; D-LEAF's trace at gamma 0, IAF = mass and IAF = focus)."""
    from . import engine
    from .config import DLeafConfig
    from .models import teacher_forced_inputs

    base = dict(gamma=0.0, layer_signal="liae", liae_variant="mixed", liae_normalize=False)
    out = []
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        full, n, reply_ids = teacher_forced_inputs(processor, prompts[sl], images[sl], replies[sl], model)
        traces = {}
        for variant in ("mass", "focus"):
            with engine.attached(model, DLeafConfig(iaf_variant=variant, **base), trace=True) as iv:
                engine.response_logprobs(model, full, [n] * len(reply_ids), iv)
            traces[variant] = iv.trace
        for i, r in enumerate(reply_ids):
            tm, tf = traces["mass"].sample(i), traces["focus"].sample(i)
            L = tm["signal"].shape[1]
            lay = list(range(L)) if layers is None else list(layers)
            row_of = {int(p): k for k, p in enumerate(tm["positions"])}
            idx = [row_of[n + j - 1] for j in range(len(r))]
            feats = features_from_values(tm["signal"][idx][:, lay].double(), tm["iaf"][idx][:, lay].double(),
                                         tf["iaf"][idx][:, lay].double())
            out.append({"token_ids": list(r), "features": feats.numpy()})
    return out


def labelled_rows(model, processor, images, prompts, replies, truths, vocab, layers=None, batch_size: int = 8) -> dict:
    """Rows of any caption benchmark with a vocabulary (the organism's, or COCO's under CHAIR's rules): features
    (:func:`row_features`), ``y`` (1 where the row predicts the first token of a hallucinated mention, found as the
    premise check finds mentions, :func:`dleaf.premise_check.mention_token_spans`; 0 at every other reply row),
    ``position`` and ``caption`` (the reply's index)."""
    from .premise_check import mention_token_spans

    recs = row_features(model, processor, images, prompts, replies, layers, batch_size)
    tok = getattr(processor, "tokenizer", processor)
    X, y, pos, cap = [], [], [], []
    for k, (rec, truth) in enumerate(zip(recs, truths)):
        ids, truth = rec["token_ids"], set(truth)
        hall = {first for first, _, m in mention_token_spans(tok, ids, vocab) if m.category not in truth}
        X.append(rec["features"])
        y += [int(j in hall) for j in range(len(ids))]
        pos += list(range(len(ids)))
        cap += [k] * len(ids)
    width = X[0].shape[1] if X else 0
    return {"X": np.concatenate(X) if X else np.zeros((0, width)), "y": np.array(y, int), "position": np.array(pos),
            "caption": np.array(cap)}


# ------------------------------------------------------------------------------------------------- fitting
def fit(x: np.ndarray, y: np.ndarray, layers, num_heads: int, model: dict, C: float = 1.0,
        meta: dict | None = None) -> Detector:
    """A standardised logistic regression (scikit-learn, L2, ``C``, no class weighting: its probabilities estimate
    the rate of hallucinated rows; the flag threshold is chosen on probabilities afterwards)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x)
    scale = np.where(sc.scale_ > 0, sc.scale_, 1.0)
    lr = LogisticRegression(C=C, max_iter=5000).fit((x - sc.mean_) / scale, y)
    return Detector(layers, num_heads, sc.mean_, scale, lr.coef_[0], lr.intercept_[0], model,
                    {"C": C, "n_rows": int(len(y)), "n_positive": int(np.sum(y)), **(meta or {})})


def reliability(p: np.ndarray, y: np.ndarray, n_bins: int = 10) -> dict:
    """Calibration on held-out rows: bins of equal count of predicted probability, each bin's mean prediction and
    observed rate; expected calibration error (count-weighted mean |observed - predicted|) and Brier score."""
    order = np.argsort(p, kind="stable")
    bins = [b for b in np.array_split(order, n_bins) if len(b)]
    rows = [{"n": int(len(b)), "predicted": float(p[b].mean()), "observed": float(y[b].mean())} for b in bins]
    ece = sum(r["n"] * abs(r["observed"] - r["predicted"]) for r in rows) / len(p)
    return {"bins": rows, "ece": float(ece), "brier": float(np.mean((p - y) ** 2)),
            "mean_predicted": float(p.mean()), "observed_rate": float(y.mean())}


def grouped_bootstrap(y, s, groups, statistic, n_resamples: int = 2000, seed: int = 0) -> dict:
    """``statistic(y, s)`` with a 95% percentile bootstrap interval, captions (``groups``) resampled with all
    their rows."""
    y, s, groups = np.asarray(y), np.asarray(s), np.asarray(groups)
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_resamples):
        pick = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        if 0 < y[pick].sum() < len(pick):
            vals.append(statistic(y[pick], s[pick]))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return {"value": float(statistic(y, s)), "low": float(lo), "high": float(hi)}


# ------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score(model, processor, image, caption: str, detector, prompt: str | None = None) -> list[dict]:
    """The detector's probability at every token of ``caption`` for ``image``: ``[{"token", "token_id",
    "probability"}]``, read at the row that predicts the token (teacher-forced after ``prompt``, default the
    organism's caption prompt). Raises for a detector fitted on another model."""
    det = as_detector(detector)
    det.check_model(model)
    prompt = prompt or DEFAULT_PROMPT
    rec = row_features(model, processor, [image], [prompt], [caption], det.layers, batch_size=1)[0]
    p = det.probability(rec["features"]) if len(rec["token_ids"]) else np.zeros(0)
    tok = getattr(processor, "tokenizer", processor)
    return [{"token": tok.convert_ids_to_tokens([t])[0], "token_id": int(t), "probability": float(q)}
            for t, q in zip(rec["token_ids"], p)]


DEFAULT_PROMPT = "describe the image in detail ."



# ------------------------------------------------------------------------------------------------- the command
SCORE_DOC = """Score a caption token by token with the learned hallucination detector: at every token, the probability that
it is a hallucinated object word, from the model's own attention at the row that predicts it (LIAE, image mass,
per-head image mass and focus of the detector's layers; dleaf.detect).

    python scripts/detect.py --item adversarial/3 --caption "a red cube and a blue ball ."
    python scripts/detect.py --model organism --image scene.png --caption "..." --output_dir runs/detect_score

The detector file names the model it was fitted on; scoring another model with it is refused. Writes
detect.json (one record per token: token, id, probability) to --output_dir.
"""


def score_parser():
    from . import cli

    ap = cli.ArgumentParser(description=SCORE_DOC)
    ap.add_argument("--model", default="organism", help="a registered model name, a checkpoint folder or a hub id")
    ap.add_argument("--detector", default=None, help="a detector file (default: the shipped organism detector, "
                    "data/detectors/organism_detector.json)")
    ap.add_argument("--caption", required=True, help="the caption to score")
    ap.add_argument("--image", default=None, help="an image file")
    ap.add_argument("--item", default=None, help="an organism caption item instead of --image, e.g. adversarial/3")
    ap.add_argument("--prompt", default=None, help="the prompt the caption answers (default: the organism's)")
    ap.add_argument("--output_dir", default="runs/detect_score", help="where detect.json goes")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads torch may use")
    return ap


def _score_run(argv=None):
    from . import cli

    args = score_parser().parse_args(argv)
    from pathlib import Path

    from . import detect, models
    from .io import InputError, write_json_atomic

    if (args.image is None) == (args.item is None):
        raise InputError("give exactly one of --image and --item")
    shown = args.detector or "the shipped organism detector"
    if args.detector is None:
        from .resources import data_path

        args.detector = data_path("detectors", "organism_detector.json")
    try:
        det = detect.Detector.load(args.detector)
    except ValueError as e:
        raise InputError(str(e)) from e
    out = cli.check_output_dir(args.output_dir)
    cli.set_threads(args.threads)
    if args.item is not None:
        from . import eval as harness

        split, _, index = args.item.partition("/")
        if not index.isdigit():
            raise InputError(f"--item must be split/index, e.g. adversarial/3; got {args.item!r}")
        bench = harness.load_benchmark("organism_caption", limit=int(index) + 1, splits=[split])
        item = bench.items[int(index)]
        image, prompt = item.image(), args.prompt or item.prompt
    else:
        from PIL import Image

        if not Path(args.image).is_file():
            raise InputError(f"--image {args.image}: no such file")
        image, prompt = Image.open(args.image).convert("RGB"), args.prompt
    model, processor = models.load(args.model, attn_implementation="eager")
    try:
        det.check_model(model)
    except ValueError as e:
        raise InputError(str(e)) from e
    tokens = detect.score(model, processor, image, args.caption, det, prompt)
    for t in tokens:
        print(f"{t['token']}\t{t['probability']:.4f}")
    path = write_json_atomic({"model": args.model, "detector": str(shown), "caption": args.caption,
                              "tokens": tokens}, Path(out) / "detect.json")
    cli.done(path)
    return 0


def score_main(argv=None) -> int:
    """``dleaf detect`` / ``scripts/detect.py``: score a caption token by token (``error:`` lines, exit 2)."""
    from . import cli

    return cli.main(_score_run, argv, resumable=False)


__all__ = ["DETECTOR_VERSION", "SHIPPED", "THRESHOLD_RULE", "Detector", "as_detector", "feature_names",
           "features_from_values", "fit", "grouped_bootstrap", "labelled_rows", "model_identity", "reliability",
           "row_features", "score", "score_main", "score_parser", "shipped_detector",
           "shipped_detector_for", "checked_detector"]

if __name__ == "__main__":  # python -m dleaf.detect: the organism study (dleaf.detect_study)
    import sys

    from .detect_study import main

    sys.exit(main())
