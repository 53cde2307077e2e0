"""Benchmark the foundation on the embedded default model; ratios measured in one process.

(a) ``run_with_cache(names_filter=every hook_resid_post)`` vs a plain transformers forward with
    ``output_hidden_states=True`` on an unbridged copy of the same weights, same batch — target ≤ 1.15×;
(b) ``depthlens.runtime.generation`` tokens/s (bridged model, hooks live) vs plain transformers ``generate`` on the same 16 prompts × 64
    new tokens — target ≥ 0.9×.
Each side is timed alternately, after a warm-up, and the median of the repeats is used.

    $ python benchmarks/bench_models.py [--repeats 5]
"""

from __future__ import annotations

import statistics
import time

import torch

from depthlens.models.base import load_base
from depthlens.data.chat import build_chat, pad_batch
from depthlens.cli import ArgumentParser, add_debug_flag, cli_errors
from depthlens.runtime.generation import generate
from depthlens.models.hooked_model import hook_name
from depthlens.models import load_model

PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about rain.",
    "How do I reverse a list in Python?", "Give me three tips for better sleep.", "What causes the seasons?",
    "Summarize the plot of Romeo and Juliet.", "How many legs does a spider have?", "What is 17 times 23?",
    "Suggest a name for a bakery.", "Why is the sky blue?", "Translate 'good morning' into Spanish.",
    "What is a prime number?", "Describe a cat to someone who has never seen one.", "How do vaccines work?",
    "List four planets of the solar system.",
]


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@cli_errors
def main(argv=None) -> dict[str, float]:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    model = load_model(args.model)
    plain, _, _ = load_base(args.model)  # an unbridged transformers model: the honest baseline
    plain = plain.to(model.device, model.dtype).eval()
    tok = model.tokenizer
    batch = pad_batch([build_chat(tok, p).ids for p in PROMPTS], tok.pad_token_id).to(model.device)
    names = {hook_name("resid_post", l) for l in range(model.n_layers)}

    @torch.inference_mode()
    def cached():
        model.bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in names)

    @torch.inference_mode()
    def hidden():
        plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)

    cached(), hidden()  # warm-up
    a, b = [], []
    for _ in range(args.repeats):
        a.append(_time(cached))
        b.append(_time(hidden))
    cache_ratio = statistics.median(a) / statistics.median(b)

    n = args.new_tokens

    @torch.inference_mode()
    def ours():
        out = generate(model, PROMPTS, max_new_tokens=n, batch_size=16, progress=False)
        return sum(len(t) for t in out.tokens)

    @torch.inference_mode()
    def theirs():
        out = plain.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=n,
                                do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return int((out[:, batch.input_ids.shape[1]:] != tok.pad_token_id).sum())

    ours(), theirs()
    ra, rb = [], []
    for _ in range(max(2, args.repeats // 2)):
        t = time.perf_counter(); k = ours(); ra.append(k / (time.perf_counter() - t))
        t = time.perf_counter(); k = theirs(); rb.append(k / (time.perf_counter() - t))
    gen_ratio = statistics.median(ra) / statistics.median(rb)
    print(f"run_with_cache_resid_post_vs_hf_hidden_states: {cache_ratio:.3f}  (target <= 1.15)")
    print(f"generate_tokens_per_s_vs_hf_generate: {gen_ratio:.3f}  (target >= 0.9; "
          f"ours {statistics.median(ra):.0f} tok/s, hf {statistics.median(rb):.0f} tok/s)")
    return {"cache_ratio": cache_ratio, "generate_ratio": gen_ratio}


if __name__ == "__main__":
    main()
