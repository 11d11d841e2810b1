"""SRLoRA in the Hugging Face workflow: save_pretrained / safetensors, r and alpha in the state dict,
and SRLoRACallback in transformers' Trainer (gradient accumulation, resume, any optimizer).

The state-dict tests need torch alone; the rest skip when transformers is missing.  Every model is a
tiny Llama built from a LlamaConfig (hidden 32, 2 layers, random weights), trained on CPU.
"""
import os
import shutil

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from srlora import SRLoRALinear, apply_srlora, srlora_layers
from srlora import PAPER_TARGETS
from srlora_export import TRACKER_PREFIX    # importing srlora_hf needs no transformers; SRLoRACallback does
from tests.helpers import ROOT


# r and alpha travel with the state dict ------------------------------------------------------------

@given(r=st.integers(1, 6), alpha=st.sampled_from([1.0, 4.0, 8.0, 16.0]),
       r2=st.integers(1, 6), alpha2=st.sampled_from([1.0, 4.0, 8.0, 16.0]))
@settings(max_examples=30, deadline=None)
def test_a_state_dict_loads_only_into_a_layer_with_its_r_and_alpha(r, alpha, r2, alpha2):
    torch.manual_seed(0)
    saved = nn.Sequential(SRLoRALinear(nn.Linear(12, 10), r=r, alpha=alpha, r_target=8)).state_dict()
    other = nn.Sequential(SRLoRALinear(nn.Linear(12, 10), r=r2, alpha=alpha2, r_target=8))
    if (r, alpha) == (r2, alpha2):
        other.load_state_dict(saved, strict=True)
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in saved.items())
        return
    with pytest.raises(ValueError) as e:
        other.load_state_dict(saved, strict=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("0:")              # names the layer ("0" in the Sequential)
    assert f"r={r}, alpha={alpha}" in msg and f"r={r2}, alpha={alpha2}" in msg and "apply_srlora(" in msg


def test_a_state_dict_of_another_alpha_is_refused_before_any_weight_is_copied():
    torch.manual_seed(0)
    saved = SRLoRALinear(nn.Linear(12, 10), r=4, alpha=4.0, r_target=8).state_dict()
    layer = SRLoRALinear(nn.Linear(12, 10), r=4, alpha=8.0, r_target=8)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="layer: the state dict was saved with r=4, alpha=4.0"):
        layer.load_state_dict(saved)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_next_index_stays_a_python_int_after_a_load():
    torch.manual_seed(0)
    a = SRLoRALinear(nn.Linear(12, 10), r=2, r_target=8)
    a.recycle(torch.tensor([0, 1]))
    b = SRLoRALinear(nn.Linear(12, 10), r=2, r_target=8)
    b.load_state_dict(a.state_dict())
    assert type(b.next_index) is int and b.next_index == a.next_index == 4


