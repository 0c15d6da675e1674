"""The analytic cost model and the results as text and Markdown tables."""

from __future__ import annotations

import math

# ---------------------------------------------------------------------------------------------------- cost model
#: LLaVA-1.5-7B's decoder, for the analytic cost model (Vicuna-7B: 32 layers, 32 heads, hidden 4096, MLP 11008,
#: vocabulary 32000; 576 image tokens).
LLAVA15_7B = {"name": "llava-1.5-7b (analytic)", "layers": 32, "heads": 32, "hidden": 4096, "intermediate": 11008,
              "vocab": 32000, "image_tokens": 576, "prompt_tokens": 640}

#: Elementwise passes over a (head, key) row that the current engine makes per watched layer and query row: the
#: eager softmax (scale, mask add, softmax: ~4, which sdpa fuses away), the statistics (image mass twice, profile,
#: head-mixed profile, entropy: ~10, all over the full key row under a mask) and the fusion (gather, difference,
#: scale, add: ~4).
PASSES_PER_HEAD_KEY = {"eager_softmax": 4, "statistics": 10, "fusion": 4}


def cost_model(desc: dict, new_tokens: int = 32) -> dict:
    """What one decoding step costs per batch row, in multiply-adds, and what D-LEAF adds to it.

    Step (Llama decoder): ``L (4 d^2 + 3 d f + 2 d K) + d V`` with K the keys at that step (the prompt plus half the
    new tokens, on average). D-LEAF per watched layer: ``H (c_stat K + c_fuse K)`` elementwise operations for the
    statistics over the current row and the fusion (``H |I|`` for the statistics if they read only the image keys),
    plus ``c_soft H K`` for materialising the softmax that sdpa would fuse, plus the head selection and thresholds,
    ``O(H)``. Returned as counts and as fractions of the step.
    """
    L, H, d, f, V = desc["layers"], desc["heads"], desc["hidden"], desc["intermediate"], desc["vocab"]
    K = desc["prompt_tokens"] + new_tokens // 2
    image = desc["image_tokens"]
    step = L * (4 * d * d + 3 * d * f + 2 * d * K) + d * V
    c = PASSES_PER_HEAD_KEY
    dleaf_now = L * H * K * (c["statistics"] + c["fusion"])
    dleaf_image_only = L * H * (c["statistics"] * image + c["fusion"] * K)
    soft = L * H * K * c["eager_softmax"]
    return {"keys": K, "step_macs": step, "attention_macs": L * 2 * d * K,
            "dleaf_elementwise": dleaf_now, "dleaf_elementwise_image_keys_only": dleaf_image_only,
            "eager_softmax_elementwise": soft,
            "dleaf_fraction_of_step": dleaf_now / step, "eager_softmax_fraction_of_step": soft / step}


# ---------------------------------------------------------------------------------------------------- report
def _nan_for_null(x):
    """A result read back from strict JSON (where NaN was written as null) with null numbers as NaN again."""
    if isinstance(x, dict):
        return {k: _nan_for_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_for_null(v) for v in x]
    return math.nan if x is None else x


def _ci(interval) -> str:
    """A bootstrap interval as text ("-" where there is none)."""
    if not interval or any(x is None or not math.isfinite(x) for x in interval):
        return "-"
    return f"{interval[0]:.3f}-{interval[1]:.3f}"


def _where(d: dict) -> str:
    """The device and dtype of a model's description, when recorded."""
    return f", {d['dtype']} on {d['device']}" if "device" in d else ""


