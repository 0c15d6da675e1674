"""Score a caption token by token with the learned hallucination detector: at every token, the probability that
it is a hallucinated object word, from the model's own attention at the row that predicts it (LIAE, image mass,
per-head image mass and focus of the detector's layers; dleaf.detect).

    python -m dleaf detect --item adversarial/3 --caption "there is a fork ."
    python scripts/detect.py --item adversarial/3 --caption "a red cube and a blue ball ."
    python scripts/detect.py --model organism --image scene.png --caption "..." --output_dir runs/detect_score

The detector file names the model it was fitted on; scoring another model with it is refused. Writes
detect.json (one record per token: token, id, probability) to --output_dir.
"""

import sys

from dleaf.detect import score_main as main
from dleaf.detect import score_parser as build_parser

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