def test_srlora_hf_imports_without_transformers_and_needs_it_only_for_the_callback():
    import subprocess
    import sys
    code = ("import sys; sys.modules['transformers'] = None; import srlora_hf\n"
            "try:\n    from srlora_hf import SRLoRACallback\nexcept ImportError:\n    print('needs transformers')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout == "needs transformers\n", done.stderr


def test_a_state_dict_saved_with_next_index_in_a_dict_still_loads():
    torch.manual_seed(0)
    a = SRLoRALinear(nn.Linear(12, 10), r=2, r_target=8)
    a.recycle(torch.tensor([0, 1]))
    old = {**a.state_dict(), "_extra_state": {"next_index": a.next_index}}     # as saved before the tensor form
    b = SRLoRALinear(nn.Linear(12, 10), r=2, r_target=8)
    b.load_state_dict(old)
    assert b.next_index == 4 and torch.equal(b.effective_weight(), a.effective_weight())


# Hugging Face models -------------------------------------------------------------------------------

R, R_TARGET = 4, 12          # r' = 2 at gamma 0.5: four switches per run


def tiny_llama(seed):
    transformers = pytest.importorskip("transformers")        # skips each Hugging Face test, not the file
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def token_data(n=64, seq=16):
    ids = torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": x, "labels": x} for x in ids]


def train(out, max_steps=24, batch=4, accumulation=2, resume=False, optim="adamw_torch", optimizers=(None, None),
          model=None, save_steps=6):
    """One Trainer run of a freshly wrapped tiny Llama (the same one every time); returns model, callback, trainer."""
    model = model or apply_srlora(tiny_llama(0), targets=PAPER_TARGETS["llama"], r=R, r_target=R_TARGET)
    import transformers
    from srlora_hf import SRLoRACallback
    callback = SRLoRACallback()
    args = transformers.TrainingArguments(
        str(out), max_steps=max_steps, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        learning_rate=1e-3, optim=optim, save_strategy="steps", save_steps=save_steps, logging_steps=1000,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=token_data(), callbacks=[callback],
                                   optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume or None)            # True, or a checkpoint folder
    return model, callback, trainer


def test_llama_paper_targets_adapt_all_seven_projections_of_every_block():
    model = apply_srlora(tiny_llama(0), targets=PAPER_TARGETS["llama"], r=R, r_target=R_TARGET)
    names = [n for n, _ in srlora_layers(model)]
    assert len(names) == 7 * 2 and {n.rsplit(".", 1)[-1] for n in names} == set(PAPER_TARGETS["llama"])


def logits(model, seed=1):
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_save_pretrained_writes_an_adapter_that_from_pretrained_gives_back_bit_for_bit(tmp_path):
    from safetensors.torch import load_file
    from srlora_hf import from_pretrained
    model, _, _ = train(tmp_path / "run", max_steps=8, save_steps=1000)      # switches at 2, 4, 6, 8
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "config.json", "model.safetensors",
                                                        "srlora_config.json"]     # the first two refuse (REFUSALS)
    saved = load_file(str(tmp_path / "adapter" / "model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"lora_A", "lora_B", "active_indices", "_extra_state",
                                                     "fused_A", "fused_B"}   # no W, no basis, no embedding
    fresh = from_pretrained(tiny_llama(0), tmp_path / "adapter")             # the same pretrained weights
    for (name, a), (_, b) in zip(srlora_layers(model), srlora_layers(fresh)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.effective_weight(), b.effective_weight()), name
        assert b.next_index == a.next_index == 12 and torch.equal(a.active_indices, b.active_indices)
    assert torch.equal(logits(fresh), logits(model))
    assert all(l.lora_A.requires_grad for _, l in srlora_layers(fresh))      # training can go on from it


def test_from_pretrained_takes_a_base_folder_and_the_adapter_folder(tmp_path):
    from srlora_hf import from_pretrained
    tiny_llama(0).save_pretrained(tmp_path / "base")                         # stands in for a Hub name
    model, _, _ = train(tmp_path / "run", max_steps=4, save_steps=1000)
    model.save_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(from_pretrained(str(tmp_path / "base"), tmp_path / "adapter")), logits(model))