def format_report(result: dict) -> str:
    """The results as text tables: per model and batch size, medians and ratios; memory; scoring."""
    result = _nan_for_null(result)
    lines = []
    for name, entry in result["models"].items():
        d = entry["description"]
        lines.append(f"\n== {name} ({d['source']}): {d['layers']} layers x {d['heads']} heads, hidden {d['hidden']}, "
                     f"{d['image_tokens']} image tokens, prompt {d['prompt_tokens']} tokens{_where(d)}; "
                     f"loop equals generate: "
                     f"{entry['loop_equals_generate']}")
        ops = entry.get("ops_per_step", {})
        if ops:
            lines.append("operators per decoding step: " + ", ".join(f"{k} {v}" for k, v in ops.items()))
        for check, row in entry.get("checks", {}).items():
            if check != "all_passed":
                lines.append(f"check {check}: {'passed' if row['passed'] else 'FAILED'} (max |logit diff| "
                             f"{row['max_abs_logit_diff']:.3g} <= {row['tolerance']:.3g}; bit exact {row['bit_exact']}; "
                             f"argmax agreement {row['argmax_agreement']:.3f})")
        for batch, dec in entry.get("decoding", {}).items():
            lines.append(f"-- batch {batch}")
            lines.append(f"{'config':<13}{'prefill s':>10}{'step ms':>9}{'dec tok/s':>11}{'/eager':>8}{'/sdpa':>7}"
                         f"{'e2e tok/s':>11}{'/eager':>8}{'/sdpa':>7}")
            for config, r in dec["configs"].items():
                lines.append(f"{config:<13}{r['prefill_s']:>10.3f}{r['step_ms']:>9.2f}{r['decode_tokens_per_s']:>11.1f}"
                             f"{r['decode_ratio_to_plain_eager']:>8.3f}{r['decode_ratio_to_plain_sdpa']:>7.3f}"
                             f"{r['e2e_tokens_per_s']:>11.1f}{r['e2e_ratio_to_plain_eager']:>8.3f}"
                             f"{r['e2e_ratio_to_plain_sdpa']:>7.3f}")
        for batch, rows in entry.get("paired", {}).items():
            lines.append(f"-- paired steps, batch {batch} (turns of one step with plain eager and plain sdpa)")
            lines.append(f"{'config':<15}{'step ms':>9}{'eager ms':>10}{'sdpa ms':>9}{'/eager':>8}{'95% CI':>15}"
                         f"{'/sdpa':>7}{'95% CI':>15}{'+ms vs eager':>14}")
            for config, r in rows.items():
                lines.append(f"{config:<15}{r['step_ms']:>9.2f}{r['plain_eager_step_ms']:>10.2f}"
                             f"{r['plain_sdpa_step_ms']:>9.2f}{r['ratio_to_plain_eager']:>8.3f}"
                             f"{_ci(r.get('ratio_ci_to_plain_eager')):>15}{r['ratio_to_plain_sdpa']:>7.3f}"
                             f"{_ci(r.get('ratio_ci_to_plain_sdpa')):>15}{r['median_diff_ms_to_plain_eager']:>14.2f}")
        for batch, mem in entry.get("memory", {}).items():
            lines.append(f"-- peak memory, batch {batch} (MB; extra = above the loaded model)")
            lines.append(f"{'config':<13}{'peak':>9}{'extra':>9}{'peak/eager':>11}{'peak/sdpa':>10}"
                         f"{'extra/eager':>12}{'extra/sdpa':>11}")
            for config, r in mem.items():
                lines.append(f"{config:<13}{r['peak_mb']:>9.1f}{r['extra_mb']:>9.1f}"
                             f"{r['peak_ratio_to_plain_eager']:>11.3f}{r['peak_ratio_to_plain_sdpa']:>10.3f}"
                             f"{r['extra_ratio_to_plain_eager']:>12.3f}{r['extra_ratio_to_plain_sdpa']:>11.3f}")
        for batch, s in entry.get("scoring", {}).items():
            lines.append(f"-- scoring a {s['response_tokens']}-token response with D-LEAF, batch {batch}: one pass "
                         f"{s['one_pass_s']:.3f} s, step by step {s['stepwise_s']:.3f} s, speed-up "
                         f"x{s['speedup']:.2f}; beyond the prompt's prefill ({s['prompt_prefill_s']:.3f} s) "
                         f"x{s['response_only_speedup']:.2f} (max |logprob diff| {s['max_abs_logprob_diff']:.1e})")
            c = s.get("cached")
            if c:
                lines.append(f"   after a cached prompt (made once in {c['prompt_cache_s']:.3f} s): one pass "
                             f"{c['one_pass_s']:.3f} s, step by step {c['stepwise_s']:.3f} s, speed-up "
                             f"x{c['speedup']:.2f} (max |logprob diff| {c['max_abs_logprob_diff']:.1e})")
    return "\n".join(lines)


