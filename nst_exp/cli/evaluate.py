"""``python -m nst_exp evaluate IMAGE --content C --style S``: the fixed evaluator on any image."""

from __future__ import annotations

import argparse
import json
import sys

from nst_exp.errors import UserError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nst_exp evaluate", description="Score images with the fixed evaluator (lower is closer)."
    )
    parser.add_argument("images", nargs="+", help="image file(s) to score")
    parser.add_argument("--content", required=True, help="the content photo (path or builtin:NAME)")
    parser.add_argument("--style", required=True, action="append", help="the style image (repeat for several)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    from nst_exp.evaluate import score_files

    try:
        rows = [(path, score_files(path, args.content, args.style, args.device)) for path in args.images]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, scores in rows:
        if args.json:
            print(json.dumps({"image": path, "content_distance": scores.content_distance, "style_distance": scores.style_distance}))
        else:
            print(f"{path}: content_distance={scores.content_distance:.4f} style_distance={scores.style_distance:.4f}")
    return 0