def tiny_family(family, seed=0):
    """A tiny model of `family` from its config (random weights, vocab 64), and whether it generates."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2))
    if family == "gpt2":                                     # Conv1D maps; lm_head tied to wte, not adapted
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3))


@pytest.mark.parametrize("family, layers", [("qwen2", 14), ("gpt2", 8), ("bert", 12)])
def test_an_adapter_trained_with_switches_reloads_with_identical_logits_and_greedy_tokens(tmp_path, family, layers):
    from srlora import ImportanceTracker, recompose
    from srlora_hf import apply_srlora as hf_apply, from_pretrained
    model = hf_apply(tiny_family(family), r=R, r_target=R_TARGET)           # targets_for(model)
    if family == "bert":
        model.classifier.requires_grad_(True)                                # a trained head travels too
    assert len(srlora_layers(model)) == layers
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0]) if family == "bert" else ids
    tracker = ImportanceTracker(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):                                                       # a switch after every step
        model(input_ids=ids, labels=labels).loss.backward()
        tracker.update()
        opt.step()
        opt.zero_grad()
        recompose(model, tracker, opt)
    assert all(layer.next_index == R_TARGET for _, layer in srlora_layers(model))
    model.save_pretrained(tmp_path)
    fresh = from_pretrained(tiny_family(family), tmp_path)                   # the same pretrained weights
    assert torch.equal(logits(fresh), logits(model))
    if family != "bert":
        prompt, greedy = ids[:1, :4], dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            assert torch.equal(fresh.generate(prompt, **greedy), model.generate(prompt, **greedy))


def test_transformers_and_peft_from_pretrained_refuse_an_srlora_folder_naming_the_loader(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _, _ = train(tmp_path / "run", max_steps=4, save_steps=2)
    model.save_pretrained(tmp_path / "adapter")
    peft = pytest.importorskip("peft")
    for folder in (tmp_path / "adapter", tmp_path / "run" / "checkpoint-4"):
        with pytest.raises(ValueError, match=r"load it with srlora_hf\.from_pretrained\(base, folder\)"):
            transformers.AutoModelForCausalLM.from_pretrained(str(folder))
        with pytest.raises(KeyError, match=r"load it with srlora_hf\.from_pretrained\(base, folder\)"):
            peft.PeftModel.from_pretrained(tiny_llama(0), str(folder))
        with pytest.raises(KeyError, match=r"load it with srlora_hf\.from_pretrained\(base, folder\)"):
            peft.AutoPeftModelForCausalLM.from_pretrained(str(folder))


def test_trainer_checkpoints_hold_the_adapter_not_the_model(tmp_path):
    from safetensors.torch import load_file
    model, _, _ = train(tmp_path / "run", max_steps=6, save_steps=6)
    folder = tmp_path / "run" / "checkpoint-6"
    assert (folder / "srlora_config.json").exists() and "srlora_hf.from_pretrained" in (folder / "config.json").read_text()
    saved = load_file(str(folder / "model.safetensors"))
    adapter = sum(v.numel() * v.element_size() for k, v in saved.items() if not k.startswith(TRACKER_PREFIX))
    ema = sum(v.numel() * v.element_size() for k, v in saved.items() if k.startswith(TRACKER_PREFIX))
    whole = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    # per layer: A, B and the fused pairs, r_target (m + n) fp32 numbers, as a LoRA adapter of rank r_target;
    # and active_indices (r int64) and (next_index, r, alpha) (3 float64)
    formula = sum(4 * R_TARGET * (l.in_features + l.out_features) + 8 * R + 24 for _, l in srlora_layers(model))
    assert adapter == formula and adapter < whole / 3       # a tiny model: 7B ratios in docs/HUGGINGFACE.md
    # and, for the resume, the tracker's two EMAs of each A and B entry, fp32, and (beta1, beta2)
    assert ema == sum(2 * 4 * R * (l.in_features + l.out_features) for _, l in srlora_layers(model)) + 16
    model.save_pretrained(tmp_path / "adapter")               # a save that is no checkpoint: the adapter alone
    assert not any(k.startswith(TRACKER_PREFIX) for k in load_file(str(tmp_path / "adapter" / "model.safetensors")))


def test_record_false_keeps_no_fused_pairs_and_saves_w_itself_which_loads_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file
    from srlora_hf import apply_srlora as hf_apply, from_pretrained
    wrap = lambda: hf_apply(tiny_llama(0), r=R, r_target=R_TARGET, record=False)    # noqa: E731
    whole, whole_cb, _ = train(tmp_path / "whole", max_steps=24, save_steps=12, model=wrap())
    assert not any(hasattr(layer, "fused_A") for _, layer in srlora_layers(whole))   # no record held
    assert len(whole_cb.events) == 4 * 14
    whole.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"weight", "lora_A", "lora_B", "active_indices", "_extra_state"}
    assert torch.equal(logits(from_pretrained(tiny_llama(0), tmp_path / "adapter")), logits(whole))
    shutil.copytree(tmp_path / "whole" / "checkpoint-12", tmp_path / "resumed" / "checkpoint-12")
    resumed, resumed_cb, _ = train(tmp_path / "resumed", max_steps=24, resume=True, model=wrap())
    assert resumed_cb.events == [e for e in whole_cb.events if e["step"] > 12] != []
    assert torch.equal(logits(resumed), logits(whole))
    with pytest.raises(ValueError, match=r"^apply_srlora: record=False with quantized='keep'"):
        pytest.importorskip("bitsandbytes")
        import transformers
        tiny_llama(0).save_pretrained(tmp_path / "base")
        hf_apply(transformers.LlamaForCausalLM.from_pretrained(
            str(tmp_path / "base"), quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True),
            device_map="cpu"), r=R, r_target=R_TARGET, record=False)


def test_a_whole_state_dict_still_loads_into_a_freshly_wrapped_model(tmp_path):
    from safetensors.torch import load_file, save_file
    from srlora_hf import apply_srlora as hf_apply
    model, _, _ = train(tmp_path / "run", max_steps=8, save_steps=1000)
    save_file(model.state_dict(), str(tmp_path / "whole.safetensors"))      # W itself, and the fused pairs
    fresh = hf_apply(tiny_llama(1), r=R, r_target=R_TARGET)                  # other weights: the file has them all
    fresh.load_state_dict(load_file(str(tmp_path / "whole.safetensors")), strict=True)
    assert torch.equal(logits(fresh), logits(model))
    fresh.save_pretrained(tmp_path / "adapter")                              # and its adapter is complete
    assert torch.equal(logits(__import__("srlora_hf").from_pretrained(tiny_llama(0), tmp_path / "adapter")),
                       logits(model))


def test_importance_with_gradient_accumulation_equals_importance_of_one_big_batch(tmp_path):
    _, accumulated, _ = train(tmp_path / "a", max_steps=5, batch=4, accumulation=2)
    _, big_batch, _ = train(tmp_path / "b", max_steps=5, batch=8, accumulation=1)
    for x, y in zip(accumulated.tracker.ibar + accumulated.tracker.ubar, big_batch.tracker.ibar + big_batch.tracker.ubar):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-10)


def test_switches_follow_eq_13_14_from_max_steps(tmp_path):
    _, callback, _ = train(tmp_path / "run", max_steps=24)
    assert sorted({e["step"] for e in callback.events}) == [6, 12, 18, 24]          # (12-4)//2 = 4 switches
    assert len(callback.events) == 4 * 14


@pytest.mark.parametrize("resume_at", [12, 15])      # at a switch step, and between two
def test_a_resumed_trainer_run_makes_the_same_switches_and_ends_with_the_same_weights(tmp_path, resume_at):
    whole, whole_cb, _ = train(tmp_path / "whole", max_steps=24, save_steps=resume_at)
    shutil.copytree(tmp_path / "whole" / f"checkpoint-{resume_at}", tmp_path / "resumed" / f"checkpoint-{resume_at}")
    resumed, resumed_cb, _ = train(tmp_path / "resumed", max_steps=24, resume=True)
    assert resumed_cb.events == [e for e in whole_cb.events if e["step"] > resume_at] != []
    for (name, a), (_, b) in zip(srlora_layers(whole), srlora_layers(resumed)):
        assert torch.equal(a.effective_weight(), b.effective_weight()), name
        assert a.next_index == b.next_index
    for x, y in zip(whole_cb.tracker.ibar + whole_cb.tracker.ubar, resumed_cb.tracker.ibar + resumed_cb.tracker.ubar):
        assert torch.equal(x, y)


def test_resuming_from_a_checkpoint_without_the_importance_emas_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file
    train(tmp_path / "run", max_steps=12)
    path = str(tmp_path / "run" / "checkpoint-12" / "model.safetensors")
    save_file({k: v for k, v in load_file(path).items() if not k.startswith(TRACKER_PREFIX)}, path)
    with pytest.raises(ValueError, match=r"^resume_from_checkpoint: the checkpoint of step 12 holds no importance "
                                         r"EMAs \(srlora_tracker\.\*\)") as e:
        train(tmp_path / "run", max_steps=24, resume=True)
    assert "\n" not in str(e.value)



def test_the_callback_resumes_from_the_folder_given_to_resume_from_checkpoint(tmp_path):
    whole, whole_cb, _ = train(tmp_path / "whole", max_steps=24, save_steps=12)
    shutil.copytree(tmp_path / "whole" / "checkpoint-12", tmp_path / "elsewhere" / "checkpoint-12")
    shutil.rmtree(tmp_path / "whole" / "checkpoint-12")            # not under the new run's output_dir either
    resumed, resumed_cb, _ = train(tmp_path / "new", max_steps=24, resume=str(tmp_path / "elsewhere" / "checkpoint-12"))
    assert resumed_cb.events == [e for e in whole_cb.events if e["step"] > 12] != []
    for x, y in zip(whole_cb.tracker.ibar + whole_cb.tracker.ubar, resumed_cb.tracker.ibar + resumed_cb.tracker.ubar):
        assert torch.equal(x, y)
    assert torch.equal(logits(resumed), logits(whole))


def test_a_wrapped_lm_head_lost_to_resize_token_embeddings_is_refused_at_save_and_at_train_begin(tmp_path):
    from srlora_hf import apply_srlora as hf_apply
    model = hf_apply(tiny_llama(0), targets=PAPER_TARGETS["llama"] + ("lm_head",), r=R, r_target=R_TARGET)
    model.resize_token_embeddings(80)                              # lm_head: a new nn.Linear, the residual only
    message = r"lm_head matches the SRLoRA targets but is a plain Linear now, .*call resize_token_embeddings before apply_srlora$"
    with pytest.raises(ValueError, match="^save_pretrained: " + message):
        model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="^SRLoRACallback: " + message):
        train(tmp_path / "run", max_steps=2, model=model)


def test_a_cast_after_wrapping_that_makes_the_adapters_bf16_is_warned_about_in_one_line(tmp_path):
    from srlora_hf import apply_srlora as hf_apply
    model = hf_apply(tiny_llama(0), r=R, r_target=R_TARGET).to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"lora_A is torch.bfloat16 \(14 layers\): a cast after apply_srlora .*"
                                         r"cast the model before apply_srlora") as warned:
        train(tmp_path / "run", max_steps=2, model=model, save_steps=1000)
    assert all("\n" not in str(w.message) for w in warned)
    fine = hf_apply(tiny_llama(0).to(torch.bfloat16), r=R, r_target=R_TARGET)   # cast first: A, B stay fp32
    assert all(layer.lora_A.dtype == torch.float32 for _, layer in srlora_layers(fine))


def test_print_trainable_parameters_and_merge_and_unload_are_the_peft_habits(tmp_path, capsys):
    from srlora_hf import apply_srlora as hf_apply, merge_and_unload, print_trainable_parameters
    model, _, _ = train(tmp_path / "run", max_steps=4, save_steps=1000,
                        model=hf_apply(tiny_llama(0), r=R, r_target=R_TARGET))
    capsys.readouterr()
    print_trainable_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    line = capsys.readouterr().out
    assert line.startswith(f"trainable params: {trainable:,d} || all params: ")
    model.print_trainable_parameters()                             # as a PeftModel's method, too
    assert capsys.readouterr().out == line
    before = logits(model)
    merged = model.merge_and_unload()
    assert not hasattr(model, "merge_and_unload") and merge_and_unload is not None
    assert merged is model and srlora_layers(model) == [] and type(model.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")                     # transformers' own save_pretrained again
    assert (tmp_path / "merged" / "config.json").exists()


@pytest.mark.filterwarnings("ignore:optimizer Adafactor keeps state")       # its factored 2nd moment: expected
@pytest.mark.parametrize("optim", ["adamw_torch", "sgd", "adafactor"])
def test_the_trainers_own_optimizer_switches_and_loses_the_recycled_first_moments(tmp_path, optim):
    model, callback, trainer = train(tmp_path / "run", max_steps=8, optim=optim, save_steps=1000)
    assert len(callback.events) == 4 * 14
    # The last switch follows the last optimizer step: its recycled rows of A hold zero first moments.
    last = callback.events[-1]
    layer = model.get_submodule(last["layer"])
    for key, value in trainer.optimizer.state.get(layer.lora_A, {}).items():
        if key in ("exp_avg", "momentum_buffer") and torch.is_tensor(value):
            assert value[last["slots"]].abs().max() == 0 and value.abs().max() > 0


class EightBitLike(torch.optim.Optimizer):
    """SGD with momentum kept under bitsandbytes' state name 'state1'."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    m = self.state[p].setdefault("state1", torch.zeros_like(p))
                    m.mul_(0.9).add_(p.grad)
                    p.add_(m, alpha=-group["lr"])


