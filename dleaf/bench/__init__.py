"""Performance benchmark: D-LEAF against plain decoding and its peers, measured side by side.

The package: :mod:`~dleaf.bench.config` (what a run measures, what each configuration decodes with),
:mod:`~dleaf.bench.presets` (named runs: ``llava7b`` on a GPU, ``tiny`` its CPU rehearsal),
:mod:`~dleaf.bench.models`, :mod:`~dleaf.bench.loop` (the decoding loop), :mod:`~dleaf.bench.checks` (gamma 0
equals plain decoding, the compiled step equals the eager one), :mod:`~dleaf.bench.scoring`,
:mod:`~dleaf.bench.memory`, :mod:`~dleaf.bench.measure` (the benchmark) and :mod:`~dleaf.bench.report`.

Every configuration decodes with one manual greedy loop (:func:`greedy_loop`): a prefill, then one cached forward per
new token, a fixed number of new tokens and no early stop, so that only the attention (or, for the contrastive
baseline, the second stream) differs between configurations. The loop's tokens equal ``model.generate``'s for plain
greedy decoding (checked by the benchmark and by the tests).

Configurations (:data:`CONFIGS`):

==================  ===============================================================================================
``plain_sdpa``      plain greedy, text decoder on ``sdpa`` attention
``plain_eager``     plain greedy, text decoder on ``eager`` attention
``dleaf``           D-LEAF (default knobs) watching every layer (eager on watched layers)
``dleaf_range``     D-LEAF watching a restricted layer range, ``unwatched="sdpa"`` on the other layers
``dleaf_sdpa``      D-LEAF watching every layer with ``unwatched="sdpa"``: the rows D-LEAF never changes (all but
                    the last at prefill) go through sdpa, only the active rows eagerly
``dleaf_compiled``  ``dleaf_sdpa`` with the per-token step compiled (``compile=True``; compiled in the warm-up)
``pai``             PAI's attention part (engine, layers from 2, eager on watched layers)
``spin``            SPIN (engine, every layer, eager)
``vcd``             VCD (:mod:`dleaf.methods.vcd`) through the engine: two caches, one forward of each per step,
                    ``logits = (1 + alpha) l(image) - alpha l(noised image)`` with VCD's plausibility cut-off
                    (``beta``); the decoder on ``sdpa`` (its fastest attention)
==================  ===============================================================================================

Any other registered method name (``python -m dleaf methods``) is a configuration too, with its default knobs.

Models (:func:`build_model_and_inputs`): ``organism`` (the committed checkpoint when present, else a randomly
initialised organism of the same shape) and ``llava_shaped``: a randomly initialised
``LlavaForConditionalGeneration`` shaped like LLaVA-1.5 but scaled to a small CPU (576 image tokens from a 336 px image
with patch 14 and a tiny CLIP tower; a Llama decoder with many layers and heads), built offline with the organism's
word-level tokenizer.

Timing: each configuration runs ``repeats`` times in the same process, round-robin (the order rotates every round),
after ``warmup`` untimed rounds; the report gives medians and the ratio of each configuration's median to those of
``plain_eager`` and ``plain_sdpa``. Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the loaded
baseline; on CPU, each configuration runs once in a fresh subprocess that reports its peak resident set size above
the loaded-model baseline (``resource.getrusage``; the high-water mark is reset through ``/proc/self/clear_refs``
after loading where the kernel allows it). Paired steps (:func:`bench_paired`): whole-run repeats on a shared CPU scatter by several percent, which hides an
overhead of a few percent; so each configuration also decodes side by side with plain eager and plain sdpa, the
three taking turns one cached step at a time, and the report gives the ratio of their median step times and the
median per-step difference. Teacher-forced scoring: a 64-token response scored by
:func:`dleaf.engine.response_logprobs` in one pass with D-LEAF attached, against step-by-step scoring (a prefill of
the prompt and one cached step per response token) with D-LEAF attached; and the same two after a
:class:`dleaf.engine.PromptCache` of the prompt made once (:func:`dleaf.engine.cached_response_logprobs` against
:func:`dleaf.engine.cached_stepwise_logprobs`), which times the response's own cost.
"""

from .checks import TOLERANCE, compare, equivalence_checks, forced_logits, with_knobs
from .config import (BASELINES, CONFIGS, DTYPES, MODELS, SPECIAL, BenchConfig, LlavaShape, Plan, config_names,
                     method_of, plan_of)
from .loop import (Stream, contrastive_logits, generate_tokens, greedy_loop, noised_inputs, noised_pixels, run_config,
                   sync)
from .measure import (Stepper, bench_decoding, bench_memory, bench_paired, bench_scoring, bootstrap_ratio,
                      check_loop_equals_generate, count_step_ops, environment, loop_vs_generate, run_benchmark,
                      run_memory_only)
from .memory import measure_memory_cpu, measure_memory_cuda, memory_child, memory_ratios
from .models import build_llava_shaped, build_model_and_inputs, build_organism, set_text_attention
from .presets import (GPU_CONFIGS, LLAVA7B_SHAPE, PRESETS, TINY_SHAPE, apply_preset_defaults, preset,
                      preset_flag_defaults, preset_llava_shape)
from .report import LLAVA15_7B, PASSES_PER_HEAD_KEY, cost_model, format_report, markdown_tables
from .scoring import SCORING_MODES, random_response, score_once, stepwise_logprobs
