"""How close tallygate's token estimates come to what providers report, on the recorded corpus.

    python bench/accuracy.py [--corpus tests/corpus] [--markdown]

For every corpus case with reported usage, the request goes through the prompt estimator and the
response body through the metering core exactly as the proxy feeds it (in network-sized pieces);
the estimate is compared with the usage the stream itself reports. Output estimates count the
visible text (content, refusal, reasoning text, tool-call names and arguments) with the model's
tiktoken encoding; hidden reasoning (OpenAI o-series, gpt-5) cannot be counted by anyone but the
provider.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

from tallygate.core.dialects import detect_dialect
from tallygate.core.meter import MeteringSettings, ResponseMeter, estimate_input, read_request
from tallygate.runtime.encodings import load_tokenizers

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE.parent / "tests" / "corpus"
# Offline machines (and CI) have the encodings beside the checkout; elsewhere tiktoken downloads.
SHARED_CACHE = HERE.parent.parent / "shared" / "tiktoken-cache"


def error(estimate: int | None, reported: int) -> float | None:
    if estimate is None or not reported:
        return None
    return (estimate - reported) / reported


def pct(value: float | None, sign: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}%" if sign else f"{100 * value:.1f}%"


# Models that think in tokens nobody but the provider sees: their output counts include them.
HIDDEN_REASONING = ("gpt-5", "o1", "o3", "o4")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args()
    if SHARED_CACHE.is_dir():
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_CACHE))
    tokenizers = load_tokenizers()
    settings = MeteringSettings(request_usage=False)

    rows = []
    families: dict[str, list[tuple[float | None, float | None, bool, int | None]]] = defaultdict(
        list
    )
    for folder in sorted(p for p in args.corpus.iterdir() if p.is_dir()):
        meta = json.loads((folder / "meta.json").read_text())
        if not meta["usage"]:
            continue
        errors: dict[str, int] = {}
        path = meta["endpoint_path"].split()[0]
        dialect = detect_dialect(path)
        request = folder / "request.json"
        facts = read_request(
            dialect, request.read_bytes() if request.exists() else b"", tokenizers, settings, errors
        )
        estimate_input(facts, dialect, tokenizers, settings, errors)
        meter = ResponseMeter(
            dialect, meta["content_type"], tokenizers, settings, facts.model, errors,
            tools_offered=facts.tools_offered,
        )  # fmt: skip
        body = (folder / "response.body").read_bytes()
        for i in range(0, len(body), 1460):  # one TCP segment at a time
            meter.feed(body[i : i + 1460])
        meter.close()
        response = meter.facts()
        assert response.usage is not None, folder.name
        model = response.model or facts.model or ""
        hidden = model.startswith(HIDDEN_REASONING)
        text_only = not hidden and not any(
            f in meta["features"] for f in ("tool_calls", "reasoning")
        )
        exact = tokenizers.for_model(response.model or facts.model).exact
        in_err = error(facts.estimated_input, response.usage.input)
        out_err = error(response.estimated_output, response.usage.output)
        family = (
            meta["provider"]
            if not meta["provider"].startswith("openai")
            else f"openai {meta['endpoint']}"
        )
        diff = (
            None
            if response.estimated_output is None
            else response.estimated_output - response.usage.output
        )
        families[family].append((in_err, out_err, text_only and exact, diff))
        rows.append(
            f"| {folder.name} | {response.model} | {facts.estimated_input} | {response.usage.input} | "
            f"{pct(in_err)} | {response.estimated_output} | {response.usage.output} | {pct(out_err)} | "
            f"{'yes' if text_only else ('hidden reasoning' if hidden else 'no')} | {'yes' if exact else 'no'} |"
        )

    print(
        "| case | model | input est. | input rep. | input err. | output est. | output rep. | output err. | text only | own tokenizer |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print(
        "| provider family | cases | median abs. input error | median abs. output error | text-only output, model's own tokenizer: exact / off by one token / other |"
    )
    print("|---|---|---|---|---|")
    for family, values in sorted(families.items()):
        ins = sorted(abs(v[0]) for v in values if v[0] is not None)
        outs = sorted(abs(v[1]) for v in values if v[1] is not None)
        own = [v[3] for v in values if v[2] and v[3] is not None]
        exact_cases = sum(1 for d in own if d == 0)
        off_by_one = sum(1 for d in own if abs(d) == 1)
        text = (
            f"{exact_cases} / {off_by_one} / {len(own) - exact_cases - off_by_one}"
            if own
            else "none"
        )
        print(
            f"| {family} | {len(values)} | {pct(ins[len(ins) // 2], False) if ins else 'n/a'} | "
            f"{pct(outs[len(outs) // 2], False) if outs else 'n/a'} | {text} |"
        )


if __name__ == "__main__":
    main()
