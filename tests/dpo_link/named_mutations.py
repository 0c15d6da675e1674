"""Named mutations of the DPO link (not collected by pytest; slow): plausible mistakes, each applied to a copy of the
repository, and the test that must fail on it.

    python tests/dpo_link/named_mutations.py [--only NAME ...] [--whole] [--out runs/mutation/named.json]

Each mutation replaces one exact piece of source (which must occur exactly once) in a copy of the repository under a
temporary folder; the tests named with it then run against the copy (``pytest -x``, a fresh interpreter). The
mutation is *killed* when they fail, *survives* when they pass. ``--whole`` runs every test file the mutations name
instead of only the named tests. Where several places can make the same mistake, each is its own mutation.
The exit code is 1 when a mutation survives (or no longer applies: its source changed), else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
T = "tests/dpo_link/"


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    # ---- D-LEAF as a DPO step: the slope and the loss curve
    Mutation("slope_swaps_chosen_and_rejected", "chosen and rejected swapped inside the D-LEAF DPO slope",
             "dpo_link/dleaf_dpo.py", "part = dpo_losses(chosen, rejected).sum() / n_pairs",
             "part = dpo_losses(rejected, chosen).sum() / n_pairs",
             (T + "test_dpo_dleaf_dpo.py::test_autograd_slope_against_an_independent_finite_difference",)),
    Mutation("slope_pair_rewards_swapped", "the slope's pair rewards come back as (rejected, chosen)",
             "dpo_link/dleaf_dpo.py", "        chosen, rejected = _pair_rewards(base, b, r0, beta, config, gamma)\n",
             "        rejected, chosen = _pair_rewards(base, b, r0, beta, config, gamma)\n",
             (T + "test_dpo_dleaf_dpo.py::test_autograd_slope_against_an_independent_finite_difference",)),
    Mutation("slope_beta_squared", "beta squared in the loss used by the slope",
             "dpo_link/dleaf_dpo.py", "        chosen, rejected = _pair_rewards(base, b, r0, beta, config, gamma)\n",
             "        chosen, rejected = _pair_rewards(base, b, r0, beta * beta, config, gamma)\n",
             (T + "test_dpo_dleaf_dpo.py::test_autograd_slope_against_an_independent_finite_difference",)),
    Mutation("curve_gamma_doubled", "gamma times 2 in the loss curve (for gamma in [0, 1])",
             "dpo_link/dleaf_dpo.py", "cfg = dataclasses.replace(config, gamma=g if inside else config.gamma)",
             "cfg = dataclasses.replace(config, gamma=min(2 * g, 1.0) if inside else config.gamma)",
             (T + "test_dpo_dleaf_dpo.py::test_loss_curve_against_an_independent_loss",)),
    Mutation("curve_extrapolated_gamma_doubled", "gamma times 2 where the loss curve extrapolates the fusion",
             "dpo_link/dleaf_dpo.py", "override = None if inside else torch.tensor(g, dtype=torch.float64)",
             "override = None if inside else torch.tensor(2 * g, dtype=torch.float64)",
             (T + "test_dpo_dleaf_dpo.py::test_loss_curve_against_an_independent_loss",)),
    # ---- the correspondence statistics
    Mutation("top_k_overlap_less", "the top-k overlap test's alternative flipped to 'less'",
             "dpo_link/correspondence.py", 'n_resamples=permutations, alternative="greater"',
             'n_resamples=permutations, alternative="less"',
             (T + "test_dpo_correspondence.py::test_mechanism_p_values_equal_exact_enumeration",)),
    Mutation("sign_agreement_chance_half", "sign agreement's chance level hard-coded to 0.5",
             "dpo_link/correspondence.py", '"chance": pd * pt + (1 - pd) * (1 - pt)', '"chance": 0.5',
             (T + "test_dpo_correspondence.py::test_sign_agreement_chance_from_the_marginal_sign_rates",)),
    Mutation("correlation_resamples_replies", "the correlation's bootstrap resamples single replies, not pairs",
             "dpo_link/correspondence.py", "low, high, bad = _bootstrap_units(x, y, fn, n_resamples, confidence, seed)",
             "low, high, bad = _bootstrap_units(x.reshape(-1, 1), y.reshape(-1, 1), fn, n_resamples, confidence, "
             "seed)",
             (T + "test_dpo_correspondence.py::test_bootstrap_resamples_whole_pairs",)),
    Mutation("correlation_permutes_replies", "the correlation's permutation shuffles single replies, not pairs",
             "dpo_link/correspondence.py", "p = _permutation_p_units(x, y, fn, permutations, seed + 1)",
             "p = _permutation_p_units(x.reshape(-1, 1), y.reshape(-1, 1), fn, permutations, seed + 1)",
             (T + "test_dpo_correspondence.py::test_permutation_shuffles_whole_pairs",)),
    Mutation("scale_resamples_replies", "the scale's bootstrap resamples single replies, not pairs",
             "dpo_link/correspondence.py", "_bootstrap_units(xu, yu, s_of, n_resamples, confidence, seed)",
             "_bootstrap_units(xu.reshape(-1, 1), yu.reshape(-1, 1), s_of, n_resamples, confidence, seed)",
             (T + "test_dpo_correspondence.py::test_bootstrap_resamples_whole_pairs",)),
    Mutation("suite_passes_single_replies", "the suite hands the statistics single replies instead of pairs",
             "dpo_link/suite.py", "seq = {name: C.correlations(v, r_theta, names=",
             "seq = {name: C.correlations(v.ravel(), r_theta.ravel(), names=",
             (T + "test_dpo_suite.py::test_one_run_on_a_saved_tiny_checkpoint",)),
    Mutation("tokens_resample_tokens", "token-level intervals resample tokens instead of whole replies",
             "dpo_link/correspondence.py", "low, high, bad = _cluster_bootstrap(rows, stat, n_resamples, confidence, "
             "seed)", "low, high, bad = _bootstrap((a, b), fn, n_resamples, confidence, seed)",
             (T + "test_dpo_correspondence.py::test_token_level_bootstrap_resamples_whole_replies",)),
    # ---- self-generated pairs: D-LEAF really decodes
    Mutation("self_generated_decode_greedy", "the D-LEAF decoder of the self-generated pairs replaced by plain "
             "greedy (same label)", "dpo_link/pairs.py",
             "generation.generate_texts(model, processor, [prompt] * len(scenes), images, s,",
             "generation.generate_texts(model, processor, [prompt] * len(scenes), images, Setting(label=s.label),",
             (T + "test_dpo_pairs.py::test_self_generated_replies_are_decoded_with_their_settings",)),
    Mutation("self_generated_settings_greedy", "train_dpo's D-LEAF setting for self-generated pairs is plain greedy",
             "dpo_link/train.py", 'Setting("dleaf", parse_knobs(args.dleaf_knobs), label="dleaf")',
             'Setting(label="dleaf")',
             (T + "test_dpo_pairs.py::test_self_generated_pairs_join_the_organism_data",)),
    Mutation("default_settings_greedy", "the default D-LEAF setting of self-generated pairs is plain greedy",
             "dpo_link/pairs.py", 'Setting("dleaf", label="dleaf"))', 'Setting(label="dleaf"))',
             (T + "test_dpo_pairs.py::test_self_generated_pairs_join_the_organism_data",)),
    # ---- the adapter really applies
    Mutation("correspondence_adapter_zeroed", "the correspondence suite's --adapter loads but changes nothing "
             "(its LoRA B matrices zeroed)", "dpo_link/rewards.py",
             "    peft_model = PeftModel.from_pretrained(model, str(path))\n",
             "    peft_model = PeftModel.from_pretrained(model, str(path))\n"
             "    [p.data.zero_() for n, p in peft_model.named_parameters() if 'lora_B' in n]\n",
             (T + "test_dpo_suite.py::test_one_run_on_a_saved_tiny_checkpoint",)),
    Mutation("correspondence_script_ignores_adapter", "scripts/correspondence.py ignores --adapter (the committed "
             "organism adapter instead)", "dpo_link/suite.py", "        adapter = Path(adapter)\n",
             "        adapter = data_path(ORGANISM_ADAPTER) if organism_model else Path(adapter)\n",
             (T + "test_dpo_scripts.py::test_correspondence_script_uses_the_adapter_it_is_given",)),
    Mutation("loader_ignores_adapter", "dleaf.models.load ignores its adapter", "dleaf/models.py",
             "    if adapter:\n        from peft import PeftModel\n",
             "    if False:\n        from peft import PeftModel\n",
             ("tests/test_models.py::test_adapter_is_merged_and_changes_the_model",
              "tests/test_eval.py::test_an_adapter_changes_the_generations")),
    Mutation("harness_ignores_adapter", "the harness's --adapter changes nothing", "dleaf/eval/runner.py",
             "return models.load(args.model, args.adapter, args.attn_implementation, args.dtype)",
             "return models.load(args.model, None, args.attn_implementation, args.dtype)",
             ("tests/test_eval.py::test_an_adapter_changes_the_generations",)),
    Mutation("study_correspondence_ignores_adapter", "the study's correspondence step ignores --adapter on the "
             "organism (scores the committed adapter)", "scripts/study.py",
             "adapter=cfg.adapter_path, dataset=cfg.preference_data,",
             "adapter=None if cfg.organism else cfg.adapter_path, dataset=cfg.preference_data,",
             (T + "test_dpo_scripts.py::test_the_study_scores_the_adapter_it_is_given",)),
    # ---- the study
    # ---- the study
    Mutation("study_every_setting_greedy", "the study runs every setting as greedy", "dleaf/study.py",
             "output_dir=str(_eval_dir(out, bench, setting.label)), method=setting.method,",
             'output_dir=str(_eval_dir(out, bench, setting.label)), method="greedy",',
             ("tests/test_study.py::test_every_study_setting_runs_its_own_method_and_adapter",)),
    Mutation("study_dpo_rows_without_adapter", "the study's DPO rows run without the adapter", "dleaf/study.py",
             "adapter=cfg.adapter_path if uses_adapter(setting) else None,", "adapter=None,",
             ("tests/test_study.py::test_every_study_setting_runs_its_own_method_and_adapter",)),
)


def _run(copy_root: Path, tests: list[str], timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(copy_root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                             cwd=copy_root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    if res.returncode == 5:
        return "no tests ran"
    return "survived" if res.returncode == 0 else "killed"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="run only these mutations (by name)")
    ap.add_argument("--whole", action="store_true", help="run every named test file, not only the named tests")
    ap.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation")
    ap.add_argument("--out", default=None, help="write the report (JSON) here")
    args = ap.parse_args(argv)
    todo = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"error: unknown mutations: {', '.join(sorted(unknown))}")
    if args.list:
        for m in todo:
            print(f"{m.name}: {m.what}\n  {m.path}\n  killed by: {', '.join(m.tests)}")
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        copy_root = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy_root, ignore=shutil.ignore_patterns(".git", "runs", ".venv", "__pycache__",
                                                                          "build", "*.egg-info"))
        for m in todo:
            target = copy_root / m.path
            source = target.read_text()
            if source.count(m.old) != 1:
                status, seconds = f"does not apply ({source.count(m.old)} matches)", 0.0
            else:
                target.write_text(source.replace(m.old, m.new))
                tests = sorted({t.split("::")[0] for t in m.tests}) if args.whole else list(m.tests)
                t0 = time.time()
                try:
                    status = _run(copy_root, tests, args.timeout)
                finally:
                    target.write_text(source)
                seconds = time.time() - t0
            results.append({"name": m.name, "what": m.what, "path": m.path, "tests": list(m.tests),
                            "status": status, "seconds": round(seconds, 1)})
            print(f"{m.name}: {status} ({seconds:.0f} s)", flush=True)
    bad = [r for r in results if r["status"] != "killed"]
    print(json.dumps({"mutations": len(results), "killed": len(results) - len(bad), "not_killed": len(bad)}))
    for r in bad:
        print(f"  NOT KILLED: {r['name']}: {r['status']}: {r['what']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
