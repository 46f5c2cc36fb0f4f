"""A tiny causal language model fine-tuned with LoRA on two text tasks in turn, one Hugging Face ``Trainer``
and one ``train()`` per task: how much of task 1 is left after task 2 with no regularizer, with EWC over the
adapter's parameters (attached to the Trainer's optimizer by clreg's callback), and with LwF (in
``ContinualTrainer``'s loss). Needs ``pip install transformers accelerate peft``.

The text is characters, one token each (a dict character -> id, made here). A sample is a rule's letter, five
digits, ``>``, the rule applied to each digit, ``;``:

* pretext ``c40719>40719;``: copy any digits;
* task 1  ``a40213>51324;``: add one, to the digits 0-4;
* task 2  ``s85769>74658;``: subtract one, from the digits 5-9.

Both tasks answer in digits (1-5 and 4-8) with one format, and the natural way to learn task 2 is to turn
task 1's "+1" into a "-1" for every digit. One adapter can hold both: the tasks read different digits, and
the adapter covers the token embeddings too (LoRA on ``embed_tokens`` besides every projection), so each digit
has parameters of its own. The model is a ``LlamaForCausalLM`` built from a config (2 layers, hidden size 64,
random weights), trained in full on the copy pretext (so it knows where each answer digit comes from), then
frozen under the LoRA adapter (r=8), which learns task 1, then task 2, 100 steps each.

Score: the per-digit accuracy of the answers of 500 held-out prompts per task, each answer digit predicted from
the prompt and the true digits before it (teacher forcing, one forward pass).

What the figures show: naive fine-tuning learns task 2 and forgets most of task 1 (the adapter's change
reaches digits 0-4 too); EWC keeps task 1 and learns task 2 (its Fisher, over the adapter alone, marks the
shared weights and task 1's digits, and task 2 goes through the rest); LwF keeps part of task 1: it distils
the task-1 adapter on task 2's prompts only, digits 5-9, which say little about 0-4. EWC's Fisher is divided
by its mean (``normalize="mean"``): the adapter is almost sure of task 1's answers by the end of it, so the
raw Fisher is tiny and its scale changes with the training's length. λ=10 and α=1 were picked by hand, a few
values each, on these held-out prompts: a demonstration, not a benchmark. With other seeds EWC's figures were
the same, how much naive fine-tuning forgets varied (task 1 from 0.2 to 0.6), and LwF's too.

python examples/lora_causal_lm.py          # under a minute on a 2-core CPU
python examples/lora_causal_lm.py --smoke  # a few steps
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import warnings

import peft
import torch
import transformers
from torch import nn
from transformers.trainer_callback import PrinterCallback

import clreg
from clreg.integrations.causal_lm import causal_lm_batches, causal_lm_spec
from clreg.integrations.peft import adapter_params
from clreg.integrations.transformers import ContinualCallback, ContinualTrainer

DIGITS = 5
PROMPT = DIGITS + 2  # the rule's letter, the digits, ">"
VOCAB = {c: i for i, c in enumerate("_0123456789cas>;")}  # "_" pads (unused: every sample has one length)
RULES = {
    "c": lambda s: s,
    "a": lambda s: "".join(str(int(d) + 1) for d in s),  # on the digits 0-4 only
    "s": lambda s: "".join(str(int(d) - 1) for d in s),  # on the digits 5-9 only
}
LORA_MODULES = ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Items = list[dict[str, torch.Tensor]]


def encode(rule: str, digits: list[str]) -> Items:
    """The Trainer's items: the prompt's labels are -100, so the loss (and the Fisher) reads the answers."""
    items = []
    for s in digits:
        ids = torch.tensor([VOCAB[c] for c in f"{rule}{s}>{RULES[rule](s)};"])
        labels = ids.clone()
        labels[:PROMPT] = -100
        items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return items


def make_task(rule: str, alphabet: str, seed: int, n_train: int, n_test: int) -> tuple[Items, Items]:
    """Training and held-out prompts: distinct strings of ``DIGITS`` characters of ``alphabet``."""
    k = len(alphabet)
    numbers = random.Random(seed).sample(range(k**DIGITS), n_train + n_test)
    digits = ["".join(alphabet[x // k**i % k] for i in range(DIGITS)) for x in numbers]
    return encode(rule, digits[:n_train]), encode(rule, digits[n_train:])


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=16, pad_token_id=0, bos_token_id=None,
                                      eos_token_id=None, tie_word_embeddings=False)  # fmt: skip
    config._attn_implementation = "eager"  # the Fisher's vmap has no batching rule for the CPU's SDPA kernel
    return transformers.LlamaForCausalLM(config)


def digit_accuracy(model: nn.Module, data: Items) -> float:
    """The answer digits' next-token accuracy, teacher forced (position t predicts token t + 1)."""
    ids = torch.stack([item["input_ids"] for item in data])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, PROMPT - 1 : PROMPT - 1 + DIGITS]
    return (logits.argmax(-1) == ids[:, PROMPT : PROMPT + DIGITS]).float().mean().item()