def test_an_optimizer_with_unknown_state_keys_trains_and_is_warned_about_once(tmp_path):
    model = apply_srlora(tiny_llama(0), targets=PAPER_TARGETS["llama"], r=R, r_target=R_TARGET)
    opt = EightBitLike([p for p in model.parameters() if p.requires_grad])
    with pytest.warns(UserWarning, match=r"keeps state \['state1'\]") as warned:
        _, callback, _ = train(tmp_path / "run", max_steps=12, model=model, optimizers=(opt, None), save_steps=1000)
    assert len([w for w in warned if "keeps state" in str(w.message)]) == 1 and len(callback.events) == 4 * 14


# PEFT and TRL on top of SRLoRA: refused at the start -----------------------------------------------

def test_get_peft_model_on_top_of_srlora_is_refused_when_the_trainer_is_made(tmp_path):
    peft = pytest.importorskip("peft")
    model = apply_srlora(tiny_llama(0), targets=PAPER_TARGETS["llama"], r=R, r_target=R_TARGET)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"^SRLoRACallback: .*lora_A does not require grad .*drop peft_config") as e:
        train(tmp_path / "run", max_steps=4, model=wrapped)
    assert "\n" not in str(e.value)


def test_sft_trainer_with_peft_config_on_srlora_is_refused_before_training(tmp_path):
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    datasets = pytest.importorskip("datasets")
    from srlora_hf import SRLoRACallback
    model = apply_srlora(tiny_llama(0), targets=PAPER_TARGETS["llama"], r=R, r_target=R_TARGET)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0", eos_token="t1")
    ds = datasets.Dataset.from_list([{"input_ids": x["input_ids"].tolist()} for x in token_data(8)])
    args = trl.SFTConfig(str(tmp_path), max_steps=2, report_to=[], use_cpu=True, disable_tqdm=True)
    with pytest.raises(ValueError, match=r"^SRLoRACallback: .*SFTTrainer\(peft_config=...\) froze it\); drop"):
        trl.SFTTrainer(model=model, args=args, train_dataset=ds, callbacks=[SRLoRACallback()], processing_class=tokenizer,
                       peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]))


