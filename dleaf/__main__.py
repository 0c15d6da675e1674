"""``python -m dleaf methods``: every method with its knobs, defaults and one line each (from the registry);
``python -m dleaf detect``: a caption scored token by token by the learned detector (:mod:`dleaf.detect`)."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    args_ = sys.argv[1:] if argv is None else list(argv)
    if args_[:1] == ["detect"]:  # ``python -m dleaf detect``: the learned detector's per-token scores
        from .detect import score_main

        return score_main(args_[1:])
    parser = argparse.ArgumentParser(prog="python -m dleaf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("detect", help="score a caption token by token with the learned detector (--help for its flags)")
    methods = sub.add_parser("methods", help="list every method with its knobs and defaults")
    methods.add_argument("--json", action="store_true", help="print the listing as JSON")
    methods.add_argument("--names", action="store_true", help="print the method names only, one a line")
    args = parser.parse_args(argv)
    from .config import describe_methods, format_methods, method_names

    if args.json:
        print(json.dumps(describe_methods(), indent=1, default=repr))
    elif args.names:
        print("\n".join(["greedy", *method_names()]))
    else:
        print(format_methods())
    return 0


if __name__ == "__main__":
    sys.exit(main())