def train(model: nn.Module, data: Items, steps: int, out: str, continual: ContinualCallback | None = None) -> None:
    args = transformers.TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=64,
                                          learning_rate=3e-3, lr_scheduler_type="constant", weight_decay=0.0,
                                          label_names=["labels"], use_cpu=True, report_to=[], save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip
    if continual is None:
        trainer = transformers.Trainer(model, args, train_dataset=data)
    else:  # at the end of train() the callback consolidates on the Trainer's training loader
        trainer = ContinualTrainer(model, args, train_dataset=data, continual=continual)
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def regularizer(method: str, model: nn.Module) -> ContinualCallback | None:
    if method == "naive":
        return None
    params = adapter_params(model)  # the LoRA matrices alone
    if method == "ewc":  # each task's Fisher divided by its mean: λ pulls a parameter of mean importance
        reg = clreg.EWC(model, lam=10.0, params=params, normalize="mean")
    else:  # the teacher: the adapter at the end of task 1, run on the frozen base
        reg = clreg.LwF(model, alpha=1.0, params=params, teacher_params="selected")
    # the token logits (B, L, V), labels one ahead, -100 ignored; the Trainer's dict batches as clreg's
    return ContinualCallback(reg, spec=causal_lm_spec(), batches=causal_lm_batches)


def run(method: str, base: nn.Module, tasks: list[tuple[Items, Items]], steps: int, out: str) -> list[float]:
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_MODULES)
    model = peft.get_peft_model(copy.deepcopy(base), lora)  # the base frozen, the adapter trains
    continual = regularizer(method, model)
    for t, (train_items, _) in enumerate(tasks):
        train(model, train_items, steps, f"{out}/{method}/task{t + 1}", continual)
    return [digit_accuracy(model, test) for _, test in tasks]


def pretrain(n: int, steps: int, out: str) -> transformers.LlamaForCausalLM:
    """The base model, trained in full on the pretext: copy any five digits."""
    torch.manual_seed(0)
    model = tiny_llama()
    train(model, make_task("c", "0123456789", 0, n, 0)[0], steps, out)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)  # peft's call
    torch.set_num_threads(1)  # a model this small gains nothing from a second thread
    n_train, n_test, pre_steps, steps = (200, 100, 5, 3) if args.smoke else (2000, 500, 300, 100)
    tasks = [make_task("a", "01234", 1, n_train, n_test), make_task("s", "56789", 2, n_train, n_test)]
    scores = {}
    with tempfile.TemporaryDirectory() as out:
        base = pretrain(2 * n_train, pre_steps, f"{out}/pretext")
        for method in ("naive", "ewc", "lwf"):
            scores[method] = run(method, base, tasks, steps, out)
            print(f"{method:<8} task 1 {scores[method][0]:.3f}  task 2 {scores[method][1]:.3f}", flush=True)
    print(f"task 1 kept: naive {scores['naive'][0]:.3f} vs EWC {scores['ewc'][0]:.3f}")


if __name__ == "__main__":
    main()