def test_apply_srlora_on_a_peft_model_is_refused_in_one_line_without_suggesting_peft_modules():
    peft = pytest.importorskip("peft")
    from srlora_hf import apply_srlora as hf_apply
    wrapped = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"^apply_srlora: model is a PeftModel, .*without peft_config$") as e:
        hf_apply(wrapped, r=R, r_target=R_TARGET)
    assert "base_layer" not in str(e.value) and "default" not in str(e.value)



def test_the_peft_route_is_refused_in_one_line_that_names_the_srlora_route():
    from srlora_hf import SRLoRAPeftConfig
    with pytest.raises(ValueError, match=r"^SRLoRAPeftConfig: SRLoRA is no PEFT method .*srlora_hf.apply_srlora\(model, "
                                         r"r=\.\.\., r_target=\.\.\.\), .*srlora_hf.from_pretrained\(base, folder\)$") as e:
        SRLoRAPeftConfig(r=8, r_target=64)
    assert "\n" not in str(e.value)

# targets -------------------------------------------------------------------------------------------

def test_a_target_that_matches_nothing_is_refused_and_targets_for_maps_phi3s_fused_projections():
    transformers = pytest.importorskip("transformers")
    from srlora_hf import apply_srlora as hf_apply, targets_for
    torch.manual_seed(0)
    phi3 = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=0))
    with pytest.raises(ValueError, match=r"^apply_srlora: targets \['q_proj', 'k_proj', 'v_proj', 'gate_proj', "
                                         r"'up_proj'\] match no module of Phi3ForCausalLM; targets_for\(model\) gives"):
        hf_apply(phi3, targets=PAPER_TARGETS["llama"], r=R, r_target=R_TARGET)
    hf_apply(phi3, r=R, r_target=R_TARGET)                                   # targets_for(phi3) by default
    assert len(srlora_layers(phi3)) == 2 * len(targets_for(phi3)) == 2 * 4   # every map of every block
    assert targets_for(tiny_llama(0)) == PAPER_TARGETS["llama"]
    with pytest.raises(ValueError, match=r"^targets_for: no targets known for model_type='t5'"):
        targets_for("t5")