def markdown_tables(result: dict) -> str:
    """The results as Markdown tables (for docs/performance.md): per model and batch size, the median decoding
    throughput and its ratios, peak memory and scoring."""
    result = _nan_for_null(result)
    out = []
    for name, entry in result["models"].items():
        d = entry["description"]
        out.append(f"### {name} ({d['source']} weights): {d['layers']} layers, {d['heads']} heads, hidden {d['hidden']}, "
                   f"{d['image_tokens']} image tokens, {d['prompt_tokens']}-token prompt{_where(d)}\n")
        checks = {k: v for k, v in entry.get("checks", {}).items() if k != "all_passed"}
        if checks:
            out.append("Equivalence checks (teacher-forced on plain eager greedy decoding's tokens):\n")
            out.append("| check | steps | max abs logit diff | tolerance | bit exact | argmax agreement | passed |")
            out.append("|---|---:|---:|---:|---|---:|---|")
            for check, r in checks.items():
                out.append(f"| {check} | {r['steps']} | {r['max_abs_logit_diff']:.3g} | {r['tolerance']:.3g} | "
                           f"{'yes' if r['bit_exact'] else 'no'} | {r['argmax_agreement']:.3f} | "
                           f"{'yes' if r['passed'] else '**no**'} |")
            out.append("")
        for batch, dec in entry.get("decoding", {}).items():
            rows = dec["configs"]
            out.append(f"Batch {batch}, {next(iter(rows.values()))['repeats']} interleaved repeats, medians:\n")
            out.append("| configuration | prefill s | ms / step | decode tok/s | / eager | / sdpa | end-to-end tok/s "
                       "| / eager | / sdpa |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for config, r in rows.items():
                out.append(f"| {config} | {r['prefill_s']:.3f} | {r['step_ms']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                           f"{r['decode_ratio_to_plain_eager']:.2f} | {r['decode_ratio_to_plain_sdpa']:.2f} | "
                           f"{r['e2e_tokens_per_s']:.1f} | {r['e2e_ratio_to_plain_eager']:.2f} | "
                           f"{r['e2e_ratio_to_plain_sdpa']:.2f} |")
            out.append("")
        for batch, rows in entry.get("paired", {}).items():
            steps = next(iter(rows.values()))["steps"] if rows else 0
            out.append(f"Paired steps, batch {batch}: each configuration takes turns with plain eager and plain sdpa, "
                       f"one cached step at a time, {steps} steps, medians:\n")
            out.append("| configuration | ms / step | plain eager ms | plain sdpa ms | / eager | 95% CI | / sdpa | "
                       "95% CI | median extra ms vs eager |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for config, r in rows.items():
                out.append(f"| {config} | {r['step_ms']:.2f} | {r['plain_eager_step_ms']:.2f} | "
                           f"{r['plain_sdpa_step_ms']:.2f} | {r['ratio_to_plain_eager']:.3f} | "
                           f"{_ci(r.get('ratio_ci_to_plain_eager'))} | {r['ratio_to_plain_sdpa']:.3f} | "
                           f"{_ci(r.get('ratio_ci_to_plain_sdpa'))} | {r['median_diff_ms_to_plain_eager']:.2f} |")
            out.append("")
        for batch, mem in entry.get("memory", {}).items():
            out.append(f"Peak memory, batch {batch} (MB; extra = above the loaded model and inputs):\n")
            out.append("| configuration | peak | extra | peak / eager | peak / sdpa | extra / eager | extra / sdpa |")
            out.append("|---|---:|---:|---:|---:|---:|---:|")
            for config, r in mem.items():
                out.append(f"| {config} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} | {r['peak_ratio_to_plain_eager']:.2f} | "
                           f"{r['peak_ratio_to_plain_sdpa']:.2f} | {r['extra_ratio_to_plain_eager']:.2f} | "
                           f"{r['extra_ratio_to_plain_sdpa']:.2f} |")
            out.append("")
        if entry.get("scoring"):
            out.append("Teacher-forced scoring with D-LEAF attached:\n")
            out.append("| batch | response tokens | one pass s | step by step s | speed-up | prompt prefill s | "
                       "speed-up beyond the prompt | max abs log-prob diff |")
            out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
            for batch, sc in entry["scoring"].items():
                out.append(f"| {batch} | {sc['response_tokens']} | {sc['one_pass_s']:.3f} | {sc['stepwise_s']:.3f} | "
                           f"{sc['speedup']:.1f}x | {sc['prompt_prefill_s']:.3f} | {sc['response_only_speedup']:.1f}x | "
                           f"{sc['max_abs_logprob_diff']:.1e} |")
            out.append("")
            cached = {b: sc["cached"] for b, sc in entry["scoring"].items() if sc.get("cached")}
            if cached:
                out.append("The same response after a cached prompt (`PromptCache`, made once; only the response's "
                           "own cost is timed):\n")
                out.append("| batch | prompt cache s | one pass s | step by step s | speed-up | max abs log-prob diff |")
                out.append("|---:|---:|---:|---:|---:|---:|")
                for batch, c in cached.items():
                    out.append(f"| {batch} | {c['prompt_cache_s']:.3f} | {c['one_pass_s']:.3f} | "
                               f"{c['stepwise_s']:.3f} | {c['speedup']:.1f}x | {c['max_abs_logprob_diff']:.1e} |")
                out.append("")
        if entry.get("ops_per_step"):
            out.append("Operators dispatched by one decoding step (batch 1): " +
                       ", ".join(f"{k} {v}" for k, v in entry["ops_per_step"].items()) + "\n")
    return "\n".join(out)