# quantized bases -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, quantized", [(4, "keep"), (8, "keep"), (4, "dequantize"), (8, "dequantize")])
def test_a_bitsandbytes_base_is_decomposed_from_its_dequantized_weight_and_its_adapter_replays(tmp_path, bits, quantized):
    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from srlora_hf import QuantizedSRLoRALinear, apply_srlora as hf_apply, dequantized, from_pretrained
    tiny_llama(0).save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(**{f"load_in_{bits}bit": True})
    load = lambda: transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), quantization_config=quant,
                                                                device_map="cpu")
    base = load()
    layer = base.model.layers[0].mlp.down_proj
    assert isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    W = dequantized(layer)
    W_fp32 = tiny_llama(0).model.layers[0].mlp.down_proj.weight
    assert W.shape == W_fp32.shape and (W - W_fp32).abs().max() < (0.2 if bits == 4 else 0.01) * W_fp32.abs().max()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():                            # in train(): bitsandbytes' CPU inference kernel would repack W0
        before = base.train()(ids).logits
    model = hf_apply(base, r=R, r_target=R_TARGET, quantized=quantized)
    wrapped = model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(wrapped.effective_weight(), W, rtol=0, atol=1e-6 * W.abs().max().item())  # PiSSA of that very weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)   # the same function
    if quantized == "keep":                          # W0 stays quantized; nothing of the layer's own is W-sized
        assert isinstance(wrapped, QuantizedSRLoRALinear) and wrapped.base_layer is layer
        assert all(t.numel() < W.numel() for key, t in wrapped.state_dict().items() if not key.startswith("base_layer."))
    else:
        assert type(wrapped).__name__ == "RecordedSRLoRALinear" and wrapped.weight.shape == W.shape
    _, callback, _ = train(tmp_path / "run", max_steps=4, model=model, save_steps=1000)
    assert len(callback.events) == 4 * 14
    if quantized == "keep":                          # the switches and an eval forward left W0 as it was loaded
        logits(model)
        assert not getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)
        assert torch.equal(dequantized(layer), W)
    model.save_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(from_pretrained(str(tmp_path / "base"), tmp_path / "adapter", quantization_config=quant,
                                              device_map="cpu")), logits(model))
    with pytest.raises(ValueError, match=r"^from_pretrained: the adapter was trained on a base with .*quantization_config"):
        from_pretrained(str(tmp_path / "base"), tmp_path / "adapter")        # the unquantized base: another W0


def test_a_kept_quantized_layer_keeps_its_function_at_every_switch_and_computes_its_effective_weight(tmp_path):
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from srlora import ImportanceTracker, recompose
    from srlora_hf import apply_srlora as hf_apply
    tiny_llama(0).save_pretrained(tmp_path / "base")
    model = hf_apply(transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "base"), quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True),
        device_map="cpu"), r=R, r_target=R_TARGET)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tracker, layers = ImportanceTracker(model), [layer for _, layer in srlora_layers(model)]
    for step in range(8):
        model(ids, labels=ids).loss.backward()
        tracker.update(), optimizer.step(), optimizer.zero_grad()
        if step % 2:
            with torch.no_grad():
                before, weights = model(ids).logits, [layer.effective_weight() for layer in layers]
            assert len(recompose(model, tracker, optimizer)) == len(layers)
            with torch.no_grad():
                torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)
            for layer, W in zip(layers, weights):
                torch.testing.assert_close(layer.effective_weight(), W, rtol=0, atol=1e-6)
    assert {layer.next_index for layer in layers} == {R_TARGET}
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():                             # forward = x (W0 + the change + scaling B A)^T
        torch.testing.assert_close(layer(x), x @ layer.effective_weight().T, rtol=0, atol=1e-5)
    from srlora_export import export_lora_adapter
    with pytest.raises(ValueError, match=r"^export_lora_adapter: model\.layers\.0\.self_attn\.q_proj keeps a quantized W0"):
        export_lora_adapter(model, {}, tmp_path / "peft")


def test_a_4bit_layer_repacked_by_a_cpu_forward_is_refused_in_one_line(tmp_path):
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from srlora_hf import apply_srlora as hf_apply
    tiny_llama(0).save_pretrained(tmp_path / "base")
    base = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "base"), quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True), device_map="cpu")
    with torch.no_grad():
        base.model.layers[0].mlp.down_proj(torch.randn(2, 64))             # eval, no grad: the packed CPU kernel
    if not getattr(base.model.layers[0].mlp.down_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU's bitsandbytes kernel does not repack")
    with pytest.raises(ValueError, match=r"^a forward pass on CPU repacked this Linear4bit .*before the model's first forward$"):
        hf_apply(base, r=R, r_target=R_TARGET)
